"""Exact duplicates: rows with identical sha256 digests, as a star per group."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dedup.compute.search.pairs import Pairs

__all__ = [
    "digest_groups",
    "digest_prefixes",
    "exact_pairs",
    "star_pairs",
]

_I64 = np.int64
_F32 = np.float32


def digest_groups(prefix: np.ndarray, full: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The rows that share their whole digest with another row, and a group id for each.

    ``prefix``: (n,) uint64, each row's digest's first 8 bytes; ``full(rows)``: the whole
    digests of ``rows`` (increasing) as (len(rows), w) uint8. Only rows whose prefix repeats
    are read whole, and those are compared byte for byte: equal prefixes of different digests
    (about n²/2⁶⁵ of them at random) never join a group. Returns ``(rows, gid)``: rows in groups
    of two or more, sorted by group then row, and group ids 0, 1, … in that order. Holds ~24
    bytes a row (the sort of the prefixes) instead of the digests themselves (32+ bytes a row,
    sorted: ~100)."""
    prefix = np.asarray(prefix, np.uint64)
    n = len(prefix)
    empty = (np.empty(0, _I64), np.empty(0, _I64))
    if n < 2:
        return empty
    order = np.argsort(prefix, kind="stable")
    sk = prefix[order]
    eq = sk[1:] == sk[:-1]
    del sk
    rep = np.zeros(n, bool)
    rep[1:] |= eq
    rep[:-1] |= eq
    cand = np.sort(order[rep]).astype(_I64)  # rows whose prefix repeats, increasing
    del order, rep, eq
    if len(cand) < 2:
        return empty
    a = np.ascontiguousarray(full(cand), dtype=np.uint8).reshape(len(cand), -1)
    keys = a.view(np.dtype((np.void, a.shape[1]))).ravel()
    o = np.argsort(keys, kind="stable")  # equal digests keep row order
    sk = keys[o]
    new_group = np.ones(len(o), bool)
    new_group[1:] = sk[1:] != sk[:-1]
    gid = np.cumsum(new_group) - 1
    size = np.bincount(gid)
    keep = size[gid] >= 2  # a prefix shared with another digest only: alone
    gid = gid[keep]
    _, gid = np.unique(gid, return_inverse=True)  # 0, 1, … (gid is non-decreasing)
    return cand[o][keep], gid.astype(_I64)


def star_pairs(rows: np.ndarray, gid: np.ndarray) -> Pairs:
    """Each group of :func:`digest_groups` as a star from its smallest row, sorted by (i, j)."""
    if len(rows) == 0:
        return Pairs.empty()
    first = np.ones(len(rows), bool)
    first[1:] = gid[1:] != gid[:-1]
    root = rows[np.flatnonzero(first)][gid]  # rows increase within a group: its first is its smallest
    sel = root != rows
    i, j = root[sel].astype(_I64), rows[sel].astype(_I64)
    o = np.lexsort((j, i))
    return Pairs(i[o], j[o], np.ones(len(o), _F32))


def exact_pairs(digests: np.ndarray) -> Pairs:
    """Pairs of rows with identical digests, as a STAR per group.

    ``digests``: (n, 32) uint8 (any fixed width works). For a group of identical digests with
    rows ``r0 < r1 < … < rk`` this returns ``(r0, r1), (r0, r2), …, (r0, rk)`` — k pairs, not
    k·(k+1)/2 — each with score 1.0. The star connects the group exactly like all pairs would
    (and every member *is* a duplicate of ``r0``), at linear size. (The run's exact search
    passes the sha256 column's prefixes and reads the whole digests of the few rows whose
    prefixes repeat: :func:`digest_groups`.)
    """
    a = np.ascontiguousarray(digests, dtype=np.uint8)
    n = a.shape[0] if a.ndim else 0
    if n < 2:
        return Pairs.empty()
    a = a.reshape(n, -1)
    return star_pairs(*digest_groups(digest_prefixes(a), lambda r: a[r]))


def digest_prefixes(a: np.ndarray) -> np.ndarray:
    """(n, w) uint8 digests → (n,) uint64 of their first 8 bytes (zero-padded when w < 8)."""
    head = np.zeros((len(a), 8), np.uint8)
    w = min(8, a.shape[1])
    head[:, :w] = a[:, :w]
    return head.view("<u8").reshape(-1)
