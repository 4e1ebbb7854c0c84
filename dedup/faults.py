"""Crash points for fault-injection tests (like faiss.contrib's ``crash_at``).

Set ``DEDUP_CRASH_AT=<point>[#<n>]`` and the process SIGKILLs itself the n-th time (default:
first) it passes ``<point>``. Points: ``features:shard_done`` (parent, after a shard's marker),
``features:before_marker`` (worker, features file written, marker not yet),
``candidates:before_write``, ``write:<file name>`` (temp file written, not yet renamed into
place; e.g. ``write:manifest.parquet``). Unset in normal use: one dict lookup per call.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("DEDUP_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
