"""The scheduled-job path as users run it (issue #18, must-show 4).

A Ray head started the way an operator starts one — ``ray start --head`` with the dashboard
(the Jobs API) and token authentication (``RAY_AUTH_MODE=token``, a generated token in
``RAY_AUTH_TOKEN``) — and ``ray job submit --working-dir <repo> -- python pipelines/ray_job.py
...`` against its dashboard address, exactly as a cron job or a KubeRay RayJob submits:

1. the job succeeds and writes the full manifest; a submission without the token is refused;
2. a job stopped mid-run (``ray job stop`` while the features phase holds after its first
   shard, via ``DEDUP_DELAY_AT`` in the job's runtime environment) and submitted again
   resumes: the shards finished before the stop are not redone (their markers are untouched)
   and the manifest equals the one of an uninterrupted job.

The head runs in its own Ray temp dir (its address file must not make another ``ray.init()``
on this machine join it) and on free ports; teardown stops every process it started.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sameruns import assert_same_manifest

pytest.importorskip("ray")
pytest.importorskip("ray.dashboard.modules.job.cli", reason="ray job submit needs ray[default]")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
# The example cluster config, with what a 2-CPU GPU-less head can host.
JOB_ARGS = [
    "--config", "pipelines/cluster-config.yaml",
    "--set", "embedding.spec=pixel", "--set", "embedding.device=cpu", "--set", "ray.embed_actors=1",
    "--set", "ray.cpus_per_actor=0.5", "--set", "ray.cpus_per_task=0.5", "--set", "ray.max_in_flight=1",
    "--quiet", "--json", "--no-report",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    env: dict  # the environment of a user of this cluster: RAY_AUTH_MODE and the token
    temp: str

    def ray(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*RAY, *args], capture_output=True, text=True, env=env or self.env, timeout=timeout,
                              cwd=REPO, check=False)

    def submit(self, *args: str, runtime_env: dict | None = None, wait: bool = True, job_id: str | None = None,
               ) -> subprocess.CompletedProcess:
        extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        extra += ["--submission-id", job_id] if job_id else []
        return self.ray("job", "submit", "--address", self.dashboard, "--working-dir", str(REPO), *extra,
                        *([] if wait else ["--no-wait"]), "--", "python", "pipelines/ray_job.py", *args, timeout=600)

    def status(self, job_id: str) -> str:
        """The job's state as `ray job status` prints it ("Status for job 'x': RUNNING", or for a
        finished job "Job 'x' succeeded" / "failed" / "was stopped")."""
        r = self.ray("job", "status", "--address", self.dashboard, job_id, timeout=120)
        text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
        for state, says in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped"),
                            ("RUNNING", ": RUNNING"), ("PENDING", ": PENDING")):
            if f"Job '{job_id}' {says}" in text or (says.startswith(":") and f"job '{job_id}'{says}" in text):
                return state
        return "UNKNOWN: " + text[-800:]


def _processes_under(temp: str) -> list[int]:
    """Processes whose command line or environment names ``temp`` (this head's Ray temp dir):
    the head's raylet, GCS, dashboard, agents, workers and job drivers — this test's only."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if any(temp.encode() in Path(f"/proc/{d}/{f}").read_bytes() for f in ("cmdline", "environ")):
                    pids.append(int(d))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp = tempfile.mkdtemp(prefix="dedup-rj-")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DEDUP_DELAY_AT", "DEDUP_CRASH_AT")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=temp)
    port, dash = _free_port(), _free_port()
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port")]
    log = open(Path(temp) / "ray-start.log", "w")  # open while the head runs
    proc = subprocess.Popen(
        [*RAY, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats", *ports],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 180
        while True:  # the dashboard answers (401 without the token is an answer)
            assert proc.poll() is None, (Path(temp) / "ray-start.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/api/version", timeout=5)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not come up: " + (Path(temp) / "ray-start.log").read_text()[-3000:]
                time.sleep(1)
        yield Head(url, env, temp)
    finally:
        # `ray start --block` stops its processes on SIGTERM; what is left of this head (workers,
        # job drivers) is found by its temp dir and killed by pid. Never `ray stop`: it would
        # stop every Ray on the machine.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for _ in range(20):
            left = _processes_under(temp)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(head, synth_shards, tmp_path_factory) -> Path:
    """One uninterrupted job's run directory."""
    src, _ = synth_shards
    out = tmp_path_factory.mktemp("rayjob") / "run"
    r = head.submit(str(src), "--out", str(out), *JOB_ARGS)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout, r.stdout[-3000:]
    return out


def test_ray_job_submit_with_token_auth(head, submitted, synth_shards):
    _, truth = synth_shards
    stats = json.loads((submitted / "stats.json").read_text())
    assert stats["shards"]["done"] == 4 and not stats["shards"]["failed"]
    assert stats["samples"] == len(truth.samples)
    assert json.loads((submitted / "run.json").read_text())["config"]["run"]["executor"] == "ray"
    ids = sorted(pq.read_table(submitted / "manifest.parquet", columns=["sample_id"])["sample_id"].to_pylist())
    assert ids == sorted(s.sample_id for s in truth.samples)
    # The head really asks for the token: the same submission without it is refused.
    no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"}
    r = head.ray("job", "list", "--address", head.dashboard, env=no_token, timeout=120)
    assert r.returncode != 0, r.stdout[-2000:]


def test_stopped_job_resubmitted_resumes(head, submitted, synth_shards, tmp_path):
    src, _ = synth_shards
    out = tmp_path / "run"
    flag = tmp_path / "held"
    # Hold the job's driver after its first finished shard (ray.max_in_flight=1: nothing else runs).
    hold = {"env_vars": {"DEDUP_DELAY_AT": "features:shard_done#1=600", "DEDUP_DELAY_FLAG": str(flag)}}
    job_id = f"dedup-held-{secrets.token_hex(4)}"
    r = head.submit(str(src), "--out", str(out), *JOB_ARGS, runtime_env=hold, wait=False, job_id=job_id)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert time.monotonic() < deadline and head.status(job_id) in ("PENDING", "RUNNING"), head.status(job_id)
        time.sleep(0.5)
    r = head.ray("job", "stop", "--address", head.dashboard, job_id, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert head.status(job_id) == "STOPPED"
    done = sorted((out / "done").glob("*.json"))
    assert len(done) == 1 and not (out / "manifest.parquet").exists()
    mtimes = {m.name: m.stat().st_mtime_ns for m in done}
    # Submitted again (a scheduled retry): the finished shard is not redone, the rest are.
    r = head.submit(str(src), "--out", str(out), *JOB_ARGS)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert {m: (out / "done" / m).stat().st_mtime_ns for m in mtimes} == mtimes
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"]["done"] == 4 and not stats["shards"]["failed"]
    assert_same_manifest(pq.read_table(out / "manifest.parquet"), pq.read_table(submitted / "manifest.parquet"))
