"""Nothing lost: SIGKILL at several points, rerun, byte-identical manifest; lock; exit codes; s3."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

EXE = [sys.executable, "-m", "dedup.cli"]
ARGS = ["--methods", "exact,phash,dhash,embedding", "--embedder", "pixel", "-w", "1", "-q"]


def _run(shards, out, env_extra=None, extra=()):
    env = {k: v for k, v in os.environ.items() if k != "DEDUP_CRASH_AT"}
    env.update(env_extra or {})
    return subprocess.run(EXE + ["run", str(shards), "--out", str(out), *ARGS, *extra], capture_output=True, text=True, env=env)


def _temp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.startswith(".tmp-")]


@pytest.fixture(scope="module")
def reference(synth_shards, tmp_path_factory):
    shards, _ = synth_shards
    out = tmp_path_factory.mktemp("ref") / "run"
    r = _run(shards, out)
    assert r.returncode == 0, r.stderr
    return out, (out / "manifest.parquet").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    ["features:before_marker#2", "features:shard_done#1", "candidates:before_write", "write:pairs.parquet", "write:manifest.parquet"],
)
def test_sigkill_then_rerun_gives_identical_manifest(point, synth_shards, reference, tmp_path):
    shards, _ = synth_shards
    ref_dir, ref_bytes = reference
    out = tmp_path / "run"
    r = _run(shards, out, {"DEDUP_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert not (out / "manifest.parquet").exists()  # killed before the manifest was in place
    r = _run(shards, out)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.parquet").read_bytes() == ref_bytes
    assert _temp_files(out) == []
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_external_sigkill_during_features(synth_shards, reference, tmp_path):
    shards, _ = synth_shards
    _, ref_bytes = reference
    out = tmp_path / "run"
    p = subprocess.Popen(EXE + ["run", str(shards), "--out", str(out), *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list(out.glob("done/*.json")):
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.parquet").exists()
    r = _run(shards, out)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.parquet").read_bytes() == ref_bytes
    assert _temp_files(out) == []


def test_lock_refuses_a_second_writer_and_recovers_a_stale_one(synth_shards, tmp_path):
    shards, _ = synth_shards
    out = tmp_path / "run"
    out.mkdir()
    # A live process (this test) holds the lock: refused with exit 2.
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r = _run(shards, out)
    assert r.returncode == 2 and "locked" in r.stderr
    # The owner is dead: the stale lock is taken over and the run completes.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    r = _run(shards, out)
    assert r.returncode == 0, r.stderr
    assert not (out / ".lock").exists()


def test_error_budget_sets_exit_code_3(tmp_path):
    import io
    import tarfile

    from PIL import Image

    d = tmp_path / "in"
    d.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(buf, "PNG")
    with tarfile.open(d / "s.tar", "w") as tf:
        for name, data in [("a.png", buf.getvalue()), ("b.jpg", b"junk"), ("c.jpg", b"junk2")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    base = EXE + ["run", str(d), "--methods", "exact,phash", "-q", "-w", "1"]
    r = subprocess.run(base + ["--out", str(tmp_path / "r1"), "--set", "run.max_error_fraction=0.5"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr  # 2/3 failed > 0.5
    stats = json.loads((tmp_path / "r1" / "stats.json").read_text())
    assert stats["partial"] is True and stats["status_counts"] == {"decode_error": 2, "ok": 1}
    assert pq.read_table(tmp_path / "r1" / "manifest.parquet").num_rows == 3
    r = subprocess.run(base + ["--out", str(tmp_path / "r2"), "--set", "run.max_error_fraction=0.9"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "r3"), "--set", "run.max_error_fraction=7"], capture_output=True, text=True)
    assert r.returncode == 2 and "max_error_fraction" in r.stderr


@pytest.fixture
def s3_server():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    yield env
    server.stop()


def test_s3_round_trip(synth_shards, reference, s3_server, tmp_path):
    import s3fs

    shards, _ = synth_shards
    _, ref_bytes = reference
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("bucket")
    for p in sorted(shards.glob("*.tar")):
        fs.put(str(p), f"bucket/shards/{p.name}")
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**os.environ, **s3_server, "TMPDIR": str(scratch)}
    r = subprocess.run(
        EXE + ["run", "s3://bucket/shards/", "--out", "s3://bucket/runs/r1", *ARGS], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    # the local scratch copy of the embeddings (remote run dir) is not left behind
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("dedup-index-")]
    with fs.open("bucket/runs/r1/manifest.parquet", "rb") as f:
        got = f.read()
    assert pq.read_table(pa.BufferReader(got)).equals(pq.read_table(pa.BufferReader(ref_bytes)))
    assert fs.exists("bucket/runs/r1/stats.json") and len(fs.ls("bucket/runs/r1/done")) == len(list(shards.glob("*.tar")))
    # Rerun against s3 resumes: nothing is recomputed, manifest unchanged.
    r = subprocess.run(
        EXE + ["run", "s3://bucket/shards/", "--out", "s3://bucket/runs/r1", *ARGS], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    with fs.open("bucket/runs/r1/manifest.parquet", "rb") as f:
        assert f.read() == got


def test_staging_embeddings_without_disk_space_is_a_clear_error(tmp_path, monkeypatch):
    """No room to stage the embeddings: a DedupError saying how much is needed where, before
    anything is written (not an OSError half-way through), and the features stay for a rerun."""
    from collections import namedtuple

    import numpy as np

    from dedup.errors import DedupError
    from dedup.io.rundir import RunDir
    from dedup.phases import candidates as P

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(DedupError, match=r"not enough disk space .* GiB needed in .*index.*rerun"):
        P._stage_embeddings(RunDir(str(tmp_path)), [], np.zeros(1, np.int64), np.arange(8), 4)
    assert not (tmp_path / "index" / "embeddings.f16").exists()
    monkeypatch.undo()
    staged = P._stage_embeddings(RunDir(str(tmp_path)), [], np.zeros(1, np.int64), np.arange(8), 4)
    assert staged.shape == (8, 4)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_run_with_s3_run_dir_equals_local_run(synth_shards, reference, s3_server, tmp_path):
    """Issue #18, must-show 3: the Ray executor's run with its run directory on s3:// (moto on
    loopback; every Ray worker writes its features and markers there) gives the manifest of
    the local executor's local run, row by row."""
    pytest.importorskip("ray")
    import s3fs
    from sameruns import assert_same_manifest

    shards, _ = synth_shards
    ref_dir, _ = reference
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("ray-bucket")  # moto keeps buckets for the whole process: one of its own
    # A Ray of its own (its address file in its own temp dir: no other Ray on this machine joins it
    # or is joined), whose workers inherit the s3 settings from the driver's environment.
    ray_tmp = tempfile.mkdtemp(prefix="dedup-s3ray-")
    env = {**os.environ, **s3_server, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        r = subprocess.run(
            EXE + ["run", str(shards), "--out", "s3://ray-bucket/run", *ARGS, "--executor", "ray",
                   "--set", "ray.cpus_per_actor=0.5", "--set", "ray.cpus_per_task=0.5"],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with fs.open("ray-bucket/run/run.json") as f:
        assert json.load(f)["config"]["run"]["executor"] == "ray"
    assert len(fs.ls("ray-bucket/run/done")) == len(list(shards.glob("*.tar")))
    with fs.open("ray-bucket/run/manifest.parquet", "rb") as f:
        got = pq.read_table(pa.BufferReader(f.read()))
    assert_same_manifest(got, pq.read_table(ref_dir / "manifest.parquet"))
