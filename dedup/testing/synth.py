"""Shards built from real photos with planted duplicates, and their ground truth.

Real photos come only from what installs offline:

* scikit-image's sample photos that ship inside its wheel (the ones that need a download are
  not used): 19 photos, synthetic graphics (logo, colour wheel, silhouettes) left out;
* the UKBench/Holidays samples in ``shared/data/ukbench_holidays`` when that folder is found
  (``$DEDUP_SHARED_DATA`` or a ``shared/data`` beside the repository): ONE image per group,
  since members of a group are near-duplicates of each other — three UKBench objects, plus two
  diagonal quadrants of one Holidays photo (its neighbouring quadrants share sky and were too
  similar; the diagonal ones are not).

Every pair of these is unrelated: pHash Hamming distance > 16 and SSCD cosine < 0.5
(measured: min distance 20 bits, max cosine 0.29). tests/test_synth.py checks this.

Copies (one per edit in ``edits``) are made from the original's published JPEG bytes:

``exact``         the same bytes;
``reencode_q40``  decoded and saved as JPEG quality 40;
``resize_half``   half width and height (Lanczos), JPEG q90;
``crop_5pct``     5% of the width and 5% of the height cut away, split between the two sides
                  at a seeded ratio, JPEG q90;
``png_resave``    decoded and saved as PNG (member ``.png``).
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

EDITS = ("exact", "reencode_q40", "resize_half", "crop_5pct", "png_resave")

# scikit-image sample photos shipped inside the wheel (no pooch download). ``cat`` is the same
# photo as ``chelsea`` and is left out; ``stereo_motorcycle`` contributes its left view only.
_SKIMAGE = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "page", "text", "brick", "grass",
    "gravel", "immunohistochemistry", "cell", "clock", "microaneurysms", "retina", "hubble_deep_field",
    "stereo_motorcycle",
)
# (relative path, tiles as (rows, cols, [(row, col), ...]) or None for the whole image)
_SHARED = (
    ("ukbench/ukbench00000.jpg", None),
    ("ukbench/ukbench00004.jpg", None),
    ("ukbench/ukbench00008.jpg", None),
    ("holidays/100000.jpg", (2, 2, ((0, 0), (1, 1)))),
)
_MTIME = 1_700_000_000  # fixed member mtime: identical bytes for identical inputs


def _shared_data_dir() -> Path | None:
    here = Path(__file__).resolve()
    cands = [os.environ.get("DEDUP_SHARED_DATA"), here.parents[2] / "shared" / "data", here.parents[3] / "shared" / "data"]
    for cand in cands:
        if cand and (Path(cand) / "ukbench_holidays").is_dir():
            return Path(cand)
    return None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        return (a.astype(np.float64) / max(float(a.max()), 1e-9) * 255).astype(np.uint8)
    return a


@functools.lru_cache(maxsize=8)
def _load_photos(max_side: int) -> tuple[tuple[str, Image.Image], ...]:
    from skimage import data

    raw: list[tuple[str, Image.Image]] = []
    im: Image.Image
    for name in _SKIMAGE:
        try:
            a = getattr(data, name)()
        except Exception:  # noqa: BLE001 - not shipped in this scikit-image build
            continue
        if isinstance(a, tuple):  # stereo pair: the two views are near-duplicates, keep one
            a = a[0]
        raw.append((name, Image.fromarray(_to_uint8(np.asarray(a)))))
    shared = _shared_data_dir()
    if shared is not None:
        for rel, tiles in _SHARED:
            p = shared / "ukbench_holidays" / rel
            if not p.exists():
                continue
            stem = f"{p.parent.name}_{p.stem}"
            rows, cols, keep = tiles or (1, 1, ((0, 0),))
            with Image.open(p) as im:
                # Decode large JPEGs at a reduced scale (far faster) that keeps tiles >= max_side.
                im.draft("RGB", (max_side * cols, max_side * rows))
                im = im.convert("RGB")
            if tiles is None:
                raw.append((stem, im))
                continue
            w, h = im.size
            for r, c in keep:
                box = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
                raw.append((f"{stem}_tile{r}{c}", im.crop(box)))
    out = []
    for name, im in raw:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out.append((name, im))
    return tuple(out)


def real_photos(max_side: int = 512) -> list[tuple[str, Image.Image]]:
    """Mutually unrelated real RGB photos (long side <= ``max_side``), in a fixed order.

    Returns ``[(name, image), ...]``; the images are fresh copies the caller may modify.
    """
    return [(name, im.copy()) for name, im in _load_photos(int(max_side))]


@dataclass(frozen=True)
class PlantedSample:
    sample_id: str
    shard_id: str
    key: str
    group: str | None  # the original photo's name; None for unrelated photos
    edit: str  # "original", "unrelated", or one of EDITS


@dataclass(frozen=True)
class GroundTruth:
    samples: tuple[PlantedSample, ...]

    def groups(self) -> dict[str, list[str]]:
        """group -> sample_ids (the original and its copies), sorted."""
        out: dict[str, list[str]] = {}
        for s in self.samples:
            if s.group is not None:
                out.setdefault(s.group, []).append(s.sample_id)
        return {g: sorted(ids) for g, ids in sorted(out.items())}

    def duplicate_pairs(self) -> set[tuple[str, str]]:
        """Every unordered pair (a < b) of samples of one group, copies of one original included."""
        return {(a, b) for ids in self.groups().values() for a, b in combinations(ids, 2)}

    def pairs_by_edit(self) -> dict[str, set[tuple[str, str]]]:
        """original<->copy pairs keyed by the copy's edit, plus ``cross_shard``: every duplicate
        pair (copy<->copy included) whose two members are in different shards."""
        orig = {s.group: s for s in self.samples if s.edit == "original"}
        out: dict[str, set[tuple[str, str]]] = {}
        for s in self.samples:
            if s.group is not None and s.edit not in ("original", "unrelated"):
                a, b = sorted((orig[s.group].sample_id, s.sample_id))
                out.setdefault(s.edit, set()).add((a, b))
        shard = {s.sample_id: s.shard_id for s in self.samples}
        out["cross_shard"] = {p for p in self.duplicate_pairs() if shard[p[0]] != shard[p[1]]}
        return out

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps({"samples": [asdict(s) for s in self.samples]}, indent=1, sort_keys=True))

    @classmethod
    def from_json(cls, path) -> GroundTruth:
        obj = json.loads(Path(path).read_text())
        rows = obj["samples"] if isinstance(obj, dict) else obj
        return cls(tuple(PlantedSample(**d) for d in rows))


def _jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _make_copy(orig_bytes: bytes, edit: str, rng: np.random.Generator) -> tuple[bytes, str]:
    if edit == "exact":
        return orig_bytes, "jpg"
    with Image.open(io.BytesIO(orig_bytes)) as f:
        im = f.convert("RGB")
    w, h = im.size
    if edit == "reencode_q40":
        return _jpeg(im, 40), "jpg"
    if edit == "resize_half":
        return _jpeg(im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS), 90), "jpg"
    if edit == "crop_5pct":
        cw, ch = round(w * 0.05), round(h * 0.05)
        left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
        return _jpeg(im.crop((left, top, w - (cw - left), h - (ch - top))), 90), "jpg"
    if edit == "png_resave":
        return _png(im), "png"
    raise ValueError(f"unknown edit {edit!r}; known: {EDITS}")


def make_shards(
    out_dir,
    *,
    n_shards: int = 4,
    n_originals: int | None = None,
    n_unrelated: int | None = None,
    edits=EDITS,
    seed: int = 0,
    max_side: int = 512,
    with_sidecars: bool = True,
) -> GroundTruth:
    """Write ``out_dir/shard-00000.tar`` ... and return the ground truth.

    The photos are shuffled by ``seed`` and split into ``n_originals`` originals (default: half)
    that get one copy per edit in ``edits``, and ``n_unrelated`` singletons (default: the rest).
    Originals are dealt round-robin over the shards; copies alternate between the original's
    shard and another one, so every edit occurs both within a shard and across shards (given
    two or more originals and shards). Samples are shuffled within each shard by ``seed``; keys
    are ``s000000``, ``s000001``, ... across the whole set. Members: ``KEY.jpg`` (JPEG q90 for
    originals) or ``KEY.png`` (png_resave), and with ``with_sidecars`` ``KEY.json``
    (``{"caption", "source"}``) and ``KEY.txt`` (the caption). Same seed, same bytes.
    """
    unknown = [e for e in edits if e not in EDITS]
    if unknown:
        raise ValueError(f"unknown edits {unknown}; known: {EDITS}")
    if n_shards < 1:
        raise ValueError("n_shards must be >= 1")
    from webdataset import TarWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = real_photos(max_side)
    n = len(photos)
    if n_originals is None and n_unrelated is None:
        n_originals = n // 2
    if n_originals is None:
        assert n_unrelated is not None  # both None is handled above
        n_originals = n - n_unrelated
    if n_unrelated is None:
        n_unrelated = n - n_originals
    if n_originals < 0 or n_unrelated < 0 or n_originals + n_unrelated > n:
        raise ValueError(f"n_originals={n_originals} + n_unrelated={n_unrelated} must fit the {n} real photos available")
    photos = [photos[k] for k in rng.permutation(n)][: n_originals + n_unrelated]

    # (shard index, group, edit, bytes, ext, source name)
    items: list[tuple[int, str | None, str, bytes, str, str]] = []
    for k, (name, im) in enumerate(photos):
        home = k % n_shards
        orig = _jpeg(im, 90)
        if k >= n_originals:
            items.append((home, None, "unrelated", orig, "jpg", name))
            continue
        items.append((home, name, "original", orig, "jpg", name))
        for e, edit in enumerate(edits):
            same = n_shards == 1 or (k + e) % 2 == 0
            target = home if same else (home + 1 + (k + e) % (n_shards - 1)) % n_shards
            data, ext = _make_copy(orig, edit, rng)
            items.append((target, name, edit, data, ext, name))

    samples: list[PlantedSample] = []
    counter = 0
    for s in range(n_shards):
        mine = [it for it in items if it[0] == s]
        mine = [mine[i] for i in rng.permutation(len(mine))]
        shard_id = f"shard-{s:05d}"
        with open(out / f"{shard_id}.tar", "wb") as f, TarWriter(
            f, user="dedup", group="dedup", mode=0o644, encoder=False, mtime=_MTIME
        ) as tw:
            for _, group, edit, data, ext, name in mine:
                key = f"s{counter:06d}"
                counter += 1
                sample = {"__key__": key, ext: data}
                if with_sidecars:
                    caption = f"a photo: {name.replace('_', ' ')}"
                    sample["json"] = json.dumps({"caption": caption, "source": name}, sort_keys=True).encode()
                    sample["txt"] = caption.encode()
                tw.write(sample)
                samples.append(PlantedSample(f"{shard_id}/{key}", shard_id, key, group, edit))
    return GroundTruth(tuple(sorted(samples, key=lambda x: x.sample_id)))
