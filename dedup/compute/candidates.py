"""Compatibility module: the candidate search lives in :mod:`dedup.compute.search`, one idea
per module (pairs, exact, hamming, threads, kernels, bound, ivf, coarse, cosine, knn). This
module re-exports the package's public names for older imports; new code imports from the
package's modules.
"""

from __future__ import annotations

from dedup.compute import search as _search
from dedup.compute.search import *  # noqa: F403 - the re-export this module exists for

__all__ = list(_search.__all__)
