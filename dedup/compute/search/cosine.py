"""Cosine pairs on embeddings: exact brute force (the reference), one IVF work unit
(:func:`unit_pairs`) and the serial driver :func:`embedding_pairs`."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from dedup.compute.search.bound import Bound, tile_pairs_bounded
from dedup.compute.search.coarse import plan_ivf
from dedup.compute.search.ivf import (
    IVFParams,
    WorkUnit,
    make_units,
    outlier_lists,
    plan_figures,
)
from dedup.compute.search.kernels import (
    Matmul,
    gpu_available,
    rows_f32,
    tile_pairs,
    want_fast_f16,
)
from dedup.compute.search.knn import OUTLIER_NPROBE
from dedup.compute.search.pairs import Pairs, collect_tiles, merge_pairs, valid_rows
from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs

__all__ = [
    "PROJECT_MIN_MEMBERS",
    "brute_force_pairs",
    "embedding_pairs",
    "unit_pairs",
]

_I64 = np.int64


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
    blocks; ``x`` may be a memmap. Scores are exact (see :mod:`dedup.compute.search`)."""
    n = x.shape[0]
    rows = valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    if m < 2:
        return Pairs.empty()
    block = max(1, int(block))
    mm = Matmul(use_gpu)
    starts = list(range(0, m, block))
    want_fast_f16(x, float(m) * x.shape[1] * (len(starts) + 1) / 2)  # a row block per tile

    def sl(a: int, b: int):
        return slice(a, b) if rows is None else idx[a:b]

    def column(ci: int):
        c0 = starts[ci]
        c1 = min(m, c0 + block)
        xc = rows_f32(x, sl(c0, c1))
        out = []
        for r0 in starts[: ci + 1]:
            r1 = min(m, r0 + block)
            xr = xc if r0 == c0 else rows_f32(x, sl(r0, r1))
            got = tile_pairs(mm, xr, xc, idx[r0:r1], idx[c0:c1], threshold, (r1 - r0, 0) if r0 == c0 else None)
            if got is not None:
                out.append(got)
        return out, ci + 1

    workers = 1 if use_gpu else n_threads(threads)
    total = len(starts) * (len(starts) + 1) // 2
    done = 0
    parts: list = []
    with single_threaded_libs():
        # biggest columns first so the threads finish together
        for _, (got, ntiles) in pmap(column, list(range(len(starts)))[::-1], workers):
            parts.extend(got)
            done += ntiles
            if progress:
                progress(done, total)
    return collect_tiles(parts)



# Projecting a row onto the bound costs ~(q + 1)·d multiply-adds, once per list it is read
# for; each of its tile products then costs q + 2 instead of d. With lists of fewer members
# than this, projecting on the fly costs more than it saves (break-even ≈ q·d / (d − q) ≈ 170
# at d = 512, q = 128; docs/candidates.md).
PROJECT_MIN_MEMBERS = 256


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
    ``PROJECT_MIN_MEMBERS`` members as they are read (a Ray unit: nothing n-sized travels)."""
    bs = max(1, int(block_size or (params.block_size if params else 4096)))
    if use_gpu is None:
        use_gpu = bool(params.use_gpu) if params is not None and params.use_gpu is not None else gpu_available()
    mm = Matmul(use_gpu)

    def plain_load(r):
        return rows_f32(x, r)

    def plain_tile(xr, xc, rr, rc, diag):
        return tile_pairs(mm, xr, xc, rr, rc, threshold, diag)

    def bound_tile(zr, zc, rr, rc, diag):
        return tile_pairs_bounded(mm, zr, zc, rr, rc, x, threshold, diag)

    bound_load = None
    if bound is not None and not use_gpu:
        if isinstance(bound, Bound):
            def bound_load(r):
                return bound(rows_f32(x, r))
            min_members = PROJECT_MIN_MEMBERS
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
    return collect_tiles(parts)


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
    rows = valid_rows(n, valid)
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
    want_fast_f16(x, (1.2 if params.bound_dim else 3.0) * m * d)
    plan = plan_ivf(x, params, valid, threshold=threshold, stats=st, progress=plan_progress,
                    keep_nearest=OUTLIER_NPROBE if lists_out is not None else 0)
    if lists_out is not None:
        lists_out.update(outlier_lists(plan))
    t1 = time.perf_counter()
    units = make_units(plan)
    st.update(method="ivf", plan_seconds=t1 - t0, **plan_figures(plan, units, 0 if gpu else None))
    workers = 1 if gpu else n_threads(params.threads)
    done = 0
    parts: list = [None] * len(units)
    order = sorted(range(len(units)), key=lambda k: -units[k].cost)  # big units first
    with single_threaded_libs():
        for k, p in pmap(lambda k: unit_pairs(x, units[k], threshold, plan.params, use_gpu=gpu,
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
