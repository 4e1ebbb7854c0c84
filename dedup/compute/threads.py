"""How many threads a model's CPU inference may use in this process."""

from __future__ import annotations

import os

__all__ = ["cpu_threads"]


def cpu_threads() -> int:
    """Threads for a model's CPU inference: ``OMP_NUM_THREADS`` when set (the local executor
    sets it to cores / workers in each worker), else the cores this process may run on (its
    CPU affinity, which taskset, cgroup cpusets and Ray restrict) — not the machine's core
    count, onnxruntime's default, which oversubscribes a process given fewer cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)
