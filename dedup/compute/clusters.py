"""Keeper-centred clusters (DESIGN.md §5).

Connected components chain: A~B and B~C join A and C even when they look nothing alike. We
instead visit samples best-first by the keeper policy and attach each sample to the
best-ranked *keeper* it is itself a duplicate of; a sample with no keeper among its
duplicates becomes a keeper. So every member of a cluster is a direct duplicate of its
keeper, never a duplicate of a duplicate.

Pure numpy in, numpy out; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# When one pair is found by several methods, the manifest reports the first of these.
METHOD_PRIORITY = ("exact", "phash", "dhash", "embedding")


@dataclass(frozen=True)
class Edges:
    """Undirected duplicate edges between sample indices (any order, duplicates allowed)."""

    i: np.ndarray  # int64
    j: np.ndarray  # int64
    method: np.ndarray  # int8 index into METHOD_PRIORITY
    score: np.ndarray  # float32

    @classmethod
    def empty(cls) -> Edges:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int8), np.empty(0, np.float32))

    @classmethod
    def concat(cls, parts: list[Edges]) -> Edges:
        parts = [p for p in parts if len(p.i)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("i", "j", "method", "score")))


@dataclass(frozen=True)
class Clusters:
    keeper: np.ndarray  # int64: index of the cluster's primary keeper; -1 for excluded samples
    is_keeper: np.ndarray  # bool: kept (primary keeper or one of keep_per_cluster-1 extra copies)
    method: np.ndarray  # int8: METHOD_PRIORITY index of the edge to the keeper; -1 if none
    score: np.ndarray  # float32: score of that edge; NaN if none
    size: np.ndarray  # int32: size of the sample's cluster; 0 for excluded samples


def rank_order(columns: list[tuple[np.ndarray, bool]]) -> np.ndarray:
    """Rank of each sample (0 = best) from (values, descending) sort keys, first key first.

    The last key should be unique (sample_id) so the order is total and deterministic.
    """
    if not columns:
        raise ValueError("at least one rank column is needed")
    keys = []
    for values, descending in reversed(columns):  # np.lexsort: last key is primary
        v = np.asarray(values)
        if v.dtype.kind in "US":  # strings: rank them first, then sort the integer ranks
            _, v = np.unique(v, return_inverse=True)
        v = v.astype(np.float64)
        v = np.where(np.isnan(v), -np.inf if descending else np.inf, v)  # missing values last
        keys.append(-v if descending else v)
    order = np.lexsort(keys)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def keeper_clusters(n: int, edges: Edges, rank: np.ndarray, valid: np.ndarray | None = None, keep_per_cluster: int = 1) -> Clusters:
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    keeper = np.where(valid, np.arange(n), -1).astype(np.int64)
    method = np.full(n, -1, np.int8)
    score = np.full(n, np.nan, np.float32)

    i, j = edges.i.astype(np.int64), edges.j.astype(np.int64)
    keep = (i != j) & valid[i] & valid[j] if len(i) else np.zeros(0, bool)
    i, j, em, es = i[keep], j[keep], edges.method[keep], edges.score[keep]
    if len(i):
        # One directed edge per (u, v, method priority); best method first per (u, v).
        u = np.concatenate([i, j])
        v = np.concatenate([j, i])
        m = np.concatenate([em, em])
        s = np.concatenate([es, es])
        order = np.lexsort((m, v, u))
        u, v, m, s = u[order], v[order], m[order], s[order]
        first = np.ones(len(u), bool)
        first[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
        u, v, m, s = u[first], v[first], m[first], s[first]
        starts = np.searchsorted(u, np.arange(n + 1))
        is_k = np.zeros(n, bool)
        touched = np.unique(u)
        for a in touched[np.argsort(rank[touched], kind="stable")]:
            lo, hi = starts[a], starts[a + 1]
            nb = v[lo:hi]
            cand = nb[is_k[nb] & (rank[nb] < rank[a])]
            if len(cand):
                best = cand[np.argmin(rank[cand])]
                k = lo + np.flatnonzero(nb == best)[0]
                keeper[a], method[a], score[a] = best, m[k], s[k]
            else:
                is_k[a] = True
    size = np.zeros(n, np.int32)
    ok = keeper >= 0
    counts = np.bincount(keeper[ok], minlength=n)
    size[ok] = counts[keeper[ok]]

    is_keeper = ok & (keeper == np.arange(n))
    if keep_per_cluster > 1:
        members = np.flatnonzero(ok & ~is_keeper)
        order = members[np.lexsort((rank[members], keeper[members]))]
        if len(order):
            grp = keeper[order]
            new = np.ones(len(order), bool)
            new[1:] = grp[1:] != grp[:-1]
            idx = np.arange(len(order))
            pos = idx - np.maximum.accumulate(np.where(new, idx, 0))
            is_keeper[order[pos < keep_per_cluster - 1]] = True
    return Clusters(keeper=keeper, is_keeper=is_keeper, method=method, score=score, size=size)
