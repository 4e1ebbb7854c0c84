"""Regions of a query image for ``dedup check``: a memorized image inside a bigger picture.

One global descriptor per query misses a training image that fills only part of it: a cell of
a collage or grid, a small copy pasted into a scene, a print photographed on a wall, a copy
under a caption bar. So each query is also embedded region by region, and every region is
matched against the training index like the whole image:

* the **content box** of the whole image (uniform borders trimmed: :func:`dedup.compute.content.content_box`);
* a **multi-scale grid** over it: for each ``n`` in ``grids`` the ``n × n`` cells, and with
  ``half_steps`` also the cells shifted by half a cell (``(2n - 1)²`` cells of side ``1/n``:
  2 → 9, 3 → 25), so that a copy that straddles a grid line still has a cell mostly on it;
* the content box of each cell, when the cell has uniform borders (a grid with gutters, a
  copy on a plain canvas).

Boxes are ``(left, top, right, bottom)`` in the pixels of the image given; cells smaller than
``min_side`` pixels are skipped, duplicates removed, the whole image is always first.
Defaults: grids (2, 3) with half steps, content boxes on: 36 regions for an ordinary photo,
whole image included. Costs scale with the count: the embedder runs once per region.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from dedup.compute.content import content_box

DEFAULT_GRIDS = (1.5, 2, 3)
MIN_SIDE = 32  # pixels of the decoded query a region keeps on each side at least


@dataclass(frozen=True)
class RegionSpec:
    grids: tuple[float, ...] = DEFAULT_GRIDS  # windows of 1/n of the side, per scale
    half_steps: bool = True  # also the cells shifted by half a cell
    content: bool = True  # content boxes of the image and of each cell
    min_side: int = MIN_SIDE
    max_regions: int | None = None  # cap per query (whole image included), None: all
    refine: bool = True  # refine the best box of a query that came close (dedup.phases.check)

    @property
    def finest(self) -> float:
        return max(self.grids, default=1)


Box = tuple[int, int, int, int]


def grid_boxes(frame: Box, n: float, half_steps: bool = True) -> list[Box]:
    """Windows of ``1/n`` of ``frame``'s width and height: the ``n × n`` cells, or with
    ``half_steps`` windows every half window, the last one flush with the far edge (``n`` may
    be fractional: 1.5 gives windows of 2/3 at 0 and 1/3)."""
    import math

    left, top, right, bottom = frame
    w, h = right - left, bottom - top
    f = 1.0 / n
    k = math.ceil(round((1 - f) / (f / 2 if half_steps else f), 6)) + 1
    pos = [0.0] if k <= 1 else [i * (1 - f) / (k - 1) for i in range(k)]
    return [(round(left + x * w), round(top + y * h), round(left + (x + f) * w), round(top + (y + f) * h)) for y in pos for x in pos]


def region_boxes(image: Image.Image, spec: RegionSpec = RegionSpec()) -> list[Box]:
    """The boxes to embed for one query, the whole image first (module docstring)."""
    w, h = image.size
    whole = (0, 0, w, h)
    boxes: list[Box] = [whole]
    frame = content_box(image) if spec.content else None
    if frame is not None:
        boxes.append(frame)
    base = frame or whole
    for n in spec.grids:
        if n <= 1:
            continue
        for cell in grid_boxes(base, n, spec.half_steps):
            boxes.append(cell)
            if spec.content and min(cell[2] - cell[0], cell[3] - cell[1]) >= 4 * spec.min_side:
                cb = content_box(image.crop(cell))
                if cb is not None:
                    boxes.append((cell[0] + cb[0], cell[1] + cb[1], cell[0] + cb[2], cell[1] + cb[3]))
    seen, out = set(), []
    for b in boxes:
        if b in seen or (b != whole and min(b[2] - b[0], b[3] - b[1]) < spec.min_side):
            continue
        seen.add(b)
        out.append(b)
    if spec.max_regions is not None:
        out = out[: max(1, int(spec.max_regions))]
    return out


def scale_box(box: Box, src: tuple[int, int], dst: tuple[int, int]) -> list[int]:
    """``box`` in an image of size ``src`` as pixels of the same image at size ``dst``."""
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    left, top, right, bottom = box
    return [int(round(left * sx)), int(round(top * sy)), int(round(right * sx)), int(round(bottom * sy))]
