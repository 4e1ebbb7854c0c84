"""Shards built from real photos with planted duplicates, and their ground truth.

Real photos come from packages available offline: scikit-image's bundled sample images and the
UKBench/Holidays samples in ``../shared/data`` (one image per group, since members of a group
are near-duplicates of each other). They were checked to be mutually unrelated (pHash
distance > 16 bits, SSCD cosine < 0.3 for every pair; see tests/test_synth.py).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

EDITS = ("exact", "reencode_q40", "resize_half", "crop_5pct", "png_resave")

_SKIMAGE = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "brick", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "colorwheel", "logo", "horse",
    "microaneurysms",
)
_SHARED = ("ukbench/ukbench00000.jpg", "ukbench/ukbench00004.jpg", "ukbench/ukbench00008.jpg", "holidays/100000.jpg")


def _shared_dir() -> Path | None:
    for cand in (os.environ.get("DEDUP_SHARED_DATA"), Path(__file__).resolve().parents[3] / "shared" / "data"):
        if cand and (Path(cand) / "ukbench_holidays").is_dir():
            return Path(cand)
    return None


def real_photos(max_side: int = 512) -> list[tuple[str, Image.Image]]:
    """Mutually unrelated real RGB images, long side <= max_side, in a fixed order."""
    from skimage import data

    out = []
    for name in _SKIMAGE:
        try:
            a = getattr(data, name)()
        except Exception:  # noqa: BLE001 - an image missing from this scikit-image build
            continue
        if a.dtype != np.uint8:
            a = (a.astype(np.float64) / max(float(a.max()), 1e-9) * 255).astype(np.uint8)
        out.append((name, Image.fromarray(a)))
    shared = _shared_dir()
    if shared is not None:
        for rel in _SHARED:
            p = shared / "ukbench_holidays" / rel
            if p.exists():
                out.append((Path(rel).stem, Image.open(p)))
    result = []
    for name, im in out:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        result.append((name, im))
    return result


@dataclass(frozen=True)
class PlantedSample:
    sample_id: str
    shard_id: str
    key: str
    group: str | None  # the original's name; None for unrelated photos
    edit: str  # "original", "unrelated", or one of EDITS


@dataclass(frozen=True)
class GroundTruth:
    samples: tuple[PlantedSample, ...]

    def duplicate_pairs(self) -> set[tuple[str, str]]:
        groups: dict[str, list[str]] = {}
        for s in self.samples:
            if s.group is not None:
                groups.setdefault(s.group, []).append(s.sample_id)
        return {tuple(sorted(p)) for ids in groups.values() for p in combinations(ids, 2)}

    def pairs_by_edit(self) -> dict[str, set[tuple[str, str]]]:
        orig = {s.group: s for s in self.samples if s.edit == "original"}
        out: dict[str, set[tuple[str, str]]] = {}
        for s in self.samples:
            if s.group is not None and s.edit not in ("original", "unrelated"):
                o = orig[s.group]
                out.setdefault(s.edit, set()).add(tuple(sorted((o.sample_id, s.sample_id))))
        by_id = {s.sample_id: s for s in self.samples}
        out["cross_shard"] = {p for p in self.duplicate_pairs() if by_id[p[0]].shard_id != by_id[p[1]].shard_id}
        return out

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps([asdict(s) for s in self.samples], indent=1))

    @classmethod
    def from_json(cls, path) -> GroundTruth:
        return cls(tuple(PlantedSample(**d) for d in json.loads(Path(path).read_text())))


def _jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _edit(orig_bytes: bytes, im: Image.Image, edit: str) -> tuple[bytes, str]:
    if edit == "exact":
        return orig_bytes, "jpg"
    if edit == "reencode_q40":
        return _jpeg(Image.open(io.BytesIO(orig_bytes)).convert("RGB"), 40), "jpg"
    if edit == "resize_half":
        w, h = im.size
        return _jpeg(im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS), 90), "jpg"
    if edit == "crop_5pct":
        w, h = im.size
        return _jpeg(im.crop((int(w * 0.05), int(h * 0.05), w, h)), 90), "jpg"
    if edit == "png_resave":
        return _png(Image.open(io.BytesIO(orig_bytes)).convert("RGB")), "png"
    raise ValueError(f"unknown edit {edit!r}")


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 1_700_000_000, 0o644, "dedup", "dedup"
            tf.addfile(ti, io.BytesIO(data))


def make_shards(
    out_dir,
    *,
    n_shards: int = 4,
    n_originals: int | None = None,
    edits=EDITS,
    seed: int = 0,
    max_side: int = 384,
    with_sidecars: bool = True,
) -> GroundTruth:
    """Write ``out_dir/shard-0000{i}.tar`` and return the ground truth.

    Half of the photos (or ``n_originals``) get one copy per edit; the rest are unrelated
    singletons. Copies alternate between the original's shard and another shard, so every
    edit type appears both within and across shards. Deterministic bytes for a given seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = real_photos(max_side)
    order = rng.permutation(len(photos))
    photos = [photos[k] for k in order]
    n_orig = len(photos) // 2 if n_originals is None else min(n_originals, len(photos))
    items: list[tuple[int, str | None, str, bytes, str, str]] = []  # (shard, group, edit, bytes, ext, name)
    for k, (name, im) in enumerate(photos):
        shard = k % n_shards
        orig_bytes = _jpeg(im, 90)
        if k >= n_orig:
            items.append((shard, None, "unrelated", orig_bytes, "jpg", name))
            continue
        items.append((shard, name, "original", orig_bytes, "jpg", name))
        for e, edit in enumerate(edits):
            same = (k + e) % 2 == 0 or n_shards == 1
            target = shard if same else (shard + 1 + e % max(1, n_shards - 1)) % n_shards
            data, ext = _edit(orig_bytes, im, edit)
            items.append((target, name, edit, data, ext, name))
    samples: list[PlantedSample] = []
    counter = 0
    for s in range(n_shards):
        mine = [it for it in items if it[0] == s]
        mine = [mine[k] for k in rng.permutation(len(mine))]
        shard_id = f"shard-{s:05d}"
        members: list[tuple[str, bytes]] = []
        for _, group, edit, data, ext, name in mine:
            key = f"s{counter:06d}"
            counter += 1
            members.append((f"{key}.{ext}", data))
            if with_sidecars:
                caption = f"a photo ({name})"
                members.append((f"{key}.json", json.dumps({"caption": caption, "source": name, "edit": edit}).encode()))
                members.append((f"{key}.txt", caption.encode()))
            samples.append(PlantedSample(f"{shard_id}/{key}", shard_id, key, group, edit))
        _write_tar(out / f"{shard_id}.tar", members)
    truth = GroundTruth(tuple(sorted(samples, key=lambda x: x.sample_id)))
    return truth
