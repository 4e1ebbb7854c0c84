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

Modules (one idea each; everything another module uses has a public name):

* ``pairs``   — :class:`Pairs` and pair utilities (canonical order, merge, remap, valid rows);
* ``exact``   — :func:`exact_pairs`;
* ``hamming`` — :func:`popcount64` (NumPy 1.26 and 2.x), multi-index hashing and its cost
  model, the exhaustive fallback, :func:`hash_pairs`;
* ``threads`` — worker threads (:func:`pmap`) and BLAS/faiss/torch thread pinning;
* ``kernels`` — fp16 row conversion, the tile product (:class:`Matmul`; GPU only with
  ``use_gpu``), exact rescoring, tile kernels;
* ``bound``   — the bound prefilter (:class:`Bound`, :func:`tile_pairs_bounded`);
* ``ivf``     — :class:`IVFParams`, :class:`IVFPlan`, :class:`WorkUnit`, plan assembly and units;
* ``coarse``  — PCA, k-means, the quantizer (:class:`IVFCoarse`), assignment, :func:`plan_ivf`;
* ``cosine``  — :func:`brute_force_pairs`, :func:`unit_pairs`, the serial driver :func:`embedding_pairs`;
* ``knn``     — :func:`kth_neighbour_similarity` and :func:`outlier_unit` (the outlier score).

``dedup.compute.candidates`` re-exports this package's public names (older imports).
"""

from __future__ import annotations

from dedup.compute.search.bound import BOUND_SLACK, Bound, tile_pairs_bounded
from dedup.compute.search.coarse import (
    ASSIGN_BLOCK,
    IVFCoarse,
    Projection,
    assign_blocks,
    assign_coordinates,
    assign_rows,
    centroid_gaps,
    fit_pca,
    plan_ivf,
    probe_radius,
    sample_rows,
    train_ivf,
)
from dedup.compute.search.cosine import (
    PROJECT_MIN_MEMBERS,
    brute_force_pairs,
    embedding_pairs,
    unit_pairs,
)
from dedup.compute.search.exact import exact_pairs
from dedup.compute.search.hamming import (
    MIHPlan,
    hash_brute,
    hash_mih,
    hash_pairs,
    plan_mih,
    popcount64,
)
from dedup.compute.search.ivf import (
    IVFParams,
    IVFPlan,
    WorkUnit,
    build_plan,
    make_units,
    outlier_lists,
    plan_figures,
    with_nearest,
)
from dedup.compute.search.kernels import (
    Matmul,
    exact_scores,
    f32_margin,
    gpu_available,
    rows_f32,
    tile_candidates,
    tile_pairs,
    want_fast_f16,
)
from dedup.compute.search.knn import (
    OUTLIER_NPROBE,
    kth_neighbour_similarity,
    outlier_unit,
)
from dedup.compute.search.pairs import (
    Pairs,
    canonical_pairs,
    collect_tiles,
    merge_pairs,
    remap_rows,
    valid_rows,
)
from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs

__all__ = [
    "ASSIGN_BLOCK",
    "BOUND_SLACK",
    "OUTLIER_NPROBE",
    "PROJECT_MIN_MEMBERS",
    "Bound",
    "IVFCoarse",
    "IVFParams",
    "IVFPlan",
    "MIHPlan",
    "Matmul",
    "Pairs",
    "Projection",
    "WorkUnit",
    "assign_blocks",
    "assign_coordinates",
    "assign_rows",
    "brute_force_pairs",
    "build_plan",
    "canonical_pairs",
    "centroid_gaps",
    "collect_tiles",
    "embedding_pairs",
    "exact_pairs",
    "exact_scores",
    "f32_margin",
    "fit_pca",
    "gpu_available",
    "hash_brute",
    "hash_mih",
    "hash_pairs",
    "kth_neighbour_similarity",
    "make_units",
    "merge_pairs",
    "n_threads",
    "outlier_lists",
    "outlier_unit",
    "plan_figures",
    "plan_ivf",
    "plan_mih",
    "pmap",
    "popcount64",
    "probe_radius",
    "remap_rows",
    "rows_f32",
    "sample_rows",
    "single_threaded_libs",
    "tile_candidates",
    "tile_pairs",
    "tile_pairs_bounded",
    "train_ivf",
    "unit_pairs",
    "valid_rows",
    "want_fast_f16",
    "with_nearest",
]
