"""Cosine pairs on embeddings: exact brute force (the reference), one IVF work unit
(:func:`unit_pairs`) and :func:`embedding_pairs` (the driver, on worker threads)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dedup.compute.search.bound import Bound, tile_pairs_bounded
from dedup.compute.search.ivf import IVFParams, NearestLists, WorkUnit
from dedup.compute.search.kernels import (
    Matmul,
    gpu_available,
    rows_f32,
    tile_pairs,
    want_fast_f16,
)
from dedup.compute.search.pairs import Pairs, collect_tiles, valid_rows
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
    """Pairs of rows with cosine ≥ ``threshold``, on this process's worker threads: the one
    search driver :func:`dedup.compute.search.driver.search_embeddings`, which returns typed
    results; this keeps the older signature for callers that only want the pairs (``stats``
    and ``lists_out``, if given, receive ``SearchStats.to_dict()`` and the fields of the
    :class:`NearestLists`)."""
    from dedup.compute.search.driver import search_embeddings

    res = search_embeddings(x, threshold, params, valid, keep_nearest=lists_out is not None, progress=progress,
                            plan_progress=plan_progress)
    if stats is not None:
        stats.update(res.stats.to_dict())
    if lists_out is not None and isinstance(res.lists, NearestLists):  # (the in-memory search's arrays)
        lists_out.update(coarse=res.lists.coarse, assign=res.lists.assign, nearest=res.lists.nearest)
    return res.pairs
