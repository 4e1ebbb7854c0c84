"""The Ray executor against a local Ray (2 CPUs, one per test session).

1. contract: the same shards through the local and the Ray executor give the same run
   directory (features files byte for byte, markers apart from timings) and the same manifest
   (sorted, compared row by row);
2. a Ray worker process killed mid-run (a scan task's worker, then the embedding actor): the
   run still completes, exit 0, every row present;
3. the Ray job entrypoint (pipelines/ray_job.py) run as a separate driver against the local
   Ray cluster, then rerun: it resumes from the run directory's markers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.config import load_config
from dedup.runner import run_pipeline

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The contract settings: the fast deterministic embedder, hashes, and a small actor so that an
# actor, a scan task and a write task fit in 2 CPUs together.
BASE = {"embedding.spec": "pixel", "run.workers": 1, "ray.cpus_per_actor": 0.5}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session; its GCS address lets other drivers connect."""
    os.environ.pop("RAY_ADDRESS", None)
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        started = True
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _jpeg(color, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _jpeg_array(a, q: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="session")
def shards(synth_shards, tmp_path_factory) -> Path:
    """The real-photo synthetic shards plus one shard of bad samples (a corrupt JPEG, a
    zero-byte image, a sample without an image) and one tar cut short."""
    src, _truth = synth_shards
    d = tmp_path_factory.mktemp("ray_shards")
    for p in sorted(src.glob("*.tar")):
        shutil.copy(p, d / p.name)
    good = _jpeg((200, 30, 30))
    _tar(
        d / "bad-00000.tar",
        [
            ("a.jpg", good), ("a.txt", b"red"),
            ("b.jpg", good[: len(good) // 2] + b"\0garbage"), ("b.txt", b"cut jpeg"),
            ("c.jpg", b""), ("d.txt", b"no image"),
            ("e.png", b"not a png at all"), ("f.jpg", _jpeg((10, 200, 10), (300, 200))),
        ],
    )
    # Many small images: several embedding chunks per shard (features.BATCH = 64), some exact
    # and re-encoded copies among them.
    rng = np.random.default_rng(0)
    members = []
    prev = None  # the last photo drawn (k = 0 draws the first)
    for k in range(300):
        if k % 10 == 9:
            data = members[-2][1] if k % 20 == 9 else _jpeg_array(prev, 60)
        else:
            prev = rng.integers(0, 256, (48 + k % 7, 64, 3), dtype=np.uint8)
            data = _jpeg_array(prev, 90)
        members += [(f"k{k:04d}.jpg", data), (f"k{k:04d}.txt", f"sample {k}".encode())]
    _tar(d / "many-00000.tar", members)
    whole = (src / "shard-00001.tar").read_bytes()
    (d / "cut-00000.tar").write_bytes(whole[: len(whole) * 2 // 3])
    return d


def _count_keys(shard_dir: Path) -> int:
    n = 0
    for p in sorted(shard_dir.rglob("*.tar")):
        keys = set()
        try:
            with tarfile.open(p, "r|") as tf:
                for m in tf:
                    if m.isfile():
                        keys.add(m.name.split("/")[-1].split(".", 1)[0])
        except tarfile.ReadError:
            pass
        n += len(keys)
    return n


def _run(shard_dir: Path, out: Path, executor: str, **overrides):
    cfg = load_config(None, None, **{**BASE, "run.executor": executor, **overrides})
    t0 = time.perf_counter()
    outcome = run_pipeline([str(shard_dir)], str(out), cfg, progress=False)
    return outcome, time.perf_counter() - t0


def _rows(run_dir: Path):
    t = pq.read_table(run_dir / "manifest.parquet")
    return t, sorted(t.to_pylist(), key=lambda r: r["sample_id"])


def _assert_same_run(a: Path, b: Path) -> None:
    """Run directories equal: same files; features byte for byte; markers and stats apart from
    timings; manifest rows equal one by one, same schema and metadata (but the config hash,
    which covers run.executor)."""
    # the embedding search's working files differ by design: a Ray run shuffles rows by list
    # (index/lists/, pairs/embedding/), a small local run searches in memory (docs/scale.md)
    def files(d: Path) -> list[str]:
        rels = (str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        return sorted(r for r in rels if not r.startswith(("index/lists/", "pairs/embedding/")))

    files_a, files_b = files(a), files(b)
    assert files_a == files_b
    for rel in files_a:
        if rel.startswith("features/"):
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        elif rel.startswith("done/"):
            ma, mb = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
            ma.pop("timings"), mb.pop("timings")
            assert ma == mb, rel
    pa_, pb_ = pq.read_table(a / "pairs" / "pairs.parquet"), pq.read_table(b / "pairs" / "pairs.parquet")
    assert pa_.equals(pb_)
    ta, rows_a = _rows(a)
    tb, rows_b = _rows(b)
    assert ta.schema.equals(tb.schema)
    meta_a, meta_b = dict(ta.schema.metadata), dict(tb.schema.metadata)
    meta_a.pop(b"config_hash"), meta_b.pop(b"config_hash")
    assert meta_a == meta_b
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert ra == rb, (ra["sample_id"], {k: (ra[k], rb[k]) for k in ra if ra[k] != rb[k]})
    sa, sb = json.loads((a / "stats.json").read_text()), json.loads((b / "stats.json").read_text())
    for s in (sa, sb):
        for k in ("timings", "candidate_timings", "finished_at"):
            s.pop(k, None)
        for k in [k for k in (s.get("ivf_search") or {}) if k.endswith("seconds")]:
            s["ivf_search"].pop(k)
        for k in ("seconds", "executor"):  # where the outlier units ran differs, not what they found
            (s.get("outlier_search") or {}).pop(k, None)
        (s.get("ivf_search") or {}).pop("executor", None)  # where the search's tasks ran
    assert sa == sb


@pytest.mark.parametrize("methods", [None, "exact,phash,dhash"], ids=["all-methods", "hashes-only"])
def test_local_and_ray_give_identical_runs(ray_cluster, shards, tmp_path, methods):
    extra = {"methods": methods.split(",")} if methods else {}
    local, t_local = _run(shards, tmp_path / "local", "local", **extra)
    remote, t_ray = _run(shards, tmp_path / "ray", "ray", **extra)
    print(f"local {t_local:.1f}s, ray {t_ray:.1f}s")
    # The cut shard makes both runs partial (exit 3), the same way.
    assert local.exit_code == remote.exit_code == 3
    assert remote.stats["shards"] == local.stats["shards"]
    assert "cut-00000" in remote.stats["shards"]["failed"]
    if methods is None:  # the embedding search reports how it went (small: exact brute force)
        assert local.stats["ivf_search"]["method"] == "brute_force" and local.stats["ivf_search"]["valid"] > 0
    _assert_same_run(tmp_path / "local", tmp_path / "ray")
    _, rows = _rows(tmp_path / "ray")
    status = {r["sample_id"]: r["status"] for r in rows}
    # One bad JPEG is a row with a status, never a failed job.
    assert status["bad-00000/b"] == "decode_error"
    assert status["bad-00000/c"] == "empty"
    assert status["bad-00000/d"] == "no_image"
    assert status["bad-00000/f"] == "ok"
    assert sum(sid.startswith("many-00000/") for sid in status) == 300
    assert len(rows) == _count_keys(shards)


def _children_of(ancestor: int) -> dict[int, str]:
    """pid -> process title of the processes under ``ancestor`` (this test's Ray only)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            title = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            pid, hops = int(d), 0
            while pid > 1 and hops < 4:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                hops += 1
                if pid == ancestor:
                    out[int(d)] = title
                    break
        except (OSError, ValueError, IndexError):
            continue
    return out


class _Killer(threading.Thread):
    """SIGKILLs the first worker seen running a scan task; then, once ``ready_for_actor()``
    (some shards done, more to do), the embedding actor's process."""

    def __init__(self, ready_for_actor):
        super().__init__(daemon=True)
        self.ready_for_actor = ready_for_actor
        self.killed: list[tuple[int, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        targets = ["ray::_scan_shard", "ray::_EmbedActor"]
        while targets and not self.stop.is_set():
            if targets[0] == "ray::_EmbedActor" and not self.ready_for_actor():
                time.sleep(0.005)
                continue
            for pid, title in _children_of(me).items():
                if title.startswith(targets[0]):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((pid, title))
                    targets.pop(0)
                    break
            time.sleep(0.005)


@pytest.fixture
def many_shards(synth_shards, tmp_path) -> Path:
    """The synthetic shards three times over (ids a/…, b/…, c/…): a run long enough to kill into."""
    src, _ = synth_shards
    d = tmp_path / "many"
    for sub in "abc":
        (d / sub).mkdir(parents=True)
        for p in sorted(src.glob("*.tar")):
            shutil.copy(p, d / sub / p.name)
    return d


def test_killed_ray_workers_do_not_lose_rows(ray_cluster, many_shards, tmp_path):
    done_dir = tmp_path / "ray" / "done"
    killer = _Killer(lambda: len(list(done_dir.rglob("*.json"))) >= 3)
    killer.start()
    try:
        outcome, secs = _run(many_shards, tmp_path / "ray", "ray")
    finally:
        killer.stop.set()
        killer.join(5)
    print(f"ray run with kills {secs:.1f}s; killed {killer.killed}")
    kinds = [t.split()[0] for _, t in killer.killed]
    assert any(k.startswith("ray::_scan_shard") for k in kinds), killer.killed
    assert any(k.startswith("ray::_EmbedActor") for k in kinds), killer.killed  # with 9+ shards to go
    assert outcome.exit_code == 0, outcome.stats["shards"]
    assert outcome.stats["shards"]["done"] == 12 and not outcome.stats["shards"]["failed"]
    _, rows = _rows(tmp_path / "ray")
    assert len(rows) == _count_keys(many_shards) == len({r["sample_id"] for r in rows})
    assert {r["status"] for r in rows} == {"ok"}
    # And the result is the one a local run gives.
    local, _ = _run(many_shards, tmp_path / "local", "local")
    assert local.exit_code == 0
    _assert_same_run(tmp_path / "local", tmp_path / "ray")


def test_ray_job_entrypoint_against_local_cluster(ray_cluster, synth_shards, tmp_path):
    src, truth = synth_shards
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    cmd = [
        sys.executable, str(REPO / "pipelines" / "ray_job.py"), str(src), "--out", str(out),
        "--config", str(REPO / "pipelines" / "cluster-config.yaml"),
        # The example config, with what this 2-CPU, GPU-less test cluster can do.
        "--set", "embedding.spec=pixel", "--set", "embedding.device=cpu", "--set", "ray.embed_actors=1",
        "--set", "ray.cpus_per_actor=0.5", "--set", "ray.max_in_flight=0",
        "--quiet", "--json", "--no-report",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    first = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"RAY_ADDRESS={ray_cluster}" in p.stderr
    # It ran as a driver of this cluster (not a Ray of its own).
    jobs = ray._private.state.jobs()
    assert any("ray_job.py" in (j.get("Entrypoint") or "") for j in jobs), [j.get("Entrypoint") for j in jobs]
    stats = json.loads(p.stdout)
    assert stats["shards"]["done"] == 4 and stats["samples"] == len(truth.samples)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["run"]["executor"] == "ray"
    _, rows = _rows(out)
    assert [r["sample_id"] for r in rows] == sorted(s.sample_id for s in truth.samples)
    # A second submission (a retried or scheduled job) resumes: no shard is recomputed.
    markers = sorted((out / "done").glob("*.json"))
    mtimes = [m.stat().st_mtime_ns for m in markers]
    manifest = (out / "manifest.parquet").read_bytes()
    t0 = time.perf_counter()
    p2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    print(f"entrypoint: first {first:.1f}s, resumed {time.perf_counter() - t0:.1f}s")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert [m.stat().st_mtime_ns for m in markers] == mtimes
    assert (out / "manifest.parquet").read_bytes() == manifest


def test_map_units(ray_cluster):
    from dedup.executors.ray import RayExecutor

    def square_or_fail(x):
        if x == 3:
            raise ValueError("three")
        return x * x

    ex = RayExecutor(load_config(None, None, **{"run.retries": 0}))
    got = {item: (res, err) for item, res, err in ex.map_units(square_or_fail, range(6))}
    assert {k: v[0] for k, v in got.items() if k != 3} == {0: 0, 1: 1, 2: 4, 4: 16, 5: 25}
    assert got[3][0] is None and "ValueError: three" in got[3][1]
    ex.close()
    assert ray.is_initialized()  # close() leaves alone a Ray it did not start


def test_pipeline_examples_are_consistent():
    import shlex

    import yaml

    cfg = load_config(REPO / "pipelines" / "cluster-config.yaml")
    assert cfg.run.executor == "ray" and cfg.ray.address is None
    docs = list(yaml.safe_load_all((REPO / "pipelines" / "kuberay-rayjob.yaml").read_text()))
    (cron,) = [d for d in docs if d and d["kind"] == "RayCronJob"]
    assert cron["apiVersion"] == "ray.io/v1" and len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]
    assert job["backoffLimit"] >= 1 and job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "/app/pipelines/ray_job.py"]
    assert "--config" in argv and argv[argv.index("--config") + 1].endswith("pipelines/cluster-config.yaml")
    assert argv[argv.index("--out") + 1].startswith("s3://")  # resume state outlives the cluster
    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        from ray_job import build_argv
    finally:
        sys.path.pop(0)
    assert build_argv(argv[2:])[-2:] == ["--executor", "ray"]
    with pytest.raises(SystemExit):
        build_argv(["x", "--out", "y", "--executor", "local"])
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    assert cfg.ray.embed_actors <= groups["gpu"]["maxReplicas"]


def test_candidate_search_spread_over_ray_equals_serial(ray_cluster, monkeypatch):
    """The coarse stage's row blocks and the IVF work units as Ray tasks (embeddings shared via
    the object store) give the serial pairs."""
    from dedup.compute import candidates as cand
    from dedup.compute.search.driver import search_embeddings
    from dedup.config import load_config
    from dedup.executors.ray import RayExecutor

    rng = np.random.default_rng(0)
    n, d = 6000, 32
    base = rng.normal(size=(n, d)).astype(np.float32)
    base[1::50] = base[0::50][: len(base[1::50])] + 0.05 * rng.normal(size=(len(base[1::50]), d))  # planted near-pairs
    x = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float16)
    ok = np.ones(n, bool)
    ok[7] = False
    params = cand.IVFParams.auto(n, d, threshold=0.9)
    assert n >= params.exact_below  # the IVF path, not the brute-force fallback
    serial = cand.embedding_pairs(x, 0.9, params=params, valid=ok)
    cfg = load_config(None, None, **{"run.executor": "ray"})
    # small row blocks, two per task: the coarse stage runs as 3 tasks, reassembled in order
    monkeypatch.setattr("dedup.compute.search.coarse.ASSIGN_BLOCK", 1000)
    monkeypatch.setattr("dedup.compute.search.driver.ASSIGN_BLOCKS_PER_TASK", 2)
    ticks = []
    with RayExecutor(cfg) as ex:
        res = search_embeddings(x, 0.9, params, valid=ok, executor=ex, plan_progress=lambda a, b: ticks.append((a, b)))
    spread, st = res.pairs, res.stats
    assert ticks[0] == (0, 6) and ticks[-1] == (6, 6) and len(ticks) == 4
    assert st.method == "ivf" and st.valid == n - 1 and st.mean_probes >= 1.0
    assert len(serial.i) > 50
    assert np.array_equal(serial.i, spread.i) and np.array_equal(serial.j, spread.j)
    assert np.array_equal(serial.score, spread.score)


def test_ray_candidate_search_equals_serial_with_the_bound_prefilter(ray_cluster):
    """The serial driver filters tiles with its precomputed bound rows; the Ray units get the
    quantizer's Bound and project the rows of their lists themselves (lists of ~600 here, above
    _PROJECT_MIN_MEMBERS). Both give the same pairs and scores."""
    from dedup.compute import candidates as cand
    from dedup.compute.search.driver import search_embeddings
    from dedup.config import load_config
    from dedup.executors.ray import RayExecutor

    rng = np.random.default_rng(3)
    n, d = 6000, 128
    spec = (1.0 + np.arange(d)) ** -0.35
    centers = rng.normal(size=(30, d))
    x = 0.8 * centers[rng.integers(0, 30, n)] / np.sqrt(d) * 3 + rng.normal(size=(n, d)) * spec
    x[1::40] = x[0::40][: len(x[1::40])] + 0.08 * rng.normal(size=(len(x[1::40]), d)) * spec
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    ok = np.ones(n, bool)
    params = cand.IVFParams.auto(n, d, threshold=0.9, pca_dim=16, bound_dim=32, nlist=10)
    st: dict = {}
    serial = cand.embedding_pairs(x, 0.9, params=params, valid=ok, stats=st)
    assert st["bound_width"] == 34 and len(serial.i) > 50
    assert st["list_size_mean"] >= 2 * cand.PROJECT_MIN_MEMBERS
    cfg = load_config(None, None, **{"run.executor": "ray"})
    with RayExecutor(cfg) as ex:
        res = search_embeddings(x, 0.9, params, valid=ok, executor=ex)
    assert serial == res.pairs
    assert res.stats.bound_width == 34  # the units were handed the bound


def test_outlier_score_on_ray_reuses_the_ray_search_lists(ray_cluster, monkeypatch, tmp_path):
    """On Ray the coarse stage's tasks also return each row's nearest lists (as the serial
    driver keeps them), and the outlier score's work units run as Ray tasks: the same lists
    and the same scores as in one process. Embeddings mapped from a file (the staged
    embeddings of a run) are not put in the object store: the tasks read their rows from it."""
    from dedup.compute import candidates as cand
    from dedup.compute.search.driver import search_embeddings
    from dedup.config import load_config
    from dedup.executors.ray import RayExecutor
    from dedup.phases.manifest import outlier_scores

    rng = np.random.default_rng(6)
    n, d = 12_000, 32
    centers = rng.normal(size=(40, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, d)) / np.sqrt(d)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    ok = np.ones(n, bool)
    ok[::53] = False
    params = cand.IVFParams.auto(int(ok.sum()), d, threshold=0.9)
    serial_lists: dict = {}
    serial = cand.embedding_pairs(x, 0.9, params=params, valid=ok, lists_out=serial_lists)
    cfg = load_config(None, None, **{"run.executor": "ray"})
    monkeypatch.setattr("dedup.compute.search.coarse.ASSIGN_BLOCK", 2000)  # several assignment tasks
    with RayExecutor(cfg) as ex:
        res = search_embeddings(x, 0.9, params, valid=ok, executor=ex, keep_nearest=True)
    ray_lists = res.lists
    assert serial == res.pairs and ray_lists is not None
    assert ray_lists.nearest.shape == (n, 5) and (ray_lists.nearest[~ok] == -1).all()
    for key in ("assign", "nearest"):
        assert np.array_equal(serial_lists[key], getattr(ray_lists, key)), key
    make = cand.make_units
    monkeypatch.setattr("dedup.compute.search.knn.make_units", lambda plan, unit_rows=None: make(plan, 2000))  # several units
    st_serial: dict = {}
    st_ray: dict = {}
    local = outlier_scores(x, ok, 5, stats=st_serial, lists=serial_lists)
    with RayExecutor(cfg) as ex:
        on_ray = outlier_scores(x, ok, 5, stats=st_ray, lists=ray_lists, executor=ex)
    assert st_ray["method"] == "ivf (the duplicate search's lists)" and st_ray["units"] >= 4
    assert np.array_equal(local, on_ray, equal_nan=True)
    assert np.isnan(on_ray[~ok]).all() and np.isfinite(on_ray[ok]).all()

    np.save(tmp_path / "emb.npy", x)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    handed: list = []
    with RayExecutor(cfg) as ex:
        real_put = ex.put
        monkeypatch.setattr(ex, "put", lambda obj: handed.append(obj) or real_put(obj))
        from_file = outlier_scores(mapped, ok, 5, lists=ray_lists, executor=ex)
    assert [type(h).__name__ for h in handed] == ["StagedFile"]  # a name, not n × d values
    assert np.array_equal(local, from_file, equal_nan=True)


def test_ray_run_equals_local_run_on_ivf_lists(ray_cluster, tmp_path):
    """12 000 small images (10 % re-encoded copies of earlier ones): enough for the IVF paths of
    both the duplicate search (≥ 5 000 rows) and the outlier score (≥ 10 000). With the Ray
    executor both run as Ray tasks, the outlier search on the duplicate search's lists; the run
    directory equals the local executor's."""
    rng = np.random.default_rng(0)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    k = 0
    for s in range(6):
        members = []
        for _ in range(2000):
            seed = k if rng.random() > 0.1 or k == 0 else int(rng.integers(0, k))
            small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3)).astype(np.uint8)
            im = Image.fromarray(small).resize((48, 48), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90 if seed == k else 70)
            members.append((f"s{k:06d}.jpg", buf.getvalue()))
            k += 1
        _tar(shard_dir / f"shard-{s:05d}.tar", members)
    local, _ = _run(shard_dir, tmp_path / "local", "local")
    remote, _ = _run(shard_dir, tmp_path / "ray", "ray")
    assert local.exit_code == remote.exit_code == 0
    assert local.stats["ivf_search"]["method"] == remote.stats["ivf_search"]["method"] == "ivf"
    assert local.stats["ivf_search"]["executor"] == "local" and remote.stats["ivf_search"]["executor"] == "ray"
    for st, where in ((local.stats, "local"), (remote.stats, "ray")):
        assert st["outlier_search"]["method"] == "ivf (the duplicate search's lists)", st["outlier_search"]
        assert st["outlier_search"]["executor"] == where
    assert remote.stats["duplicates"] > 1000  # ~1 200 planted copies
    _assert_same_run(tmp_path / "local", tmp_path / "ray")
