"""A tiny hash-only run (seconds): distinct photos, an exact copy, a re-encoded copy and an
undecodable sample, for tests of commands that read a finished run (eval, check)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from dedup.config import load_config
from dedup.runner import run_pipeline
from dedup.testing.synth import real_photos


def jpeg(im: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def tiny_run(root: Path, *, broken_only: bool = False) -> tuple[Path, Path, list[str]]:
    """(shards dir, run dir, sample ids). Keys 0000-0003 distinct photos, 0004 an exact copy of
    0000, 0005 a JPEG q40 copy of 0001, 0006 undecodable. ``broken_only``: only undecodable samples."""
    shards, run = root / "shards", root / "run"
    shards.mkdir(parents=True)
    if broken_only:
        members = [(f"{k:04d}.jpg", b"not an image %d" % k) for k in range(3)]
    else:
        photos = [im for _, im in real_photos(160)[:4]]
        blobs = [jpeg(im) for im in photos] + [jpeg(photos[0]), jpeg(photos[1], 40), b"not an image"]
        members = [(f"{k:04d}.jpg", b) for k, b in enumerate(blobs)]
    write_shard(shards / "s0.tar", members)
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    run_pipeline([str(shards)], str(run), cfg, progress=False)
    import pyarrow.parquet as pq

    ids = sorted(pq.read_table(run / "manifest.parquet", columns=["sample_id"])["sample_id"].to_pylist())
    return shards, run, ids
