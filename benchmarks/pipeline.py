"""Keeping the cores busy: one shard's features with decode/hash overlapped with inference or not.

    python benchmarks/pipeline.py              # writes docs/benchmarks.md (section "pipeline")
    python benchmarks/pipeline.py --no-write   # print only
    python benchmarks/pipeline.py --images 200 --embedder sscd

Input: one WebDataset shard of ``--images`` web-size JPEGs (default 500): real photos
(scikit-image's, the UKBench/Holidays samples) cropped at random and resized to a long side of
320-1024 px, JPEG q75-95. ``FeatureExtractor.extract`` (the local executor's per-shard work:
read, decode, sha256, pHash/dHash, embedding) runs on it in this process with every core the
process may use, in these set-ups:

- before: decode and hash, then embed, one after the other per chunk; onnxruntime's own thread
  count (the machine's cores);
- threads: onnxruntime's intra-op threads from the cores given (``embedders.cpu_threads``);
- after: threads + decode/hash of the next chunks in a producer thread while a chunk is
  embedded (``features.prefetch``) — the default with a GPU model or from
  ``features.OVERLAP_MIN_CORES`` cores (on 2 it measured slower).

Reported: wall and CPU time per image (CPU of the whole process, all threads), and the share of
the cores' time in use (CPU / (wall × cores)). Best of ``--reps``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._table import machine_description, markdown_table, write_section

UKB = Path("/work/shared/data/ukbench_holidays")


def make_shard(path: Path, n: int) -> None:
    import skimage.data as skd

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "retina", "coins",
             "moon", "brick", "grass", "gravel", "clock"]
    srcs = [Image.fromarray(getattr(skd, k)()).convert("RGB") for k in names]
    srcs += [Image.open(p).convert("RGB") for p in sorted(UKB.glob("*/*.jpg"))]
    rng = np.random.default_rng(20)
    with tarfile.open(path, "w") as tf:
        for k in range(n):
            im = srcs[k % len(srcs)]
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            c = im.crop((x, y, x + cw, y + ch))
            s = int(rng.integers(320, 1025)) / max(c.size)
            c = c.resize((max(1, round(c.width * s)), max(1, round(c.height * s))), Image.Resampling.BILINEAR)
            b = io.BytesIO()
            c.save(b, "JPEG", quality=int(rng.integers(75, 96)))
            data = b.getvalue()
            ti = tarfile.TarInfo(f"{k:06d}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def measure(shard: Path, spec: str, overlap: bool, threads: str, reps: int) -> tuple[float, float, int]:
    from dedup.config import load_config
    from dedup.phases.features import FeatureExtractor
    from dedup.records import ShardRef

    import dedup.compute.embedders as emb

    os.environ.pop("OMP_NUM_THREADS", None)
    saved = emb.cpu_threads
    if threads == "ort-default":
        emb.cpu_threads = lambda: 0  # 0: onnxruntime picks (the machine's cores)
    try:
        cfg = load_config(None, [f"embedding.spec={spec}"])
        ex = FeatureExtractor(cfg)
    finally:
        emb.cpu_threads = saved
    ex.overlap = overlap
    ref = ShardRef(str(shard), "bench")
    best_w, best_c, n = float("inf"), float("inf"), 0
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        table, _, _ = ex.extract(ref)
        best_w, best_c = min(best_w, time.perf_counter() - t), min(best_c, time.process_time() - c)
        n = table.num_rows
    return best_w, best_c, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--embedder", default="sscd-distilled")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "web.tar"
        make_shard(shard, args.images)
        setups = [("before: sequential, onnxruntime default threads", False, "ort-default"),
                  ("threads from the cores given, sequential", False, "affinity"),
                  ("after: threads from the cores given + decode/hash prefetch thread", True, "affinity")]
        for name, overlap, threads in setups:
            wall, cpu, n = measure(shard, args.embedder, overlap, threads, args.reps)
            rows.append([name, f"{1e3 * wall / n:.1f}", f"{1e3 * cpu / n:.1f}", f"{100 * cpu / (wall * cores):.0f}%"])
            print(f"  {name}: wall {wall:.1f} s, cpu {cpu:.1f} s, {n} images", file=sys.stderr)
    text = "\n".join([
        "### Keeping the cores busy (`benchmarks/pipeline.py`)", "",
        f"`python benchmarks/pipeline.py` — {machine_description()}; {cores} cores given to the process; load average "
        f"{os.getloadavg()[0]:.1f} at the end (above {cores}, other processes held the cores: wall times and 'cores busy' then "
        f"say little, CPU per image more). One shard of {args.images} web-size "
        f"JPEGs (long side 320-1024 px), `FeatureExtractor.extract` with exact, pHash, dHash and {args.embedder} "
        f"embeddings (batch 32), best of {args.reps}:", "",
        markdown_table(["set-up", "wall ms/image", "CPU ms/image", "cores busy"], rows), "",
        f"(run took {time.time() - t0:.0f} s)"])
    print(text)
    if not args.no_write:
        write_section("pipeline", text)


if __name__ == "__main__":
    main()
