"""decode_image: every kind of bad or unusual input maps to a status, never an exception.

All inputs are built in memory; the decompression bomb is a valid 20000×20000 PNG whose zlib
stream is assembled from one repeated compressed block (never decoded).
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from dedup.compute.decode import DecodePolicy, Decoded, decode_image
from dedup.compute.hashes import hamming, hash_images
from dedup.records import Status


# --------------------------------------------------------------------------------- helpers
def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


@functools.cache
def _astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def photo(size=(256, 192)) -> Image.Image:
    return _astronaut().resize(size, Image.Resampling.LANCZOS)


def with_orientation(im: Image.Image, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), **kw)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def zero_png(w: int, h: int, rows_per_block: int = 100) -> bytes:
    """A valid 8-bit grey PNG of zeros, built without materialising w*h bytes.

    After a Z_FULL_FLUSH the compressor's state is reset, so every further block of zero rows
    compresses to the same bytes; the adler32 of N zero bytes is ((N mod 65521) << 16) | 1.
    """
    assert h % rows_per_block == 0
    block = bytes((w + 1) * rows_per_block)  # filter byte 0 + w zero samples per row
    co = zlib.compressobj(9)
    first = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    again = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    n = (w + 1) * h
    stream = first + again * (h // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", ((n % 65521) << 16) | 1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")


def ok(d: Decoded) -> Image.Image:
    assert d.status is Status.OK, (d.status, d.error)
    assert d.error is None
    assert d.image is not None and d.image.mode == "RGB"
    return d.image


def px(d: Decoded, xy=(0, 0)) -> tuple[int, int, int]:
    return ok(d).getpixel(xy)


@pytest.fixture(autouse=True)
def no_warnings():
    """decode_image must never emit a warning (bombs, corrupt EXIF, palette transparency)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if "dedup" in w.filename or "PIL" in w.filename], [str(w.message) for w in caught]


# --------------------------------------------------------------------------------- statuses
def test_zero_bytes_is_empty():
    for data in (b"", bytearray()):
        d = decode_image(data)
        assert d.status is Status.EMPTY and d.image is None and d.error


def test_garbage_is_decode_error():
    for data in (b"\x00" * 100, b"<html><body>404 not found</body></html>", np.random.default_rng(0).bytes(5000), b"\xff\xd8"):
        d = decode_image(data)
        assert d.status is Status.DECODE_ERROR and d.image is None
        assert d.error


def test_garbage_message():
    assert decode_image(b"not an image at all").error == "cannot identify image file"


def test_truncated_jpeg_is_decode_error():
    data = encode(photo(), "JPEG", quality=90)
    for cut in (len(data) // 2, len(data) - 200):
        d = decode_image(data[:cut])
        assert d.status is Status.DECODE_ERROR, d
        assert "truncated" in d.error.lower() or "cannot identify" in d.error
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped globally


def test_truncated_jpeg_is_decode_error_with_draft():
    data = encode(photo((1024, 768)), "JPEG", quality=90)
    d = decode_image(data[: len(data) // 2], min_size=128)
    assert d.status is Status.DECODE_ERROR


def test_truncated_png_is_decode_error():
    data = encode(photo(), "PNG")
    assert decode_image(data[: len(data) // 2]).status is Status.DECODE_ERROR


def test_corrupt_mutations_never_raise():
    rng = np.random.default_rng(1)
    sources = [encode(photo((96, 64)), f) for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")]
    seen = set()
    for k in range(300):
        data = bytearray(sources[k % len(sources)])
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if k % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        d = decode_image(bytes(data))
        assert isinstance(d.status, Status)
        assert (d.image is not None) == (d.status is Status.OK)
        assert (d.error is None) == (d.status is Status.OK)
        seen.add(d.status)
    assert Status.DECODE_ERROR in seen


def test_unsupported_format_reports_header():
    ico = encode(Image.new("RGB", (48, 48), "red"), "ICO", sizes=[(48, 48)])
    d = decode_image(ico)
    assert d.status is Status.UNSUPPORTED_FORMAT and d.image is None
    assert d.format == "ICO" and (d.width, d.height) == (48, 48)
    assert "ICO" in d.error
    eps = encode(Image.new("RGB", (40, 30), "red"), "EPS")  # identifiable; Ghostscript never needed
    assert decode_image(eps).status is Status.UNSUPPORTED_FORMAT


def test_policy_formats_restrict():
    png = encode(photo(), "PNG")
    assert decode_image(png, DecodePolicy(formats=("JPEG",))).status is Status.UNSUPPORTED_FORMAT
    assert decode_image(png, DecodePolicy(formats=("PNG",))).status is Status.OK
    ok(decode_image(png, DecodePolicy(formats=("ICO", "PNG"))))


def test_png_bytes_are_sniffed_not_named():
    d = decode_image(encode(photo(), "PNG"))
    assert d.format == "PNG"
    ok(d)


# --------------------------------------------------------------------------------- size limits
def test_png_bomb_rejected_from_header():
    bomb = zero_png(20000, 20000)
    assert len(bomb) < 1_000_000
    d = decode_image(bomb)  # 400 Mpx: Pillow's own DecompressionBombError
    assert d.status is Status.TOO_LARGE and d.image is None
    d = decode_image(bomb, DecodePolicy(max_pixels=10**12))  # we allow it; Pillow's check still holds
    assert d.status is Status.TOO_LARGE


def test_bomb_between_pillow_limits_is_too_large_not_warning():
    # 10000×10000 = 100 Mpx: above MAX_IMAGE_PIXELS (89.5M), below 2×: Pillow only *warns*.
    d = decode_image(zero_png(10000, 10000))
    assert d.status is Status.TOO_LARGE and d.image is None


def test_max_pixels_policy_checked_before_load():
    data = zero_png(2000, 1000)
    d = decode_image(data, DecodePolicy(max_pixels=1_000_000))
    assert d.status is Status.TOO_LARGE
    assert (d.width, d.height) == (2000, 1000)
    assert "2000000" in d.error and "1000000" in d.error
    assert decode_image(data, DecodePolicy(max_pixels=2_000_000)).status is Status.OK


def test_pillow_limit_follows_policy(monkeypatch):
    """Pillow's warning threshold never overrides a larger policy; its hard error always holds."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img = encode(Image.new("RGB", (40, 40), "red"), "PNG")  # 1600 px: Pillow warns
    assert decode_image(img, DecodePolicy(max_pixels=1000)).status is Status.TOO_LARGE
    assert decode_image(img, DecodePolicy(max_pixels=5000)).status is Status.OK
    big = encode(Image.new("RGB", (50, 50), "red"), "PNG")  # 2500 px > 2×1000: Pillow errors
    assert decode_image(big, DecodePolicy(max_pixels=5000)).status is Status.TOO_LARGE


# --------------------------------------------------------------------------------- modes
def test_cmyk_jpeg():
    im = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    d = decode_image(encode(im, "JPEG", quality=95))
    r, g, b = px(d, (10, 10))
    assert d.orig_mode == "CMYK" and r > 200 and g < 60 and b < 60


def test_grayscale_jpeg_becomes_rgb():
    d = decode_image(encode(photo().convert("L"), "JPEG"))
    assert d.orig_mode == "L"
    r, g, b = px(d, (50, 50))
    assert r == g == b


def test_16bit_png_not_white_and_scaled():
    ramp = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0..65532
    d = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert d.orig_mode.startswith("I;16")
    a = np.asarray(ok(d))[..., 0].astype(int)
    expect = (ramp.astype(int) + 128) // 257
    assert np.array_equal(a, expect)
    assert 100 < a.mean() < 155  # a naive convert("L") gives 255 almost everywhere


def test_16bit_copy_of_8bit_image_decodes_identically():
    gray = np.asarray(photo().convert("L"))
    wide = gray.astype(np.uint16) * 257
    a = np.asarray(ok(decode_image(encode(Image.fromarray(wide), "PNG"))))
    b = np.asarray(ok(decode_image(encode(Image.fromarray(gray), "PNG"))))
    assert np.array_equal(a, b)


def test_two_different_16bit_images_hash_differently():
    import skimage.data

    imgs = []
    for arr in (skimage.data.camera(), skimage.data.moon()):
        imgs.append(ok(decode_image(encode(Image.fromarray(arr.astype(np.uint16) * 200 + 1000), "PNG"))))
    p, d = hash_images(imgs)
    assert hamming(p[0], p[1]) > 10 and hamming(d[0], d[1]) > 10


def test_32bit_int_and_float_tiff():
    ramp = np.tile(np.linspace(0, 1, 128), (32, 1))
    for arr, mode in (((ramp * 1e6 - 5e5).astype(np.int32), "I"), (ramp.astype(np.float32), "F"), ((ramp * 65535).astype(np.int32), "I")):
        d = decode_image(encode(Image.fromarray(arr, mode), "TIFF"))
        a = np.asarray(ok(d))[..., 0].astype(int)
        assert d.orig_mode == mode
        assert a[:, 0].max() <= 2 and a[:, -1].min() >= 253  # full range, monotone ramp
        assert (np.diff(a[0]) >= 0).all()


def test_rgba_composited_on_white():
    im = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (0, 0, 10, 10))  # left half fully transparent (blue underneath)
    im.putpixel((15, 5), (0, 0, 0, 128))
    for fmt in ("PNG", "WEBP"):
        d = decode_image(encode(im, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert d.orig_mode == "RGBA"
        assert px(d, (2, 2)) == (255, 255, 255)
        assert px(d, (18, 2)) == (255, 0, 0)
        assert all(120 <= c <= 135 for c in px(d, (15, 5)))  # half black over white


def test_la_composited_on_white():
    im = Image.new("LA", (10, 10), (0, 0))
    im.putpixel((5, 5), (0, 255))
    d = decode_image(encode(im, "PNG"))
    assert px(d, (0, 0)) == (255, 255, 255) and px(d, (5, 5)) == (0, 0, 0)


def test_palette_with_transparency():
    im = Image.new("P", (10, 10), 1)
    im.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    im.putpixel((3, 3), 0)
    for fmt in ("PNG", "GIF"):
        d = decode_image(encode(im, fmt, transparency=1))  # index 1 (red) is transparent
        assert d.orig_mode == "P"
        assert px(d, (0, 0)) == (255, 255, 255), fmt
        assert px(d, (3, 3)) == (0, 255, 0), fmt


def test_rgb_png_with_trns_color():
    im = Image.new("RGB", (10, 10), (10, 20, 30))
    im.putpixel((1, 1), (200, 0, 0))
    d = decode_image(encode(im, "PNG", transparency=(10, 20, 30)))
    assert px(d, (0, 0)) == (255, 255, 255) and px(d, (1, 1)) == (200, 0, 0)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert px(decode_image(data), (5, 5)) == (255, 0, 0)


def test_mpo_first_frame_and_draft():
    a, b = photo((640, 480)), Image.new("RGB", (640, 480), "blue")
    data = encode(a, "MPO", save_all=True, append_images=[b], quality=90)
    d = decode_image(data, min_size=128)
    assert d.format == "MPO" and (d.width, d.height) == (640, 480)
    im = ok(d)
    assert min(im.size) >= 128 and im.size[0] < 640
    assert np.asarray(im)[..., 2].mean() < 200  # the photo, not the blue second frame


def test_bmp_and_bilevel():
    ok(decode_image(encode(photo(), "BMP")))
    d = decode_image(encode(photo().convert("1"), "PNG"))
    assert d.orig_mode == "1"
    assert set(np.unique(np.asarray(ok(d)))) <= {0, 255}


# --------------------------------------------------------------------------------- EXIF, draft
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_restores_upright(orientation):
    upright = photo((128, 96))
    # The stored pixels are what a camera writes for this orientation: the inverse transform.
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = upright if inverse is None else upright.transpose(inverse)
    d = decode_image(with_orientation(stored, orientation, quality=98, subsampling=0))
    im = ok(d)
    assert (d.width, d.height) == im.size == (128, 96)
    diff = np.abs(np.asarray(im, dtype=int) - np.asarray(upright, dtype=int))
    assert diff.mean() < 3


def test_exif_rotated_copy_hashes_like_upright():
    upright = photo((256, 192))
    plain = ok(decode_image(encode(upright, "JPEG", quality=95)))
    rotated_file = with_orientation(upright.transpose(Image.Transpose.ROTATE_90), 6, quality=95)
    rotated = ok(decode_image(rotated_file))
    raw = Image.open(io.BytesIO(rotated_file)).convert("RGB")  # what a naive reader sees
    p, d = hash_images([plain, rotated, raw])
    assert hamming(p[0], p[1]) <= 2 and hamming(d[0], d[1]) <= 2
    assert hamming(p[0], p[2]) > 10


def test_draft_decode_reports_original_size():
    data = encode(photo((2048, 1536)), "JPEG", quality=90)
    d = decode_image(data, min_size=128)
    im = ok(d)
    assert (d.width, d.height) == (2048, 1536)
    assert im.size == (256, 192)  # 1/8 scale: short side 192 >= 128
    full = decode_image(data)
    assert ok(full).size == (2048, 1536) and (full.width, full.height) == (2048, 1536)


@pytest.mark.parametrize("size", [(300, 200), (511, 256), (512, 512), (1000, 257), (1023, 767), (4000, 3000)])
def test_draft_keeps_short_side_at_least_min_size(size):
    data = encode(Image.new("RGB", size, (90, 120, 150)), "JPEG")
    for min_size in (1, 64, 128, 200):
        d = decode_image(data, min_size=min_size)
        im = ok(d)
        assert min(im.size) >= min(min_size, min(size))
        scales = [(n, den) for n, den in ((1, 1), (1, 2), (3, 8), (1, 4), (1, 8))
                  if im.size == (-(-size[0] * n // den), -(-size[1] * n // den))]
        assert scales, im.size  # a DCT scale: 1/2, 1/4, 1/8 (Pillow) or 3/8 (libjpeg-turbo, colour)
        n, den = scales[-1]
        if n == 3:
            assert -(-min(size) * 3 // 8) >= min_size and min(size) // min_size < 4  # 1/4 would be too small
        else:
            assert den == 8 or min(size) // min_size < 2 * den  # the largest allowed reduction
        assert (d.width, d.height) == size


def test_draft_with_exif_rotation_reports_rotated_original_size():
    data = with_orientation(photo((1600, 1200)), 6, quality=90)
    d = decode_image(data, min_size=128)
    im = ok(d)
    assert (d.width, d.height) == (1200, 1600)
    assert im.size[0] < im.size[1] and min(im.size) >= 128 and im.size != (1200, 1600)


@pytest.mark.parametrize("mode,kw", [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0})])
def test_draft_other_jpeg_kinds(mode, kw):
    src = photo((1024, 768)).convert(mode)
    d = decode_image(encode(src, "JPEG", quality=90, **kw), min_size=100)
    im = ok(d)
    assert d.orig_mode == mode and (d.width, d.height) == (1024, 768)
    assert im.size == (256, 192)  # 768 // 100 = 7 → 1/4
    ref = ok(decode_image(encode(src, "JPEG", quality=90, **kw))).resize(im.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(im, dtype=int) - np.asarray(ref, dtype=int)).mean() < 6


def test_format_names_case_insensitive():
    assert decode_image(encode(photo(), "PNG"), DecodePolicy(formats=("png",))).status is Status.OK


def test_min_size_ignored_for_png():
    data = encode(photo((1024, 768)), "PNG")
    assert ok(decode_image(data, min_size=128)).size == (1024, 768)


def test_corrupt_exif_does_not_lose_image():
    data = bytearray(with_orientation(photo(), 6))
    i = data.find(b"Exif\x00\x00")
    data[i + 6 : i + 14] = b"\xde\xad\xbe\xef" * 2  # smash the TIFF header inside APP1
    d = decode_image(bytes(data))
    assert d.status is Status.OK and d.image.size == (256, 192)


# ------------------------------------------------------------------- gray (hash-only) decoding
@pytest.mark.parametrize("mode,kw", [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}), ("L", {})])
def test_gray_draft_decodes_luma_close_to_rgb_then_grey(mode, kw):
    """gray=True: a draft-decoded JPEG comes back as "L", same size, reported size unchanged, and
    within a grey level or two of the RGB draft converted to grey (luma vs RGB→L rounding)."""
    data = with_orientation(photo((1024, 768)).convert(mode), 6, quality=90, **kw)
    g = decode_image(data, min_size=96, gray=True)
    c = decode_image(data, min_size=96)
    assert g.status is Status.OK and g.image.mode == "L"
    assert (g.width, g.height) == (c.width, c.height) == (768, 1024)  # EXIF rotation applied to both
    assert g.image.size == c.image.size == (96, 128)  # 768 // 96 = 8: 1/8 scale, then rotated
    diff = np.abs(np.asarray(g.image, dtype=int) - np.asarray(c.image.convert("L"), dtype=int))
    assert diff.max() <= 2 and diff.mean() < 0.6
    if mode == "L":
        assert diff.max() == 0


def test_gray_leaves_other_images_in_colour():
    """gray only changes draft-decoded JPEGs (and passes plain "L" images through); CMYK JPEGs,
    PNGs, grey PNGs with transparency and small JPEGs (no draft) come back as before."""
    cmyk = encode(photo((1024, 768)).convert("CMYK"), "JPEG", quality=90)
    assert ok(decode_image(cmyk, min_size=96, gray=True)).size == (128, 96)
    png = encode(photo((300, 200)), "PNG")
    assert ok(decode_image(png, min_size=96, gray=True)).size == (300, 200)
    la = Image.new("L", (40, 30), 10)
    trns = encode(la, "PNG", transparency=10)
    assert px(decode_image(trns, gray=True)) == (255, 255, 255)  # composited on white, RGB
    small = encode(photo((150, 120)), "JPEG", quality=90)  # short side < 2 * 96: full decode
    assert decode_image(small, min_size=96, gray=True).image.mode == "RGB"
    grey_png = encode(photo((64, 48)).convert("L"), "PNG")
    g = decode_image(grey_png, gray=True).image
    assert g.mode == "L" and np.array_equal(np.asarray(g), np.asarray(ok(decode_image(grey_png)).convert("L")))


def test_gray_hashes_stay_close_to_colour_draft_hashes():
    rng = np.random.default_rng(3)
    blobs = []
    for _ in range(12):
        w, h = int(rng.integers(400, 1400)), int(rng.integers(300, 1000))
        im = _astronaut().resize((w, h), Image.Resampling.LANCZOS)
        blobs.append(encode(im.rotate(int(rng.integers(0, 360))), "JPEG", quality=int(rng.integers(60, 96))))
    g = hash_images([decode_image(b, min_size=96, gray=True).image for b in blobs])
    c = hash_images([decode_image(b, min_size=96).image for b in blobs])
    for a, b in zip(g, c):
        assert hamming(a, b).max() <= 4
        assert hamming(a, b).mean() <= 1.0


def test_decode_plan():
    from dedup.compute.hashes import HASH_MIN_SIZE
    from dedup.phases.features import decode_plan

    assert decode_plan(False, True, 224) == (None, False)
    assert decode_plan(True, True, None) == (HASH_MIN_SIZE, True)  # hash-only: luma drafts
    assert decode_plan(True, True, 224) == (224, False)  # an embedder needs colour
    assert decode_plan(True, True, 64) == (HASH_MIN_SIZE, False)
    assert decode_plan(True, False, None) == (1, True)  # exact-only: validate at the smallest size


# ---------------------------------------------------------------- libjpeg-turbo fast path
def _jpeg_variants() -> list[bytes]:
    src = _astronaut()
    out = []
    for size in ((700, 520), (300, 200), (97, 61)):
        im = src.resize(size)
        for kw in ({"quality": 90}, {"quality": 75, "subsampling": 0}, {"quality": 85, "progressive": True},
                   {"quality": 80, "subsampling": 1}):
            b = io.BytesIO()
            im.save(b, "JPEG", **kw)
            out.append(b.getvalue())
        for mode, orientation in (("L", 1), ("RGB", 6), ("L", 3), ("RGB", 8)):
            ex = Image.Exif()
            ex[0x0112] = orientation
            b = io.BytesIO()
            im.convert(mode).save(b, "JPEG", exif=ex.tobytes())
            out.append(b.getvalue())
    return out


@pytest.mark.skipif(__import__("importlib").util.find_spec("simplejpeg") is None, reason="simplejpeg not installed")
def test_turbo_path_equals_pillow_path(monkeypatch):
    """JPEGs decoded by libjpeg-turbo (simplejpeg) give Pillow's pixels, mode and sizes, bit for
    bit, at every draft size and in luma mode (these sizes never call for the 3/8 scale) — so
    hashes do not depend on whether simplejpeg is installed."""
    import dedup.compute.decode as dec

    cases = _jpeg_variants()
    fast = [[dec.decode_image(b, min_size=m, gray=g) for m in (None, 1, 96, 288) for g in (False, True)] for b in cases]
    monkeypatch.setattr(dec, "_turbo", None)
    slow = [[dec.decode_image(b, min_size=m, gray=g) for m in (None, 1, 96, 288) for g in (False, True)] for b in cases]
    n = 0
    for fs, ss in zip(fast, slow):
        for f, s in zip(fs, ss):
            assert (f.status, f.width, f.height, f.orig_mode, f.format) == (s.status, s.width, s.height, s.orig_mode, s.format)
            assert f.image is not None and s.image is not None
            assert f.image.mode == s.image.mode and f.image.size == s.image.size
            assert np.array_equal(np.asarray(f.image), np.asarray(s.image))
            n += 1
    assert n == len(cases) * 8


def test_truncated_jpeg_same_status_without_turbo(monkeypatch):
    """A truncated JPEG: the fast path gives way to Pillow, whose status and message stand."""
    import dedup.compute.decode as dec

    b = io.BytesIO()
    _astronaut().save(b, "JPEG", quality=90)
    cut = b.getvalue()[: len(b.getvalue()) // 2]
    with_turbo = dec.decode_image(cut, min_size=96, gray=True)
    monkeypatch.setattr(dec, "_turbo", None)
    without = dec.decode_image(cut, min_size=96, gray=True)
    assert with_turbo.status == without.status == Status.DECODE_ERROR
    assert with_turbo.error == without.error


@pytest.mark.skipif(__import__("importlib").util.find_spec("simplejpeg") is None, reason="simplejpeg not installed")
def test_colour_draft_three_eighths_switch(monkeypatch):
    """Off by default (the decode also feeds the hashes: Pillow's 1/2, hash bits as before).
    Switched on, a colour draft (an embedder's input size) uses libjpeg-turbo's 3/8 scale where
    Pillow's 1/2 would be the next: fewer pixels, the short side still ≥ min_size, the original
    size reported; luma drafts (hashes) keep Pillow's 1/2."""
    import dedup.compute.decode as dec

    data = encode(_astronaut().resize((1200, 900)), "JPEG", quality=90)
    assert dec.THREE_EIGHTHS is False
    assert dec.decode_image(data, min_size=288).image.size == (600, 450)
    monkeypatch.setattr(dec, "THREE_EIGHTHS", True)
    d = dec.decode_image(data, min_size=288)
    assert d.status == Status.OK and d.image is not None
    assert d.image.size == (450, 338) and (d.width, d.height) == (1200, 900)  # ceil(3/8 of each side)
    assert dec.decode_image(data, min_size=288, gray=True).image.size == (600, 450)  # luma: Pillow's 1/2
    assert dec.decode_image(data, min_size=338).image.size == (450, 338)  # 3/8 of 900 = 337.5 → 338: 3/8 still
    assert dec.decode_image(data, min_size=339).image.size == (600, 450)  # 3/8 too small: 1/2
    # Against the full decode resized to the same size: the same picture.
    full = np.asarray(dec.decode_image(data).image.resize((450, 338), Image.Resampling.BILINEAR, reducing_gap=3.0), np.float64)
    assert np.abs(full - np.asarray(d.image, np.float64)).mean() < 3.0
    monkeypatch.setattr(dec, "_turbo", None)
    assert dec.decode_image(data, min_size=288).image.size == (600, 450)  # Pillow alone: 1/2
