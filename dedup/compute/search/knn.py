"""k-th nearest neighbour similarity (the manifest's outlier score): exact blockwise below a
size, above on IVF lists cut into work units (:func:`outlier_unit`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import numpy as np

from dedup.compute.search.coarse import plan_ivf
from dedup.compute.search.ivf import (
    IVFParams,
    IVFPlan,
    NearestLists,
    PlanSource,
    WorkUnit,
    make_units,
    plan_from_visits,
)
from dedup.compute.search.kernels import Matmul, rows_f32, want_fast_f16
from dedup.compute.search.pairs import valid_rows
from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs

__all__ = [
    "OUTLIER_NPROBE",
    "kth_neighbour_similarity",
    "outlier_unit",
]

_I64 = np.int64
_F32 = np.float32


def _merge_topk(best: np.ndarray, rows: np.ndarray, sims: np.ndarray, k: int) -> None:
    """best[rows] := the k largest of best[rows] ∪ sims (per row); rows unique."""
    if sims.shape[1] > k:
        sims = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    both = np.concatenate([best[rows], sims], axis=1)
    best[rows] = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]


OUTLIER_NPROBE = 5  # lists the outlier score's search looks into: the row's own + 4 nearest


def _plan_from_lists(lists: NearestLists | PlanSource | dict | None, idx: np.ndarray, n: int, nprobe: int) -> IVFPlan | None:
    """An IVF plan whose rows visit their ``nprobe - 1`` next-nearest lists, from the lists an
    earlier search kept (a dict with the same keys is accepted too); None if there are none or
    they do not cover these rows and probes."""
    if isinstance(lists, dict):
        if lists.get("assign") is None:
            return None
        lists = NearestLists(lists.get("coarse"), lists["assign"], lists.get("nearest"))
    if lists is not None and hasattr(lists, "outlier_plan"):  # kept in files (the partitioned search's)
        return lists.outlier_plan(idx, n, nprobe)
    if lists is None or lists.nearest is None or lists.coarse is None:
        return None
    nearest, assign, coarse = lists.nearest, lists.assign, lists.coarse
    if len(assign) != n or nearest.shape[1] < nprobe or (assign[idx] < 0).any():
        return None
    # the visits a block of rows at a time, counted, then put straight into their lists' places
    # (no sort key a visit, no n × nprobe copies of the row ids)

    def visits():
        for s in range(0, len(idx), 1 << 18):
            r = idx[s : s + (1 << 18)]
            near = nearest[r, 1:nprobe]
            ok = near >= 0
            yield np.broadcast_to(r[:, None], near.shape)[ok], near[ok]  # rows increasing

    return plan_from_visits(n, coarse, idx, assign[idx], visits)


def outlier_unit(x: np.ndarray, unit: WorkUnit, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """One unit of the outlier score's IVF search: each row of the unit's lists (members and
    visitors) against the members of those lists. Returns ``(rows, sims)``: the rows
    (increasing, unique) and their k largest similarities in this unit (rows × k float32,
    -inf where fewer than k were compared). Pure: any machine, any order."""
    mm = Matmul(False)
    got: list = []
    for li in range(len(unit.lists)):
        mem = unit.member_rows[unit.member_offsets[li] : unit.member_offsets[li + 1]]
        if len(mem) == 0:
            continue
        vis = unit.visitor_rows[unit.visitor_offsets[li] : unit.visitor_offsets[li + 1]]
        rows = np.concatenate([mem, vis]) if len(vis) else mem
        for c0 in range(0, len(mem), block):
            cm = mem[c0 : c0 + block]
            xc = rows_f32(x, cm)
            for r0 in range(0, len(rows), block):
                rr = rows[r0 : r0 + block]
                s = mm(rows_f32(x, rr), xc)
                # a member never counts as its own neighbour
                pos = np.arange(r0, r0 + len(rr))
                own = (pos >= c0) & (pos < c0 + len(cm)) & (pos < len(mem))
                s[np.flatnonzero(own), pos[own] - c0] = -np.inf
                if s.shape[1] > k:  # a copy: a view would keep the whole tile alive in ``got``
                    s = np.partition(s, s.shape[1] - k, axis=1)[:, -k:].copy()
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
    nprobe: int = OUTLIER_NPROBE,
    block: int = 4096,
    stats: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 0,
    lists: NearestLists | PlanSource | dict | None = None,
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
    rows_all = valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows_all is None else rows_all
    m = len(idx)
    out = np.full(n, np.nan, _F32)
    if m <= k:
        return out
    best = np.full((n, k), -np.inf, _F32)
    mm = Matmul(False)
    if m < exact_below:
        method = "exact"
        nblocks = -(-m // block)
        for b, q0 in enumerate(range(0, m, block), 1):
            qr = idx[q0 : q0 + block]
            xq = rows_f32(x, qr)
            for c0 in range(q0, m, block):  # each block pair once: s serves both sides
                cr = idx[c0 : c0 + block]
                s = mm(xq, xq if c0 == q0 else rows_f32(x, cr))
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
        want_fast_f16(x, float(m) * d * (params.nprobe + 1))  # every row read once per list it is in
        plan = _plan_from_lists(lists, idx, n, params.nprobe)
        if plan is None:
            plan = plan_ivf(x, params, valid)
        else:
            method = "ivf (the duplicate search's lists)"
        if n < 1 << 31:  # the plan's rows on 4 bytes, held through the search (and sent with its units)
            plan = replace(plan, member_rows=plan.member_rows.astype(np.int32, copy=False),
                           visitor_rows=plan.visitor_rows.astype(np.int32, copy=False))
        units = make_units(plan)
        # units on worker threads (BLAS single-threaded inside, as in the pair stage) or as
        # the caller's tasks (map_units); the merges stay here: a visitor row is in several
        # units, and the k largest of a set do not depend on the order they arrive in
        done = 0
        if progress:
            progress(0, plan.nlist)
        if map_units is not None:
            results = map_units(units, k, block)
            ctx: AbstractContextManager[None] = nullcontext()
        else:
            results = pmap(lambda u: outlier_unit(x, u, k, block), units, n_threads(threads))
            ctx = single_threaded_libs()
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
