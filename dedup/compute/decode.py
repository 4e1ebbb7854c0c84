"""The one decode function (DESIGN.md §6): bytes in, RGB image + status out. Never raises.

Order: identify with every Pillow plugin (so "a real image in a format we do not allow" is told
apart from "not an image") → allowed-format check → pixel-count limit read from the header,
before any pixel is decoded (Pillow's own bomb check stays on; its warning/error becomes
``too_large``) → JPEG ``draft()`` when only a small image is needed → ``load()`` (the first
frame of an animation: Pillow opens every file on frame 0) → EXIF transpose → 16/32-bit and
float samples scaled to 8 bits (a 16-bit PNG naively converted turns white) → alpha composited
on white → RGB.

Status mapping (``dedup.records.Status``):

- zero bytes → ``EMPTY``
- Pillow cannot identify the bytes (garbage, HTML, HEIC without plugin, a header cut short)
  → ``DECODE_ERROR`` "cannot identify image file"
- identified, but its format is not in ``policy.formats`` (ICO, PSD, EPS, AVIF…) →
  ``UNSUPPORTED_FORMAT`` (width/height/format from the header are still reported)
- ``width * height > policy.max_pixels`` or Pillow's ``DecompressionBombError``/``Warning`` →
  ``TOO_LARGE``
- anything failing while decoding pixels (truncated JPEG/PNG, broken data stream, unsupported
  mode conversion) → ``DECODE_ERROR`` with ``"ExceptionType: message"``.

``width``/``height`` are always the ORIGINAL size after EXIF rotation, also when the pixels were
draft-decoded at 1/2, 1/4 or 1/8 scale.

Truncated files are detected only because Pillow raises on them: this module never sets
``ImageFile.LOAD_TRUNCATED_IMAGES`` (if other code in the process sets it, truncated files
decode with grey fill and come back ``OK``).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dedup.records import Status

__all__ = ["THREE_EIGHTHS", "DecodePolicy", "Decoded", "decode_image"]

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that exchange width and height
_DRAFTABLE = frozenset({"JPEG", "MPO"})
_HIGH_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class DecodePolicy:
    """What decode_image accepts.

    ``max_pixels``: images with more pixels than this are rejected from the header, before
    decoding. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, hard error above twice that)
    is never disabled; raising ``max_pixels`` above ``2 * MAX_IMAGE_PIXELS`` therefore needs
    ``MAX_IMAGE_PIXELS`` raised too.
    ``formats``: Pillow format names (``Image.format``) that are decoded.
    """

    max_pixels: int = 89_478_485
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


@dataclass(frozen=True)
class Decoded:
    image: Image.Image | None  # RGB (or "L" with gray=True), EXIF-transposed; None unless OK
    status: Status
    error: str | None = None  # short human message; None when OK
    width: int | None = None  # original full-resolution size after EXIF transpose
    height: int | None = None
    orig_mode: str | None = None  # Pillow mode of the file before any conversion
    format: str | None = None  # Pillow format name (JPEG, PNG, ...)


def _short(msg: str) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= _MAX_ERROR_CHARS else msg[: _MAX_ERROR_CHARS - 1] + "…"


def _too_large(pixels: str, policy: DecodePolicy) -> str:
    """The ``too_large`` message: names our setting and how to change it (never Pillow's limit)."""
    return (f"image of {pixels} pixels exceeds decode.max_pixels={policy.max_pixels} "
            "(decompression-bomb guard; raise it with --set decode.max_pixels=...)")


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float single-channel image → "L", keeping the picture visible.

    - ``I;16*``: the declared 16-bit range, v → round(v / 257) (so a 16-bit copy of an 8-bit
      image, v·257, comes back exactly; Pillow's own convert clips at 255 → white).
    - ``I``: values in 0..255 are taken as 8-bit (Pillow's convention for mode I), values in
      0..65535 as 16-bit, anything else (negative, > 16 bits) is stretched min..max.
    - ``F``: 0..1 → ×255, 0..255 as is, otherwise stretched min..max; NaN → 0.
    """
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (a.astype(np.uint32) + 128) // 257
        return Image.fromarray(out.astype(np.uint8), "L")
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1.0 and im.mode == "F":
        a = a * 255.0
    elif lo >= 0 and hi <= 255.0:
        pass
    elif lo >= 0 and hi <= 65535.0 and im.mode == "I":
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB; alpha (and tRNS / palette transparency) composited on white."""
    mode = im.mode
    if mode in _HIGH_BIT:
        im, mode = _scale_to_8bit(im), "L"  # PNG tRNS on 16-bit grey is ignored (rare)
    elif mode == "RGB" and "transparency" not in im.info:
        return im
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "PA"):
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


try:  # libjpeg-turbo called directly: same pixels as Pillow's JPEG decoder, less overhead
    import simplejpeg as _turbo  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - the Pillow path gives the same pixels
    _turbo = None

# ImageOps.exif_transpose's mapping, applied to pixels decoded outside Pillow.
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable). A JPEG without an Exif segment is not
    parsed at all (Pillow keeps the raw segment in ``info["exif"]`` when there is one)."""
    if im.format in _DRAFTABLE and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF never makes good pixels unusable
        return 1


# libjpeg-turbo's 3/8 scale for a colour draft (an embedder's input size) where Pillow's draft
# would take 1/2 — OFF. The same decode feeds the hashes, so 3/8 changed the pHash/dHash bits of
# runs with an embedder (benchmarks/same_manifests.py: 433 vs 425 pairs on its synth corpus;
# hash-only runs would disagree with embedder runs) for little: 0.19 vs 0.20 Mpx decoded per
# photo, 7.8 vs 10.0 ms a file mostly from libjpeg-turbo itself (docs/benchmarks.md#decode;
# benchmarks/decode.py measures it switched on).
THREE_EIGHTHS = False


def _turbo_decode(im: Image.Image, data: bytes, min_size: int, gray: bool, orientation: int) -> Image.Image | None:
    """A baseline/progressive YCbCr or grey JPEG decoded by libjpeg-turbo (simplejpeg) with the
    result Pillow's path gives, bit for bit (tests/test_decode.py): the same DCT scale as
    ``Image.draft`` (1/2, 1/4, 1/8: the output size is asked for exactly), the same IDCT
    (islow) and upsampling (fancy), luma only where Pillow would decode "L" — except that a
    colour draft may use 3/8 where Pillow would use 1/2 (:data:`THREE_EIGHTHS`, off). Skips Pillow's
    per-image decoder set-up and its RGB→RGBX→RGB copies (measured in docs/benchmarks.md).
    None on any error: the caller then decodes with Pillow, so statuses and messages are
    Pillow's."""
    w, h = im.size
    scale = 1
    if min_size:
        q = min(w // min_size, h // min_size)
        scale = next(s for s in (8, 4, 2, 1) if q >= s)
    luma = im.mode == "L" or (gray and scale > 1)
    num, den = 1, scale
    if THREE_EIGHTHS and scale == 2 and not luma and -(-min(w, h) * 3 // 8) >= min_size:
        num, den = 3, 8  # colour for an embedder: 3/8 where it keeps the input size
    out_h, out_w = -(-h * num // den), -(-w * num // den)
    try:
        assert _turbo is not None
        a = _turbo.decode_jpeg(data, colorspace="GRAY" if luma else "RGB", fastdct=False, fastupsample=False,
                               min_height=out_h, min_width=out_w)
    except Exception:  # noqa: BLE001 - Pillow decodes it again and reports
        return None
    if a.shape[:2] != (out_h, out_w):
        return None  # not the scale asked for (never seen): decode with Pillow
    out = Image.fromarray(a[:, :, 0] if luma else a, "L" if luma else "RGB")
    t = _TRANSPOSE.get(orientation)
    if t is not None:
        out = out.transpose(t)
    return out.convert("RGB") if luma and not gray else out


def _decode(data: bytes, policy: DecodePolicy, min_size: int | None, gray: bool = False) -> Decoded:
    im: Image.Image = Image.open(io.BytesIO(data))  # formats=None: identify anything Pillow knows
    fmt, mode = im.format, im.mode
    w, h = im.size
    if fmt not in policy.formats and str(fmt).upper() not in {f.upper() for f in policy.formats}:
        return Decoded(None, Status.UNSUPPORTED_FORMAT, f"format {fmt} not allowed (decode formats: {', '.join(policy.formats)})", w, h, mode, fmt)
    if w * h > policy.max_pixels:
        return Decoded(None, Status.TOO_LARGE, _too_large(f"{w}x{h} = {w * h}", policy), w, h, mode, fmt)
    drafted = bool(min_size) and fmt in _DRAFTABLE and min(w, h) >= 2 * int(min_size or 0)
    if fmt == "JPEG" and mode in ("L", "RGB") and _turbo is not None:
        orientation = _orientation(im)
        fast = _turbo_decode(im, data, int(min_size or 0) if drafted else 0, gray, orientation)
        if fast is not None:
            return Decoded(fast, Status.OK, None, *((h, w) if orientation in _SWAPS_AXES else (w, h)), mode, fmt)
    if drafted:
        # libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain; Pillow picks the largest factor
        # s with size // s >= (min_size, min_size), so the decoded short side stays >= min_size.
        # gray: a colour (YCbCr) JPEG is decoded to its luma channel only — libjpeg skips the
        # chroma IDCT, upsampling and colour conversion.
        im.draft("L" if gray else mode, (int(min_size or 0), int(min_size or 0)))
    im.load()
    orientation = _orientation(im)
    if orientation in range(2, 9):
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001
            orientation = 1
    if orientation in _SWAPS_AXES:
        w, h = h, w
    if gray and im.mode == "L" and "transparency" not in im.info:
        return Decoded(im, Status.OK, None, w, h, mode, fmt)
    return Decoded(_to_rgb(im), Status.OK, None, w, h, mode, fmt)


def decode_image(data: bytes, policy: DecodePolicy = DecodePolicy(), min_size: int | None = None,
                 gray: bool = False) -> Decoded:
    """Decode one image member. Never raises for bad bytes; see the module doc for statuses.

    ``min_size``: when set, JPEGs are draft-decoded (DCT-domain downscale by 2/4/8) so that the
    decoded short side is still >= ``min_size``; other formats are decoded at full size.
    ``gray``: the caller only needs grey pixels (hash-only runs): a JPEG that is draft-decoded
    comes back as its luma channel ("L"), and any image already in "L" without transparency is
    returned as "L" instead of being converted to RGB. Other images are still RGB.
    """
    if data is None or len(data) == 0:
        return Decoded(None, Status.EMPTY, "zero-byte image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # never print per-image warnings (corrupt EXIF...)
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and policy.max_pixels <= limit:
                # Pillow warns above MAX_IMAGE_PIXELS: here that is always over our own limit.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(bytes(data) if not isinstance(data, (bytes, bytearray)) else data, policy, min_size, gray)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        if m is None:
            msg = f"decompression bomb: {e}"
        elif int(m[1]) > policy.max_pixels:
            msg = _too_large(m[1], policy)
        else:  # allowed by decode.max_pixels, above Pillow's hard limit (2 x MAX_IMAGE_PIXELS)
            msg = (f"image of {m[1]} pixels exceeds Pillow's hard limit of {m[2]} pixels, which "
                   f"decode.max_pixels={policy.max_pixels} does not lift (raise PIL.Image.MAX_IMAGE_PIXELS too)")
        return Decoded(None, Status.TOO_LARGE, _short(msg))
    except Image.UnidentifiedImageError:
        return Decoded(None, Status.DECODE_ERROR, "cannot identify image file")
    except Exception as e:  # noqa: BLE001 - every decoder failure is a per-sample status
        return Decoded(None, Status.DECODE_ERROR, _short(f"{type(e).__name__}: {e}"))
