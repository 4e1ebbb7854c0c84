"""Incremental-run cost vs the size of the new data; writes section "incremental" of docs/benchmarks.md.

    python benchmarks/incremental.py [--prev 20000] [--day2 1000 2000 4000]

A previous run over ``--prev`` samples, then ``dedup run DAY2 --against PREV`` for each day-2
size, timed end to end (features of the new shards + search against the previous keepers +
delta manifest), next to a full re-run over previous + day-2 data. Small generated JPEGs and
the `pixel` embedder keep the per-sample cost low so the scaling is visible on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402
from dedup.config import load_config  # noqa: E402
from dedup.runner import run_pipeline  # noqa: E402


def write_shards(out: Path, prefix: str, n: int, per_shard: int, seed: int, copies_of: list[bytes] | None = None) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    blobs = []
    for s in range(0, n, per_shard):
        with tarfile.open(out / f"{prefix}-{s // per_shard:05d}.tar", "w") as tf:
            for k in range(s, min(n, s + per_shard)):
                if copies_of and k % 10 == 0:  # 10% of day-2 re-uploads an older image
                    data = copies_of[int(rng.integers(len(copies_of)))]
                else:
                    small = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(small).resize((64, 48), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                blobs.append(data)
                ti = tarfile.TarInfo(f"k{k:08d}.jpg")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return blobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prev", type=int, default=20_000)
    ap.add_argument("--day2", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = load_config(None, None, **{"embedding.spec": "pixel", "run.workers": 1, "clusters.keeper_policy": ["sample_id"]})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prev_blobs = write_shards(tmp / "day1", "a", args.prev, 2000, 0)
        t = time.perf_counter()
        assert run_pipeline([str(tmp / "day1")], str(tmp / "run1"), cfg, progress=False).exit_code == 0
        t_prev = time.perf_counter() - t
        rows.append(["previous run (full)", args.prev, "—", f"{t_prev:.1f}", "—"])
        for k, n2 in enumerate(args.day2):
            d2 = tmp / f"day2-{n2}"
            write_shards(d2, f"b{k}", n2, 1000, 100 + k, copies_of=prev_blobs)
            t = time.perf_counter()
            out = run_pipeline([str(d2)], str(tmp / f"inc-{n2}"), cfg, progress=False, against=str(tmp / "run1"))
            t_inc = time.perf_counter() - t
            assert out.exit_code == 0
            t = time.perf_counter()
            assert run_pipeline([str(tmp / "day1"), str(d2)], str(tmp / f"full-{n2}"), cfg, progress=False).exit_code == 0
            t_full = time.perf_counter() - t
            rows.append(["day 2 against previous", n2, out.stats["duplicates_of_previous"], f"{t_inc:.1f}", f"{t_full:.1f}"])
    table = markdown_table(["run", "new samples", "found as copies of previous", "incremental s", "full re-run s"], rows)
    body = (
        "### Incremental runs: cost vs new data (`benchmarks/incremental.py`)\n\n"
        f"{machine_description()}. Previous run: {args.prev} samples (64×48 JPEGs, `pixel` embedder, all four methods); "
        "day 2: new shards of the given size, 10% of them re-uploads of previous images. "
        "'incremental' = `dedup run DAY2 --against PREV` end to end (the first one also builds and caches the previous "
        "keepers' index); 'full re-run' = everything again. One worker process (`run.workers=1`), so the figures "
        "show the work itself, not process-pool start-up (~8 s on this machine when a pool is used).\n\n" + table
    )
    print(body)
    if not args.no_write:
        write_section("incremental", body)


if __name__ == "__main__":
    main()
