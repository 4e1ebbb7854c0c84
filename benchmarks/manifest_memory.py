"""Peak memory of the commands that read a large manifest (issue #18 item 5); prints JSON lines,
writes nothing else (the figures are in docs/scale.md); outputs go to ``DIR-out/``.

    python benchmarks/manifest_memory.py --rows 2000000 --dir /tmp/mm            # this checkout
    python benchmarks/manifest_memory.py --rows 2000000 --dir /tmp/mm --code DIR  # another revision's code
    python benchmarks/manifest_memory.py --rows 4000000 --dir /tmp/mm4 --part-rows 1000000

A synthetic run directory: ``manifest.parquet`` with ``--rows`` rows written directly in the
manifest schema (1 000 shards; 30 % of the rows duplicates in clusters of 2–5; random hashes;
reasons as the pipeline words them), a run.json/stats.json, an empty pairs file, no shards (the
report's thumbnails are skipped). Written by this checkout (one file up to ``--part-rows``, else
a directory of parts), built once per ``--dir``. Then ``dedup report`` and ``dedup apply
--keep-list`` run as subprocesses with ``PYTHONPATH=--code`` (default: this checkout), each
timed with its peak resident set (``os.wait4``'s ``ru_maxrss``: that process alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_run(d: Path, rows: int, part_rows: int, seed: int = 0) -> None:
    from dedup.config import load_config
    from dedup.io import manifests
    from dedup.io.rundir import RunDir
    from dedup.schema import MANIFEST_SCHEMA, PAIRS_SCHEMA

    if (d / "stats.json").exists():
        return
    rng = np.random.default_rng(seed)
    run = RunDir(str(d))
    n_shards = 1000
    per = -(-rows // n_shards)
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"]})
    shards = [f"shard-{s:05d}" for s in range(n_shards)]

    def ids(k: np.ndarray) -> np.ndarray:
        return np.char.add(np.char.add(np.char.add("shard-", np.char.zfill((k // per).astype(str), 5)), "/"),
                           np.char.zfill((k % per).astype(str), 8))

    def chunks():
        for s0 in range(0, rows, 1 << 16):
            k = np.arange(s0, min(rows, s0 + (1 << 16)))
            shard, key = k // per, k % per
            sid = ids(k)
            # clusters: in each block of 10 rows, the first is the keeper of a cluster of 4
            # (the next 3 rows, duplicates: 30 % of the rows), the other 6 rows are unique
            dup = (k % 10 > 0) & (k % 10 < 4)
            size = np.where((k % 10 < 4), 4, 1).astype(np.int32)
            ksid = ids(np.where(dup, k - k % 10, k))
            reason = np.where(dup, np.char.add("duplicate of ", ksid), np.where(size > 1, "keeper of a cluster of 4", "unique"))
            n = len(k)
            yield pa.table({
                "sample_id": sid, "shard_id": np.char.add("shard-", np.char.zfill(shard.astype(str), 5)),
                "key": np.char.zfill(key.astype(str), 8), "status": np.full(n, "ok"), "error": pa.nulls(n, pa.string()),
                "cluster_id": ksid, "cluster_size": size, "is_keeper": ~dup,
                "dup_method": pa.array(np.where(dup, "phash", None), pa.string()),
                "score_to_keeper": pa.array(np.where(dup, 3.0, np.nan), pa.float32(), mask=~dup),
                "reason": reason, "width": np.full(n, 640, np.int32), "height": np.full(n, 480, np.int32),
                "file_size": rng.integers(10_000, 200_000, n), "phash": rng.integers(0, 2**63, n).astype(np.uint64),
                "dhash": rng.integers(0, 2**63, n).astype(np.uint64), "outlier_score": pa.nulls(n, pa.float32()),
            }).cast(MANIFEST_SCHEMA)

    md = {**MANIFEST_SCHEMA.metadata, b"config_hash": cfg.config_hash().encode(), b"partial": b"false"}
    manifests.write_manifest_data(run, run.manifest, MANIFEST_SCHEMA.with_metadata(md), chunks(), rows, part_rows=part_rows)
    run.write_parquet(run.pairs, PAIRS_SCHEMA.empty_table())
    run.write_json(run.run_json, {"config": cfg.to_dict(), "config_hash": cfg.config_hash(), "inputs": [], "input_locations": [],
                                  "shards": shards, "shard_urls": {s: f"/nonexistent/{s}.tar" for s in shards}})
    dups = rows * 3 // 10
    run.write_json(run.stats, {"samples": rows, "ok": rows, "kept": rows - dups, "duplicates": dups, "partial": False,
                               "thresholds": {"phash_radius": 8, "dhash_radius": 8}, "cluster_size_histogram": {"1": rows // 10 * 6, "4": rows // 10}})


def measure(cmd: list[str], code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    # cwd: `python -m` puts it first on sys.path, ahead of PYTHONPATH
    p = subprocess.Popen(cmd, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024),
            **({"stderr": err[-400:]} if p.returncode else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--part-rows", type=int, default=None, help="default: dedup.io.manifests.MANIFEST_PART_ROWS")
    ap.add_argument("--code", default=str(ROOT), help="PYTHONPATH of the measured commands (another revision's code)")
    ap.add_argument("--only", choices=["report", "keep-list"], default=None)
    a = ap.parse_args()
    d = Path(a.dir)
    t0 = time.perf_counter()
    make_run(d, a.rows, a.part_rows or 0)
    built = round(time.perf_counter() - t0, 1)
    form = "directory" if (d / "manifest.parquet").is_dir() else "file"
    out = d.parent / (d.name + "-out")
    out.mkdir(exist_ok=True)
    cmds = {"report": [sys.executable, "-m", "dedup.cli", "report", str(d), "--out", str(out / "report.html"), "--overwrite"],
            "keep-list": [sys.executable, "-m", "dedup.cli", "apply", str(d), "--keep-list", str(out / "keep.txt"), "--overwrite"]}
    for name, cmd in cmds.items():
        if a.only and name != a.only:
            continue
        print(json.dumps({"command": name, "rows": a.rows, "form": form, "code": a.code, "built_s": built, **measure(cmd, Path(a.code))}), flush=True)


if __name__ == "__main__":
    main()
