"""The coarse stage of the IVF search (CPU, one thread per block, fixed seeds): PCA (and the
:class:`~dedup.compute.search.bound.Bound`), k-means, the trained quantizer
(:class:`IVFCoarse`), rows assigned to lists, and :func:`plan_ivf`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from dedup.compute.search.bound import Bound
from dedup.compute.search.ivf import IVFParams, IVFPlan, build_plan, with_nearest
from dedup.compute.search.kernels import rows_f32, take_rows
from dedup.compute.search.pairs import valid_rows
from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs
from dedup.compute.search.upper import Upper, upper_level

__all__ = [
    "ASSIGN_BLOCK",
    "IVFCoarse",
    "Projection",
    "assign_blocks",
    "assign_coordinates",
    "assign_rows",
    "centroid_gaps",
    "fit_pca",
    "plan_ivf",
    "probe_radius",
    "sample_rows",
    "train_ivf",
    "train_upper",
]

_I64 = np.int64
_F32 = np.float32


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



TRAIN_BLOCK = 1 << 14  # training rows projected at a time
PCA_BLOCK = 1 << 13  # rows of the PCA's scatter matrix summed at a time
PCA_ROWS = 1 << 16  # the PCA is fitted on the training sample's first rows (float64)


def _principal(train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top ``k`` principal axes (columns, float64) of ``train``: float64 eigh, each
    axis' sign fixed (eigh may return ±v), so the result is reproducible."""
    t = train[:PCA_ROWS]
    # mean and scatter matrix in float64, PCA_BLOCK rows at a time: the rows' float64 copy
    # (8·d bytes each: 268 MB for 65 536 × 512) never exists whole
    mean = np.zeros(t.shape[1], np.float64)
    for s in range(0, len(t), PCA_BLOCK):
        mean += t[s : s + PCA_BLOCK].astype(np.float64).sum(axis=0)
    mean /= max(1, len(t))
    scatter = np.zeros((t.shape[1], t.shape[1]), np.float64)
    for s in range(0, len(t), PCA_BLOCK):
        b = t[s : s + PCA_BLOCK].astype(np.float64)
        b -= mean
        scatter += b.T @ b
    w, v = np.linalg.eigh(scatter)
    axes = v[:, np.argsort(-w, kind="stable")[:k]]
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])] < 0, -1.0, 1.0)
    return mean, axes


def fit_pca(train: np.ndarray, dp: int, bound_dim: int = 0) -> tuple[Projection, Bound | None]:
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


def sample_rows(idx: np.ndarray, k: int, seed: int) -> np.ndarray:
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
    """faiss k-means (single-threaded inside :func:`single_threaded_libs`: deterministic)."""
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


def train_upper(centroids: np.ndarray, n_super: int, probe: int, niter: int, seed: int) -> Upper:
    """The coarse stage's upper level: k-means of the lists' centroids into ``n_super``
    super-lists, each list in that of its nearest super-centroid (one thread: deterministic)."""
    s = max(1, min(int(n_super), len(centroids)))
    sup = _kmeans(centroids, s, niter, seed + 1)
    return upper_level(sup, _nearest(sup, centroids, 1)[1][:, 0], probe)


def probe_radius(params: IVFParams, threshold: float | None) -> float:
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
    upper: Upper | None = None  # the super-lists (params.super_lists > 0), else flat assignment

    def nearest(self, pz: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k nearest centroids (squared L2): all of them compared (flat), or those
        of the row's nearest super-lists (:mod:`~dedup.compute.search.upper`)."""
        if self.upper is not None:
            return self.upper.nearest(self.centroids, pz, k)
        return _nearest(self.centroids, pz, k)

    def coordinates(self, blk: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(PCA coordinates, bound rows or None) of float32 rows: with a bound, the coordinates
        are read off its columns (one product for both, and the same on every path)."""
        return _coordinates(self.projection, self.bound, blk)

    def from_bound(self, zb: np.ndarray) -> np.ndarray:
        """PCA coordinates of rows from their bound rows (the bound's first pca_dim columns)."""
        return _from_bound(self.projection, zb)


def _from_bound(projection: Projection, zb: np.ndarray) -> np.ndarray:
    assert projection.axes is not None  # bound rows come with a PCA projection
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
        p = self.params
        gaps = centroid_gaps(centroids) if math.isfinite(self.rho) and p.nprobe > 1 else None
        upper = None
        if p.super_lists and 1 < p.super_lists < len(centroids):
            upper = train_upper(centroids, p.super_lists, p.super_probe, p.niter, p.seed)
        return IVFCoarse(self.project, centroids, self.rho, p, self.bound, gaps, upper)


def _fit(x: np.ndarray, params: IVFParams, valid: np.ndarray | None, threshold: float | None) -> _Fitted:
    """Sample the valid rows, fit the PCA (and the bound), project the sample (one thread)."""
    n, d = x.shape
    rows = valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    if m == 0:
        raise ValueError("plan_ivf needs at least one valid row")
    nlist = max(1, min(int(params.nlist), m))
    nprobe = max(1, min(int(params.nprobe), nlist))
    with single_threaded_libs():
        sample = sample_rows(idx, max(int(params.train_size), nlist), params.seed)
        dp = int(params.pca_dim) if params.pca_dim and params.pca_dim < d else d
        # the PCA's rows (the sample's first PCA_ROWS) read apart, before the float32 copy of the
        # whole sample exists: float16 rows go to float64 unchanged (as through float32), and the
        # two copies never overlap (at 131 072 sampled rows: ~540 → ~340 MB at the peak)
        head = sample[:PCA_ROWS]
        pca_rows = take_rows(x, head) if x.dtype == np.float16 else rows_f32(x, head)
        project, bound = fit_pca(pca_rows, dp, int(params.bound_dim or 0) if threshold is not None else 0)
        del pca_rows
        # the sample projected a block at a time: its float32 rows (2·d bytes each, 256 MB at
        # 131 072 × 512) never exist all at once, only its coordinates (pca_dim floats a row)
        xt = None
        for s in range(0, len(sample), TRAIN_BLOCK):
            z = _coordinates(project, bound, rows_f32(x, sample[s : s + TRAIN_BLOCK]))[0]
            if xt is None:
                xt = np.empty((len(sample), z.shape[1]), z.dtype)
            xt[s : s + len(z)] = z
        assert xt is not None
    return _Fitted(project, bound, xt, replace(params, nlist=nlist, nprobe=nprobe), probe_radius(params, threshold))


def train_ivf(x: np.ndarray, params: IVFParams, valid: np.ndarray | None = None, *,
              threshold: float | None = None) -> IVFCoarse:
    """PCA and k-means on a sample of the valid rows (CPU, one thread, fixed seeds: the same
    input and params give the same quantizer whatever the number of cores)."""
    fitted = _fit(x, params, valid, threshold)
    with single_threaded_libs():
        return fitted.quantizer(fitted.kmeans())


_GAPS_MAX_LISTS = 4096  # a table of ≤ 64 MB; above it, gaps are computed per visit candidate


def centroid_gaps(c: np.ndarray) -> np.ndarray | None:
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
    blk = rows_f32(x, rows)
    pz, _ = coarse.coordinates(blk)
    del blk
    return assign_coordinates(coarse, pz, rid, nearest_out)


def assign_coordinates(coarse: IVFCoarse, pz: np.ndarray, rid: np.ndarray,
            nearest_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`assign_rows` from the rows' PCA coordinates ``pz`` (``rid``: their row ids).
    ``nearest_out`` (rows × k, k ≤ nprobe): receives each row's k nearest lists, own first."""
    nprobe = coarse.params.nprobe
    centroids = coarse.centroids
    dist, lab = coarse.nearest(pz, nprobe)
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


ASSIGN_BLOCK = 1 << 13


def assign_blocks(n_rows: int) -> list[tuple[int, int]]:
    """The row blocks (positions among the valid rows) of the coarse stage."""
    return [(s, min(n_rows, s + ASSIGN_BLOCK)) for s in range(0, n_rows, ASSIGN_BLOCK)]



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
    rows = valid_rows(n, valid)
    idx = np.arange(n, dtype=_I64) if rows is None else rows
    m = len(idx)
    blocks = assign_blocks(m)
    workers = n_threads(params.threads)
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
    with single_threaded_libs():
        if bound is None:
            coarse = fitted.quantizer(fitted.kmeans())
        else:
            found: list = []

            def project(k: int) -> None:
                if k < 0:
                    found.append(fitted.kmeans())
                else:
                    assert bound_rows is not None
                    bound_rows[sel(k)] = bound(rows_f32(x, sel(k)))

            for k, _ in pmap(project, [-1, *range(len(blocks))], workers):
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
            p, vr, vl = assign_coordinates(coarse, coarse.from_bound(bound_rows[sel(k)]), rid, out)
        prim[s:e] = p
        visits[k] = (vr, vl)

    with single_threaded_libs():
        for _ in pmap(one, list(range(len(blocks))), workers):
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
