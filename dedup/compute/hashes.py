"""Batched pHash / dHash with exactly imagehash 4.3.2's bits (hash_size=8).

What imagehash does, per image and per hash (``imagehash.phash`` / ``imagehash.dhash``):

- pHash: ``convert("L")`` → LANCZOS resize to 32×32 → uint8 pixels → 2-D DCT-II with
  ``scipy.fftpack.dct`` (axis 0, then axis 1; unnormalised, i.e. ``2·Σ x·cos``) → keep the 8×8
  low-frequency block (DC included) → bit = coefficient > median of the 64.
- dHash: ``convert("L")`` → LANCZOS resize to 9 wide × 8 high → bit = pixel[r, c+1] > pixel[r, c].
- ``str(hash)``: the flattened (row-major) bool matrix as one binary number, in hex; the first
  element is the most significant bit. Our ``uint64`` equals ``int(str(h), 16)``.

What we do instead: the grayscale conversion runs once per image and feeds both resizes (
Pillow's arithmetic, see below, so the 32×32 and 9×8 pixels are identical to imagehash's). The DCT of the
whole batch is one pair of matrix products, ``B @ P @ B.T`` with ``B`` the first 8 rows of the
32-point DCT-II basis (float64, scaled by 2 per axis like fftpack). Only the 8×8 block that is
kept is ever computed.

Exactness: the matrix product and fftpack's FFT round differently (~1e-10 on coefficients of
magnitude up to ~1e6). A bit can only differ when a coefficient lies within rounding error of
the median — which in practice happens only when coefficients tie exactly in real arithmetic
(flat images, symmetric synthetic patterns), where fftpack's own rounding noise decides the
bit. Every image with a coefficient within ``_TIE_RTOL`` (relative to the block's largest
magnitude, far above both rounding errors) of its median is recomputed with
``scipy.fftpack.dct`` exactly as imagehash does; all others are decided by a margin that
rounding cannot cross. Result: bit-identical output (tests/test_hashes.py checks real photos,
crops, noise, flat and tiny images, and imagehash's published vectors).

The two LANCZOS resizes are not Pillow calls but :func:`resize_l` — Pillow's 8-bit resampling
reproduced in numpy: the same filter weights (computed in Python doubles with libm's ``sin``,
in Pillow's order), the same conversion to 22-bit fixed point, the same two passes with
round-half-up and clipping to 0..255 after each, in Pillow's pass order. Every product of a
pixel (≤ 255) and a fixed-point weight (|w| ≤ 2²²) and every partial sum is an integer below
2⁵³, so the float64 matrix products are exact and the result is bit-identical to
``Image.resize`` — at about half of Pillow's cost on these tiny outputs (Pillow spends
~150 µs per call on a 128×96 → 32×32 resize here). Recent Pillow (13.0 here) runs the vertical pass first
when it shrinks height much more than width; older Pillow always runs horizontal first. Which
of the two the installed Pillow does is checked once against ``Image.resize`` on probe images
(:func:`_resize_rule`); if neither reproduces it, every resize goes through Pillow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dedup.compute.search.hamming import popcount64

__all__ = ["HASH_MIN_SIZE", "HASH_SIZE", "content_hashes", "dhash_int", "from_hex", "hamming", "hash_images", "phash_int", "resize_l", "to_hex"]

HASH_SIZE = 8
_PSIZE = HASH_SIZE * 4  # imagehash's highfreq_factor=4 → 32×32 before the DCT

# Smallest decoded short side the hash path asks of decode_image(min_size=...): JPEGs are then
# draft-decoded (libjpeg DCT-domain downscale by 2/4/8) to a short side >= 96 instead of fully.
# Measured on 48 real photos at 256-2048 px, JPEG q90 (docs/hashing.md): relative to imagehash
# on the full decode, pHash moves 0.4 bits on average (99th percentile 2, max 4), dHash 0.5
# (max 5); distances between sizes of the same photo stay within 4 bits (pHash), as with 128.
# 96 lets the common 4:3 shapes draft one step further than 128 (512x384 and 640x480 → 1/4,
# 1024x768 → 1/8); 64 doubles the deviation (max 6 pHash / 8-10 dHash), too close to the
# usual 8-10 bit near-duplicate thresholds.
HASH_MIN_SIZE = 96

_LANCZOS = Image.Resampling.LANCZOS
_n = np.arange(_PSIZE)
# fftpack DCT-II: y[k] = 2 Σ_n x[n] cos(π k (2n+1) / 2N); we only need k < 8.
_BASIS = 2.0 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * _n[None, :] + 1) / (2 * _PSIZE))  # (8, 32)
_BASIS_T = np.ascontiguousarray(_BASIS.T)
_TIE_RTOL = 1e-9


def _pack(bits: np.ndarray) -> np.ndarray:
    """(n, 64) bool → (n,) uint64, element 0 the most significant bit."""
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).reshape(-1)


# ----------------------------------------------------------------- Pillow's LANCZOS, exactly
_PREC = 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2
_HALF = float(1 << (_PREC - 1))
_INV = 1.0 / (1 << _PREC)


def _lanczos(x: float) -> float:
    """Pillow's lanczos_filter (truncated sinc, support 3), same operations in doubles."""
    if -3.0 <= x < 3.0:
        a = 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)
        y = x / 3
        b = 1.0 if y == 0.0 else math.sin(y * math.pi) / (y * math.pi)
        return a * b
    return 0.0


# Inputs up to this many pixels per side are resized in numpy; larger ones (full decodes for
# an embedder) go through Pillow: their weights take milliseconds to build in Python and there
# are too many distinct sizes to cache them all. Both give the same pixels.
_NP_MAX_SIDE = 512


@functools.lru_cache(maxsize=2048)
def _band(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point LANCZOS weights for one axis (precompute_coeffs +
    normalize_coeffs_8bpc, box = the whole axis), compactly: (out_size,) first input index and
    (out_size, taps) integer weights as float32 (exact: |w| ≤ 2²²). ≤ ~12 KB per entry."""
    filterscale = scale = float(in_size) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = 3.0 * filterscale
    ss = 1.0 / filterscale
    first = np.zeros(out_size, np.int64)
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(0, int(center - support + 0.5))
        xmax = min(in_size, int(center + support + 0.5)) - xmin
        ws = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in ws:
            ww += w
        fixed = []
        for w in ws:
            if ww != 0.0:
                w /= ww
            fixed.append(int(-0.5 + w * (1 << _PREC)) if w < 0 else int(0.5 + w * (1 << _PREC)))
        first[xx] = xmin
        rows.append(fixed)
    taps = np.zeros((out_size, max(1, max(len(r) for r in rows))), np.float32)
    for xx, r in enumerate(rows):
        taps[xx, : len(r)] = r
    return first, taps


@functools.lru_cache(maxsize=2048)
def _weights32(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) dense float32 matrix of Pillow's weights for one axis (≤ 64 KB for
    in_size ≤ _NP_MAX_SIDE: the two caches hold ≤ ~150 MB even if every entry were that big,
    a few MB for the sizes draft decoding produces)."""
    first, taps = _band(in_size, out_size)
    m = np.zeros((out_size, in_size + taps.shape[1]), np.float32)
    cols = first[:, None] + np.arange(taps.shape[1])[None, :]
    m[np.arange(out_size)[:, None], cols] = taps
    m = np.ascontiguousarray(m[:, :in_size])  # taps past the edge are zero (Pillow clips the window)
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=256)
def _weights(in_size: int, out_size: int) -> np.ndarray:
    """float64 copy of :func:`_weights32` (integers ≤ 2²²: exact either way), cached for the
    sizes seen most recently (≤ 128 KB each)."""
    m = _weights32(in_size, out_size).astype(np.float64)
    m.flags.writeable = False
    return m


def _fix(acc: np.ndarray) -> np.ndarray:
    """Pillow's clip8 on exact integer sums: (sum + 2^21) >> 22, clipped to 0..255."""
    return np.clip(np.floor((acc + _HALF) * _INV), 0.0, 255.0)


def _vertical_first(h: int, w: int, oh: int, ow: int, rule: str) -> bool:
    if rule == "horizontal_first":
        return False
    return (h - oh) > 0 and (h - oh) > (w - ow) * 2  # recent Pillow's ImagingResampleInner


def _resize_np(a: np.ndarray, ow: int, oh: int, rule: str) -> np.ndarray:
    """float64 (h, w) grey pixels → float64 (oh, ow), Pillow's arithmetic and pass order."""
    return _resize_stack(a[None], ow, oh, rule)[0]


def _resize_stack(a: np.ndarray, ow: int, oh: int, rule: str) -> np.ndarray:
    """float64 (n, h, w) images of one shape → float64 (n, oh, ow): each pass is one matrix
    product for the whole stack (the same weights for every image of a shape)."""
    n, h, w = a.shape

    def horizontal(x: np.ndarray) -> np.ndarray:
        k, rows, cols = x.shape
        if ow == cols:
            return x
        return _fix(x.reshape(k * rows, cols) @ _weights(cols, ow).T).reshape(k, rows, ow)

    def vertical(x: np.ndarray) -> np.ndarray:
        k, rows, cols = x.shape
        if oh == rows:
            return x
        y = _weights(rows, oh) @ x.transpose(1, 0, 2).reshape(rows, k * cols)  # (oh, k * cols)
        return _fix(y).reshape(oh, k, cols).transpose(1, 0, 2)

    if _vertical_first(h, w, oh, ow, rule):
        return horizontal(vertical(a))
    return vertical(horizontal(a))


@functools.lru_cache(maxsize=1)
def _resize_rule() -> str:
    """Which pass order reproduces the installed Pillow ("height_first_rule" or "horizontal_first"),
    checked on probe images that tell the orders apart; "pillow" = neither: use Pillow."""
    rng = np.random.default_rng(7)
    cases = [(96, 128, 32, 32), (128, 96, 32, 32), (200, 40, 32, 32), (45, 48, 5, 44), (9, 2, 8, 9),
             (74, 11, 48, 2), (131, 97, 8, 9), (31, 33, 32, 32), (1, 7, 8, 9), (500, 60, 8, 9)]
    for rule in ("height_first_rule", "horizontal_first"):
        ok = True
        for h, w, oh, ow in cases:
            a = rng.integers(0, 256, (h, w), dtype=np.uint8)
            ref = np.asarray(Image.fromarray(a, "L").resize((ow, oh), _LANCZOS))
            if not np.array_equal(_resize_np(a.astype(np.float64), ow, oh, rule).astype(np.uint8), ref):
                ok = False
                break
        if ok:
            return rule
    return "pillow"


def resize_l(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``np.asarray(Image.fromarray(a, "L").resize(size, LANCZOS))`` for a (h, w) uint8 array,
    bit for bit, computed with two exact float64 matrix products."""
    ow, oh = int(size[0]), int(size[1])
    rule = _resize_rule()
    if rule == "pillow":
        return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.uint8), "L").resize((ow, oh), _LANCZOS))
    return _resize_np(np.asarray(a, np.float64), ow, oh, rule).astype(np.uint8)


def _reduce(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32) and (n, 8, 9) uint8: imagehash's resized grayscale pixels for each hash.
    Images of one decoded size are resized together (one matrix product per pass)."""
    n = len(images)
    ph = np.empty((n, _PSIZE, _PSIZE), np.uint8)
    dh = np.empty((n, HASH_SIZE, HASH_SIZE + 1), np.uint8)
    rule = _resize_rule()
    pillow = rule == "pillow"
    by_shape: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for k, im in enumerate(images):
        gray = im if im.mode == "L" else im.convert("L")  # once per image, shared by both hashes
        if pillow or max(gray.size) > _NP_MAX_SIDE:
            ph[k] = np.asarray(gray.resize((_PSIZE, _PSIZE), _LANCZOS))
            dh[k] = np.asarray(gray.resize((HASH_SIZE + 1, HASH_SIZE), _LANCZOS))
            continue
        a = np.asarray(gray)
        by_shape.setdefault(a.shape, []).append((k, a))
    for members in by_shape.values():
        idx = [k for k, _ in members]
        g = np.stack([a for _, a in members]).astype(np.float64)
        ph[idx] = _resize_stack(g, _PSIZE, _PSIZE, rule)  # a pass is skipped where the size is kept
        dh[idx] = _resize_stack(g, HASH_SIZE + 1, HASH_SIZE, rule)
    return ph, dh


def _scipy_phash_bits(pixels: np.ndarray) -> np.ndarray:
    """imagehash.phash's own arithmetic on one 32×32 uint8 block (the tie fallback)."""
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(np.ascontiguousarray(pixels, np.uint8), axis=0), axis=1)
    low = dct[:HASH_SIZE, :HASH_SIZE]
    return (low > np.median(low)).reshape(-1)


def _phash_bits(pixels: np.ndarray) -> np.ndarray:
    """(n, 32, 32) uint8 → (n, 64) bool, one batched DCT for all images."""
    n = len(pixels)
    block = (_BASIS @ pixels.astype(np.float64) @ _BASIS_T).reshape(n, -1)  # (n, 64)
    med = np.median(block, axis=1, keepdims=True)
    bits = block > med
    margin = _TIE_RTOL * (np.abs(block).max(axis=1, keepdims=True) + 1.0)
    for k in np.flatnonzero((np.abs(block - med) <= margin).any(axis=1)):
        bits[k] = _scipy_phash_bits(pixels[k])
    return bits


def hash_images(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(phash, dhash) as uint64 arrays of length n; equal to imagehash's for the same images."""
    if len(images) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    ph, dh = _reduce(images)
    d_bits = (dh[:, :, 1:] > dh[:, :, :-1]).reshape(len(images), -1)
    return _pack(_phash_bits(ph)), _pack(d_bits)


def content_hashes(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pipeline's hashes: (phash, dhash, kept) of each image's content box — the image
    without uniform borders (:mod:`dedup.compute.content`), so that padding, letterbox bars
    and plain canvases neither dominate the hash nor separate a padded copy from its
    original. ``kept``: the share of the area the box keeps (1.0: nothing trimmed, and then
    the hashes equal imagehash's)."""
    from dedup.compute.content import trim

    boxes = [trim(im) for im in images]
    ph, dh = hash_images([b for b, _ in boxes])
    return ph, dh, np.array([k for _, k in boxes], np.float32)


def phash_int(img: Image.Image) -> int:
    return int(hash_images([img])[0][0])


def dhash_int(img: Image.Image) -> int:
    return int(hash_images([img])[1][0])


def to_hex(h: int) -> str:
    """imagehash's ``str()`` of a 64-bit hash: 16 lowercase hex digits."""
    return f"{int(h) & 0xFFFFFFFFFFFFFFFF:016x}"


def from_hex(s: str) -> int:
    """Inverse of :func:`to_hex`; accepts any ``str(imagehash.ImageHash)`` of an 8×8 hash."""
    s = s.strip().lower()
    if len(s) != 16:
        raise ValueError(f"expected 16 hex digits for a 64-bit hash, got {s!r}")
    return int(s, 16)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise Hamming distance of uint64 hashes."""
    return popcount64(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
