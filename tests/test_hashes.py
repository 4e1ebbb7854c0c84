"""hash_images gives imagehash 4.3.2's exact pHash/dHash bits (hash_size=8), batched."""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

import dedup.compute.hashes as H
from dedup.compute.decode import decode_image
from dedup.compute.hashes import HASH_MIN_SIZE, dhash_int, from_hex, hamming, hash_images, phash_int, to_hex

VECTORS = Path("/work/shared/data/imagehash_vectors")  # imagehash's own test images + published hashes
UKB = Path("/work/shared/data/ukbench_holidays")  # optional extra real photos
needs_vectors = pytest.mark.skipif(not (VECTORS / "expected_hashes.csv").exists(), reason="imagehash reference vectors not present")


def ih(im: Image.Image) -> tuple[int, int]:
    return int(str(imagehash.phash(im)), 16), int(str(imagehash.dhash(im)), 16)


@functools.cache
def real_photos() -> tuple[Image.Image, ...]:
    import skimage.data as d

    arrays = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.camera(), d.hubble_deep_field(), d.immunohistochemistry(),
              d.coins(), d.moon(), d.brick(), d.grass(), d.clock(), d.page(), d.text(), d.colorwheel(), d.stereo_motorcycle()[0]]
    out = [Image.fromarray(a) for a in arrays]
    out += [Image.open(p).reduce(4) if "holidays" in str(p) else Image.open(p).copy() for p in sorted(UKB.glob("*/*.jpg"))]
    return tuple(out)


@functools.cache
def varied_images() -> tuple[Image.Image, ...]:
    """>= 200 images: photos, random crops and resizes, noise, flat, tiny, patterns, modes."""
    rng = np.random.default_rng(2024)
    photos = real_photos()
    out: list[Image.Image] = list(photos)
    for im in photos:
        w, h = im.size
        for _ in range(4):
            cw, ch = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = im.crop((x, y, x + cw, y + ch))
            out.append(crop)
            out.append(crop.resize((int(rng.integers(1, 200)), int(rng.integers(1, 200))), Image.Resampling.BILINEAR))
        noisy = np.clip(np.asarray(im.convert("RGB"), dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(noisy))
    for v in (0, 1, 127, 128, 254, 255):  # flat grey, every DCT coefficient but DC ties at 0
        out.append(Image.new("L", (int(rng.integers(1, 80)), int(rng.integers(1, 80))), v))
    for c in ((255, 0, 0), (0, 128, 255), (7, 7, 7)):
        out.append(Image.new("RGB", (64, 48), c))
    for s in ((1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (8, 8), (9, 8), (31, 33), (32, 32)):
        out.append(Image.fromarray(rng.integers(0, 256, (s[1], s[0], 3), dtype=np.uint8)))
    for _ in range(20):
        out.append(Image.fromarray(rng.integers(0, 256, (int(rng.integers(1, 300)), int(rng.integers(1, 300))), dtype=np.uint8)))
    for k in (1, 2, 4, 16, 31, 32):  # stripes and checkerboards: exactly symmetric DCTs
        a = np.zeros((64, 64), np.uint8)
        a[:, :k] = 255
        out += [Image.fromarray(a), Image.fromarray(np.ascontiguousarray(a.T))]
        out.append(Image.fromarray(((np.indices((64, 64)).sum(0) // k) % 2 * 255).astype(np.uint8)))
    base = photos[0].resize((96, 64))
    out += [base.convert(m) for m in ("L", "RGBA", "P", "LA", "CMYK", "1", "YCbCr")]
    out.append(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 300))  # I;16, clipped by convert("L")
    return tuple(out)


# ----------------------------------------------------------------------------- exactness
def test_at_least_200_varied_images_bit_identical_to_imagehash():
    images = varied_images()
    assert len(images) >= 200
    ph, dh = hash_images(images)
    assert ph.dtype == np.uint64 and dh.dtype == np.uint64 and len(ph) == len(images)
    bad = [(k, im.mode, im.size) for k, (im, p, d) in enumerate(zip(images, ph, dh)) if ih(im) != (int(p), int(d))]
    assert not bad, bad


@needs_vectors
def test_published_vectors():
    rows = list(csv.DictReader(open(VECTORS / "expected_hashes.csv")))
    fn = {"phash": phash_int, "dhash": dhash_int}
    checked = 0
    for row in rows:
        if row["algorithm"] in fn and row["params"] == "hash_size=8":
            im = Image.open(VECTORS / row["image"])
            assert to_hex(fn[row["algorithm"]](im)) == row["expected_hex"], row
            checked += 1
    assert checked == 2  # imagehash.png: phash ba8c84536bd3c366, dhash 0026273b2b19550e


@needs_vectors
@pytest.mark.parametrize("name", ["imagehash.png", "peppers.png"])
def test_upstream_rotation_invariants(name):
    im = Image.open(VECTORS / "data" / name)
    ph, dh = hash_images([im, im.rotate(-1), im.rotate(-90)])
    for h in (ph, dh):
        assert hamming(h[0], h[1]) <= 10
        assert hamming(h[0], h[2]) > 10


def test_tie_fallback_is_needed_and_used(monkeypatch):
    """Flat and symmetric images tie with the median; fftpack's rounding decides their bits."""
    ties = [Image.new("L", (40, 30), v) for v in range(0, 256, 5)]
    ties += [Image.fromarray(((np.indices((64, 64)).sum(0) // k) % 2 * 255).astype(np.uint8)) for k in (1, 2, 4, 8)]
    want = [ih(im)[0] for im in ties]
    assert [int(p) for p in hash_images(ties)[0]] == want
    monkeypatch.setattr(H, "_TIE_RTOL", -1.0)  # disable the fallback: the plain matrix DCT
    assert [int(p) for p in hash_images(ties)[0]] != want


def test_photos_never_take_the_scipy_path(monkeypatch):
    calls = []
    real = H._scipy_phash_bits
    monkeypatch.setattr(H, "_scipy_phash_bits", lambda p: calls.append(1) or real(p))
    hash_images(list(real_photos()))
    assert calls == []


def test_batch_equals_single_and_order():
    images = list(varied_images()[:40])
    ph, dh = hash_images(images)
    rev_p, rev_d = hash_images(images[::-1])
    assert np.array_equal(ph, rev_p[::-1]) and np.array_equal(dh, rev_d[::-1])
    for im, p, d in list(zip(images, ph, dh))[:10]:
        assert (phash_int(im), dhash_int(im)) == (int(p), int(d))


def test_empty_batch():
    p, d = hash_images([])
    assert p.dtype == np.uint64 and d.dtype == np.uint64 and len(p) == len(d) == 0


def test_input_images_not_modified():
    im = real_photos()[0].copy()
    before = im.tobytes()
    hash_images([im])
    assert im.tobytes() == before and im.mode == "RGB"


# ----------------------------------------------------------------------------- bit order, hex
def test_bit_order_msb_is_first_matrix_element():
    im = real_photos()[1]
    h = imagehash.phash(im)
    ours = phash_int(im)
    flat = h.hash.flatten()
    assert bool(flat[0]) == bool(ours >> 63 & 1)
    assert bool(flat[-1]) == bool(ours & 1)
    assert ours == int("".join("1" if b else "0" for b in flat), 2)
    assert to_hex(ours) == str(h) and len(to_hex(ours)) == 16
    assert from_hex(str(h)) == ours
    assert imagehash.hex_to_hash(to_hex(ours)) == h


def test_hex_round_trip_and_errors():
    for v in (0, 1, 2**63, 2**64 - 1, 0x0026273B2B19550E):
        assert from_hex(to_hex(v)) == v
    assert to_hex(1) == "0000000000000001"
    assert to_hex(np.uint64(2**64 - 1)) == "ffffffffffffffff"
    with pytest.raises(ValueError):
        from_hex("abc")


def test_hamming():
    a = np.array([0, 2**64 - 1, 0b1011], dtype=np.uint64)
    b = np.array([0, 0, 0b0110], dtype=np.uint64)
    assert hamming(a, b).tolist() == [0, 64, 3]
    im1, im2 = real_photos()[0], real_photos()[1]
    assert int(hamming(phash_int(im1), phash_int(im2))) == imagehash.phash(im1) - imagehash.phash(im2)


# ----------------------------------------------------------------------------- decode + hash paths
def _jpeg(im: Image.Image, long_side: int) -> bytes:
    w, h = im.size
    s = long_side / max(w, h)
    b = io.BytesIO()
    im.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS).save(b, "JPEG", quality=90)
    return b.getvalue()


def test_full_decode_path_identical_to_imagehash_on_files():
    datas = [_jpeg(im, 512) for im in real_photos()[:12]]
    ph, dh = hash_images([decode_image(x).image for x in datas])
    for x, p, d in zip(datas, ph, dh):
        assert ih(Image.open(io.BytesIO(x))) == (int(p), int(d))


def test_hash_min_size_draft_stays_close():
    """The hash-only path (draft decode to a short side >= HASH_MIN_SIZE) moves few bits."""
    assert isinstance(HASH_MIN_SIZE, int) and 32 <= HASH_MIN_SIZE <= 256
    datas = [_jpeg(im, 1024) for im in real_photos()[:10]]
    drafted = [decode_image(x, min_size=HASH_MIN_SIZE).image for x in datas]
    assert all(HASH_MIN_SIZE <= min(im.size) < 2 * HASH_MIN_SIZE for im in drafted)
    ph, dh = hash_images(drafted)
    dist = [(int(hamming(p, ih_p)), int(hamming(d, ih_d))) for p, d, (ih_p, ih_d) in
            zip(ph, dh, (ih(Image.open(io.BytesIO(x))) for x in datas))]
    assert max(max(t) for t in dist) <= 4, dist
    assert np.mean([t[0] for t in dist]) <= 1.0, dist


def test_resize_l_is_pillows_lanczos_bit_for_bit():
    """resize_l reproduces Image.resize(LANCZOS) on "L" images for down-, up- and mixed scaling,
    both pass orders, unchanged axes, and the hash sizes from draft-decoded shapes."""
    rng = np.random.default_rng(11)
    shapes = [(int(rng.integers(1, 90)), int(rng.integers(1, 90)), int(rng.integers(1, 90)), int(rng.integers(1, 90))) for _ in range(400)]
    shapes += [(h, w, oh, ow) for h, w in ((96, 128), (128, 96), (85, 128), (192, 129), (384, 512), (1, 1), (32, 32), (8, 9))
               for oh, ow in ((32, 32), (8, 9))]
    assert H._resize_rule() != "pillow"  # the numpy path is what is tested here
    for h, w, oh, ow in shapes:
        for a in (rng.integers(0, 256, (h, w), dtype=np.uint8), np.where(rng.random((h, w)) < 0.5, 0, 255).astype(np.uint8)):
            ref = np.asarray(Image.fromarray(a, "L").resize((ow, oh), Image.Resampling.LANCZOS))
            np.testing.assert_array_equal(H.resize_l(a, (ow, oh)), ref, err_msg=f"{(h, w)} -> {(oh, ow)}")


def test_pillow_fallback_gives_the_same_hashes(monkeypatch):
    """If the installed Pillow resampled in a way we do not reproduce, hashing goes through Pillow."""
    ims = list(real_photos()[:6])
    fast = hash_images(ims)
    monkeypatch.setattr(H, "_resize_rule", lambda: "pillow")
    slow = hash_images(ims)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])
    assert [ih(im) for im in ims] == list(zip(slow[0].tolist(), slow[1].tolist()))
