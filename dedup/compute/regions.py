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
  copy on a plain canvas);
* **square windows** at the coarse scales ``square`` when the frame is not square: grid cells
  have the frame's shape, so a portrait copy inside a landscape query (a print photographed on
  a wall, a phone photo pasted into a scene) never had a cell that framed it — the best cell
  took in half background (benchmarks/check_quality.py: cosine 0.41 at the best cell where the
  copy's own box gave 0.61). A square of the short side's ``1/n`` frames a 3:4 or a 4:3 copy
  of that height at IoU ≥ 0.75.

Boxes are ``(left, top, right, bottom)`` in the pixels of the image given; cells smaller than
``min_side`` pixels are skipped, duplicates removed, the whole image is always first.
Defaults: grids (1.5, 2, 3) with half steps, content boxes on, squares at 1.5 and 2: about 64
regions for a 4:3 photo (45 for a square one), whole image included. Costs scale with the
count: the embedder runs once per region.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from dedup.compute.content import content_box

DEFAULT_GRIDS = (1.5, 2, 3)
DEFAULT_SQUARE = (1.5, 2)
SQUARE_ASPECT = 1.15  # frames at least this far from square get square windows
REFINE_BELOW = 0.3
MIN_SIDE = 32  # pixels of the decoded query a region keeps on each side at least


@dataclass(frozen=True)
class RegionSpec:
    grids: tuple[float, ...] = DEFAULT_GRIDS  # windows of 1/n of the side, per scale
    half_steps: bool = True  # also the cells shifted by half a cell
    content: bool = True  # content boxes of the image and of each cell
    min_side: int = MIN_SIDE
    square: tuple[float, ...] = DEFAULT_SQUARE  # square windows of 1/n of the short side, per scale
    max_regions: int | None = None  # cap per query (whole image included), None: all
    refine: bool = True  # refine the best box of a query that came close (dedup.phases.check)
    # how close: within this much cosine under the region threshold. Measured (check_quality.py,
    # every query refined): copies framed by a coarse window at 0.44-0.64 rose to 0.84-0.94;
    # unrelated queries rose by at most 0.17, to at most 0.45 under a threshold of 0.65
    refine_below: float = REFINE_BELOW

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


def square_boxes(frame: Box, n: float, half_steps: bool = True) -> list[Box]:
    """Square windows of ``1/n`` of ``frame``'s short side, every half window along both sides
    (``half_steps``) or side by side, the last ones flush with the far edges."""
    import math

    left, top, right, bottom = frame
    w, h = right - left, bottom - top
    side = min(w, h) / n

    def starts(length: float) -> list[float]:
        step = side / 2 if half_steps else side
        k = math.ceil(round((length - side) / step, 6)) + 1 if length > side else 1
        return [0.0] if k <= 1 else [i * (length - side) / (k - 1) for i in range(k)]

    return [(round(left + x), round(top + y), round(left + x + side), round(top + y + side)) for y in starts(h) for x in starts(w)]


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
    bw, bh = base[2] - base[0], base[3] - base[1]
    if bw and bh and max(bw, bh) >= SQUARE_ASPECT * min(bw, bh):
        for n in spec.square:
            if n >= 1:
                boxes.extend(square_boxes(base, n, spec.half_steps))
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
