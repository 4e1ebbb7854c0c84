"""The one decode function (DESIGN.md §6): bytes in, RGB image + status out. Never raises.

Order: identify (any format, so "unsupported" is told apart from "garbage") → allowed-format
check → pixel-count limit from the header, before any pixel is decoded (Pillow's bomb check
stays on; its error becomes ``too_large``) → JPEG ``draft()`` when only a small image is needed
→ ``load()`` → first frame → EXIF transpose → 16/32-bit scaled to 8-bit by the actual range
(a 16-bit PNG naively converted turns white) → alpha composited on white → RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dedup.records import Status


@dataclass(frozen=True)
class DecodePolicy:
    max_pixels: int = 89_478_485
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


@dataclass(frozen=True)
class Decoded:
    image: Image.Image | None
    status: Status
    error: str | None = None
    width: int | None = None
    height: int | None = None
    orig_mode: str | None = None
    format: str | None = None


_HIGH_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F", "I;32"}


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float single-channel image to 8 bits by its value range."""
    a = np.asarray(im, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., 0]
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() <= 65535 and a.min() >= 0):
        hi = 65535.0 if a.size and a.max() > 255 else 255.0
        a = a / hi * 255.0
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        a = (a - lo) / (hi - lo or 1.0) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(im: Image.Image) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im


def decode_image(data: bytes, policy: DecodePolicy = DecodePolicy(), min_size: int | None = None) -> Decoded:
    if not data:
        return Decoded(None, Status.EMPTY, "zero-byte image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            w, h = im.size
            if fmt not in policy.formats:
                return Decoded(None, Status.UNSUPPORTED_FORMAT, f"format {fmt} not in decode.formats {list(policy.formats)}", w, h, im.mode, fmt)
            if w * h > policy.max_pixels:
                return Decoded(None, Status.TOO_LARGE, f"{w}x{h} = {w * h} px > decode.max_pixels {policy.max_pixels}", w, h, im.mode, fmt)
            orig_mode = im.mode
            # Size after EXIF rotation, read from the header (a draft decode must not change it).
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            full_w, full_h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if min_size and fmt in ("JPEG", "MPO") and min(w, h) > 2 * min_size:
                scale = min_size / min(w, h)
                im.draft(im.mode if im.mode in ("RGB", "L") else None, (max(1, int(w * scale)), max(1, int(h * scale))))
            if getattr(im, "is_animated", False):
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in _HIGH_BIT:
                im = _to_8bit(im)
            im = _flatten_alpha(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            return Decoded(im, Status.OK, None, full_w, full_h, orig_mode, fmt)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Decoded(None, Status.TOO_LARGE, f"decompression bomb guard: {e}")
    except Image.UnidentifiedImageError:
        return Decoded(None, Status.DECODE_ERROR, "cannot identify image file (not an image, or a format Pillow cannot read)")
    except Exception as e:  # noqa: BLE001 - every decoder failure is a per-sample status
        return Decoded(None, Status.DECODE_ERROR, f"{type(e).__name__}: {e}")
