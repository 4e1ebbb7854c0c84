"""The content box: an image without its uniform borders (padding, letterbox bars, a plain canvas).

Perceptual hashes and embeddings of a padded copy are dominated by the padding: a photo pasted
on a large white canvas hashes like every other photo on that canvas (measured on held-out
data: canvas variants of *different* photos 6–8 pHash bits apart) and far from its own original.
Every signal is therefore computed on the content box, and the box's size is kept so that a
padded member is never chosen as the keeper over the fuller original (:mod:`dedup.phases.manifest`).

A border row (column) is one in which at most ``1 %`` of the pixels differ by more than
``tol`` grey levels from the border colour (the median of the image's outer frame). Rows are
peeled from each side while they are border rows. The box is used only when it removes at least
``min_cut`` of the area and keeps at least ``min_side`` pixels on each side; otherwise the
image is returned unchanged — so for ordinary photos every signal is exactly what it was.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TOL = 16  # grey levels: above JPEG ringing next to a bar, below any real edge
MIN_CUT = 0.03  # the box must remove at least this share of the area
MIN_SIDE = 8  # decoded pixels the box keeps on each side at least
OUTLIERS = 0.01  # share of a border row's pixels allowed to differ (noise, JPEG blocks)


def content_box(image: Image.Image, tol: int = TOL, min_cut: float = MIN_CUT, min_side: int = MIN_SIDE) -> tuple[int, int, int, int] | None:
    """``(left, top, right, bottom)`` of the content inside uniform borders, or None when the
    image has no such border worth removing."""
    g = np.asarray(image.convert("L") if image.mode != "L" else image, dtype=np.int16)
    h, w = g.shape
    if h < 2 * min_side or w < 2 * min_side:
        return None
    frame = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    bg = int(np.median(frame))
    # Shortcut with the same answer: when none of the four outer lines is a border line the box
    # would be the whole image, which never removes min_cut of it (most photos stop here,
    # without touching the inside).
    edges = np.abs(frame - bg) > tol
    if min(edges[:w].mean(), edges[w:2 * w].mean(), edges[2 * w:2 * w + h].mean(), edges[2 * w + h:].mean()) > OUTLIERS:
        return None
    off = np.abs(g - bg) > tol
    rows = off.mean(axis=1) > OUTLIERS
    cols = off.mean(axis=0) > OUTLIERS
    if not rows.any() or not cols.any():
        return None  # uniform image: nothing to trim to (hashes already treat it as uninformative)
    top, bottom = int(np.argmax(rows)), int(h - np.argmax(rows[::-1]))
    left, right = int(np.argmax(cols)), int(w - np.argmax(cols[::-1]))
    if bottom - top < min_side or right - left < min_side:
        return None
    if (bottom - top) * (right - left) > (1.0 - min_cut) * h * w:
        return None
    return left, top, right, bottom


def trim(image: Image.Image) -> tuple[Image.Image, float]:
    """The image cropped to its content box, and the share of the area the box keeps (1.0 when
    nothing is trimmed)."""
    box = content_box(image)
    if box is None:
        return image, 1.0
    left, top, right, bottom = box
    kept = (right - left) * (bottom - top) / float(image.width * image.height)
    return image.crop(box), kept
