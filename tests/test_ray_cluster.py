"""A multi-node Ray cluster on one machine (issue #18, must-show 2).

``ray.cluster_utils.Cluster`` starts a head and two worker nodes as separate raylets, each with
Ray's smallest object store (75 MiB), which is smaller than the corpus's embeddings (18 000
images × ``pixel:48`` = 2 304 float16 values each, 83 MB): the embeddings the candidate search
shares through the object store do not fit in any one node's store. The head has no CPUs (it
only coordinates, as on many production clusters), so every task runs on a worker node and the
embeddings cross nodes. ``dedup run --executor ray --ray-address <head>`` runs as users run
it (a separate driver process) and must give the manifest the local executor gives, row by row:

1. on the whole cluster;
2. with a worker node removed (its raylet and workers killed) while the candidate search's
   work units run on it: Ray retries them on the surviving node and the run completes with
   the same manifest.

The tests compare whole manifests, not internals, so they hold for any correct
implementation of the candidate search.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sameruns import assert_same_manifest

Cluster = pytest.importorskip("ray.cluster_utils").Cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STORE = 75 * 1024 * 1024  # Ray's smallest object store (its OBJECT_STORE_MINIMUM_MEMORY_BYTES)
SIDE = 48  # pixel:48 → 2 304 dimensions
SHARDS, PER_SHARD = 6, 3000
EMBEDDING_BYTES = SHARDS * PER_SHARD * SIDE * SIDE * 2  # float16
ARGS = ["--embedder", f"pixel:{SIDE}", "-q", "--json", "--no-report"]
# Fits two 1-CPU worker nodes: an embedding actor and a scan task share one node.
RAY_ARGS = ["--executor", "ray", "--set", "ray.cpus_per_actor=0.5", "--set", "ray.cpus_per_task=0.5"]
TIMEOUT = 900


def _dedup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dedup.cli", "run", *args], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """18 000 small JPEGs in 6 shards; ~10 % are re-encoded or exact copies of earlier ones."""
    d = tmp_path_factory.mktemp("cluster_shards")
    rng = np.random.default_rng(0)
    k = 0
    for s in range(SHARDS):
        with tarfile.open(d / f"shard-{s:05d}.tar", "w") as tf:
            for _ in range(PER_SHARD):
                seed = k if k == 0 or rng.random() > 0.1 else int(rng.integers(0, k))
                small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3)).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((SIDE, SIDE), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90 if seed == k else 70)
                ti = tarfile.TarInfo(f"s{k:06d}.jpg")
                ti.size, ti.mtime = buf.tell(), 1_700_000_000
                buf.seek(0)
                tf.addfile(ti, buf)
                k += 1
    return d


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluster_local") / "run"
    r = _dedup(str(corpus), "--out", str(out), "-w", "1", *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def cluster(monkeypatch) -> Iterator:
    """Head (no CPUs) + 2 worker nodes of 1 CPU, every object store 75 MiB. The nodes inherit
    this process's environment (set DEDUP_DELAY_AT before asking for the fixture). Its own Ray
    temp dir: the cluster's address file must not make another ``ray.init()`` on this machine
    (another test session, another user) join it."""
    temp = tempfile.mkdtemp(prefix="dedup-rc-")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, object_store_memory=STORE)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()  # kills every process of every node it started
        shutil.rmtree(temp, ignore_errors=True)


def _check_premise(run_dir: Path) -> None:
    st = json.loads((run_dir / "stats.json").read_text())
    assert st["samples"] == SHARDS * PER_SHARD
    emb = pq.read_schema(next((run_dir / "features").glob("*.parquet"))).field("embedding").type
    assert emb.list_size * 2 * st["samples"] == EMBEDDING_BYTES > STORE  # the embeddings fit no node's store
    assert st["duplicates"] > 1000


def test_cluster_run_equals_local_run(corpus, local_run, cluster, tmp_path):
    out = tmp_path / "ray"
    t0 = time.perf_counter()
    r = _dedup(str(corpus), "--out", str(out), *ARGS, *RAY_ARGS, "--ray-address", cluster.address)
    print(f"3-node cluster run: {time.perf_counter() - t0:.1f}s")
    assert r.returncode == 0, r.stderr[-5000:]
    _check_premise(out)
    st = json.loads((out / "stats.json").read_text())
    assert json.loads((out / "run.json").read_text())["config"]["run"]["executor"] == "ray"
    assert st["shards"]["done"] == SHARDS and not st["shards"]["failed"]
    assert_same_manifest(pq.read_table(out / "manifest.parquet"), pq.read_table(local_run / "manifest.parquet"))


def _ancestors(pid: int) -> list[int]:
    out: list[int] = []
    while pid > 1 and len(out) < 6:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


def _node_of(cluster, pid: int):
    """The worker node whose raylet started the worker process ``pid`` (None: not found)."""
    up = _ancestors(pid)
    for node in cluster.worker_nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        if raylet in up:
            return node
    return None


@pytest.fixture
def held_units(tmp_path, monkeypatch) -> Path:
    """Every candidate-search work unit (any ``map_units`` task) sleeps 3 s when it starts on a
    node and notes its pid in the returned file (dedup.faults), so a test can remove the node
    it runs on. Set before the cluster starts: Ray workers take their node's environment."""
    flag = tmp_path / "units-started"
    monkeypatch.setenv("DEDUP_DELAY_AT", "ray:unit=3")
    monkeypatch.setenv("DEDUP_DELAY_FLAG", str(flag))
    return flag


def test_cluster_run_survives_losing_a_node_in_the_candidate_search(corpus, local_run, held_units, cluster, tmp_path):
    out = tmp_path / "ray"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_DELAY")}  # the driver runs undelayed
    cmd = [sys.executable, "-m", "dedup.cli", "run", str(corpus), "--out", str(out), *ARGS, *RAY_ARGS,
           "--ray-address", cluster.address]
    t0 = time.perf_counter()
    log = tmp_path / "driver.log"  # a file, not a pipe: Ray forwards its workers' logs to the driver
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True, env=env)
    removed = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while removed is None and p.poll() is None and time.monotonic() < deadline:
            lines = held_units.read_text().splitlines() if held_units.exists() else []
            for line in lines:
                node = _node_of(cluster, int(line.split()[1]))
                if node is not None:
                    # The features are all done: this is the candidate search's work.
                    assert len(list((out / "done").glob("*.json"))) == SHARDS
                    cluster.remove_node(node, allow_graceful=False)  # raylet and workers SIGKILLed
                    removed = (len(lines), time.perf_counter() - t0)
                    break
            time.sleep(0.05)
        p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stderr = log.read_text()
    print(f"cluster run with a node removed after {removed}: {time.perf_counter() - t0:.1f}s")
    assert removed is not None, "no work unit started on a worker node before the run ended: " + stderr[-3000:]
    assert len(cluster.worker_nodes) == 1
    assert p.returncode == 0, stderr[-5000:]
    # The unit that was running on the removed node started again elsewhere.
    assert len(held_units.read_text().splitlines()) > removed[0]
    _check_premise(out)
    # stats.json from the run directory: stdout also carries what Ray forwards from its
    # processes (e.g. "(raylet) Raylet is terminated" of the removed node), not only --json's
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"]["done"] == SHARDS and not stats["shards"]["failed"]
    assert_same_manifest(pq.read_table(out / "manifest.parquet"), pq.read_table(local_run / "manifest.parquet"))
