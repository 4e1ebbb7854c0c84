"""Queries against a reference set: cost proportional to the number of queries.

Used by ``dedup check`` (generated images or an eval set against a training run) and by
incremental runs (new shards against a previous run's keepers). Pure numpy/faiss; no I/O.

* hashes: multi-index hashing with ``radius + 1`` chunk tables over the reference (sorted chunk
  values; each query looks up its bucket per chunk with a binary search), verified exactly;
  plus the nearest reference hash per query for reporting.
* embeddings: a FAISS inner-product index over the reference vectors (flat below ~50k vectors,
  IVF above), ``range_search`` at the cosine threshold and ``search`` for the top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def popcount64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1).astype(np.int64)


@dataclass(frozen=True)
class Matches:
    q: np.ndarray  # int64 query index
    r: np.ndarray  # int64 reference index
    score: np.ndarray  # float32 (Hamming bits, or cosine)


def _chunks(radius: int) -> list[tuple[int, int]]:
    m = min(radius + 1, 64)
    edges = [round(k * 64 / m) for k in range(m + 1)]
    return [(edges[k], edges[k + 1] - edges[k]) for k in range(m)]


class HashTable:
    """Chunk tables over reference hashes for radius queries (pigeonhole: within ``radius``
    bits ⇒ equal on at least one of ``radius + 1`` chunks)."""

    def __init__(self, ref: np.ndarray, radius: int):
        self.ref = np.asarray(ref, np.uint64)
        self.radius = radius
        self.tables = []
        for shift, width in _chunks(radius):
            key = (self.ref >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(key, kind="stable")
            self.tables.append((shift, width, key[order], order))

    def query(self, q: np.ndarray, max_bucket: int = 200_000) -> Matches:
        q = np.asarray(q, np.uint64)
        qs, rs = [], []
        for shift, width, skeys, order in self.tables:
            qk = (q >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            lo = np.searchsorted(skeys, qk, "left")
            hi = np.searchsorted(skeys, qk, "right")
            for k in np.flatnonzero(hi > lo):
                cand = order[lo[k] : min(hi[k], lo[k] + max_bucket)]
                d = popcount64(self.ref[cand] ^ q[k])
                sel = d <= self.radius
                qs.append(np.full(int(sel.sum()), k, np.int64))
                rs.append(cand[sel])
        if not qs:
            return Matches(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
        qa, ra = np.concatenate(qs), np.concatenate(rs)
        key = np.unique(qa * (len(self.ref) + 1) + ra)
        qa, ra = key // (len(self.ref) + 1), key % (len(self.ref) + 1)
        return Matches(qa, ra, popcount64(self.ref[ra] ^ q[qa]).astype(np.float32))


def nearest_hash(ref: np.ndarray, q: np.ndarray, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference hash per query (brute force in blocks; for reporting)."""
    ref = np.asarray(ref, np.uint64)
    best_d = np.full(len(q), 65, np.int64)
    best_i = np.full(len(q), -1, np.int64)
    if len(ref) == 0:
        return best_i, best_d
    step = max(1, block // max(len(ref), 1))
    for a in range(0, len(q), step):
        d = popcount64(np.asarray(q[a : a + step], np.uint64)[:, None] ^ ref[None, :])
        best_i[a : a + step] = d.argmin(axis=1)
        best_d[a : a + step] = d.min(axis=1)
    return best_i, best_d


class VectorIndex:
    """Inner-product index over L2-normalised reference vectors."""

    def __init__(self, ref: np.ndarray, flat_max: int = 50_000, seed: int = 1234):
        import faiss

        self.n, d = ref.shape
        self.faiss = faiss
        if self.n <= flat_max:
            self.index = faiss.IndexFlatIP(d)
        else:
            nlist = int(min(4 * math.sqrt(self.n), self.n // 50))
            quant = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(self.n, size=min(self.n, nlist * 64), replace=False))
            self.index.train(np.ascontiguousarray(ref[sample], np.float32))
            self.index.nprobe = min(nlist, 16)
        for a in range(0, self.n, 65536):
            self.index.add(np.ascontiguousarray(ref[a : a + 65536], np.float32))

    def range(self, q: np.ndarray, threshold: float) -> Matches:
        if self.n == 0 or len(q) == 0:
            return Matches(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
        lims, dist, ids = self.index.range_search(np.ascontiguousarray(q, np.float32), float(threshold) - 1e-6)
        qa = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
        keep = dist >= threshold
        return Matches(qa[keep].astype(np.int64), ids[keep].astype(np.int64), dist[keep].astype(np.float32))

    def topk(self, q: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0:
            return np.full((len(q), k), -1), np.full((len(q), k), np.nan, np.float32)
        d, i = self.index.search(np.ascontiguousarray(q, np.float32), min(k, self.n))
        return i, d
