"""Where the per-shard work of the features phase runs: :mod:`dedup.executors.local` (this
process or a process pool) or :mod:`dedup.executors.ray` (a Ray cluster). Both yield one
:class:`ShardResult` per shard as it finishes."""

from __future__ import annotations

from dataclasses import dataclass

from dedup.records import ShardRef


@dataclass(frozen=True)
class ShardResult:
    """One shard through the features phase: its done marker (the worker wrote the files), or
    why it failed after every retry."""

    ref: ShardRef
    marker: dict | None  # the shard's done/<shard>.json; None when it failed
    error: str | None = None  # "ExceptionType: message" when it failed
