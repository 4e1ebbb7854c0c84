"""Peak memory of the clusters phase, step by step, on a run directory kept by benchmarks/scale.py.

    python benchmarks/scale.py --n 10000000 --json --keep         # prints the kept run directory
    python benchmarks/clusters_memory.py RUN_DIR 10000000 [--code DIR]

Loads the run's features as ``finish_run`` does (the table moved to a file mapping), takes the
pairs' rows from their sample ids (row r is ``s<shard>/<r>`` in scale.py's data) and the outlier
scores from the kept manifest, then runs ``cluster_manifest`` and ``write_manifest`` (into
``--out``, default RUN_DIR-clusters/) with the resident set sampled every 10 ms. A step ends
where ``cluster_manifest`` calls its ``release`` (after the links, the keeper ranks, the linked
rows' columns, the clustering, then the manifest's chunks). Prints one JSON line: each step's
peak (VmRSS, RssAnon, RssFile in MB) and the seconds; with ``--same-as OTHER``, whether the
manifest equals the one written into OTHER (another run of this script) row by row and column
by column. ``--code``: another checkout's ``dedup`` (the "before" of a change). Figures:
docs/scale.md, "Sixth pass".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("n", type=int)
    ap.add_argument("--code", default=str(ROOT), help="the dedup checkout to measure (default: this one)")
    ap.add_argument("--out", help="where the manifest is written (default: RUN_DIR-clusters)")
    ap.add_argument("--same-as", help="compare the manifest with the one written into this directory")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale  # benchmarks/scale.py (its config and shard names): puts this checkout first on sys.path

    sys.path.insert(0, a.code)  # so the code measured goes before it
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import dedup
    from dedup.io.rundir import RunDir
    from dedup.memory import return_freed_memory
    from dedup.phases.candidates import load_features
    from dedup.phases.manifest import cluster_manifest, write_manifest
    from dedup.runner import _scratch_dir

    assert Path(dedup.__file__).resolve().is_relative_to(Path(a.code).resolve()), dedup.__file__
    run_dir = Path(a.run_dir)
    out = Path(a.out or f"{str(run_dir).rstrip('/')}-clusters")
    return_freed_memory(setup=True)
    cfg = scale._config()
    shards = [scale._shard_id(k) for k in range((a.n + scale.SHARD_ROWS - 1) // scale.SHARD_ROWS)]
    fs = load_features(RunDir(str(run_dir)), shards, with_embeddings=True, digests=False)
    fs.map_table(_scratch_dir(RunDir(str(run_dir))))
    pairs = pq.read_table(run_dir / "pairs" / "pairs.parquet")
    rows = tuple(pc.cast(pc.utf8_slice_codeunits(pairs[c], 8), pa.int64()).to_numpy() for c in ("a", "b"))
    got = fs.table["sample_id"].take(pa.array(rows[0][:1000]))
    assert pc.all(pc.equal(got, pairs["a"][:1000])).as_py(), "not scale.py's sample ids"
    pairs = pairs.select(["method", "score"])  # as finish_run passes them with the rows
    outlier = pq.read_table(run_dir / "manifest.parquet", columns=["outlier_score"])["outlier_score"]
    outlier = outlier.to_numpy(zero_copy_only=False).astype(np.float32)
    fs.drop_pages()
    return_freed_memory()
    steps = scale._PhaseMemory(every=0.01, listen=False)  # baseline: its step "start"
    steps.start()
    time.sleep(0.5)
    names = iter(["keeper ranks", "linked columns", "clustering"])  # then the manifest's chunks

    def release() -> None:
        fs.drop_pages()
        steps.mark(next(names, "manifest chunks"))

    steps.mark("links")
    t0, c0 = time.perf_counter(), time.process_time()
    manifest, stats = cluster_manifest(cfg, fs.table, pairs, outlier=outlier, embeddings=fs.embeddings,
                                       threshold=cfg.embedding.resolved_threshold(), rows=rows,
                                       digests=fs.digests, release=release)
    steps.mark("manifest write")
    write_manifest(RunDir(str(out)), cfg, manifest, failed_shards=False)
    steps.mark("end")
    steps.stop.set()
    steps.join()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    same = None
    if a.same_as:
        same = pq.read_table(out / "manifest.parquet").equals(pq.read_table(Path(a.same_as) / "manifest.parquet"))
    peaks = {k: v for k, v in steps.peaks.items() if k not in ("start", "end")}
    top = max(peaks.items(), key=lambda kv: kv[1].get("VmRSS", 0.0))
    print(json.dumps({"n": a.n, "code": a.code, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                      "kept": stats["kept"], "duplicates": stats["duplicates"],
                      "baseline": steps.peaks.get("start"), "peak_step": top[0], "peak": top[1],
                      "steps": peaks, "same_manifest": same}))


if __name__ == "__main__":
    main()
