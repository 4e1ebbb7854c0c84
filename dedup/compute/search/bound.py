"""The bound prefilter of the pair stage: rows projected onto a few principal axes (+ the
mean's direction, + the norm of the rest) bound every cosine from above, so most tile entries
are ruled out on narrow rows and only the rest are scored on the full vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dedup.compute.search.kernels import (
    Matmul,
    exact_scores,
    f32_margin,
    rows_f32,
    tile_candidates,
)

__all__ = [
    "BOUND_SLACK",
    "Bound",
    "tile_pairs_bounded",
]

_F32 = np.float32


# Slack of the Bound prefilter, in cosine: above its worst-case float32 rounding for rows of
# norm ≤ 1.01 (projection: ≤ √q·γ_d ≈ 3.5e-4 per row → ≤ 7e-4 on a product of two; the
# (q+2)-term tile product ≈ 1e-5). Rows of other norms get an infinite bound (see Bound).
BOUND_SLACK = 2e-3
_BOUND_ETA = 1e-3  # the projection's error allowance when bounding the rest's norm


@dataclass(frozen=True)
class Bound:
    """Rows ↦ ``[x·Q, ē]`` (q + 1 float32 columns), Q orthonormal (the top principal axes and
    the mean's direction). For rows a, b: ⟨a, b⟩ = ⟨Qᵀa, Qᵀb⟩ + ⟨Pa, Pb⟩ ≤ ⟨Qᵀa, Qᵀb⟩ +
    ‖Pa‖·‖Pb‖ (P = I − QQᵀ, Cauchy–Schwarz), and ē ≥ ‖Px‖ — so the product of two bound rows
    is an upper bound of the cosine (up to ``BOUND_SLACK``). Rows whose norm is not ~1 get
    ē = 1e6: every pair with them is a candidate and gets scored exactly."""

    axes: np.ndarray  # (d, q) float32

    @property
    def width(self) -> int:
        return int(self.axes.shape[1]) + 1

    def __call__(self, blk: np.ndarray) -> np.ndarray:
        q = self.axes.shape[1]
        out = np.empty((len(blk), q + 1), _F32)
        z = out[:, :q]
        np.matmul(blk, self.axes, out=z)
        # float32 sums of squares, widened by their worst-case rounding (γ_d) in the safe direction
        d = blk.shape[1]
        n2 = np.einsum("ij,ij->i", blk, blk).astype(np.float64) * (1.0 + 1.1 * d * 2.0**-24)
        zn = np.sqrt(np.einsum("ij,ij->i", z, z).astype(np.float64) * (1.0 - 1.1 * q * 2.0**-24))
        # ‖Px‖² = ‖x‖² − ‖Qᵀx‖² ≤ ‖x‖² − (‖z‖ − η‖x‖)²₊ for z within η‖x‖ of Qᵀx
        e2 = n2 - np.maximum(zn - _BOUND_ETA * np.sqrt(n2), 0.0) ** 2
        e = np.sqrt(np.maximum(e2, 0.0)).astype(_F32)
        e = np.nextafter(e, np.float32(np.inf))  # round up, never down
        e[(n2 < 0.98) | (n2 > 1.0201)] = 1e6
        out[:, q] = e
        return out



def tile_pairs_bounded(mm: Matmul, zr, zc, rows_r, rows_c, x, threshold: float, diag: tuple[int, int] | None,
                  x_c: np.ndarray | None = None):
    """:func:`tile_pairs` with a prefilter: the product of the :class:`Bound` rows ``zr``, ``zc``
    bounds every cosine from above, so a pair below ``threshold - BOUND_SLACK`` there cannot
    reach the threshold. Only the remaining candidates are scored, on their rows of ``x``
    (``x_c`` for the columns if given: queries against references), float32 first, then
    exactly — the same pairs as :func:`tile_pairs` on the full rows."""
    got = tile_candidates(mm(zr, zc), threshold - BOUND_SLACK, diag)
    if got is None:
        return None
    r, c = got
    ur, ir = np.unique(r, return_inverse=True)
    uc, ic = np.unique(c, return_inverse=True)
    a = rows_f32(x, rows_r[ur])
    b = rows_f32(x if x_c is None else x_c, rows_c[uc])
    if len(ur) * len(uc) > 4 * len(r) and len(r) > 64:
        # few candidates scattered over the tile: a float32 pass drops those the bound let
        # through but the vectors do not (most of them) before the float64 rescoring
        s32 = np.einsum("ij,ij->i", a[ir], b[ic])
        keep = s32 >= np.float32(threshold - f32_margin(a.shape[1]))
        r, c, ir, ic = r[keep], c[keep], ir[keep], ic[keep]
        if len(r) == 0:
            return None
    sc = exact_scores(a, b, ir, ic)
    ok = sc >= threshold
    if not ok.any():
        return None
    return rows_r[r[ok]], rows_c[c[ok]], sc[ok].astype(_F32)
