"""IVF search: parameters (:class:`IVFParams` and their automatic choice), the plan (rows per
list: members and visitors) and its work units. The coarse stage that makes a plan is in
:mod:`dedup.compute.search.coarse`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from dedup.compute.search.coarse import IVFCoarse

__all__ = [
    "IVFParams",
    "IVFPlan",
    "NearestLists",
    "WorkUnit",
    "build_plan",
    "make_units",
    "outlier_lists",
    "plan_from_visits",
    "plan_figures",
    "with_nearest",
]

_I64 = np.int64


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
    super_lists  the coarse stage's upper level: the nlist centroids grouped into this many
                 super-lists (a k-means over them); a row is compared with the centroids of its
                 ``super_probe`` nearest super-lists only (dedup.compute.search.upper).
                 0 = flat: every row compared with every centroid
    super_probe  super-lists a row searches for its nearest lists (with super_lists > 0)
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
    super_lists: int = 0
    super_probe: int = 8

    @classmethod
    def auto(cls, n: int, d: int, threshold: float | None = None, *, list_rows: int | None = None,
             **overrides) -> IVFParams:
        """Parameters for n valid rows of dimension d (measurements: docs/candidates.md).
        ``list_rows`` replaces the rule's rows per list (nlist = n / list_rows, at most n / 50);
        nprobe and train_size then follow that nlist (an ``nlist=`` override changes nlist alone).

        * nlist = n / 500 (lists of ~500 rows), at least √n, at most n / 50. Lists of 1 000 to
          8 000 rows were measured at 1e6 and 1e7: no fewer visits a row, many more dot products,
          recall < 0.99 at 1e7 (docs/candidates.md, "List size").
        * nprobe (a cap) = 16 up to 2 000 lists (1e6 rows), then 16 · (1 + log10(nlist /
          2000)): 32 at 1e7 rows. probe_margin = 0.16. Denser data puts more lists within the
          visiting radius, and a cap cut short loses pairs: at 1e7 a cap of 16 kept 0.98 of
          the planted pairs, 32 kept 0.993 (docs/candidates.md). The visiting radius scales
          with the threshold at search time (``threshold`` is accepted for symmetry).
        * train_size = 32 · nlist, between 20 000 and 524 288 (and ≤ n); niter = 10. The cap
          first binds above 16 384 lists (~8·10⁶ rows); at 10⁷ the earlier cap of 131 072
          (6.6 rows a list) left the lists uneven: 13.4 visits a row instead of 9.3 and 2.5× the
          pair stage's dot products, for 236 CPU-s less k-means (docs/candidates.md).
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
        nlist = _auto_nlist(n, list_rows)
        p = cls(
            nlist=nlist,
            nprobe=_auto_nprobe(nlist, threshold),
            train_size=int(min(n, max(20_000, 32 * nlist), 1 << 19)),
            pca_dim=int(128 if d >= 512 else min(d, 64)),
            bound_dim=_auto_bound_dim(n, d),
        )
        sl, sp = _auto_upper(nlist)
        if sl:
            p = replace(p, super_lists=sl, super_probe=sp)
        return replace(p, **overrides) if overrides else p


def _auto_nlist(n: int, list_rows: int | None = None) -> int:
    if n < 2:
        return 1
    if list_rows:  # as asked (benchmarks): no √n floor
        return int(max(1, min(n // 50, n // int(list_rows))))
    return int(max(1, min(n // 50, max(round(math.sqrt(n)), n // 500))))


_BOUND_MAX_BYTES = 8 << 30


def _auto_bound_dim(n: int, d: int) -> int:
    q = int(min(128, d // 4)) if d >= 128 else 0
    return q if q and n * (q + 2) * 4 <= _BOUND_MAX_BYTES else 0


# The coarse stage's upper level from this many lists on; None = never. Measured
# (docs/candidates.md, "Coarse quantizer at scale"; benchmarks/quantizer.py): on the benchmark
# data it did not win up to 20 000 lists (10⁷ rows) at recall ≥ 0.99 — keeping 0.99 of the flat
# assignment's pairs took as much CPU a row as the flat assignment — so auto keeps the flat one.
UPPER_FROM_LISTS: int | None = None
UPPER_PROBE = 32  # super-lists probed, of 2·√nlist, where it is switched on


def _auto_upper(nlist: int) -> tuple[int, int]:
    """(super_lists, super_probe) for nlist lists: (0, 8) = flat below UPPER_FROM_LISTS."""
    if UPPER_FROM_LISTS is None or nlist < UPPER_FROM_LISTS:
        return 0, 8
    return int(round(2.0 * math.sqrt(nlist))), UPPER_PROBE


def _auto_nprobe(nlist: int, threshold: float | None) -> int:
    cap = 16 if nlist <= 2000 else round(16 * (1.0 + math.log10(nlist / 2000)))
    return int(max(1, min(nlist, cap)))



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
    if visits and n <= 1 << 32:
        # one uint64 key a visit, list above row, sorted in place: rows increase within a list
        # (~16 B a visit at the peak; a stable argsort of the lists with the rows and lists
        # concatenated around it took ~40: 3.8 GB for 7·10⁷ visits)
        key = np.empty(sum(len(v[0]) for v in visits), np.uint64)
        at = 0
        for vr, vl in visits:
            part = key[at : at + len(vr)]
            np.left_shift(vl.astype(np.uint64), np.uint64(32), out=part)
            part |= vr.astype(np.uint64)
            at += len(vr)
        key.sort()
        visitor_offsets = np.searchsorted(key, np.arange(nlist + 1, dtype=np.uint64) << np.uint64(32)).astype(_I64)
        np.bitwise_and(key, np.uint64(0xFFFFFFFF), out=key)  # the rows, in place
        visitor_rows = key.view(_I64)
    elif visits:  # rows past 32 bits
        vr = np.concatenate([v[0] for v in visits])
        vl = np.concatenate([v[1] for v in visits])
        vo = np.lexsort((vr, vl))  # by list, rows increasing within a list
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



def plan_from_visits(n: int, coarse: IVFCoarse, idx: np.ndarray, prim: np.ndarray,
                     visits: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]) -> IVFPlan:
    """:func:`build_plan` for visits that can be read twice (``visits()``: batches of (rows,
    lists)): counted per list first, then each row put straight into its list's place, on 32
    bits when n < 2³¹. The same plan (rows increasing within a list) without a sort key a visit:
    4 bytes a visit at the peak instead of 8 (+ 4 for the 32-bit copy the outlier score makes).
    Batches whose rows increase (within one and from one to the next) need no sort; otherwise
    each list's rows are sorted where they are."""
    nlist = coarse.params.nlist
    counts = np.zeros(nlist, _I64)
    for _r, lst in visits():
        counts += np.bincount(lst, minlength=nlist)
    offsets = np.zeros(nlist + 1, _I64)
    np.cumsum(counts, out=offsets[1:])
    rows = np.empty(int(offsets[-1]), np.int32 if n < 1 << 31 else _I64)
    at = offsets[:-1].copy()
    ordered, last = True, -1
    for r, lst in visits():
        if len(r) == 0:
            continue
        r = np.asarray(r)
        if ordered and (r[0] <= last or (len(r) > 1 and not (np.diff(r) >= 0).all())):
            ordered = False
        last = max(last, int(r[-1]))
        # by list, the batch's order kept within a list (16-bit keys sort by radix: ~5× faster)
        by = np.argsort(lst.astype(np.uint16) if nlist <= 1 << 16 else lst, kind="stable")
        ls = lst[by]
        first = np.flatnonzero(np.concatenate([[True], ls[1:] != ls[:-1]]))
        size = np.diff(np.append(first, len(ls)))
        pos = at[ls] + (np.arange(len(ls), dtype=_I64) - np.repeat(first, size))
        rows[pos] = r[by]
        at[ls[first]] += size
        del by, ls, pos
    assert (at == offsets[1:]).all(), "visits() gave other batches the second time"
    if not ordered:
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            if b - a > 1:
                rows[a:b].sort()
    plan = build_plan(n, coarse, idx, prim, [])
    return replace(plan, member_rows=plan.member_rows.astype(rows.dtype, copy=False), visitor_rows=rows,
                   visitor_offsets=offsets)


def with_nearest(plan: IVFPlan, idx: np.ndarray, near: np.ndarray) -> IVFPlan:
    """The plan, also holding each row's nearest lists (``near``: aligned with the valid rows
    ``idx``; the other rows get -1)."""
    nearest = np.full((plan.n, near.shape[1]), -1, np.int32)
    nearest[idx] = near
    return replace(plan, nearest=nearest)


class PlanSource(Protocol):
    """Nearest lists kept elsewhere (e.g. the partitioned search's files) that build the
    outlier score's plan themselves (:func:`dedup.compute.search.knn.kth_neighbour_similarity`)."""

    def outlier_plan(self, idx: np.ndarray, n: int, nprobe: int) -> IVFPlan | None: ...


@dataclass(frozen=True)
class NearestLists:
    """What :func:`kth_neighbour_similarity` (``lists=``) reuses of a search's plan: the
    quantizer, each row's own list and its nearest lists (own first; -1: invalid row)."""

    coarse: IVFCoarse | None
    assign: np.ndarray  # (n,) int32
    nearest: np.ndarray | None  # (n, k) int32


def outlier_lists(plan: IVFPlan) -> NearestLists:
    """What :func:`kth_neighbour_similarity` (``lists=``) reuses of a search's plan."""
    return NearestLists(plan.coarse, plan.assign, plan.nearest)


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
