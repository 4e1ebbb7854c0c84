"""Crash points for fault-injection tests (like faiss.contrib's ``crash_at``).

Set ``DEDUP_CRASH_AT=<point>[#<n>]`` and the process SIGKILLs itself the n-th time (default:
first) it passes ``<point>``. Points: ``features:shard_done`` (parent, after a shard's marker),
``features:before_marker`` (worker, features file written, marker not yet),
``candidates:before_write``, ``write:<file name>`` (temp file written, not yet renamed into
place; e.g. ``write:manifest.parquet``; a manifest of parts: all parts and ``_parts.json``
written under the temp name, not yet renamed), ``write:manifest.parquet/part-00001.parquet``
(that part written, the next not begun), ``ray:unit`` (a Ray worker, at the start of each
``RayExecutor.map_units`` task: the candidate search's and the outlier score's work units; a
Ray worker sees the environment of the node it runs on, not the driver's). Unset in normal
use: one dict lookup per call.

``DEDUP_DELAY_AT=<point>[#<n>]=<seconds>[,...]`` sleeps at ``<point>`` instead (every pass, or
only the n-th), to hold a run there while a test signals it; with ``DEDUP_DELAY_FLAG=<file>``
the file is created (one line per delay: point and pid) when a delay starts.
"""

from __future__ import annotations

import os
import signal
import time

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    if os.environ.get("DEDUP_DELAY_AT"):
        _delay(name, os.environ["DEDUP_DELAY_AT"])
    spec = os.environ.get("DEDUP_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _delay(name: str, spec: str) -> None:
    for item in spec.split(","):
        where, _, seconds = item.rpartition("=")
        point, _, nth = where.partition("#")
        if point != name:
            continue
        key = "delay:" + name
        _seen[key] = _seen.get(key, 0) + 1
        if nth and _seen[key] != int(nth):
            continue
        flag = os.environ.get("DEDUP_DELAY_FLAG")
        if flag:
            with open(flag, "a") as f:
                f.write(f"{name} {os.getpid()}\n")
        time.sleep(float(seconds))
