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


@dataclass(frozen=True)
class Edges:
    """Undirected duplicate edges between sample indices (any order, duplicates allowed)."""

    i: np.ndarray  # int64
    j: np.ndarray  # int64
    method: np.ndarray  # int8 index into dedup.records.METHODS
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
    method: np.ndarray  # int8: METHODS index of the edge to the keeper; -1 if none
    score: np.ndarray  # float32: score of that edge; NaN if none
    size: np.ndarray  # int32: size of the sample's cluster; 0 for excluded samples


@dataclass(frozen=True)
class TouchedClusters:
    """Clusters held for the rows some link touches only: ``rows`` (increasing) and ``sub``,
    the clusters over them (``sub.keeper`` an index into ``rows``); every other ``valid`` row is
    its own keeper (a cluster of one), every invalid row in none. About 30 bytes a touched row
    (int64 row and keeper, size, score, method, flag) instead of that for every row of the run;
    :meth:`slice` gives a row range's :class:`Clusters` (as the manifest writes them)."""

    rows: np.ndarray  # int64, increasing
    sub: Clusters
    valid: np.ndarray  # bool, every row

    def slice(self, s: int, e: int) -> Clusters:
        v = self.valid[s:e]
        keeper = np.where(v, np.arange(s, e, dtype=np.int64), -1)
        method = np.full(e - s, -1, np.int8)
        score = np.full(e - s, np.nan, np.float32)
        size = v.astype(np.int32)
        is_keeper = v.copy()
        a, b = np.searchsorted(self.rows, [s, e])
        at = self.rows[a:b] - s
        sk = self.sub.keeper[a:b]
        keeper[at] = np.where(sk >= 0, self.rows[np.maximum(sk, 0)], -1)
        method[at], score[at] = self.sub.method[a:b], self.sub.score[a:b]
        size[at], is_keeper[at] = self.sub.size[a:b], self.sub.is_keeper[a:b]
        return Clusters(keeper=keeper, is_keeper=is_keeper, method=method, score=score, size=size)

    def dense(self) -> Clusters:
        return self.slice(0, len(self.valid))


def rank_order(columns: list[tuple[np.ndarray, bool]]) -> np.ndarray:
    """Rank of each sample (0 = best) from (values, descending) sort keys, first key first;
    missing values (NaN) last; samples equal on every key keep their order (row order).

    One stable sort per key, the last key first (the order ``np.lexsort`` gives, without
    holding every key's float64 copy at once: ~4 int64/float64 arrays of the rows at a time)."""
    if not columns:
        raise ValueError("at least one rank column is needed")
    n = len(np.asarray(columns[0][0]))
    order = np.arange(n, dtype=np.int64)
    for values, descending in reversed(columns):
        v = np.asarray(values)
        if v.dtype.kind in "US":  # strings: rank them first, then sort the integer ranks
            _, v = np.unique(v, return_inverse=True)
        v = np.asarray(v[order], np.float64)  # (a copy: v[order] is one)
        v[np.isnan(v)] = -np.inf if descending else np.inf  # missing values last
        if descending:
            np.negative(v, out=v)
        order = order[np.argsort(v, kind="stable")]
        del v
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return rank


def _singletons(n: int, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keeper, method, score) before any link: every valid sample its own keeper."""
    return np.where(valid, np.arange(n), -1).astype(np.int64), np.full(n, -1, np.int8), np.full(n, np.nan, np.float32)


def _valid_edges(edges: Edges, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, method, score) of the edges between two different valid samples."""
    i, j = edges.i.astype(np.int64), edges.j.astype(np.int64)
    keep = (i != j) & valid[i] & valid[j] if len(i) else np.zeros(0, bool)
    return i[keep], j[keep], edges.method[keep], edges.score[keep]


def keeper_clusters(n: int, edges: Edges, rank: np.ndarray, valid: np.ndarray | None = None, keep_per_cluster: int = 1) -> Clusters:
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    keeper, method, score = _singletons(n, valid)
    i, j, em, es = _valid_edges(edges, valid)
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
    return _finish(n, keeper, method, score, rank, keep_per_cluster)


def components(n: int, edges: Edges, valid: np.ndarray) -> np.ndarray:
    """Connected-component label of each sample over the edges between valid samples
    (-1 for invalid samples). Labels are the smallest member index of each component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j, _, _ = _valid_edges(edges, valid)
    g = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    first = np.full(lab.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(first, lab, np.arange(n))
    out = first[lab]
    return np.where(valid, out, -1)


def group_clusters(
    n: int, edges: Edges, rank: np.ndarray, valid: np.ndarray | None = None, keep_per_cluster: int = 1,
    centrality=None, joins=None, tolerance: float = 0.02,
) -> Clusters:
    """Clusters that keep a group whole: connected components of the verified links, with the
    component's most representative member as keeper — the most linked members (at least 80 %
    of the most links), of those the most central, of those the best by the keeper policy's rank —
    and a member joins
    its component's keeper when it is linked to it directly or ``joins`` finds it close enough
    to the keeper; members that do neither are clustered among themselves by
    :func:`keeper_clusters` (keeper-centred: never joined through a chain of unrelated images).

    ``centrality(members) -> float array``: how well each member represents the component's
    most linked members (e.g. cosine to their mean embedding); members within ``tolerance`` of
    the best are tied and the rank decides between them. ``joins(members, keeper) -> (ok, method,
    score)``: the relaxed check of each member against the keeper, with the METHODS
    index and score to report (None: direct links only)."""
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    lab = components(n, edges, valid)
    keeper, method, score = _singletons(n, valid)
    # best direct link (method priority first) of every linked pair, reported against the keeper
    i, j, em, es = _valid_edges(edges, valid)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    o = np.lexsort((em, hi, lo))
    first = np.ones(len(o), bool)
    first[1:] = (lo[o][1:] != lo[o][:-1]) | (hi[o][1:] != hi[o][:-1])
    o = o[first]
    # the linked pairs as sorted integer keys lo·n + hi (n ≤ 3·10⁹ fits int64), with their best
    # link: 13 B a pair instead of a dict of Python tuples (~200 B a pair)
    link_key = lo[o] * np.int64(n) + hi[o]
    link_m, link_s = em[o], es[o]

    sizes = np.bincount(np.maximum(lab, 0), minlength=n)
    multi = np.flatnonzero(valid & (sizes[np.maximum(lab, 0)] > 1))
    order = multi[np.argsort(lab[multi], kind="stable")]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(lab[order])) + 1, [len(order)]]) if len(order) else np.zeros(1, np.int64)
    groups = (order[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()))  # one component at a time
    degree = np.bincount(lo[o], minlength=n) + np.bincount(hi[o], minlength=n)  # distinct direct links
    # per component: its keeper, and what ``joins`` says of each member (integer arrays a row)
    comp_keeper = np.full(n, -1, np.int64)
    joined = np.zeros(n, bool)
    join_m, join_s = np.full(n, -1, np.int8), np.full(n, np.nan, np.float32)
    for members in groups:
        # the most linked members (at least 80 % of the most links), then the most central of
        # them, then the rank
        deg = degree[members]
        cand = members[deg >= 0.8 * deg.max()]
        if centrality is not None and len(cand) > 1:
            cen = np.asarray(centrality(cand), np.float64)
            cand = cand[cen >= cen.max() - tolerance]
        k = int(cand[np.argmin(rank[cand])])
        comp_keeper[members] = k
        if joins is not None:
            ok, jm, js = joins(members, k)
            joined[members] = np.asarray(ok, bool)
            join_m[members], join_s[members] = jm, js
    # every member's direct link to its keeper, if any, in one lookup: it wins over a join
    mem = order
    k_of = comp_keeper[mem]
    want = np.minimum(mem, k_of) * np.int64(n) + np.maximum(mem, k_of)
    at = np.minimum(np.searchsorted(link_key, want), max(len(link_key) - 1, 0))
    is_k = mem == k_of
    direct = (link_key[at] == want) & ~is_k if len(link_key) else np.zeros(len(mem), bool)
    via_join = joined[mem] & ~direct & ~is_k
    method[mem[direct]], score[mem[direct]] = link_m[at[direct]], link_s[at[direct]]
    method[mem[via_join]], score[mem[via_join]] = join_m[mem[via_join]], join_s[mem[via_join]]
    ok = direct | via_join | is_k
    keeper[mem[ok]] = k_of[ok]
    rest_mask = np.zeros(n, bool)
    rest_mask[mem[~ok]] = True
    if rest_mask.any():  # keeper-centred among themselves (no edges cross components)
        sub = keeper_clusters(n, edges, rank, valid=rest_mask, keep_per_cluster=1)
        keeper[rest_mask] = sub.keeper[rest_mask]
        method[rest_mask], score[rest_mask] = sub.method[rest_mask], sub.score[rest_mask]
    return _finish(n, keeper, method, score, rank, keep_per_cluster)


def _finish(n: int, keeper: np.ndarray, method: np.ndarray, score: np.ndarray, rank: np.ndarray, keep_per_cluster: int) -> Clusters:
    """Sizes and keepers (with ``keep_per_cluster - 1`` extra copies, best-ranked first)."""
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
