"""Candidate duplicate pairs: exact groups, Hamming radius on 64-bit hashes, cosine on embeddings.

Pure functions over numpy arrays (vectors may be a float16 ``np.memmap``); no I/O.

* **exact**: group equal sha256 digests; each copy is paired with its group's first index (a
  star: g-1 pairs for a group of g, not g(g-1)/2).
* **hashes**: multi-index hashing. Split the 64 bits into ``radius + 1`` chunks; by the
  pigeonhole principle two hashes within ``radius`` bits agree exactly on at least one chunk.
  Bucket by each chunk value (a sort), enumerate pairs inside buckets, verify the full
  distance exactly, de-duplicate.
* **embeddings**: FAISS IVF bucketing. Train a k-means coarse quantizer on a sample, give each
  vector its ``nprobe`` nearest lists (its first list is its *home*), and inside each list
  compare the home vectors against every vector that probes the list, as blocked matrix
  products. A pair is found when either vector's home list is among the other's probed lists,
  so pairs split by a list boundary are still caught. Each list is an independent unit of
  work (:func:`plan_embedding_units` / :func:`pairs_in_units`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

BRUTE_FORCE_MAX = 20_000  # below this many valid vectors, exact blockwise search is cheaper


@dataclass(frozen=True)
class Pairs:
    i: np.ndarray  # int64, i < j
    j: np.ndarray  # int64
    score: np.ndarray  # float32

    @classmethod
    def empty(cls) -> Pairs:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    def __len__(self) -> int:
        return len(self.i)


def _finish(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> Pairs:
    """Order each pair (i < j), drop self-pairs and duplicates, sort by (i, j)."""
    if len(i) == 0:
        return Pairs.empty()
    i, j = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    keep = i != j
    i, j, s = i[keep], j[keep], np.asarray(s, np.float32)[keep]
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return Pairs(i[first], j[first], s[first])


def _concat(parts: Iterable[Pairs]) -> Pairs:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Pairs.empty()
    return _finish(np.concatenate([p.i for p in parts]), np.concatenate([p.j for p in parts]), np.concatenate([p.score for p in parts]))


# -- exact ------------------------------------------------------------------------------------
def exact_pairs(digests: np.ndarray) -> Pairs:
    d = np.ascontiguousarray(digests, dtype=np.uint8)
    if len(d) < 2:
        return Pairs.empty()
    keys = d.view(np.dtype((np.void, d.shape[1]))).ravel()
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    new = np.ones(len(sk), bool)
    new[1:] = sk[1:] != sk[:-1]
    group_first = order[np.maximum.accumulate(np.where(new, np.arange(len(sk)), 0))]
    dup = ~new
    return _finish(group_first[dup], order[dup], np.ones(int(dup.sum()), np.float32))


# -- hashes -----------------------------------------------------------------------------------
def popcount64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    b = x.view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(b, axis=-1).sum(axis=-1).astype(np.int64)


def _chunks(radius: int, bits: int = 64) -> list[tuple[int, int]]:
    m = min(radius + 1, bits)
    edges = [round(k * bits / m) for k in range(m + 1)]
    return [(edges[k], edges[k + 1] - edges[k]) for k in range(m)]


def hash_pairs(hashes: np.ndarray, radius: int, valid: np.ndarray | None = None, max_bucket_pairs: int = 20_000_000) -> Pairs:
    h = np.asarray(hashes, np.uint64)
    idx = np.arange(len(h)) if valid is None else np.flatnonzero(valid)
    if len(idx) < 2:
        return Pairs.empty()
    hv = h[idx]
    parts = []
    for shift, width in _chunks(radius):
        key = (hv >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        ends = np.r_[starts[1:], len(sk)]
        sizes = ends - starts
        for s0, e0 in zip(starts[sizes > 1], ends[sizes > 1]):
            members = order[s0:e0]
            # All pairs inside the bucket, in slabs so memory stays bounded.
            slab = max(1, max_bucket_pairs // len(members))
            for a0 in range(0, len(members), slab):
                a = members[a0 : a0 + slab]
                d = popcount64(hv[a][:, None] ^ hv[members][None, :])
                ai, bj = np.nonzero(d <= radius)
                sel = a[ai] < members[bj]
                if sel.any():
                    parts.append(Pairs(idx[a[ai[sel]]], idx[members[bj[sel]]], d[ai[sel], bj[sel]].astype(np.float32)))
    return _concat(parts)


# -- embeddings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class IVFParams:
    nlist: int
    nprobe: int
    train_size: int
    block_size: int = 4096
    seed: int = 1234
    niter: int = 20
    use_gpu: bool | None = None  # None = when faiss has a GPU

    @classmethod
    def auto(cls, n: int, d: int) -> IVFParams:
        nlist = int(min(max(1, round(4 * math.sqrt(max(n, 1)))), max(1, n // 50)))
        nprobe = 1 if nlist == 1 else min(nlist, 8)
        return cls(nlist=nlist, nprobe=nprobe, train_size=min(n, max(nlist * 64, 10_000)))


def brute_force_pairs(x: np.ndarray, threshold: float, block: int = 4096, valid: np.ndarray | None = None) -> Pairs:
    idx = np.arange(len(x)) if valid is None else np.flatnonzero(valid)
    parts = []
    for a0 in range(0, len(idx), block):
        ia = idx[a0 : a0 + block]
        xa = np.asarray(x[ia], np.float32)
        for b0 in range(a0, len(idx), block):
            ib = idx[b0 : b0 + block]
            s = xa @ np.asarray(x[ib], np.float32).T
            r, c = np.nonzero(s >= threshold)
            sel = ia[r] < ib[c]
            if sel.any():
                parts.append(Pairs(ia[r[sel]], ib[c[sel]], s[r[sel], c[sel]]))
    return _concat(parts)


@dataclass(frozen=True)
class Units:
    """The IVF partition: for each list, its home members and everything that probes it."""

    home: list[np.ndarray]
    probing: list[np.ndarray]


def plan_embedding_units(x: np.ndarray, params: IVFParams, valid: np.ndarray | None = None) -> Units:
    import faiss

    idx = np.arange(len(x)) if valid is None else np.flatnonzero(valid)
    d = x.shape[1]
    rng = np.random.default_rng(params.seed)
    train_idx = np.sort(rng.choice(idx, size=min(params.train_size, len(idx)), replace=False))
    train = np.ascontiguousarray(x[train_idx], dtype=np.float32)
    km = faiss.Kmeans(d, params.nlist, niter=params.niter, seed=params.seed, spherical=True, verbose=False,
                      gpu=bool(params.use_gpu) if params.use_gpu is not None else faiss.get_num_gpus() > 0)
    km.train(train)
    lists = np.empty((len(idx), params.nprobe), np.int64)
    for a0 in range(0, len(idx), params.block_size * 16):
        xa = np.ascontiguousarray(x[idx[a0 : a0 + params.block_size * 16]], dtype=np.float32)
        _, lists[a0 : a0 + len(xa)] = km.index.search(xa, params.nprobe)
    home_list = lists[:, 0]
    order = np.argsort(home_list, kind="stable")
    bounds = np.searchsorted(home_list[order], np.arange(params.nlist + 1))
    home = [idx[order[bounds[k] : bounds[k + 1]]] for k in range(params.nlist)]
    flat_l = lists.ravel()
    flat_v = np.repeat(idx, params.nprobe)
    order = np.argsort(flat_l, kind="stable")
    bounds = np.searchsorted(flat_l[order], np.arange(params.nlist + 1))
    probing = [np.unique(flat_v[order[bounds[k] : bounds[k + 1]]]) for k in range(params.nlist)]
    return Units(home, probing)


def pairs_in_units(x: np.ndarray, units: Units, list_ids: Iterable[int], threshold: float, block: int) -> Pairs:
    parts = []
    for k in list_ids:
        h, p = units.home[k], units.probing[k]
        if len(h) == 0 or len(p) < 2:
            continue
        xp = np.asarray(x[p], np.float32)
        for a0 in range(0, len(h), block):
            ha = h[a0 : a0 + block]
            s = np.asarray(x[ha], np.float32) @ xp.T
            r, c = np.nonzero(s >= threshold)
            sel = ha[r] != p[c]
            if sel.any():
                parts.append(Pairs(ha[r[sel]], p[c[sel]], s[r[sel], c[sel]]))
    return _concat(parts)


def embedding_pairs(
    x: np.ndarray,
    threshold: float,
    params: IVFParams | None = None,
    valid: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Pairs:
    n_valid = len(x) if valid is None else int(np.count_nonzero(valid))
    if n_valid < 2:
        return Pairs.empty()
    params = params or IVFParams.auto(n_valid, x.shape[1])
    if n_valid <= BRUTE_FORCE_MAX and params.nlist <= 1:
        p = brute_force_pairs(x, threshold, params.block_size, valid)
        if progress:
            progress(1, 1)
        return p
    units = plan_embedding_units(x, params, valid)
    parts = []
    step = max(1, params.nlist // 100)
    for k0 in range(0, params.nlist, step):
        parts.append(pairs_in_units(x, units, range(k0, min(k0 + step, params.nlist)), threshold, params.block_size))
        if progress:
            progress(min(k0 + step, params.nlist), params.nlist)
    return _concat(parts)
