"""Exact duplicates: rows with identical sha256 digests, as a star per group."""

from __future__ import annotations

import numpy as np

from dedup.compute.search.pairs import Pairs

__all__ = [
    "exact_pairs",
]

_I64 = np.int64
_F32 = np.float32


def exact_pairs(digests: np.ndarray) -> Pairs:
    """Pairs of rows with identical digests, as a STAR per group.

    ``digests``: (n, 32) uint8 (any fixed width works). For a group of identical digests with
    rows ``r0 < r1 < … < rk`` this returns ``(r0, r1), (r0, r2), …, (r0, rk)`` — k pairs, not
    k·(k+1)/2 — each with score 1.0. The star connects the group exactly like all pairs would
    (and every member *is* a duplicate of ``r0``), at linear size.
    """
    a = np.ascontiguousarray(digests, dtype=np.uint8)
    n = a.shape[0] if a.ndim else 0
    if n < 2:
        return Pairs.empty()
    a = a.reshape(n, -1)
    keys = a.view(np.dtype((np.void, a.shape[1]))).ravel()
    order = np.argsort(keys, kind="stable")  # equal digests keep row order
    sk = keys[order]
    new_group = np.ones(n, bool)
    new_group[1:] = sk[1:] != sk[:-1]
    group_first = order[np.flatnonzero(new_group)]  # smallest row of each group (stable)
    gid = np.cumsum(new_group) - 1
    root = group_first[gid]  # per sorted position
    sel = root != order
    i, j = root[sel].astype(_I64), order[sel].astype(_I64)
    o = np.lexsort((j, i))
    return Pairs(i[o], j[o], np.ones(len(o), _F32))
