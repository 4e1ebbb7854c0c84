"""Hamming-radius search on 64-bit hashes: popcount, multi-index hashing (MIH) and its cost
model, the exhaustive fallback (faiss ``IndexBinaryFlat``), and :func:`hash_pairs`.

Multi-index hashing: split the 64 bits into ``m`` chunks; by the (generalised) pigeonhole
principle two hashes within Hamming ``r`` agree within ``r // m`` bits on at least one chunk
(``m = r + 1``: exactly, on one chunk). Every candidate is verified with an exact popcount, so
the result equals brute force. ``m`` and the per-chunk radius come from a cost estimate on the
data (:func:`plan_mih`); when no split beats it (large radius, dense data) it is exhaustive
popcount search (:func:`hash_brute`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from dedup.compute.search.pairs import Pairs, collect_tiles, remap_rows, valid_rows
from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs

__all__ = [
    "MIHPlan",
    "hash_brute",
    "hash_mih",
    "hash_pairs",
    "plan_mih",
    "popcount64",
]

_I64 = np.int64
_F32 = np.float32


_HASH_BITS = 64
_DIRECT_TABLE_BITS = 22  # chunks up to this many bits use a direct-address bucket table
_MAX_PROBES = 4096  # flip masks per chunk we are willing to enumerate
_VERIFY_CAP = 1 << 17  # candidates verified at once: a few cache-sized arrays, bounded memory


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def popcount64(x: np.ndarray | int) -> np.ndarray:
    """Set bits of each 64-bit value (uint64; int64 counts its two's-complement bits), as int64.

    ``np.bitwise_count`` on NumPy ≥ 2.0; on NumPy 1.26 (which lacks it) the same counts by a
    branch-free bit sum (SWAR) on uint64 arrays, which wrap silently."""
    x = np.asarray(x, np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    v = np.array(x, np.uint64, ndmin=1)  # a copy, ≥ 1-d: array arithmetic (scalars would warn on overflow)
    v -= (v >> np.uint64(1)) & _M1
    v = (v & _M2) + ((v >> np.uint64(2)) & _M2)
    v = (v + (v >> np.uint64(4))) & _M4
    v *= _H01
    v >>= np.uint64(56)
    return v.astype(np.int64).reshape(x.shape)


def _bit_count(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, in the narrowest type at hand (uint8 on NumPy ≥ 2.0)."""
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else popcount64(x)


def _low_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


@dataclass(frozen=True)
class MIHPlan:
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
        # row positions on 32 bits where they fit (4 bytes a row less for each of order,
        # ustart, and the search's rank and bucket ends)
        self.order: np.ndarray = np.argsort(vals, kind="stable").astype(_index_type(len(vals)))
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
            self.ustart: np.ndarray = np.append(idx, len(sv)).astype(_index_type(len(sv) + 1))

    def ranges(self, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.direct:
            p = probes.astype(_I64)
            s = self.offs[p]
            return s, self.offs[p + 1] - s
        pos = np.searchsorted(self.uniq, probes)
        pos_c = np.minimum(pos, len(self.uniq) - 1)
        hit = (pos < len(self.uniq)) & (self.uniq[pos_c] == probes)
        s = self.ustart[pos_c].astype(_I64)
        ln = np.where(hit, self.ustart[pos_c + 1] - s, 0)
        return s, ln


def _index_type(n: int) -> np.dtype:
    """int32 for positions below 2³¹, else int64."""
    return np.dtype(np.int32 if n < 1 << 31 else _I64)


def _split_long(q: np.ndarray, start: np.ndarray, length: np.ndarray, cap: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranges longer than ``cap`` cut into pieces of at most ``cap`` (same query each)."""
    if not len(length) or length.max() <= cap:
        return q, start, length
    parts = (length + cap - 1) // cap
    rep = np.repeat(np.arange(len(q)), parts)
    k = np.arange(len(rep)) - np.repeat(np.cumsum(parts) - parts, parts)
    return q[rep], start[rep] + k * cap, np.minimum(length[rep] - k * cap, cap)


def _spans(length: np.ndarray, cap: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs of consecutive ranges holding about ``cap`` positions together (at least
    one range each; a range is at most ``cap`` long after :func:`_split_long`)."""
    cum = np.cumsum(length)
    lo = 0
    while lo < len(length):
        base = cum[lo] - length[lo]
        hi = max(int(np.searchsorted(cum, base + cap, side="right")), lo + 1)
        yield lo, hi
        lo = hi


def plan_mih(h: np.ndarray, radius: int, rng: np.random.Generator) -> MIHPlan | None:
    """Pick (chunks, per-chunk radius) by estimated cost; None = brute force is cheaper."""
    n = len(h)
    sample = h[rng.choice(n, size=min(n, 1024), replace=False)] if n > 1024 else h
    brute = 0.5 * n * n * 1.5  # ns: faiss popcount kernel, per unordered pair
    best: MIHPlan | None = None
    seen = set()
    for rp in range(0, radius + 1):
        m = radius // (rp + 1) + 1  # fewest chunks with m·(rp+1) > r
        if m > _HASH_BITS or m in seen:
            continue
        seen.add(m)
        layout = _chunk_layout(m)
        bits = max(b for _, b in layout)
        nmask = _n_masks(bits, rp)
        # ns, fitted to benchmarks/hash_scale.py at 10⁶ and 10⁷ rows (Intel host, 2026-12-05)
        enum = n * m * (nmask * 8.0 + 60.0)  # ns: probe lookups + per-chunk sort
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
        cost = enum + cand * 20.0  # ns per candidate pair (gather in bucket order, XOR, popcount)
        if best is None or cost < best.est_cost:
            best = MIHPlan(m, rp, cost)
    if best is None or best.est_cost > brute:
        return None
    return best


def hash_brute(h: np.ndarray, radius: int, block: int = 4096, threads: int = 0,
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
        qi = np.repeat(np.arange(r1 - r0, dtype=_I64), np.diff(lims).astype(_I64))
        lab = lab.astype(_I64)
        keep = lab > qi  # upper triangle within the block; later rows entirely
        return qi[keep] + r0, lab[keep] + r0, dist[keep].astype(_F32)

    parts = []
    # progress in comparisons: the block starting at r0 compares its rows with rows [r0, n)
    cost = [(min(n, r0 + block) - r0) * (n - r0) for r0 in starts]
    total, done = sum(cost), 0
    with single_threaded_libs():
        for k, got in pmap(rows, starts, n_threads(threads)):
            parts.append(got)
            done += cost[k]
            if progress:
                progress(done, total)
    return collect_tiles(parts)


def _high_bit(masks: np.ndarray) -> np.ndarray:
    hb = np.zeros(len(masks), np.uint64)
    for b in range(64):
        bit = np.uint64(1) << np.uint64(b)
        hb[(masks & bit) != 0] = bit
    return hb


def hash_mih(h: np.ndarray, radius: int, plan: MIHPlan, threads: int = 0,
             progress: Callable[[int, int], None] | None = None) -> Pairs:
    """Multi-index hashing. Per chunk, every unordered pair of rows whose chunk values differ
    in ≤ rp bits is generated exactly once: equal values from the earlier position in the
    bucket, different values from the row with the smaller value. A pair agreeing (within rp)
    on several chunks is kept only on the first; then the full distance is verified.

    Per chunk the hashes are copied in bucket order and the queries run in that order too, so a
    candidate's hash is read from a run of its bucket (one cache line for a few candidates)
    rather than gathered by row id across the whole array, and row ids are looked up only for
    the pairs within the radius: ~20 ns a candidate instead of ~35, which matters where the
    candidates a row verifies grow with n (~n / 2²² a probe; docs/scale.md)."""
    layout = _chunk_layout(plan.m)
    cmask = [_low_mask(b) << np.uint64(s) for s, b in layout]
    n = len(h)
    workers = n_threads(threads)
    parts = []
    done = 0  # rows done, summed over chunks
    pos_t = _index_type(n)
    for k, (shift, bits) in enumerate(layout):
        vals = (h >> np.uint64(shift)) & _low_mask(bits)
        if bits <= 32:
            vals = vals.astype(np.uint32)
        bk = _Buckets(vals, bits)
        del vals
        hs = h[bk.order]  # the hashes in bucket order (8 B a row while this chunk runs)
        vdt = np.uint32 if bits <= 32 else np.uint64
        masks = _flip_masks(bits, plan.rp)[1:].astype(vdt)
        hb = _high_bit(masks.astype(np.uint64)).astype(vdt)
        qblock = max(256, (1 << 18) // (len(masks) + 1))

        def block(p0: int, k=k, bk=bk, hs=hs, masks=masks, hb=hb, qblock=qblock, shift=shift, bits=bits, vdt=vdt):
            p1 = min(n, p0 + qblock)
            hq = hs[p0:p1]
            v = ((hq >> np.uint64(shift)) & _low_mask(bits)).astype(vdt)
            # same value: the positions after this one in its bucket
            st, ln = bk.ranges(v)
            own = np.arange(p0 + 1, p1 + 1, dtype=_I64)
            qs, starts, lens = [np.arange(p1 - p0, dtype=_I64)], [own], [st + ln - own]
            if len(masks):
                probes = (v[:, None] ^ masks[None, :]).ravel()
                sel = ((v[:, None] & hb[None, :]) == 0).ravel()  # only probes above the own value
                if bk.direct:
                    sel &= bk.occupied[probes]  # most probes hit empty buckets (below ~10⁷ rows)
                f = np.flatnonzero(sel)
                st, ln = bk.ranges(probes[f])
                qs.append(f // len(masks))
                starts.append(st)
                lens.append(ln)
            q, start, length = np.concatenate(qs), np.concatenate(starts), np.concatenate(lens)
            keep = length > 0
            q, start, length = _split_long(q[keep], start[keep], length[keep], _VERIFY_CAP)
            out = []
            for lo, hi in _spans(length, _VERIFY_CAP):
                ln = length[lo:hi]
                cum = np.cumsum(ln)
                tot = int(cum[-1])
                # candidate j of range r sits at start[r] + (j - first j of r)
                pos = np.repeat((start[lo:hi] - (cum - ln)).astype(pos_t), ln)
                pos += np.arange(tot, dtype=pos_t)
                x = np.repeat(hq[q[lo:hi]], ln) ^ hs[pos]
                d = _bit_count(x)
                hit = np.flatnonzero(d <= radius)
                if not len(hit):
                    continue
                xk = x[hit]
                ok = np.ones(len(hit), bool)
                for kk in range(k):  # already produced by an earlier chunk
                    ok &= popcount64(xk & cmask[kk]) > plan.rp
                hit = hit[ok]
                if len(hit):
                    r = q[lo:hi][np.searchsorted(cum, hit, side="right")]
                    out.append((bk.order[r + p0].astype(_I64), bk.order[pos[hit]].astype(_I64),
                                d[hit].astype(_F32)))
            return out

        for i, got in pmap(block, list(range(0, n, qblock)), workers):
            parts.extend(got)
            done += min(n, (i + 1) * qblock) - i * qblock
            if progress:
                progress(done, n * len(layout))
        # this chunk's arrays (~12 B a row: order and hs; and the closure holding them) gone before the next
        del block, bk, hs
    return collect_tiles(parts)


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
    rows = valid_rows(len(h), valid)
    if rows is not None:
        h = h[rows]
    if len(h) < 2 or radius < 0:
        return Pairs.empty()
    radius = int(min(radius, _HASH_BITS))
    if method == "brute":
        return remap_rows(hash_brute(h, radius, progress=progress), rows)
    plan = plan_mih(h, radius, np.random.default_rng(0))
    if method == "mih" and plan is None:
        m = radius + 1 if radius < _HASH_BITS else _HASH_BITS
        plan = MIHPlan(m, radius // m, 0.0)
    if plan is None:
        return remap_rows(hash_brute(h, radius, progress=progress), rows)
    return remap_rows(hash_mih(h, radius, plan, progress=progress), rows)
