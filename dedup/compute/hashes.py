"""Batched pHash / dHash with exactly imagehash's bits (hash_size=8).

imagehash computes, per image: ``convert("L")``, a LANCZOS resize (32×32 for pHash, 9×8 for
dHash), then pHash = sign of the 8×8 low-frequency block of a 2-D DCT-II against its median,
dHash = sign of horizontal neighbour differences. We do the same PIL steps (the grayscale
conversion once per image, shared by both hashes) and replace the per-image
``scipy.fftpack.dct`` calls with one matrix product over the whole batch: only the 8×8 block is
needed, ``C @ P @ C.T`` with ``C`` the first 8 rows of the DCT-II basis. The DCT's positive
scale does not change a comparison against the median, so the bits are the same except where a
coefficient ties the median within rounding (flat or synthetic images): those images are
recomputed with scipy exactly as imagehash does, so the output is bit-identical always.

Bit order: ``int(str(imagehash_hash), 16)`` — the first element of the flattened boolean
matrix is the most significant bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

HASH_SIZE = 8
_PH = HASH_SIZE * 4  # imagehash's highfreq_factor=4
# Draft (DCT-domain) JPEG decoding keeps the decoded short side at least this large. The hash
# reduction is a LANCZOS resize to 32×32; from >= 128 px the draft image carries every
# frequency the 32×32 image keeps. Measured effect on bits: docs/hashing.md.
HASH_MIN_SIZE = 128

_n = np.arange(_PH)
_C = np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * _n[None, :] + 1) / (2 * _PH))  # (8, 32)
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)
_TIE_TOL = 1e-9


def _pack(bits: np.ndarray) -> np.ndarray:
    """(n, 64) bool -> (n,) uint64, first bit most significant."""
    return (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def _reduce(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    lanczos = Image.Resampling.LANCZOS
    ph = np.empty((len(images), _PH, _PH), np.float64)
    dh = np.empty((len(images), HASH_SIZE, HASH_SIZE + 1), np.int16)
    for k, im in enumerate(images):
        gray = im.convert("L")  # once per image, shared by both hashes
        ph[k] = np.asarray(gray.resize((_PH, _PH), lanczos), dtype=np.float64)
        dh[k] = np.asarray(gray.resize((HASH_SIZE + 1, HASH_SIZE), lanczos), dtype=np.int16)
    return ph, dh


def _phash_bits(pixels: np.ndarray) -> np.ndarray:
    block = np.einsum("kn,bnm,lm->bkl", _C, pixels, _C, optimize=True).reshape(len(pixels), -1)
    med = np.median(block, axis=1, keepdims=True)
    bits = block > med
    # Near-ties with the median: redo those images exactly as imagehash does.
    scale = np.abs(block).max(axis=1, keepdims=True) + 1.0
    ties = (np.abs(block - med) <= _TIE_TOL * scale).any(axis=1)
    if ties.any():
        import scipy.fftpack

        for k in np.flatnonzero(ties):
            p = pixels[k].astype(np.uint8)
            d = scipy.fftpack.dct(scipy.fftpack.dct(p, axis=0), axis=1)[:HASH_SIZE, :HASH_SIZE]
            bits[k] = (d > np.median(d)).reshape(-1)
    return bits


def hash_images(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(phash, dhash) as uint64 arrays, imagehash-identical for the same input images."""
    if len(images) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    ph, dh = _reduce(images)
    p = _pack(_phash_bits(ph))
    d = _pack((dh[:, :, 1:] > dh[:, :, :-1]).reshape(len(images), -1))
    return p, d


def phash_int(img: Image.Image) -> int:
    return int(hash_images([img])[0][0])


def dhash_int(img: Image.Image) -> int:
    return int(hash_images([img])[1][0])


def to_hex(h: int) -> str:
    return f"{int(h):016x}"


def from_hex(s: str) -> int:
    return int(s, 16)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.array([bin(int(v)).count("1") for v in np.ravel(x)])
