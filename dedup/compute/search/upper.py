"""The coarse quantizer's upper level: a second k-means over the lists' centroids (issue #18).

The flat coarse stage compares every row with every centroid: n × nlist products, quadratic
with nlist ∝ n. With an upper level, the nlist centroids are grouped into ``S`` super-lists
(k-means over the centroids, each centroid in the super-list of its nearest super-centroid);
a row is compared with the S super-centroids, then only with the centroids of its ``probe``
nearest super-lists: S + probe · nlist / S distances a row instead of nlist. The k nearest
centroids it finds among those are the candidates of the same visiting rule as the flat stage
(its own list first, the bisector test); a list outside the probed super-lists is never
visited, so recall depends on ``probe`` (tested: probing every super-list is the flat result).

Opt-in (``IVFParams.super_lists``): ``IVFParams.auto`` does not switch it on, because on the
benchmark data it did not win where measured — at 10⁷ rows (20 000 lists) keeping 0.99 of the
flat assignment's pairs took 2·√nlist super-lists with 64 probed, as much CPU a row as the flat
BLAS search (docs/candidates.md, "Coarse quantizer at scale"; benchmarks/quantizer.py).

The search is a faiss ``IndexIVFFlat`` over the centroids, built from the trained super-lists
the first time a process assigns rows (the quantizer pickles without it): its distances are
computed row by row (no block product), so a row's lists do not depend on the other rows
assigned with it, and they are the same in every process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["Upper", "upper_level"]

_F32 = np.float32
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Upper:
    """The super-centroids, which lists each super-list holds, and how many a row probes."""

    centroids: np.ndarray  # (S, pca_dim) float32 super-centroids
    order: np.ndarray  # (nlist,) int64 list ids grouped by super-list (increasing within one)
    offsets: np.ndarray  # (S + 1,) int64 into order
    probe: int  # super-lists a row searches

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_index"}  # the faiss index: rebuilt

    def _search_index(self, lists: np.ndarray):
        got = self.__dict__.get("_index")
        if got is None:
            with _LOCK:
                got = self.__dict__.get("_index")
                if got is None:
                    got = _build(self, lists)
                    object.__setattr__(self, "_index", got)
        return got[0]

    def nearest(self, lists: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of the centroids ``lists`` (squared L2, nearest first; -1 / inf when
        the probed super-lists hold fewer) among those of each row's ``probe`` nearest
        super-lists."""
        q = np.ascontiguousarray(q, dtype=_F32)
        if len(q) == 0:
            return np.empty((0, k), _F32), np.empty((0, k), np.int64)
        return self._search_index(lists).search(q, int(k))


def _build(up: Upper, lists: np.ndarray):
    import faiss

    lists = np.ascontiguousarray(lists, dtype=_F32)
    dp = lists.shape[1]
    quant = faiss.IndexFlatL2(dp)
    quant.add(np.ascontiguousarray(up.centroids, dtype=_F32))
    index = faiss.IndexIVFFlat(quant, dp, len(up.centroids), faiss.METRIC_L2)
    invlists = index.invlists
    assert invlists is not None
    for s in range(len(up.centroids)):  # the trained membership, as it is (no reassignment)
        ids = np.ascontiguousarray(up.order[up.offsets[s] : up.offsets[s + 1]], dtype=np.int64)
        if len(ids):
            codes = np.ascontiguousarray(lists[ids])
            invlists.add_entries(s, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes.view(np.uint8)))
    index.ntotal = len(lists)
    index.nprobe = int(min(up.probe, len(up.centroids)))
    return index, quant  # the quantizer must outlive the index (the index does not own it)


def upper_level(super_centroids: np.ndarray, own: np.ndarray, probe: int) -> Upper:
    """The upper level from the super-centroids and each list's super-list (``own``: its
    nearest super-centroid; :func:`dedup.compute.search.coarse.train_upper` trains them)."""
    s = len(super_centroids)
    order = np.argsort(own, kind="stable").astype(np.int64)
    offsets = np.zeros(s + 1, np.int64)
    np.cumsum(np.bincount(own, minlength=s), out=offsets[1:])
    return Upper(np.ascontiguousarray(super_centroids, dtype=_F32), order, offsets, int(max(1, min(probe, s))))
