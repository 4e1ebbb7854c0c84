"""The result type of every candidate search (:class:`Pairs`) and the utilities that build,
merge and re-index pair sets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Pairs",
    "canonical_pairs",
    "collect_tiles",
    "merge_pairs",
    "remap_rows",
    "valid_rows",
]

_I64 = np.int64
_F32 = np.float32


@dataclass(frozen=True)
class Pairs:
    """Candidate pairs: ``i < j`` always, sorted by ``(i, j)``, no duplicates.

    ``score`` is the cosine for embeddings, the Hamming distance for hashes, 1.0 for exact.
    """

    i: np.ndarray  # int64
    j: np.ndarray  # int64
    score: np.ndarray  # float32

    @classmethod
    def empty(cls) -> Pairs:
        return cls(np.empty(0, _I64), np.empty(0, _I64), np.empty(0, _F32))

    def __len__(self) -> int:
        return len(self.i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pairs):
            return NotImplemented
        return (
            np.array_equal(self.i, other.i)
            and np.array_equal(self.j, other.j)
            and np.array_equal(self.score, other.score)
        )

    __hash__ = None  # type: ignore[assignment]


def canonical_pairs(i: np.ndarray, j: np.ndarray, score: np.ndarray) -> Pairs:
    """Orient (i < j), drop self pairs, sort by (i, j) and drop duplicates (first score kept)."""
    i = np.asarray(i, _I64)
    j = np.asarray(j, _I64)
    score = np.asarray(score, _F32)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = lo != hi
    if not keep.all():
        lo, hi, score = lo[keep], hi[keep], score[keep]
    if len(lo) == 0:
        return Pairs.empty()
    order = np.lexsort((hi, lo))
    lo, hi, score = lo[order], hi[order], score[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    if not first.all():
        lo, hi, score = lo[first], hi[first], score[first]
    return Pairs(lo, hi, score)


def merge_pairs(parts: Iterable[Pairs]) -> Pairs:
    """Union of pair sets (e.g. the per-unit results of :func:`unit_pairs`), canonical order.

    A pair found by two units carries the same (exact) score in both, so which copy is kept
    does not matter.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return Pairs.empty()
    if len(parts) == 1:
        p = parts[0]
        return canonical_pairs(p.i, p.j, p.score)
    return canonical_pairs(
        np.concatenate([p.i for p in parts]),
        np.concatenate([p.j for p in parts]),
        np.concatenate([p.score for p in parts]),
    )


def remap_rows(p: Pairs, rows: np.ndarray | None) -> Pairs:
    """Map pair indices from a compacted (valid-only) array back to original rows.

    ``rows`` is increasing, so order and orientation are preserved."""
    if rows is None or len(p) == 0:
        return p
    return Pairs(rows[p.i], rows[p.j], p.score)


def valid_rows(n: int, valid: np.ndarray | None) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, bool)
    if valid.shape != (n,):
        raise ValueError(f"valid must be a bool mask of shape ({n},), got {valid.shape}")
    return np.flatnonzero(valid).astype(_I64)


def collect_tiles(parts: list) -> Pairs:
    """Pairs from tile results ``(rows, columns, scores)`` (None: a tile without any), canonical."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return Pairs.empty()
    return canonical_pairs(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2] for p in parts]))
