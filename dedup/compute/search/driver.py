"""The one driver of the IVF embedding search, over any executor (:class:`TaskMap`).

The driver trains the coarse quantizer on a sample (:func:`train_ivf`), hands the embeddings
and the quantizer to the executor once (:meth:`TaskMap.put`), maps the assignment tasks
(:func:`assign_task`: groups of row blocks → each row's list, the lists it visits, its nearest
lists) and then the work units (:func:`unit_task`) through :meth:`TaskMap.map_units`, and
merges the pairs. In-process the executor is :class:`ThreadMap` (worker threads; the
embeddings are not copied); :class:`dedup.executors.ray.RayExecutor` runs the same tasks as Ray
tasks (the embeddings in the object store once). Row blocks and units are independent and the
merges order-free, so every executor gives the same pairs.

Results are typed (:class:`SearchResult`, :class:`SearchStats`, :class:`NearestLists`), not
out-parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from dedup.compute.search.coarse import IVFCoarse, assign_blocks, assign_rows, train_ivf
from dedup.compute.search.cosine import brute_force_pairs, unit_pairs
from dedup.compute.search.ivf import (
    IVFParams,
    NearestLists,
    PlanSource,
    WorkUnit,
    build_plan,
    make_units,
    outlier_lists,
    plan_figures,
    with_nearest,
)
from dedup.compute.search.kernels import gpu_available, want_fast_f16
from dedup.compute.search.knn import OUTLIER_NPROBE
from dedup.compute.search.pairs import Pairs, merge_pairs, valid_rows
from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs

__all__ = [
    "ASSIGN_BLOCKS_PER_TASK",
    "SearchInput",
    "SearchResult",
    "SearchStats",
    "SearchTaskError",
    "TaskMap",
    "ThreadMap",
    "assign_task",
    "search_embeddings",
    "unit_task",
]

_I64 = np.int64

# Row blocks (ASSIGN_BLOCK rows each) per assignment task: ~0.5 M rows, seconds to minutes each.
ASSIGN_BLOCKS_PER_TASK = 64

TaskResult = tuple[Any, Any, "str | None"]  # (item, result, error)


class SearchTaskError(RuntimeError):
    """A task of the search failed (after the executor's own retries)."""


class TaskMap(Protocol):
    """The executor contract of the distributed work: ``map_units`` runs ``fn(item)`` (or
    ``fn(shared, item)`` with ``shared``) for every item, wherever the executor runs work, and
    yields ``(item, result, None)`` or ``(item, None, error)`` as each finishes, in any order;
    ``put`` hands a large value over once (a reference to pass as ``shared`` to several maps).
    ``in_process``: the tasks run in this process (``put`` is the identity), so they may read
    the caller's arrays, mappings included; otherwise large inputs are better handed over by
    name (e.g. a file each task reads) than through ``put``."""

    in_process: bool

    def map_units(self, fn: Callable[..., Any], items: Iterable[Any], *, shared: Any = None) -> Iterator[TaskResult]:
        ...

    def put(self, obj: Any) -> Any:
        ...


class ThreadMap:
    """:class:`TaskMap` on worker threads of this process (BLAS, faiss and torch held to one
    thread each meanwhile); ``put`` is the identity: the tasks read the caller's arrays."""

    in_process = True

    def __init__(self, workers: int = 0):
        self.workers = n_threads(workers)

    def map_units(self, fn: Callable[..., Any], items: Iterable[Any], *, shared: Any = None) -> Iterator[TaskResult]:
        todo = list(items)

        def one(item: Any) -> tuple[Any, str | None]:
            try:
                return (fn(item) if shared is None else fn(shared, item)), None
            except Exception as e:  # noqa: BLE001 - reported per item, as every executor does
                return None, f"{type(e).__name__}: {e}"

        with single_threaded_libs():
            for k, (res, err) in pmap(one, todo, self.workers):
                yield todo[k], res, err

    def put(self, obj: Any) -> Any:
        return obj


@dataclass(frozen=True)
class SearchInput:
    """What every task of one search shares: the embeddings and the trained quantizer."""

    x: np.ndarray
    coarse: IVFCoarse


@dataclass(frozen=True)
class SearchStats:
    """How a search went (for tuning nlist / nprobe): where the time went, visits per row."""

    method: str  # none | brute_force | ivf
    n: int
    valid: int
    gpu: bool = False
    nlist: int = 0
    nprobe: int = 0
    units: int = 0
    bound_width: int = 0
    mean_probes: float = 0.0
    list_size_max: int = 0
    list_size_mean: float = 0.0
    dot_products: int = 0
    train_seconds: float = 0.0
    assign_seconds: float = 0.0
    pairs_seconds: float = 0.0
    seconds: float = 0.0
    pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SearchResult:
    pairs: Pairs
    stats: SearchStats
    lists: NearestLists | PlanSource | None = None  # rows' nearest lists (IVF only, when asked for)


def assign_task(shared: SearchInput, item: tuple[int, list[np.ndarray], int]) -> list[tuple]:
    """One assignment task: for each of its row blocks, ``(member list, visitor rows, visited
    lists, nearest lists or None)`` (:func:`assign_rows`)."""
    _, spans, keep = item
    out = []
    with single_threaded_libs():
        for rows in spans:
            near = np.empty((len(rows), keep), np.int32) if keep else None
            out.append((*assign_rows(shared.x, shared.coarse, rows, near), near))
    return out


def unit_task(shared: SearchInput, item: tuple[int, WorkUnit, float, IVFParams, bool]) -> Pairs:
    """One work unit: its pairs (:func:`unit_pairs`). With the quantizer's bound, the unit
    projects the rows of its larger lists itself: no n-sized bound rows exist anywhere."""
    _, unit, threshold, params, gpu = item
    with single_threaded_libs():
        return unit_pairs(shared.x, unit, threshold, params, use_gpu=gpu, bound=shared.coarse.bound)


def search_embeddings(
    x: np.ndarray,
    threshold: float,
    params: IVFParams | None = None,
    valid: np.ndarray | None = None,
    *,
    executor: TaskMap | None = None,
    keep_nearest: bool = False,
    progress: Callable[[int, int], None] | None = None,
    plan_progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """Pairs of rows with cosine ≥ ``threshold`` (rows L2-normalised, float16 or float32, may
    be a memmap). Below ``params.exact_below`` valid rows exact brute force in this process;
    above, the IVF search with its tasks on ``executor`` (default: :class:`ThreadMap`).
    ``progress(done, total)`` counts lists (brute force: tiles), ``plan_progress`` the coarse
    stage's row blocks. ``keep_nearest``: the result also holds each row's nearest lists
    (:class:`NearestLists`) for the outlier score's search."""
    t0 = time.perf_counter()
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {x.shape}")
    n, d = x.shape
    rows = valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    if params is None:
        params = IVFParams.auto(m, d, threshold)
    gpu = bool(params.use_gpu) if params.use_gpu is not None else gpu_available()
    if m < 2:
        return SearchResult(Pairs.empty(), SearchStats("none", n, m, gpu))
    if m < params.exact_below or min(params.nlist, m) <= 1:
        p = brute_force_pairs(x, threshold, block=params.block_size, valid=valid, use_gpu=gpu,
                              progress=progress, threads=params.threads)
        return SearchResult(p, SearchStats("brute_force", n, m, gpu, seconds=time.perf_counter() - t0, pairs=len(p)))
    ex: TaskMap = executor if executor is not None else ThreadMap(1 if gpu else params.threads)
    # each row is converted once for the assignment, then again for each list it is read in
    want_fast_f16(x, 3.0 * m * d)
    blocks = assign_blocks(m)
    if plan_progress:
        plan_progress(0, len(blocks))
    coarse = train_ivf(x, params, valid=valid, threshold=threshold)
    t1 = time.perf_counter()
    shared = ex.put(SearchInput(np.asarray(x), coarse))
    keep = min(OUTLIER_NPROBE, coarse.params.nprobe) if keep_nearest else 0
    groups = [list(range(k, min(len(blocks), k + ASSIGN_BLOCKS_PER_TASK)))
              for k in range(0, len(blocks), ASSIGN_BLOCKS_PER_TASK)]
    # a task gets the row indices of its blocks (never the whole index array)
    items = [(k, [idx[blocks[b][0] : blocks[b][1]] for b in g], keep) for k, g in enumerate(groups)]
    results: list[Any] = [None] * len(groups)
    done = 0
    for item, res, err in ex.map_units(assign_task, items, shared=shared):
        if err:
            raise SearchTaskError(f"candidate search coarse stage failed after retries: {err}")
        results[item[0]] = res
        done += len(groups[item[0]])
        if plan_progress:
            plan_progress(done, len(blocks))
    prim = np.empty(m, np.int32)
    near = np.empty((m, keep), np.int32) if keep else None
    visits = []
    for g, res in zip(groups, results):
        for b, (p, vr, vl, nb) in zip(g, res):
            s, e = blocks[b]
            prim[s:e] = p
            if near is not None:
                near[s:e] = nb
            visits.append((vr, vl))
    del results
    plan = build_plan(n, coarse, idx, prim, visits)
    del prim, visits
    lists = None
    if near is not None:
        lists = outlier_lists(with_nearest(plan, idx, near))
        del near
    t2 = time.perf_counter()
    units = make_units(plan)
    bound_width = 0 if coarse.bound is None or gpu else coarse.bound.width
    figures = plan_figures(plan, units, bound_width)
    order = sorted(range(len(units)), key=lambda k: -units[k].cost)  # big units first
    parts = []
    done = 0
    for item, res, err in ex.map_units(unit_task, [(k, units[k], threshold, plan.params, gpu) for k in order],
                                       shared=shared):
        if err:
            raise SearchTaskError(f"candidate search unit failed after retries: {err}")
        parts.append(res)
        done += len(item[1].lists)
        if progress:
            progress(done, plan.nlist)
    if progress and done < plan.nlist:
        progress(plan.nlist, plan.nlist)
    out = merge_pairs(parts)
    t3 = time.perf_counter()
    stats = SearchStats("ivf", n, m, gpu, train_seconds=t1 - t0, assign_seconds=t2 - t1, pairs_seconds=t3 - t2,
                        seconds=t3 - t0, pairs=len(out), **figures)
    return SearchResult(out, stats, lists)
