"""Candidate duplicate pairs: exact sha256 groups, Hamming radius on 64-bit hashes, cosine on embeddings.

Pure functions over numpy arrays (decision record and measurements: ``docs/candidates.md``).

* :func:`exact_pairs` — sha256 groups, returned as a *star* (every member paired with the
  group's first index), not all g·(g-1)/2 pairs.
* :func:`hash_pairs` — multi-index hashing: split the 64 bits into ``m`` chunks; by the
  (generalised) pigeonhole principle two hashes within Hamming ``r`` agree within
  ``r // m`` bits on at least one chunk (``m = r + 1``: exactly, on one chunk). Every
  candidate is verified with an exact popcount, so the result equals brute force. ``m`` and
  the per-chunk radius come from a cost estimate on the data; when no split beats it (large
  radius, dense data) it is exhaustive popcount search (faiss ``IndexBinaryFlat``).
* :func:`embedding_pairs` — IVF bucketing. The serial driver composes pure steps that an
  executor (Ray) can spread::

      plan = plan_ivf(x, params, valid, threshold=t)   # PCA + k-means on a sample; assign rows
      units = make_units(plan)                         # consecutive lists, ~unit_rows rows each
      parts = [unit_pairs(x, u, t, plan.params) for u in units]   # independent, any order
      pairs = merge_pairs(parts)

  Every row is a *member* of its nearest list and a *visitor* of up to ``nprobe - 1`` other
  lists: those among its nearest centroids whose Voronoi boundary with its own cell passes
  within ``probe_margin · √(2 - 2t)`` of it (PCA space) — rows deep inside a cell visit few
  lists, rows near a boundary several. A list compares members × members (each pair once) and
  visitors × members with float32 matrix products in tiles of at most ``block_size`` rows a
  side (bounded memory however large a list is). A pair split by a boundary is found when
  either side visits the other's list.
* :func:`brute_force_pairs` — the exact reference, same tile code over all rows.

Exactness and determinism. Candidates from float32 products are kept with a margin
(``d · 2**-22``, above the worst-case float32 rounding of a d-term dot product) and then
rescored in float64. For float16 inputs (what the pipeline stores) the float64 dot product is
*exact*: every fp16 is a multiple of 2**-24, so products are multiples of 2**-48 and, for
vectors of norm ≤ ~1, every partial sum is below 2 in magnitude — 49 bits, inside float64's 53.
Hence scores and the pair set do not depend on block size, summation order, thread count or
CPU vs GPU. (float32 inputs: exact up to float64 rounding, ~1e-16.) The coarse stage (PCA,
k-means, assignment) always runs on CPU, single-threaded per block, with fixed seeds, so the
partition is the same with or without a GPU; the GPU (faiss ``pairwise_distance_gpu``) only
does the tile products.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

__all__ = [
    "Pairs",
    "IVFParams",
    "IVFPlan",
    "WorkUnit",
    "exact_pairs",
    "hash_pairs",
    "embedding_pairs",
    "brute_force_pairs",
    "plan_ivf",
    "plan_figures",
    "train_ivf",
    "assign_rows",
    "build_plan",
    "IVFCoarse",
    "make_units",
    "unit_pairs",
    "merge_pairs",
    "gpu_available",
]

_I64 = np.int64
_F32 = np.float32


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


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


def _canonical(i: np.ndarray, j: np.ndarray, score: np.ndarray) -> Pairs:
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
        return _canonical(p.i, p.j, p.score)
    return _canonical(
        np.concatenate([p.i for p in parts]),
        np.concatenate([p.j for p in parts]),
        np.concatenate([p.score for p in parts]),
    )


def _remap(p: Pairs, rows: np.ndarray | None) -> Pairs:
    """Map pair indices from a compacted (valid-only) array back to original rows.

    ``rows`` is increasing, so order and orientation are preserved."""
    if rows is None or len(p) == 0:
        return p
    return Pairs(rows[p.i], rows[p.j], p.score)


def _valid_rows(n: int, valid: np.ndarray | None) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, bool)
    if valid.shape != (n,):
        raise ValueError(f"valid must be a bool mask of shape ({n},), got {valid.shape}")
    return np.flatnonzero(valid).astype(_I64)


# --------------------------------------------------------------------------------------------
# Exact (sha256)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Hashes: multi-index hashing with exact verification
# --------------------------------------------------------------------------------------------

_HASH_BITS = 64
_DIRECT_TABLE_BITS = 22  # chunks up to this many bits use a direct-address bucket table
_MAX_PROBES = 4096  # flip masks per chunk we are willing to enumerate
_EXPAND_CAP = 1 << 22  # candidate pairs materialised at once (bounded memory)


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _low_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


@dataclass(frozen=True)
class _MIHPlan:
    m: int  # number of chunks
    rp: int  # per-chunk radius: a pair within r agrees within rp bits on some chunk
    est_cost: float


def _chunk_layout(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m chunks covering the 64 bits, sizes differing by at most one."""
    base, extra = divmod(_HASH_BITS, m)
    out, shift = [], 0
    for k in range(m):
        b = base + (1 if k < extra else 0)
        out.append((shift, b))
        shift += b
    return out


def _flip_masks(bits: int, rp: int) -> np.ndarray:
    masks = [0]
    for w in range(1, rp + 1):
        for combo in combinations(range(bits), w):
            v = 0
            for b in combo:
                v |= 1 << b
            masks.append(v)
    return np.array(masks, np.uint64)


def _n_masks(bits: int, rp: int) -> int:
    return sum(math.comb(bits, w) for w in range(rp + 1))


class _Buckets:
    """Rows grouped by one chunk's value; ``ranges(probes)`` -> (start, length) into ``order``."""

    def __init__(self, vals: np.ndarray, bits: int):
        self.order = np.argsort(vals, kind="stable").astype(_I64)
        self.direct = bits <= _DIRECT_TABLE_BITS
        if self.direct:
            counts = np.bincount(vals.astype(_I64), minlength=1 << bits)
            self.occupied = counts > 0
            self.offs = np.zeros(len(counts) + 1, _I64)
            np.cumsum(counts, out=self.offs[1:])
        else:
            sv = vals[self.order]
            first = np.ones(len(sv), bool)
            first[1:] = sv[1:] != sv[:-1]
            idx = np.flatnonzero(first)
            self.uniq = sv[idx]
            self.ustart = np.append(idx, len(sv)).astype(_I64)

    def ranges(self, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.direct:
            p = probes.astype(_I64)
            s = self.offs[p]
            return s, self.offs[p + 1] - s
        pos = np.searchsorted(self.uniq, probes)
        pos_c = np.minimum(pos, len(self.uniq) - 1)
        hit = (pos < len(self.uniq)) & (self.uniq[pos_c] == probes)
        s = self.ustart[pos_c]
        ln = np.where(hit, self.ustart[pos_c + 1] - s, 0)
        return s, ln


def _expand(q: np.ndarray, start: np.ndarray, length: np.ndarray, cap: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (query, position) for every position in every range, at most ~cap at a time."""
    keep = length > 0
    q, start, length = q[keep], start[keep], length[keep]
    if len(q) == 0:
        return
    if length.max() > cap:  # split long ranges so that each piece fits
        parts = (length + cap - 1) // cap
        rep = np.repeat(np.arange(len(q)), parts)
        k = np.arange(len(rep)) - np.repeat(np.cumsum(parts) - parts, parts)
        q = q[rep]
        start = start[rep] + k * cap
        length = np.minimum(length[rep] - k * cap, cap)
    cum = np.cumsum(length)
    lo = 0
    while lo < len(q):
        base = cum[lo] - length[lo]
        hi = int(np.searchsorted(cum, base + cap, side="right"))
        hi = max(hi, lo + 1)
        ln = length[lo:hi]
        tot = int(ln.sum())
        qq = np.repeat(q[lo:hi], ln)
        off = np.arange(tot) - np.repeat(np.cumsum(ln) - ln, ln)
        yield qq, np.repeat(start[lo:hi], ln) + off
        lo = hi


def _plan_mih(h: np.ndarray, radius: int, rng: np.random.Generator) -> _MIHPlan | None:
    """Pick (chunks, per-chunk radius) by estimated cost; None = brute force is cheaper."""
    n = len(h)
    sample = h[rng.choice(n, size=min(n, 1024), replace=False)] if n > 1024 else h
    brute = 0.5 * n * n * 1.5  # ns: faiss popcount kernel, per unordered pair
    best: _MIHPlan | None = None
    seen = set()
    for rp in range(0, radius + 1):
        m = radius // (rp + 1) + 1  # fewest chunks with m·(rp+1) > r
        if m > _HASH_BITS or m in seen:
            continue
        seen.add(m)
        layout = _chunk_layout(m)
        bits = max(b for _, b in layout)
        nmask = _n_masks(bits, rp)
        enum = n * m * (nmask * 15.0 + 60.0)  # ns: probe lookups + per-chunk sort
        if nmask > _MAX_PROBES or enum >= min(brute, best.est_cost if best else math.inf):
            break  # enumeration only grows with the per-chunk radius
        # candidates per chunk estimated on the first chunk from a sample of queries
        shift, b = layout[0]
        mask = _low_mask(b)
        vals = (h >> np.uint64(shift)) & mask
        bk = _Buckets(vals, b)
        sv = (sample >> np.uint64(shift)) & mask
        masks = _flip_masks(b, rp)
        tot = 0
        for s0 in range(0, len(sv), max(1, 65536 // len(masks))):
            blk = sv[s0 : s0 + max(1, 65536 // len(masks))]
            _, ln = bk.ranges((blk[:, None] ^ masks[None, :]).ravel())
            tot += int(ln.sum())
        cand = tot * (n / len(sv)) * m / 2
        cost = enum + cand * 35.0  # ns per candidate pair (gather, XOR, popcounts)
        if best is None or cost < best.est_cost:
            best = _MIHPlan(m, rp, cost)
    if best is None or best.est_cost > brute:
        return None
    return best


def _hash_brute(h: np.ndarray, radius: int, block: int = 4096, threads: int = 0,
                progress: Callable[[int, int], None] | None = None) -> Pairs:
    """All pairs within ``radius`` by exhaustive Hamming distances (faiss ``IndexBinaryFlat``
    range search, popcount kernels): query block [r0, r1) against rows [r0, n)."""
    import faiss

    n = len(h)
    codes = np.ascontiguousarray(h).view(np.uint8).reshape(n, 8)
    starts = list(range(0, n, block))

    def rows(r0: int):
        r1 = min(n, r0 + block)
        index = faiss.IndexBinaryFlat(64)
        index.add(codes[r0:])
        lims, dist, lab = index.range_search(codes[r0:r1], int(radius) + 1)  # strict "<"
        qi = np.repeat(np.arange(r1 - r0, dtype=_I64), np.diff(lims.astype(_I64)))
        lab = lab.astype(_I64)
        keep = lab > qi  # upper triangle within the block; later rows entirely
        return qi[keep] + r0, lab[keep] + r0, dist[keep].astype(_F32)

    parts = []
    # progress in comparisons: the block starting at r0 compares its rows with rows [r0, n)
    cost = [(min(n, r0 + block) - r0) * (n - r0) for r0 in starts]
    total, done = sum(cost), 0
    with _single_threaded_libs():
        for k, got in _pmap(rows, starts, _n_threads(threads)):
            parts.append(got)
            done += cost[k]
            if progress:
                progress(done, total)
    return _collect(parts)


def _high_bit(masks: np.ndarray) -> np.ndarray:
    hb = np.zeros(len(masks), np.uint64)
    for b in range(64):
        bit = np.uint64(1) << np.uint64(b)
        hb[(masks & bit) != 0] = bit
    return hb


def _hash_mih(h: np.ndarray, radius: int, plan: _MIHPlan, threads: int = 0,
              progress: Callable[[int, int], None] | None = None) -> Pairs:
    """Multi-index hashing. Per chunk, every unordered pair of rows whose chunk values differ
    in ≤ rp bits is generated exactly once: equal values from the earlier row of the bucket,
    different values from the row with the smaller value. A pair agreeing (within rp) on
    several chunks is kept only on the first; then the full distance is verified."""
    layout = _chunk_layout(plan.m)
    cmask = [_low_mask(b) << np.uint64(s) for s, b in layout]
    n = len(h)
    workers = _n_threads(threads)
    parts = []
    done = 0  # rows done, summed over chunks
    for k, (shift, bits) in enumerate(layout):
        vals = (h >> np.uint64(shift)) & _low_mask(bits)
        if bits <= 32:
            vals = vals.astype(np.uint32)
        bk = _Buckets(vals, bits)
        rank = np.empty(n, _I64)
        rank[bk.order] = np.arange(n)
        own_end = bk.ranges(vals)
        own_end = own_end[0] + own_end[1]  # end of each row's own bucket in `order`
        masks = _flip_masks(bits, plan.rp)[1:].astype(vals.dtype)
        hb = _high_bit(masks.astype(np.uint64)).astype(vals.dtype)
        qblock = max(256, (1 << 20) // (len(masks) + 1))

        def block(q0: int, k=k, vals=vals, bk=bk, rank=rank, own_end=own_end, masks=masks, hb=hb):
            q1 = min(n, q0 + qblock)
            q = np.arange(q0, q1, dtype=_I64)
            v = vals[q0:q1]
            # same value: the rows after this one in its bucket
            starts = [rank[q0:q1] + 1]
            lens = [own_end[q0:q1] - rank[q0:q1] - 1]
            qs = [q]
            if len(masks):
                probes = v[:, None] ^ masks[None, :]
                sel = (v[:, None] & hb[None, :]) == 0  # only probes above the own value
                if bk.direct:
                    sel &= bk.occupied[probes]  # most probes hit empty buckets: drop early
                r, c = np.nonzero(sel)
                st, ln = bk.ranges(probes[r, c])
                starts.append(st)
                lens.append(ln)
                qs.append(q[r])
            out = []
            for qi, pos in _expand(np.concatenate(qs), np.concatenate(starts), np.concatenate(lens), _EXPAND_CAP):
                qj = bk.order[pos]
                x = h[qi] ^ h[qj]
                d = _popcount(x)
                keep = d <= radius
                for kk in range(k):  # already produced by an earlier chunk
                    keep &= _popcount(x & cmask[kk]) > plan.rp
                if keep.any():
                    out.append((qi[keep], qj[keep], d[keep].astype(_F32)))
            return out

        for i, got in _pmap(block, list(range(0, n, qblock)), workers):
            parts.extend(got)
            done += min(n, (i + 1) * qblock) - i * qblock
            if progress:
                progress(done, n * len(layout))
    return _collect(parts)


def hash_pairs(hashes: np.ndarray, radius: int, valid: np.ndarray | None = None, *, method: str = "auto",
               progress: Callable[[int, int], None] | None = None) -> Pairs:
    """All pairs of 64-bit hashes within Hamming distance ``radius`` (score = the distance).

    Exact: candidates from multi-index hashing are verified with a popcount, so the result is
    the brute-force result. ``valid``: bool mask of rows to consider (others never appear).
    ``method``: "auto" (cost estimate), "mih" or "brute". ``progress(done, total)``: rows
    processed over all chunks (MIH) or pair comparisons done (exhaustive).
    """
    h = np.ascontiguousarray(hashes)
    if h.dtype != np.uint64:
        h = h.astype(np.int64).view(np.uint64) if h.dtype.kind == "i" else h.astype(np.uint64)
    h = h.ravel()
    rows = _valid_rows(len(h), valid)
    if rows is not None:
        h = h[rows]
    if len(h) < 2 or radius < 0:
        return Pairs.empty()
    radius = int(min(radius, _HASH_BITS))
    if method == "brute":
        return _remap(_hash_brute(h, radius, progress=progress), rows)
    plan = _plan_mih(h, radius, np.random.default_rng(0))
    if method == "mih" and plan is None:
        m = radius + 1 if radius < _HASH_BITS else _HASH_BITS
        plan = _MIHPlan(m, radius // m, 0.0)
    if plan is None:
        return _remap(_hash_brute(h, radius, progress=progress), rows)
    return _remap(_hash_mih(h, radius, plan, progress=progress), rows)


# --------------------------------------------------------------------------------------------
# Embeddings: parameters
# --------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when faiss sees a CUDA GPU (faiss-gpu installed and a device visible)."""
    try:
        import faiss

        return faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover - faiss missing or broken CUDA
        return False


@dataclass(frozen=True)
class IVFParams:
    """Parameters of the IVF candidate search; :meth:`auto` picks them from n and d.

    nlist        number of inverted lists (k-means centroids)
    nprobe       most lists a row is compared against: its own (member) + up to nprobe-1
                 visited lists (the nearest centroids, filtered by ``probe_margin``)
    train_size   rows sampled to train PCA and k-means
    block_size   tile edge of the block products: a tile holds ≤ block_size² float32 scores
    seed         sampling and k-means seed (same input + params -> same pairs)
    use_gpu      tile products on GPU (faiss); None = when faiss sees one
    pca_dim      the coarse stage (k-means, assignment) works in this many PCA dimensions
    niter        k-means iterations
    probe_margin visit a list only if its boundary with the row's own cell is within
                 probe_margin · √(2 - 2·threshold) of the row (the largest distance of a pair
                 at the threshold); None or 0 = always visit nprobe - 1 lists
    exact_below  below this many valid rows, exact brute force instead of IVF
    bound_dim    pair-stage prefilter: tiles are first computed on each row's projection onto
                 this many principal axes (+ the mean's direction, + the norm of the rest),
                 an upper bound of the cosine; only pairs the bound cannot rule out are
                 scored on the full vectors. Same pairs, fewer flops; 0 = off
    unit_rows    target member+visitor rows per work unit (a unit = consecutive lists)
    threads      worker threads for units and assignment (0 = all cores); BLAS and faiss
                 run single-threaded inside them
    """

    nlist: int
    nprobe: int
    train_size: int
    block_size: int = 4096
    seed: int = 1234
    use_gpu: bool | None = None
    pca_dim: int = 64
    niter: int = 10
    probe_margin: float | None = 0.16
    exact_below: int = 5000
    unit_rows: int = 1 << 16
    threads: int = 0
    bound_dim: int = 0

    @classmethod
    def auto(cls, n: int, d: int, threshold: float | None = None, **overrides) -> IVFParams:
        """Parameters for n valid rows of dimension d (measurements: docs/candidates.md).

        * nlist = n / 500 (lists of ~500 rows), at least √n, at most n / 50.
        * nprobe (a cap) = 16 up to 2 000 lists (1e6 rows), then 16 · (1 + log10(nlist /
          2000)): 32 at 1e7 rows. probe_margin = 0.16. Denser data puts more lists within the
          visiting radius, and a cap cut short loses pairs: at 1e7 a cap of 16 kept 0.98 of
          the planted pairs, 32 kept 0.993 (docs/candidates.md). The visiting radius scales
          with the threshold at search time (``threshold`` is accepted for symmetry).
        * train_size = 32 · nlist, between 20 000 and 131 072 (and ≤ n); niter = 10.
        * pca_dim = 128 from d = 512 (min(d, 64) below); block_size = 4096; exact brute force
          below 5 000 rows. 128 rather than 64 dimensions separate the cells better: at 1e6
          3.0 instead of 5.1 lists visited per row and 0.997 instead of 0.993 of the planted
          pairs kept; the coordinates come with the bound rows at no extra projection.
        * bound_dim = min(128, d // 4) from d = 128 up (0 below: too few dimensions to gain),
          and 0 when the bound rows (n × (bound_dim + 2) float32, held by the driver) would
          exceed 8 GiB, i.e. from ~16 million rows at d = 512.
        * use_gpu = None (when faiss sees a GPU). Any field can be overridden by keyword.
        """
        n = max(int(n), 0)
        nlist = _auto_nlist(n)
        p = cls(
            nlist=nlist,
            nprobe=_auto_nprobe(nlist, threshold),
            train_size=int(min(n, max(20_000, 32 * nlist), 1 << 17)),
            pca_dim=int(128 if d >= 512 else min(d, 64)),
            bound_dim=_auto_bound_dim(n, d),
        )
        return replace(p, **overrides) if overrides else p


def _auto_nlist(n: int) -> int:
    if n < 2:
        return 1
    return int(max(1, min(n // 50, max(round(math.sqrt(n)), n // 500))))


_BOUND_MAX_BYTES = 8 << 30


def _auto_bound_dim(n: int, d: int) -> int:
    q = int(min(128, d // 4)) if d >= 128 else 0
    return q if q and n * (q + 2) * 4 <= _BOUND_MAX_BYTES else 0


def _auto_nprobe(nlist: int, threshold: float | None) -> int:
    cap = 16 if nlist <= 2000 else round(16 * (1.0 + math.log10(nlist / 2000)))
    return int(max(1, min(nlist, cap)))


def _n_threads(threads: int) -> int:
    return int(threads) if threads and threads > 0 else max(1, os.cpu_count() or 1)


@contextmanager
def _single_threaded_libs() -> Iterator[None]:
    """BLAS and faiss (OpenMP) to one thread each, restored afterwards.

    We parallelise over independent pieces (units, blocks) with Python threads instead:
    BLAS/OpenMP thread pools on many small products are slow, and several times slower still
    when the cores are shared with other processes (measured in docs/candidates.md).
    """
    import faiss

    from threadpoolctl import threadpool_limits

    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    # flat search (the coarse stage): 1 024 query rows per BLAS block instead of 4 096 keeps the
    # distance block in cache: 27% faster at 3 906 centroids, 10% at 2 000 (measured)
    prev_bs = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = 1024
    torch = sys.modules.get("torch")  # only its fp16 conversion runs here (see _rows_f32)
    prev_torch = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(prev)
        faiss.cvar.distance_compute_blas_query_bs = prev_bs
        if torch is not None:
            torch.set_num_threads(prev_torch)


def _pmap(fn: Callable, items: list, workers: int) -> Iterator:
    """Map in a thread pool, yielding results in completion order as (index, result)."""
    if workers <= 1 or len(items) <= 1:
        for k, it in enumerate(items):
            yield k, fn(it)
        return
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futs = {ex.submit(fn, it): k for k, it in enumerate(items)}
        try:
            for f in as_completed(futs):
                yield futs[f], f.result()
        except BaseException:  # interrupted (dedup.interrupt) or abandoned: do not run the queue first
            ex.shutdown(wait=False, cancel_futures=True)
            raise


# --------------------------------------------------------------------------------------------
# Embeddings: tile products (CPU / GPU), exact rescoring
# --------------------------------------------------------------------------------------------


# numpy converts float16 one value at a time (≈2.5 ns per value on the benchmark machine: a
# quarter of the pair stage); torch uses the CPU's F16C instructions (≈0.15 ns). torch is a
# dependency (open_clip), but importing it costs ~2 s, so a search imports it only when its
# conversions would cost more than that (_want_fast_f16); once loaded it is always used.
_FAST_F16_MIN_VALUES = 1 << 30


def _want_fast_f16(x: np.ndarray, values: float) -> None:
    """Load torch for fp16 conversion when converting ``values`` float16 values pays for it."""
    if x.dtype != np.float16 or "torch" in sys.modules or values < _FAST_F16_MIN_VALUES:
        return
    try:
        import torch  # noqa: F401
    except Exception:  # pragma: no cover - torch missing or broken: numpy conversion
        pass


def _rows_f32(x: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Gather rows (sorted indices read a memmap front to back) and convert to float32
    (bit-exact either way: every float16 value is a float32 value)."""
    a = x[rows]
    torch = sys.modules.get("torch") if a.dtype == np.float16 and a.size >= 4096 else None
    if torch is None:
        return np.ascontiguousarray(a, dtype=_F32)
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, order="C")  # torch wants a writable buffer (memmap slices are not)
    out = np.empty(a.shape, _F32)
    torch.from_numpy(out).copy_(torch.from_numpy(a))
    return out


def _margin(d: int) -> float:
    # above the worst-case float32 rounding of a d-term dot product of vectors of norm ≤ ~1
    return d * 2.0**-22 + 1e-6


_GPU_RES = None
_GPU_LOCK = threading.Lock()


class _Matmul:
    """S = A @ B.T in float32: BLAS on CPU, faiss ``pairwise_distance_gpu`` on GPU."""

    def __init__(self, use_gpu: bool):
        self.gpu = bool(use_gpu)
        if self.gpu:
            import faiss

            global _GPU_RES
            with _GPU_LOCK:
                if _GPU_RES is None:
                    _GPU_RES = faiss.StandardGpuResources()
            self._faiss = faiss

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.gpu:
            f = self._faiss
            with _GPU_LOCK:
                return f.pairwise_distance_gpu(_GPU_RES, a, b, metric=f.METRIC_INNER_PRODUCT)
        return a @ b.T


def _exact_scores(a: np.ndarray, b: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float64 dot products of a[r[k]] and b[c[k]] (exact for fp16-valued inputs, so the value
    does not depend on how it is computed)."""
    rs, inv_r = np.unique(r, return_inverse=True)
    cs, inv_c = np.unique(c, return_inverse=True)
    if len(rs) * len(cs) <= 4 * len(r):  # dense: one float64 product of the sub-block
        sub = a[rs].astype(np.float64) @ b[cs].astype(np.float64).T
        return sub[inv_r, inv_c]
    out = np.empty(len(r), np.float64)
    step = max(1, (1 << 21) // max(1, a.shape[1]))
    for s in range(0, len(r), step):
        e = min(len(r), s + step)
        out[s:e] = np.einsum("ij,ij->i", a[r[s:e]].astype(np.float64), b[c[s:e]].astype(np.float64))
    return out


def _tile_candidates(s: np.ndarray, lo: float, diag: tuple[int, int] | None):
    """Positions (r, c) of tile ``s`` holding a value ≥ lo, each symmetric pair once (see
    :func:`_tile` for ``diag``); None when there are none. ``s`` is overwritten."""
    lo = np.float32(lo)
    sym = diag is not None and diag[0] > 0
    if sym:
        n_sym, offset = diag
        r = np.arange(max(0, -offset), min(n_sym, s.shape[1] - offset))
        s[r, r + offset] = -np.inf  # a row and itself (else every such row would be a hit)
    # Candidates are rare: one reduction finds the rows holding any, and only those are
    # compared in full (a compare + nonzero over the whole tile cost ~15% of the pair stage).
    hit = np.flatnonzero(s.max(axis=1) >= lo)
    if len(hit) == 0:
        return None
    if 2 * len(hit) > len(s):  # dense (e.g. a list of near-identical rows): no copy of the rows
        r, c = np.nonzero(s >= lo)
    else:
        rr, c = np.nonzero(s[hit] >= lo)
        r = hit[rr]
    del s
    if sym:
        keep = (r >= n_sym) | (c > r + offset)  # each symmetric pair once (not its mirror)
        r, c = r[keep], c[keep]
        if len(r) == 0:
            return None
    return r, c


def _tile(mm: _Matmul, xr, xc, rows_r, rows_c, threshold: float, diag: tuple[int, int] | None):
    """Pairs (rows_r[r], rows_c[c]) with exact cosine ≥ threshold in one tile.

    ``diag = (n_sym, offset)``: rows r < n_sym belong to the symmetric (member × member) part
    and keep only columns c > r + offset (each pair once); other rows keep every column."""
    got = _tile_candidates(mm(xr, xc), threshold - _margin(xr.shape[1]), diag)
    if got is None:
        return None
    r, c = got
    sc = _exact_scores(xr, xc, r, c)
    ok = sc >= threshold
    if not ok.any():
        return None
    return rows_r[r[ok]], rows_c[c[ok]], sc[ok].astype(_F32)


def _tile_bounded(mm: _Matmul, zr, zc, rows_r, rows_c, x, threshold: float, diag: tuple[int, int] | None,
                  x_c: np.ndarray | None = None):
    """:func:`_tile` with a prefilter: the product of the :class:`Bound` rows ``zr``, ``zc``
    bounds every cosine from above, so a pair below ``threshold - _BOUND_SLACK`` there cannot
    reach the threshold. Only the remaining candidates are scored, on their rows of ``x``
    (``x_c`` for the columns if given: queries against references), float32 first, then
    exactly — the same pairs as :func:`_tile` on the full rows."""
    got = _tile_candidates(mm(zr, zc), threshold - _BOUND_SLACK, diag)
    if got is None:
        return None
    r, c = got
    ur, ir = np.unique(r, return_inverse=True)
    uc, ic = np.unique(c, return_inverse=True)
    a = _rows_f32(x, rows_r[ur])
    b = _rows_f32(x if x_c is None else x_c, rows_c[uc])
    if len(ur) * len(uc) > 4 * len(r) and len(r) > 64:
        # few candidates scattered over the tile: a float32 pass drops those the bound let
        # through but the vectors do not (most of them) before the float64 rescoring
        s32 = np.einsum("ij,ij->i", a[ir], b[ic])
        keep = s32 >= np.float32(threshold - _margin(a.shape[1]))
        r, c, ir, ic = r[keep], c[keep], ir[keep], ic[keep]
        if len(r) == 0:
            return None
    sc = _exact_scores(a, b, ir, ic)
    ok = sc >= threshold
    if not ok.any():
        return None
    return rows_r[r[ok]], rows_c[c[ok]], sc[ok].astype(_F32)


def _collect(parts: list) -> Pairs:
    parts = [p for p in parts if p is not None]
    if not parts:
        return Pairs.empty()
    return _canonical(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2] for p in parts]))


# --------------------------------------------------------------------------------------------
# Embeddings: brute force
# --------------------------------------------------------------------------------------------


def brute_force_pairs(
    x: np.ndarray,
    threshold: float,
    block: int = 4096,
    valid: np.ndarray | None = None,
    use_gpu: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 0,
) -> Pairs:
    """All pairs with cosine ≥ threshold by exact blockwise products — the reference.

    Memory: per worker thread one ``block × block`` float32 tile and two ``block × d`` row
    blocks; ``x`` may be a memmap. Scores are exact (see module docstring)."""
    n = x.shape[0]
    rows = _valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    if m < 2:
        return Pairs.empty()
    block = max(1, int(block))
    mm = _Matmul(use_gpu)
    starts = list(range(0, m, block))
    _want_fast_f16(x, float(m) * x.shape[1] * (len(starts) + 1) / 2)  # a row block per tile

    def sl(a: int, b: int):
        return slice(a, b) if rows is None else idx[a:b]

    def column(ci: int):
        c0 = starts[ci]
        c1 = min(m, c0 + block)
        xc = _rows_f32(x, sl(c0, c1))
        out = []
        for r0 in starts[: ci + 1]:
            r1 = min(m, r0 + block)
            xr = xc if r0 == c0 else _rows_f32(x, sl(r0, r1))
            got = _tile(mm, xr, xc, idx[r0:r1], idx[c0:c1], threshold, (r1 - r0, 0) if r0 == c0 else None)
            if got is not None:
                out.append(got)
        return out, ci + 1

    workers = 1 if use_gpu else _n_threads(threads)
    total = len(starts) * (len(starts) + 1) // 2
    done = 0
    parts: list = []
    with _single_threaded_libs():
        # biggest columns first so the threads finish together
        for _, (got, ntiles) in _pmap(column, list(range(len(starts)))[::-1], workers):
            parts.extend(got)
            done += ntiles
            if progress:
                progress(done, total)
    return _collect(parts)


# --------------------------------------------------------------------------------------------
# Embeddings: IVF plan -> units -> per-unit pairs -> merge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IVFPlan:
    """Result of the coarse stage: which rows each list holds (members) and probes (visitors).

    ``member_rows[member_offsets[L]:member_offsets[L+1]]`` are the rows whose nearest list is
    L (increasing); ``visitor_rows[visitor_offsets[L]:…]`` the rows that also probe L.
    """

    n: int
    nlist: int
    assign: np.ndarray  # (n,) int32 nearest list; -1 for rows excluded by `valid`
    member_rows: np.ndarray
    member_offsets: np.ndarray
    visitor_rows: np.ndarray
    visitor_offsets: np.ndarray
    centroids: np.ndarray  # (nlist, pca_dim) float32, in the PCA space
    params: IVFParams  # as used (nlist, nprobe clamped to the data)
    bound_rows: np.ndarray | None = None  # (n, width) float32 Bound rows for the pair stage
    coarse: IVFCoarse | None = None  # the quantizer that made it (assigns further rows, e.g. queries)
    nearest: np.ndarray | None = None  # (n, k) int32 each row's k nearest lists, own first (-1: invalid row)

    def list_sizes(self) -> np.ndarray:
        return np.diff(self.member_offsets)


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive lists and their rows: everything :func:`unit_pairs` needs besides ``x``."""

    lists: np.ndarray  # list ids
    member_rows: np.ndarray
    member_offsets: np.ndarray  # len(lists) + 1, into member_rows
    visitor_rows: np.ndarray
    visitor_offsets: np.ndarray

    @property
    def cost(self) -> int:
        """Dot products this unit computes (members × (members + visitors))."""
        m = np.diff(self.member_offsets).astype(np.float64)
        v = np.diff(self.visitor_offsets).astype(np.float64)
        return int((m * (m + v)).sum())


@dataclass(frozen=True)
class Projection:
    """v ↦ v @ axes − shift onto orthonormal principal axes (None: identity). A plain object,
    not a closure, so a trained quantizer pickles with the standard library."""

    axes: np.ndarray | None
    shift: np.ndarray | None

    def __call__(self, blk: np.ndarray) -> np.ndarray:
        if self.axes is None:
            return blk
        return np.ascontiguousarray(blk @ self.axes - self.shift, dtype=_F32)


# Slack of the Bound prefilter, in cosine: above its worst-case float32 rounding for rows of
# norm ≤ 1.01 (projection: ≤ √q·γ_d ≈ 3.5e-4 per row → ≤ 7e-4 on a product of two; the
# (q+2)-term tile product ≈ 1e-5). Rows of other norms get an infinite bound (see Bound).
_BOUND_SLACK = 2e-3
_BOUND_ETA = 1e-3  # the projection's error allowance when bounding the rest's norm


@dataclass(frozen=True)
class Bound:
    """Rows ↦ ``[x·Q, ē]`` (q + 1 float32 columns), Q orthonormal (the top principal axes and
    the mean's direction). For rows a, b: ⟨a, b⟩ = ⟨Qᵀa, Qᵀb⟩ + ⟨Pa, Pb⟩ ≤ ⟨Qᵀa, Qᵀb⟩ +
    ‖Pa‖·‖Pb‖ (P = I − QQᵀ, Cauchy–Schwarz), and ē ≥ ‖Px‖ — so the product of two bound rows
    is an upper bound of the cosine (up to ``_BOUND_SLACK``). Rows whose norm is not ~1 get
    ē = 1e6: every pair with them is a candidate and gets scored exactly."""

    axes: np.ndarray  # (d, q) float32

    @property
    def width(self) -> int:
        return int(self.axes.shape[1]) + 1

    def __call__(self, blk: np.ndarray) -> np.ndarray:
        q = self.axes.shape[1]
        out = np.empty((len(blk), q + 1), _F32)
        z = out[:, :q]
        np.matmul(blk, self.axes, out=z)
        # float32 sums of squares, widened by their worst-case rounding (γ_d) in the safe direction
        d = blk.shape[1]
        n2 = np.einsum("ij,ij->i", blk, blk).astype(np.float64) * (1.0 + 1.1 * d * 2.0**-24)
        zn = np.sqrt(np.einsum("ij,ij->i", z, z).astype(np.float64) * (1.0 - 1.1 * q * 2.0**-24))
        # ‖Px‖² = ‖x‖² − ‖Qᵀx‖² ≤ ‖x‖² − (‖z‖ − η‖x‖)²₊ for z within η‖x‖ of Qᵀx
        e2 = n2 - np.maximum(zn - _BOUND_ETA * np.sqrt(n2), 0.0) ** 2
        e = np.sqrt(np.maximum(e2, 0.0)).astype(_F32)
        e = np.nextafter(e, np.float32(np.inf))  # round up, never down
        e[(n2 < 0.98) | (n2 > 1.0201)] = 1e6
        out[:, q] = e
        return out


def _principal(train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top ``k`` principal axes (columns, float64) of ``train``: float64 eigh, each
    axis' sign fixed (eigh may return ±v), so the result is reproducible."""
    t = train[: 1 << 16].astype(np.float64)
    mean = t.mean(axis=0)
    t -= mean
    w, v = np.linalg.eigh(t.T @ t)
    axes = v[:, np.argsort(-w, kind="stable")[:k]]
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])] < 0, -1.0, 1.0)
    return mean, axes


def _pca(train: np.ndarray, dp: int, bound_dim: int = 0) -> tuple[Projection, Bound | None]:
    """Projection onto the top ``dp`` principal axes of ``train`` and, if ``bound_dim`` (at
    least ``dp`` axes then), the :class:`Bound` on the top ``max(dp, bound_dim)`` axes + the
    mean's direction. The projection's axes are the bound's first ``dp`` columns."""
    d = train.shape[1]
    kb = max(dp, bound_dim) if bound_dim > 0 else 0
    if kb and kb + 1 > d // 2:
        kb = 0  # too few dimensions left for the bound to save work
    if dp >= d and not kb:
        return Projection(None, None), None
    mean, axes = _principal(train, max(dp, kb))
    bound = None
    if kb:
        m = mean - axes[:, :kb] @ (axes[:, :kb].T @ mean)  # the mean, outside the axes
        cols = [axes[:, :kb]]
        if np.linalg.norm(m) > 1e-6:
            cols.append((m / np.linalg.norm(m))[:, None])
        bound = Bound(np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=_F32))
    if dp >= d:
        return Projection(None, None), bound
    return Projection(np.ascontiguousarray(axes[:, :dp], dtype=_F32), (mean @ axes[:, :dp]).astype(_F32)), bound


def _sample_rows(idx: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k >= len(idx):
        return idx
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(idx, size=k, replace=False))


def _nearest(centroids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest centroids (squared L2) of each row of q (faiss flat search)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=_F32))
    return index.search(np.ascontiguousarray(q, dtype=_F32), int(k))


def _kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """faiss k-means (single-threaded inside :func:`_single_threaded_libs`: deterministic)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=_F32)
    if k >= len(x):
        return x[:k].copy()
    if k == 1:
        return x.mean(axis=0, keepdims=True).astype(_F32)
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed) % (2**31 - 1),
                      max_points_per_centroid=1 << 30, min_points_per_centroid=1, verbose=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=_F32)


def _probe_radius(params: IVFParams, threshold: float | None) -> float:
    """Bisector-distance limit for visiting a list (PCA units); inf = plain top-nprobe."""
    if threshold is None or params.probe_margin is None or params.probe_margin <= 0:
        return math.inf
    r = math.sqrt(max(0.0, 2.0 - 2.0 * float(threshold)))  # max distance of a pair ≥ threshold
    return float(params.probe_margin) * r


@dataclass(frozen=True)
class IVFCoarse:
    """The trained coarse quantizer: all that assigning rows to lists needs (small, picklable)."""

    projection: Projection
    centroids: np.ndarray  # (nlist, pca_dim) float32, in the PCA space
    rho: float  # bisector-distance limit for visiting (inf = plain top-nprobe)
    params: IVFParams  # nlist and nprobe clamped to the data
    bound: Bound | None = None  # pair-stage prefilter (its first pca_dim columns = projection)
    gaps: np.ndarray | None = None  # (nlist, nlist) float32 centroid distances, if nlist ≤ 4096

    def coordinates(self, blk: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(PCA coordinates, bound rows or None) of float32 rows: with a bound, the coordinates
        are read off its columns (one product for both, and the same on every path)."""
        return _coordinates(self.projection, self.bound, blk)

    def from_bound(self, zb: np.ndarray) -> np.ndarray:
        """PCA coordinates of rows from their bound rows (the bound's first pca_dim columns)."""
        return _from_bound(self.projection, zb)


def _from_bound(projection: Projection, zb: np.ndarray) -> np.ndarray:
    dp = projection.axes.shape[1]
    return np.ascontiguousarray(zb[:, :dp] - projection.shift, dtype=_F32)


def _coordinates(projection: Projection, bound: Bound | None, blk: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if bound is None or projection.axes is None:
        return projection(blk), None
    zb = bound(blk)
    return _from_bound(projection, zb), zb


@dataclass(frozen=True)
class _Fitted:
    """The coarse quantizer before k-means: projection, bound, training rows' coordinates."""

    project: Projection
    bound: Bound | None
    xt: np.ndarray
    params: IVFParams  # nlist and nprobe clamped to the data
    rho: float

    def kmeans(self) -> np.ndarray:
        # One thread on purpose: with more, BLAS rounds some distances differently and ties
        # (identical rows) can break another way, so the centroids would depend on the core
        # count (measured: docs/candidates.md). The same partition whatever the core count
        # matters more than the 1.5x.
        p = self.params
        return _kmeans(self.xt, p.nlist, p.niter, p.seed)

    def quantizer(self, centroids: np.ndarray) -> IVFCoarse:
        gaps = _centroid_gaps(centroids) if math.isfinite(self.rho) and self.params.nprobe > 1 else None
        return IVFCoarse(self.project, centroids, self.rho, self.params, self.bound, gaps)


def _fit(x: np.ndarray, params: IVFParams, valid: np.ndarray | None, threshold: float | None) -> _Fitted:
    """Sample the valid rows, fit the PCA (and the bound), project the sample (one thread)."""
    n, d = x.shape
    rows = _valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    if m == 0:
        raise ValueError("plan_ivf needs at least one valid row")
    nlist = max(1, min(int(params.nlist), m))
    nprobe = max(1, min(int(params.nprobe), nlist))
    with _single_threaded_libs():
        train = _rows_f32(x, _sample_rows(idx, max(int(params.train_size), nlist), params.seed))
        dp = int(params.pca_dim) if params.pca_dim and params.pca_dim < d else d
        project, bound = _pca(train, dp, int(params.bound_dim or 0) if threshold is not None else 0)
        xt = _coordinates(project, bound, train)[0]
    return _Fitted(project, bound, xt, replace(params, nlist=nlist, nprobe=nprobe), _probe_radius(params, threshold))


def train_ivf(x: np.ndarray, params: IVFParams, valid: np.ndarray | None = None, *,
              threshold: float | None = None) -> IVFCoarse:
    """PCA and k-means on a sample of the valid rows (CPU, one thread, fixed seeds: the same
    input and params give the same quantizer whatever the number of cores)."""
    fitted = _fit(x, params, valid, threshold)
    with _single_threaded_libs():
        return fitted.quantizer(fitted.kmeans())


_GAPS_MAX_LISTS = 4096  # a table of ≤ 64 MB; above it, gaps are computed per visit candidate


def _centroid_gaps(c: np.ndarray) -> np.ndarray | None:
    """All centroid-to-centroid distances (float64 arithmetic, then float32), for the
    visiting rule: a table lookup instead of two gathers and a difference per candidate."""
    if len(c) > _GAPS_MAX_LISTS:
        return None
    c64 = c.astype(np.float64)
    sq = (c64 * c64).sum(axis=1)
    g = sq[:, None] + sq[None, :] - 2.0 * (c64 @ c64.T)
    return np.sqrt(np.maximum(g, 0.0)).astype(_F32)


def assign_rows(x: np.ndarray, coarse: IVFCoarse, rows: np.ndarray | slice,
                nearest_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest list of each of ``x[rows]`` and the lists each visits (see :func:`plan_ivf`).

    Returns ``(member_list, visitor_row, visitor_list)``: int32 per row; then the (global row,
    list) visit pairs, rows increasing. Pure, one thread; any split of the rows into calls
    gives the same result (the unit of the Ray-spread coarse stage)."""
    rid = np.arange(rows.start or 0, rows.stop, dtype=_I64) if isinstance(rows, slice) else np.asarray(rows, _I64)
    blk = _rows_f32(x, rows)
    pz, _ = coarse.coordinates(blk)
    del blk
    return _assign(coarse, pz, rid, nearest_out)


def _assign(coarse: IVFCoarse, pz: np.ndarray, rid: np.ndarray,
            nearest_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`assign_rows` from the rows' PCA coordinates ``pz`` (``rid``: their row ids).
    ``nearest_out`` (rows × k, k ≤ nprobe): receives each row's k nearest lists, own first."""
    nprobe = coarse.params.nprobe
    centroids = coarse.centroids
    dist, lab = _nearest(centroids, pz, nprobe)
    del pz
    if nearest_out is not None:
        nearest_out[:] = lab[:, : nearest_out.shape[1]]
    prim = lab[:, 0].astype(np.int32)
    if nprobe == 1:
        return prim, np.empty(0, _I64), np.empty(0, np.int32)
    keep = lab[:, 1:] >= 0
    if math.isfinite(coarse.rho):
        # Visit L if its bisector with the own cell is within rho: (dist_L - dist_1) / 2‖c_L - c_1‖.
        # As ‖c_L - c_1‖ ≤ √dist_L + √dist_1, only lists with √dist_L ≤ √dist_1 + 2·rho can
        # pass; the centroid gaps are computed for those alone (+ slack for faiss' rounding).
        d1 = dist[:, :1]
        keep &= dist[:, 1:] <= (np.sqrt(np.maximum(d1, 0.0)) + 2.0 * coarse.rho) ** 2 + 1e-4
        r, j = np.nonzero(keep)
        if coarse.gaps is not None:
            gap = coarse.gaps[lab[r, 0], lab[r, j + 1]]
        else:
            diff = centroids[lab[r, j + 1]] - centroids[lab[r, 0]]
            gap = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        bis = (dist[r, j + 1] - d1[r, 0]) / np.maximum(2.0 * gap, 1e-12)
        ok = bis <= coarse.rho
        r, j = r[ok], j[ok]
    else:
        r, j = np.nonzero(keep)
    return prim, rid[r], lab[:, 1:][r, j].astype(np.int32)


_ASSIGN_BLOCK = 1 << 13


def assign_blocks(n_rows: int) -> list[tuple[int, int]]:
    """The row blocks (positions among the valid rows) of the coarse stage."""
    return [(s, min(n_rows, s + _ASSIGN_BLOCK)) for s in range(0, n_rows, _ASSIGN_BLOCK)]


def build_plan(n: int, coarse: IVFCoarse, idx: np.ndarray, prim: np.ndarray,
               visits: list[tuple[np.ndarray, np.ndarray]], bound_rows: np.ndarray | None = None) -> IVFPlan:
    """Assemble the plan from every valid row's member list (``prim``, aligned with ``idx``)
    and the visit pairs of :func:`assign_rows`, in row-block order (``bound_rows``: the
    rows' :class:`Bound` rows, if collected)."""
    nlist = coarse.params.nlist
    assign = np.full(n, -1, np.int32)
    assign[idx] = prim
    order = np.argsort(prim, kind="stable")
    member_rows = idx[order]
    member_offsets = np.zeros(nlist + 1, _I64)
    np.cumsum(np.bincount(prim, minlength=nlist), out=member_offsets[1:])
    visits = [v for v in visits if len(v[0])]
    if visits:
        vr = np.concatenate([v[0] for v in visits])  # rows increasing (blocks in order)
        vl = np.concatenate([v[1] for v in visits])
        vo = np.argsort(vl, kind="stable")  # rows stay increasing within a list
        visitor_rows = vr[vo]
        visitor_offsets = np.zeros(nlist + 1, _I64)
        np.cumsum(np.bincount(vl, minlength=nlist), out=visitor_offsets[1:])
        del vr, vl, vo
    else:
        visitor_rows = np.empty(0, _I64)
        visitor_offsets = np.zeros(nlist + 1, _I64)
    return IVFPlan(
        n=n, nlist=nlist, assign=assign, member_rows=member_rows, member_offsets=member_offsets,
        visitor_rows=visitor_rows, visitor_offsets=visitor_offsets, centroids=coarse.centroids,
        params=coarse.params, bound_rows=bound_rows, coarse=coarse,
    )


def plan_ivf(x: np.ndarray, params: IVFParams, valid: np.ndarray | None = None, *,
             threshold: float | None = None, stats: dict | None = None,
             progress: Callable[[int, int], None] | None = None, keep_nearest: int = 0) -> IVFPlan:
    """Coarse stage (CPU, deterministic): PCA + k-means on a sample of the valid rows
    (:func:`train_ivf`), then each valid row's nearest list (member) and the lists it visits,
    streamed in blocks on worker threads (:func:`assign_rows`; ``x`` may be a memmap).

    Visited lists: among the ``nprobe - 1`` next-nearest centroids, those whose Voronoi
    boundary with the row's own cell is within ``probe_margin · √(2 - 2·threshold)`` of the
    row (distance to the bisecting hyperplane, in the PCA space). A partner across a boundary
    that far away would have to move that far *towards* it; rows deep inside their cell visit
    few lists, rows near a boundary many. Without ``threshold`` every row visits
    ``nprobe - 1`` lists. With ``threshold`` and ``params.bound_dim``, the plan also holds
    every row's :class:`Bound` row (n × ~130 float32) for the pair stage's prefilter; the
    rows are projected on the worker threads while one of them trains the k-means.
    ``progress(done, total)`` counts row blocks: reported at 0 first, then each block as it
    is projected (with a bound) and as it is assigned to lists (total = 2 × blocks with a
    bound, else the blocks; the k-means gives no progress of its own).
    ``keep_nearest`` = k > 0: the plan also keeps each row's k nearest lists (``nearest``; k is
    capped at nprobe), e.g. for the outlier score's search, which then needs no coarse stage."""
    t0 = time.perf_counter()
    n = x.shape[0]
    rows = _valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    blocks = assign_blocks(m)
    workers = _n_threads(params.threads)
    fitted = _fit(x, params, valid, threshold)
    bound = fitted.bound
    # with a bound, every row block is first projected (its bound rows, from which its PCA
    # coordinates are read), on the worker threads while one of them runs the k-means
    total = (2 if bound is not None else 1) * len(blocks)
    if progress and m:
        progress(0, total)

    def sel(k: int):
        s, e = blocks[k]
        return slice(s, e) if rows is None else idx[s:e]

    bound_rows = np.zeros((n, bound.width), _F32) if bound is not None else None
    done = 0
    with _single_threaded_libs():
        if bound is None:
            coarse = fitted.quantizer(fitted.kmeans())
        else:
            found: list = []

            def project(k: int) -> None:
                if k < 0:
                    found.append(fitted.kmeans())
                else:
                    bound_rows[sel(k)] = bound(_rows_f32(x, sel(k)))

            for k, _ in _pmap(project, [-1, *range(len(blocks))], workers):
                if k > 0 and progress:  # item 0 is the k-means
                    done += 1
                    progress(done, total)
            coarse = fitted.quantizer(found[0])
    t1 = time.perf_counter()
    prim = np.empty(m, np.int32)
    visits: list = [None] * len(blocks)
    kn = min(int(keep_nearest), coarse.params.nprobe) if keep_nearest else 0
    near = np.empty((m, kn), np.int32) if kn else None

    def one(k: int) -> None:
        s, e = blocks[k]
        out = None if near is None else near[s:e]
        if bound_rows is None:
            p, vr, vl = assign_rows(x, coarse, sel(k), out)
        else:  # the same coordinates assign_rows computes, read off the bound rows
            rid = np.arange(s, e, dtype=_I64) if rows is None else idx[s:e]
            p, vr, vl = _assign(coarse, coarse.from_bound(bound_rows[sel(k)]), rid, out)
        prim[s:e] = p
        visits[k] = (vr, vl)

    with _single_threaded_libs():
        for _ in _pmap(one, list(range(len(blocks))), workers):
            done += 1
            if progress:
                progress(done, total)
    plan = build_plan(n, coarse, idx, prim, visits, bound_rows)
    if near is not None:
        plan = with_nearest(plan, idx, near)
    if stats is not None:
        stats.update(train_seconds=t1 - t0, assign_seconds=time.perf_counter() - t1,
                     mean_probes=1.0 + len(plan.visitor_rows) / m, probe_radius=coarse.rho)
    return plan


def with_nearest(plan: IVFPlan, idx: np.ndarray, near: np.ndarray) -> IVFPlan:
    """The plan, also holding each row's nearest lists (``near``: aligned with the valid rows
    ``idx``; the other rows get -1)."""
    nearest = np.full((plan.n, near.shape[1]), -1, np.int32)
    nearest[idx] = near
    return replace(plan, nearest=nearest)


def outlier_lists(plan: IVFPlan) -> dict:
    """What :func:`kth_neighbour_similarity` (``lists=``) reuses of a search's plan."""
    return {"coarse": plan.coarse, "assign": plan.assign, "nearest": plan.nearest}


def plan_figures(plan: IVFPlan, units: list[WorkUnit], bound_width: int | None = None) -> dict:
    """What a plan will cost: lists, lists compared per row, list sizes, dot products, and
    the width of the bound rows the tiles use (``bound_width``; default: the plan's, if any)."""
    sizes = plan.list_sizes()
    rows = max(1, int(plan.member_offsets[-1]))
    if bound_width is None:
        bound_width = 0 if plan.bound_rows is None else int(plan.bound_rows.shape[1])
    return dict(nlist=plan.nlist, nprobe=plan.params.nprobe, units=len(units), bound_width=int(bound_width),
                mean_probes=1.0 + len(plan.visitor_rows) / rows, list_size_max=int(sizes.max()),
                list_size_mean=float(sizes.mean()), dot_products=int(sum(u.cost for u in units)))


def make_units(plan: IVFPlan, unit_rows: int | None = None) -> list[WorkUnit]:
    """Cut the lists into units of consecutive lists with about ``unit_rows`` rows each
    (members + visitors). Units are independent: run them anywhere, in any order, and
    :func:`merge_pairs` the results."""
    target = max(1, int(unit_rows or plan.params.unit_rows))
    msz = np.diff(plan.member_offsets)
    vsz = np.diff(plan.visitor_offsets)
    rows_per_list = np.where(msz > 0, msz + vsz, 0)
    units: list[WorkUnit] = []
    start, acc = 0, 0
    for L in range(plan.nlist):
        if acc and acc + rows_per_list[L] > target:
            units.append(_unit(plan, start, L))
            start, acc = L, 0
        acc += int(rows_per_list[L])
    if acc:
        units.append(_unit(plan, start, plan.nlist))
    return units


def _unit(plan: IVFPlan, a: int, b: int) -> WorkUnit:
    mo, vo = plan.member_offsets, plan.visitor_offsets
    return WorkUnit(
        lists=np.arange(a, b, dtype=_I64),
        member_rows=plan.member_rows[mo[a] : mo[b]],
        member_offsets=mo[a : b + 1] - mo[a],
        visitor_rows=plan.visitor_rows[vo[a] : vo[b]],
        visitor_offsets=vo[a : b + 1] - vo[a],
    )


# Projecting a row onto the bound costs ~(q + 1)·d multiply-adds, once per list it is read
# for; each of its tile products then costs q + 2 instead of d. With lists of fewer members
# than this, projecting on the fly costs more than it saves (break-even ≈ q·d / (d − q) ≈ 170
# at d = 512, q = 128; docs/candidates.md).
_PROJECT_MIN_MEMBERS = 256


def unit_pairs(
    x: np.ndarray,
    unit: WorkUnit,
    threshold: float,
    params: IVFParams | None = None,
    *,
    block_size: int | None = None,
    use_gpu: bool | None = None,
    bound: np.ndarray | Bound | None = None,
) -> Pairs:
    """Pairs with cosine ≥ threshold found in one unit's lists: members × members (each pair
    once) and visitors × members, in tiles of at most ``block_size`` rows per side.

    ``bound`` (CPU only; the same pairs either way): the tiles are computed on narrower
    :class:`Bound` rows first and only the pairs those cannot rule out are scored on ``x``.
    Either a plan's ``bound_rows`` (every row's, precomputed: the serial driver) or the
    quantizer's :class:`Bound` itself, which then projects the rows of each list with at least
    ``_PROJECT_MIN_MEMBERS`` members as they are read (a Ray unit: nothing n-sized travels)."""
    bs = max(1, int(block_size or (params.block_size if params else 4096)))
    if use_gpu is None:
        use_gpu = bool(params.use_gpu) if params is not None and params.use_gpu is not None else gpu_available()
    mm = _Matmul(use_gpu)

    def plain_load(r):
        return _rows_f32(x, r)

    def plain_tile(xr, xc, rr, rc, diag):
        return _tile(mm, xr, xc, rr, rc, threshold, diag)

    def bound_tile(zr, zc, rr, rc, diag):
        return _tile_bounded(mm, zr, zc, rr, rc, x, threshold, diag)

    bound_load = None
    if bound is not None and not use_gpu:
        if isinstance(bound, Bound):
            def bound_load(r):
                return bound(_rows_f32(x, r))
            min_members = _PROJECT_MIN_MEMBERS
        else:
            def bound_load(r):
                return bound[r]
            min_members = 0
    parts = []
    mo, vo = unit.member_offsets, unit.visitor_offsets
    for k in range(len(unit.lists)):
        mem = unit.member_rows[mo[k] : mo[k + 1]]
        nm = len(mem)
        if nm == 0:
            continue
        if bound_load is not None and nm >= min_members:
            load, tile = bound_load, bound_tile
        else:
            load, tile = plain_load, plain_tile
        vis = unit.visitor_rows[vo[k] : vo[k + 1]]
        rows = np.concatenate([mem, vis]) if len(vis) else mem
        if len(rows) <= bs:  # common case: one gather, one product
            xa = load(rows)
            parts.append(tile(xa, xa[:nm], rows, mem, (nm, 0)))
            continue
        for c0 in range(0, nm, bs):
            c1 = min(nm, c0 + bs)
            xc = load(mem[c0:c1])
            for r0 in range(0, len(rows), bs):
                r1 = min(len(rows), r0 + bs)
                if r0 >= c1 and r1 <= nm:
                    continue  # member rows all after these columns: the mirrored tile has them
                xr = xc if (r0 == c0 and r1 == c1) else load(rows[r0:r1])
                # member rows at positions r0 + r pair with columns c0 + c only if r0 + r < c0 + c
                n_sym = min(r1 - r0, max(0, nm - r0))
                parts.append(tile(xr, xc, rows[r0:r1], mem[c0:c1], (n_sym, r0 - c0)))
    return _collect(parts)


def embedding_pairs(
    x: np.ndarray,
    threshold: float,
    params: IVFParams | None = None,
    valid: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
    plan_progress: Callable[[int, int], None] | None = None,
    lists_out: dict | None = None,
) -> Pairs:
    """Pairs of rows with cosine ≥ ``threshold``; rows L2-normalised, float16 or float32, may
    be a memmap. Serial driver: :func:`plan_ivf` → :func:`make_units` → :func:`unit_pairs`
    (in worker threads) → :func:`merge_pairs`. Below ``params.exact_below`` valid rows it is
    exact brute force. ``progress(done, total)`` counts lists (brute force: tiles),
    ``plan_progress`` the coarse stage (see :func:`plan_ivf`); ``stats``, if given, receives
    timings and plan figures. ``lists_out``, if given (a dict) and the search ran on IVF lists,
    receives each row's nearest lists for :func:`kth_neighbour_similarity` (``lists=``), so
    the outlier score's search reuses this coarse stage instead of running its own."""
    t0 = time.perf_counter()
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {x.shape}")
    n, d = x.shape
    rows = _valid_rows(n, valid)
    m = n if rows is None else len(rows)
    if params is None:
        params = IVFParams.auto(m, d, threshold)
    gpu = bool(params.use_gpu) if params.use_gpu is not None else gpu_available()
    st = stats if stats is not None else {}
    st.update(n=n, valid=m, gpu=gpu)
    if m < 2:
        st.update(method="none", seconds=0.0)
        return Pairs.empty()
    if m < params.exact_below or min(params.nlist, m) <= 1:
        p = brute_force_pairs(x, threshold, block=params.block_size, valid=valid, use_gpu=gpu,
                              progress=progress, threads=params.threads)
        st.update(method="brute_force", seconds=time.perf_counter() - t0, pairs=len(p))
        return p
    # rows are converted once for the assignment, then ≥ 2 more times without a bound (own
    # list, visits) but only as candidates with one
    _want_fast_f16(x, (1.2 if params.bound_dim else 3.0) * m * d)
    plan = plan_ivf(x, params, valid, threshold=threshold, stats=st, progress=plan_progress,
                    keep_nearest=_OUTLIER_NPROBE if lists_out is not None else 0)
    if lists_out is not None:
        lists_out.update(outlier_lists(plan))
    t1 = time.perf_counter()
    units = make_units(plan)
    st.update(method="ivf", plan_seconds=t1 - t0, **plan_figures(plan, units, 0 if gpu else None))
    workers = 1 if gpu else _n_threads(params.threads)
    done = 0
    parts: list = [None] * len(units)
    order = sorted(range(len(units)), key=lambda k: -units[k].cost)  # big units first
    with _single_threaded_libs():
        for k, p in _pmap(lambda k: unit_pairs(x, units[k], threshold, plan.params, use_gpu=gpu,
                                                bound=plan.bound_rows),
                          order, workers):
            parts[order[k]] = p
            done += len(units[order[k]].lists)
            if progress:
                progress(done, plan.nlist)
    if progress and done < plan.nlist:
        progress(plan.nlist, plan.nlist)
    t2 = time.perf_counter()
    out = merge_pairs(parts)
    st.update(pairs_seconds=t2 - t1, merge_seconds=time.perf_counter() - t2,
              seconds=time.perf_counter() - t0, pairs=len(out))
    return out


# --------------------------------------------------------------------------------------------
# k-th nearest neighbour similarity (the manifest's outlier score)
# --------------------------------------------------------------------------------------------


def _merge_topk(best: np.ndarray, rows: np.ndarray, sims: np.ndarray, k: int) -> None:
    """best[rows] := the k largest of best[rows] ∪ sims (per row); rows unique."""
    if sims.shape[1] > k:
        sims = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    both = np.concatenate([best[rows], sims], axis=1)
    best[rows] = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]


_OUTLIER_NPROBE = 5  # lists the outlier score's search looks into: the row's own + 4 nearest


def _plan_from_lists(lists: dict | None, idx: np.ndarray, n: int, nprobe: int) -> IVFPlan | None:
    """An IVF plan whose rows visit their ``nprobe - 1`` next-nearest lists, from the lists an
    earlier search kept; None if there are none or they do not cover these rows and probes."""
    if not lists or lists.get("nearest") is None or lists.get("coarse") is None:
        return None
    nearest, assign = lists["nearest"], lists["assign"]
    if len(assign) != n or nearest.shape[1] < nprobe or (assign[idx] < 0).any():
        return None
    others = nearest[idx, 1:nprobe]
    keep = others >= 0
    vr = np.repeat(idx, others.shape[1]).reshape(others.shape)[keep]  # rows increasing
    return build_plan(n, lists["coarse"], idx, assign[idx], [(vr, others[keep])])


def outlier_unit(x: np.ndarray, unit: WorkUnit, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """One unit of the outlier score's IVF search: each row of the unit's lists (members and
    visitors) against the members of those lists. Returns ``(rows, sims)``: the rows
    (increasing, unique) and their k largest similarities in this unit (rows × k float32,
    -inf where fewer than k were compared). Pure: any machine, any order."""
    mm = _Matmul(False)
    got: list = []
    for li in range(len(unit.lists)):
        mem = unit.member_rows[unit.member_offsets[li] : unit.member_offsets[li + 1]]
        if len(mem) == 0:
            continue
        vis = unit.visitor_rows[unit.visitor_offsets[li] : unit.visitor_offsets[li + 1]]
        rows = np.concatenate([mem, vis]) if len(vis) else mem
        for c0 in range(0, len(mem), block):
            cm = mem[c0 : c0 + block]
            xc = _rows_f32(x, cm)
            for r0 in range(0, len(rows), block):
                rr = rows[r0 : r0 + block]
                s = mm(_rows_f32(x, rr), xc)
                # a member never counts as its own neighbour
                pos = np.arange(r0, r0 + len(rr))
                own = (pos >= c0) & (pos < c0 + len(cm)) & (pos < len(mem))
                s[np.flatnonzero(own), pos[own] - c0] = -np.inf
                if s.shape[1] > k:
                    s = np.partition(s, s.shape[1] - k, axis=1)[:, -k:]
                got.append((rr, s))
    if not got:
        return np.empty(0, _I64), np.empty((0, k), _F32)
    every = np.concatenate([rr for rr, _ in got])
    rows, inv = np.unique(every, return_inverse=True)
    best = np.full((len(rows), k), -np.inf, _F32)
    at = 0
    for rr, s in got:  # a tile's rows are distinct; a row recurs only across tiles
        _merge_topk(best, inv[at : at + len(rr)], s, k)
        at += len(rr)
    return rows, best


def kth_neighbour_similarity(
    x: np.ndarray,
    k: int,
    valid: np.ndarray | None = None,
    *,
    exact_below: int = 10_000,
    nprobe: int = _OUTLIER_NPROBE,
    block: int = 4096,
    stats: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 0,
    lists: dict | None = None,
    map_units: Callable[[list[WorkUnit], int, int], Iterable[tuple[int, tuple[np.ndarray, np.ndarray]]]] | None = None,
) -> np.ndarray:
    """Cosine of each valid row to its k-th most similar other valid row (float32; NaN for
    invalid rows and where fewer than k others were compared).

    Exact (blockwise matrix products) below ``exact_below`` valid rows. Above, approximate and
    near-linear: an IVF plan (as in :func:`plan_ivf`, every row visiting its ``nprobe - 1``
    next-nearest lists) and one matrix product per list, members and visitors × members, so
    each row is compared with the members of its own list and of its nearest other lists.
    A row whose true neighbours lie in lists it did not visit gets a lower similarity (a
    higher outlier score) than exact search would give; docs/manifest.md measures how much.
    ``progress(done, total)`` counts row blocks (exact) or lists (IVF); ``threads``: worker
    threads for the lists (0 = all cores). ``lists``: the nearest lists an
    :func:`embedding_pairs` run over the same rows kept (its ``lists_out``): the IVF path then
    uses that partition and skips its own PCA, k-means and assignment. The lists are cut into
    :class:`WorkUnit` s (:func:`make_units`), each searched by :func:`outlier_unit`;
    ``map_units(units, k, block)``, if given, runs them elsewhere (e.g. as Ray tasks) and
    yields ``(position in units, outlier_unit's result)`` in any order: the same values as
    on the worker threads here, if its BLAS runs on one thread as theirs does (a
    multi-threaded product may round differently)."""
    t0 = time.perf_counter()
    n, d = x.shape
    rows_all = _valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows_all is None else rows_all
    m = len(idx)
    out = np.full(n, np.nan, _F32)
    if m <= k:
        return out
    best = np.full((n, k), -np.inf, _F32)
    mm = _Matmul(False)
    if m < exact_below:
        method = "exact"
        nblocks = -(-m // block)
        for b, q0 in enumerate(range(0, m, block), 1):
            qr = idx[q0 : q0 + block]
            xq = _rows_f32(x, qr)
            for c0 in range(q0, m, block):  # each block pair once: s serves both sides
                cr = idx[c0 : c0 + block]
                s = mm(xq, xq if c0 == q0 else _rows_f32(x, cr))
                if c0 == q0:
                    np.fill_diagonal(s, -np.inf)
                else:
                    _merge_topk(best, cr, np.ascontiguousarray(s.T), k)
                _merge_topk(best, qr, s, k)
            if progress:
                progress(b, nblocks)
    else:
        method = "ivf"
        params = IVFParams.auto(m, d, nprobe=max(1, int(nprobe)), probe_margin=None, bound_dim=0, threads=threads)
        _want_fast_f16(x, float(m) * d * (params.nprobe + 1))  # every row read once per list it is in
        plan = _plan_from_lists(lists, idx, n, params.nprobe)
        if plan is None:
            plan = plan_ivf(x, params, valid)
        else:
            method = "ivf (the duplicate search's lists)"
        units = make_units(plan)
        # units on worker threads (BLAS single-threaded inside, as in the pair stage) or as
        # the caller's tasks (map_units); the merges stay here: a visitor row is in several
        # units, and the k largest of a set do not depend on the order they arrive in
        done = 0
        if progress:
            progress(0, plan.nlist)
        if map_units is not None:
            results = map_units(units, k, block)
            ctx = nullcontext()
        else:
            results = _pmap(lambda u: outlier_unit(x, u, k, block), units, _n_threads(threads))
            ctx = _single_threaded_libs()
        with ctx:
            for u, (rr, s) in results:
                if len(rr):
                    _merge_topk(best, rr, s, k)
                done += len(units[u].lists)
                if progress:
                    progress(done, plan.nlist)
        if stats is not None:
            stats.update(units=len(units))
    kth = best[:, 0] if k == 1 else best.min(axis=1)
    kth = np.where(np.isfinite(kth), kth, np.nan).astype(_F32)
    out[idx] = kth[idx]
    if stats is not None:
        stats.update(method=method, seconds=time.perf_counter() - t0)
    return out
