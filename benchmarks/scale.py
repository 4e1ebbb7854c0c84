"""Benchmark the global phases (candidates → outlier score → manifest) at n rows, decode skipped.

    python benchmarks/scale.py --n 100000 --json     # one point: prints one JSON line
    python benchmarks/scale.py --n 100000 --n 1000000   # a table; writes docs/scale.md's section
    python benchmarks/scale.py --n 1000000 --executor ray   # the same phases on a local Ray

Synthetic feature shards in the real features schema (``dedup.schema.features_schema``, written
by ``RunDir.write_parquet``, 10 000 rows a shard): the candidate benchmark's CLIP-like float16
embeddings (d = 512, with planted near-duplicates, exact copies and hard negatives; see
``benchmarks/candidates.py``), random sha256 digests (the planted exact copies share theirs) and
its synthetic 64-bit hashes as pHash and dHash. The shards are cached under
``$DEDUP_BENCH_CACHE/scale-n<N>`` (default /tmp/dedup-bench); each measurement uses a fresh run
directory whose ``features/`` links to them.

``dedup.runner.finish_run`` (what ``dedup run`` does after the features phase) runs in a child
process, fixed cosine threshold 0.90, methods exact, phash, dhash, embedding, default settings
otherwise. Every 0.2 s this process samples the resident set size of the child (the driver) and
of each of its descendant processes (with ``--executor ray`` the driver starts a local Ray, so its
daemons and workers are descendants): ``driver_peak_rss_mb``, ``worker_peak_rss_mb`` (the
largest single task worker — a Ray worker, ``ray::…``; 0 when the work ran in the driver's
threads) and ``ray_daemons_peak_rss_mb`` (the largest of Ray's own processes: gcs_server, raylet,
dashboard). A Ray worker's RSS includes the object-store pages it has mapped (shared memory). RSS counts the mapped pages of files the
driver reads (e.g. a memmap of the embeddings). ``phase_peak_rss_mb``: the child's own peak per
global phase (load, candidates, outlier, clusters, manifest write), VmRSS split into RssAnon
(heap) and RssFile (libraries and mapped file pages), sampled every 0.1 s inside it.
``candidate_timings``: wall seconds of each method's pair search (exact, phash, dhash, embedding).

``recall``: the embedding pairs found vs exact brute force for a uniform sample of query rows
(``--queries``, default 1 000) against all n rows (float64 rescoring, as the search does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.candidates import CACHE, THRESHOLD, D, _ensure_data, synth_hashes  # noqa: E402

SHARD_ROWS = 10_000
MODEL_TAG = "synthetic-clip-like"
METHODS = ["exact", "phash", "dhash", "embedding"]
DOC = ROOT / "docs" / "scale.md"


def _config(executor: str = "local"):
    from dedup.config import Config

    return Config.model_validate({"methods": METHODS, "embedding": {"threshold": THRESHOLD},
                                  "run": {"executor": executor}})


def _shard_id(k: int) -> str:
    return f"s{k:06d}"


def features_dir(n: int, seed: int = 0) -> Path:
    """The cached synthetic features of n rows (made on first use). Row r is sample
    ``s<r // SHARD_ROWS>/<r:010d>``: sorted sample ids are the rows in order."""
    base = CACHE / f"scale-n{n}-s{seed}"
    feats = base / "features"
    if (base / "complete").exists():
        return feats
    import pyarrow as pa

    from dedup.io.rundir import RunDir
    from dedup.schema import features_schema

    emb_path = _ensure_data(n, seed, THRESHOLD)
    x = np.load(emb_path, mmap_mode="r")
    planted = np.load(emb_path.with_suffix(".planted.npz"))
    rng = np.random.default_rng(seed + 17)
    sha = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    n_dup, n_exact = int(0.10 * n), int(0.02 * n)
    tgt, bas = planted["targets"][n_dup : n_dup + n_exact], planted["bases"][n_dup : n_dup + n_exact]
    sha[tgt] = sha[bas]  # the planted exact copies (cosine 1) are byte copies
    ph = synth_hashes(n, seed)
    dh = synth_hashes(n, seed + 1)
    if base.exists():
        shutil.rmtree(base)
    run = RunDir(str(base))
    cfg = _config()
    schema = features_schema(D, {"config_hash": cfg.features_hash(MODEL_TAG), "model_tag": MODEL_TAG})
    for k, s in enumerate(range(0, n, SHARD_ROWS)):
        e = min(n, s + SHARD_ROWS)
        m = e - s
        sid = _shard_id(k)
        keys = [f"{r:010d}" for r in range(s, e)]
        cols = {
            "sample_id": [f"{sid}/{key}" for key in keys], "shard_id": [sid] * m, "key": keys,
            "status": ["ok"] * m, "error": [None] * m, "image_member": ["jpg"] * m,
            "file_size": np.full(m, 40_000, np.int64), "caption_len": np.full(m, 60, np.int32),
            "width": np.full(m, 512, np.int32), "height": np.full(m, 384, np.int32),
            "orig_mode": ["RGB"] * m, "format": ["JPEG"] * m,
            "sha256": [bytes(r) for r in sha[s:e]], "phash": ph[s:e], "dhash": dh[s:e],
            "content_fraction": np.ones(m, np.float32),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x[s:e]).reshape(-1)), D),
        }
        table = pa.Table.from_arrays([pa.array(cols[f.name], f.type) if f.name != "embedding" else cols[f.name]
                                      for f in schema], schema=schema)
        run.write_parquet(run.features(sid), table)
    (base / "complete").write_text(str(n))
    return feats


# ------------------------------------------------------------------------------------------
# the measured child


def _child(run_dir: str, n: int, executor: str, search: str = "auto") -> None:
    from dedup.phases import lists

    if search != "auto":  # the in-memory driver or the list-partitioned one, whatever n
        lists.PARTITION_ROWS = 0 if search == "partitioned" else 1 << 62
    from dedup.io.rundir import RunDir
    from dedup.runner import finish_run

    phases = _PhaseMemory()
    phases.start()
    shards = [_shard_id(k) for k in range((n + SHARD_ROWS - 1) // SHARD_ROWS)]
    t0 = time.perf_counter()
    stats = finish_run(RunDir(run_dir), _config(executor), shards, progress=False)
    phases.stop.set()
    phases.join()
    out = {"seconds": time.perf_counter() - t0, "timings": stats["timings"], "pairs": stats["pairs"],
           "ivf_search": stats.get("ivf_search"), "candidate_timings": stats.get("candidate_timings"),
           "cpu_seconds": time.process_time(), "phase_peak_rss_mb": phases.peaks}
    print("RESULT " + json.dumps(out, default=str), flush=True)


class _PhaseMemory(threading.Thread):
    """In the child: peak resident set per global phase (``finish_run`` logs "global phase: X"
    at debug level), split into anonymous memory (heap) and file pages (libraries, mapped
    files), from /proc/self/status every ``every`` s (Linux; empty elsewhere). ``listen=False``:
    the steps are named by :meth:`mark` alone (benchmarks/clusters_memory.py)."""

    def __init__(self, every: float = 0.1, listen: bool = True):
        super().__init__(daemon=True)
        import logging

        self.every = every
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self.stop = threading.Event()
        if not listen:
            return
        me = self

        class _Listen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if msg.startswith("global phase: "):
                    me.mark(msg[len("global phase: "):])

        lg = logging.getLogger("dedup")
        lg.setLevel(logging.DEBUG)
        lg.addHandler(_Listen(logging.DEBUG))

    def sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                got = {k: int(v.split()[0]) / 1024 for k, v in (ln.split(":", 1) for ln in f)
                       if k in ("VmRSS", "RssAnon", "RssFile")}
        except OSError:
            return
        peak = self.peaks.setdefault(self.phase, {})
        for k, v in got.items():
            peak[k] = round(max(peak.get(k, 0.0), v), 1)

    def mark(self, name: str) -> None:
        """The step so far sampled once more, then the next one named (a name seen before
        continues that step's peak)."""
        self.sample()
        self.phase = name

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)


def _is_task_worker(proc) -> bool:
    """A process that runs tasks: a Ray worker (``ray::…`` / ``default_worker.py``) or, for a
    process pool, any other child of the driver that is not one of Ray's daemons."""
    import psutil

    try:
        cmd = " ".join(proc.cmdline()[:3])
        name = proc.name()
    except psutil.Error:
        return False
    if name.startswith("ray::") or "default_worker.py" in cmd:
        return True
    return not any(k in cmd or k in name for k in ("gcs_server", "raylet", "dashboard", "log_monitor",
                                                     "monitor.py", "runtime_env", "ray/_private"))


class _RSSSampler(threading.Thread):
    """Peak RSS of a process and, separately, of the largest of its descendants."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.driver = 0
        self.worker = 0
        self.daemon_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                self.driver = max(self.driver, self.proc.memory_info().rss)
                for c in self.proc.children(recursive=True):
                    try:
                        rss = c.memory_info().rss
                        if _is_task_worker(c):
                            self.worker = max(self.worker, rss)
                        else:  # Ray's own processes (gcs_server, raylet, dashboard, ...)
                            self.daemon_peak = max(self.daemon_peak, rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.stop.wait(self.every)


def _exact_truth(x: np.ndarray, queries: np.ndarray, threshold: float, block: int = 1 << 16) -> set[tuple[int, int]]:
    """Pairs (min, max) with cosine ≥ threshold and an endpoint in ``queries`` (exact)."""
    q = np.asarray(x[queries], np.float32)
    q64 = q.astype(np.float64)
    out: set[tuple[int, int]] = set()
    margin = D * 2.0**-22 + 1e-6
    for s in range(0, x.shape[0], block):
        e = min(x.shape[0], s + block)
        xb = np.asarray(x[s:e], np.float32)
        r, c = np.nonzero(q @ xb.T >= threshold - margin)
        if len(r) == 0:
            continue
        sc = np.einsum("ij,ij->i", q64[r], xb[c].astype(np.float64))
        for a, b, ok in zip(queries[r], c + s, sc >= threshold):
            if ok and a != b:
                out.add((int(min(a, b)), int(max(a, b))))
    return out


def _found(run_dir: Path, queries: np.ndarray) -> set[tuple[int, int]]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "pairs" / "pairs.parquet", filters=[("method", "=", "embedding")],
                      columns=["a", "b"])
    a = pc.utf8_slice_codeunits(t["a"], 8).to_numpy(zero_copy_only=False).astype(np.int64)
    b = pc.utf8_slice_codeunits(t["b"], 8).to_numpy(zero_copy_only=False).astype(np.int64)
    qs = np.zeros(int(max(a.max(initial=0), b.max(initial=0), queries.max(initial=0))) + 1, bool)
    qs[queries] = True
    hit = qs[a] | qs[b]
    return {(int(min(i, j)), int(max(i, j))) for i, j in zip(a[hit], b[hit])}


def measure(n: int, seed: int = 0, queries: int = 1000, executor: str = "local", keep: bool = False,
            search: str = "auto") -> dict:
    feats = features_dir(n, seed)
    work = Path(tempfile.mkdtemp(prefix=f"scale-n{n}-", dir=CACHE))
    run_dir = work / "run"
    run_dir.mkdir()
    os.symlink(feats, run_dir / "features")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(run_dir), "--n", str(n), "--executor", executor,
                             "--search", search],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = _RSSSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"finish_run failed at n={n} (exit {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    x = np.load(_ensure_data(n, seed, THRESHOLD), mmap_mode="r")
    q = np.sort(np.random.default_rng(seed + 99).choice(n, size=min(queries, n), replace=False))
    truth = _exact_truth(x, q, THRESHOLD)
    found = _found(run_dir, q)
    recall = len(truth & found) / len(truth) if truth else 1.0
    disk = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file() and "features" not in f.parts)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n, "executor": executor, "search": search, "seconds": round(res["seconds"], 2), "cpu_seconds": round(res["cpu_seconds"], 1),
        "driver_peak_rss_mb": round(sampler.driver / 2**20, 1), "worker_peak_rss_mb": round(sampler.worker / 2**20, 1),
        "ray_daemons_peak_rss_mb": round(sampler.daemon_peak / 2**20, 1),
        "pairs": int(sum(res["pairs"].values())), "pairs_by_method": res["pairs"], "recall": round(recall, 4),
        "recall_exact_pairs": len(truth), "queries": len(q), "timings": res["timings"],
        "candidate_timings": res.get("candidate_timings"),  # wall s of each method's search
        "run_dir_bytes": disk, "ivf_search": res.get("ivf_search"), "phase_peak_rss_mb": res.get("phase_peak_rss_mb"),
    }


def _report(rows: list[dict]) -> str:
    from benchmarks._table import machine_description, markdown_table

    table = markdown_table(
        ["n", "executor", "wall s", "driver CPU s", "driver peak RSS MB", "largest worker RSS MB", "pairs",
         "recall (sampled)", "candidates s", "outlier s", "manifest s"],
        [[r["n"], r["executor"], r["seconds"], r["cpu_seconds"], r["driver_peak_rss_mb"], r["worker_peak_rss_mb"],
          r["pairs"], f"{r['recall']:.4f} ({r['recall_exact_pairs']} pairs)", r["timings"].get("candidates"),
          r["timings"].get("outlier"), r["timings"].get("manifest")] for r in rows],
    )
    cmd = "python benchmarks/scale.py " + " ".join(f"--n {r['n']}" for r in rows)
    return f"`{cmd}` on {machine_description()}:\n\n{table}\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, action="append", help="rows (repeatable); default 1e5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=1000, help="query rows of the sampled exact recall")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--json", action="store_true", help="one JSON line per n, no table")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (path printed)")
    ap.add_argument("--search", choices=["auto", "memory", "partitioned"], default="auto",
                    help="local runs: the embedding search in memory or list-partitioned (auto: partitioned "
                    "from dedup.phases.lists.PARTITION_ROWS rows; Ray runs always partition)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    ns = a.n or [100_000]
    if a.child:
        _child(a.child, ns[0], a.executor, a.search)
        return
    rows = []
    for n in ns:
        r = measure(n, a.seed, a.queries, a.executor, a.keep, a.search)
        rows.append(r)
        if a.json:
            print(json.dumps(r), flush=True)
    if not a.json:
        body = _report(rows)
        print(body)
        from benchmarks._table import write_section

        write_section("scale", body, DOC)


if __name__ == "__main__":
    main()
