"""benchmarks/same_photo.py's pixel score: copies of one photo score high, other photos low."""

from __future__ import annotations

import io

from PIL import Image, ImageEnhance, ImageOps

from benchmarks.same_photo import same_photo_score
from dedup.testing.synth import real_photos


def _tiny(im: Image.Image, side: int = 32) -> Image.Image:
    return im.convert("RGB").resize((side, side), Image.BICUBIC)


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_copies_score_above_other_photos():
    photos = [_tiny(im) for _, im in real_photos(128)[:8]]
    copies, others = [], []
    for k, a in enumerate(photos):
        shifted = Image.new("RGB", a.size)
        shifted.paste(a, (2, 1))
        edits = [_jpeg(a, 40), ImageEnhance.Brightness(a).enhance(1.15), ImageOps.mirror(a), shifted,
                 a.crop((2, 2, 30, 30)).resize((32, 32), Image.BICUBIC)]
        copies += [same_photo_score(a, e) for e in edits]
        others += [same_photo_score(a, b) for b in photos[k + 1:]]
    assert min(copies) > 0.75, sorted(copies)[:5]
    assert max(others) < min(copies), (max(others), min(copies))
    assert same_photo_score(photos[0], photos[0]) > 0.999
