"""Stopping a command: SIGINT/SIGTERM at several points of a real run, apply and report; SIGKILL.

Each case runs the real CLI in its own session (``start_new_session``), holds it at a point with
``DEDUP_DELAY_AT`` (dedup/faults.py), signals the main process only, and checks: exit 130/143,
one line on stderr (no traceback), every process of the session gone within 10 s (pool
workers, multiprocessing's resource tracker), the lock released, and that rerunning the same
command gives what an uninterrupted run gives.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

EXE = [sys.executable, "-m", "dedup.cli"]
HASHES = ["--methods", "exact,phash,dhash", "-q", "--no-report"]
N_SHARDS = 8
GONE_S = 10.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from dedup.testing.synth import make_shards

    d = tmp_path_factory.mktemp("sig") / "shards"
    make_shards(d, n_shards=N_SHARDS, max_side=128)
    return d


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEDUP_CRASH_AT", "DEDUP_DELAY"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run, its clean shards and its report."""
    root = tmp_path_factory.mktemp("sigref")
    run, clean, report = root / "run", root / "clean", root / "report.html"
    for cmd in (["run", str(corpus), "--out", str(run), "-w", "1", *HASHES], ["apply", str(run), "--out", str(clean)],
                ["report", str(run), "--out", str(report)]):
        r = subprocess.run(EXE + cmd, capture_output=True, text=True, env=_env())
        assert r.returncode == 0, r.stderr
    return run, clean, report


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            out.append(int(d))
    return out


def _until(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _signal_at(cmd, sig, delay, ready, tmp_path, group=False):
    """Start ``cmd`` held at ``delay``, wait for ``ready()``, send ``sig`` to the main process
    (``group``: to its whole process group, as a terminal's Ctrl-C does). Returns (exit code,
    stderr, the session's pids before the signal, seconds until all gone)."""
    flag = tmp_path / "flag"
    err = tmp_path / "stderr"
    with open(err, "w") as ferr:
        p = subprocess.Popen(EXE + cmd, stdout=subprocess.DEVNULL, stderr=ferr, start_new_session=True,
                             env=_env(DEDUP_DELAY_AT=delay, DEDUP_DELAY_FLAG=str(flag)))
    try:
        assert _until(lambda: flag.exists() and ready() or p.poll() is not None, 60), "never reached the delay"
        assert p.poll() is None, f"exited before the signal: {err.read_text()[-2000:]}"
        before = _session(p.pid)
        t0 = time.monotonic()
        os.killpg(p.pid, sig) if group else p.send_signal(sig)
        rc = p.wait(timeout=GONE_S)
        assert _until(lambda: not _session(p.pid), GONE_S - (time.monotonic() - t0)), f"left running: {_session(p.pid)}"
        return rc, err.read_text(), before, time.monotonic() - t0
    finally:
        if p.poll() is None or _session(p.pid):  # a failed test leaves nothing behind
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _one_line(stderr: str, sig, command: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no message"
    name = signal.Signals(sig).name
    assert re.fullmatch(rf"interrupted \({name}\)(: [^;]+)?; rerun the same command to resume: dedup {command} .*", lines[-1]), stderr
    return lines[-1]


def _temp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.startswith(".tmp-")]


def _same_manifest(a, b):
    ta = pq.read_table(a / "manifest.parquet").sort_by("sample_id")
    tb = pq.read_table(b / "manifest.parquet").sort_by("sample_id")
    assert ta.equals(tb)


SIGS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [pytest.param(signal.SIGINT, True, id="SIGINT-to-group"),
                                       pytest.param(signal.SIGTERM, False, id="SIGTERM")])
def test_signal_during_features_stops_workers_and_resumes(sig, group, corpus, reference, tmp_path):
    """Two workers, each held 1.5 s per shard before its marker: the signal comes after the
    first markers, while both workers are mid-shard and more shards wait. The run stops at once
    (no queued shard is started or waited for), kills the workers, keeps the finished shards.
    SIGINT goes to the whole group, as Ctrl-C in a terminal: the workers leave it to the parent
    (no traceback of theirs); SIGTERM to the main process only, as ``kill`` or a scheduler."""
    out = tmp_path / "run"
    cmd = ["run", str(corpus), "--out", str(out), "-w", "2", *HASHES]
    rc, err, before, took = _signal_at(cmd, sig, "features:before_marker=1.5", lambda: any(out.glob("done/*.json")), tmp_path, group)
    assert rc == 128 + sig, err
    assert len(before) >= 3, before  # main, two workers (and the resource tracker)
    done = len(list(out.glob("done/*.json")))
    assert 1 <= done < N_SHARDS
    reported = int(re.search(rf": (\d+) of {N_SHARDS} shards done;", _one_line(err, sig, "run")).group(1))
    assert reported <= done  # a worker writes its marker a moment before the parent hears of it
    assert took < 5, took  # the 1.5 s delays of the running shards are not waited for
    assert not (out / ".lock").exists()
    r = subprocess.run(EXE + cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    _same_manifest(out, reference[0])
    assert _temp_files(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGS)
@pytest.mark.parametrize("point", ["candidates:before_write", "write:manifest.parquet"], ids=["candidates", "manifest"])
def test_signal_after_features_releases_lock_and_resumes(point, sig, corpus, reference, tmp_path):
    """The main process holds the run (candidate search done, or the manifest's temp file
    written but not renamed): the signal gives the same clean stop; no temp file is left."""
    out = tmp_path / "run"
    cmd = ["run", str(corpus), "--out", str(out), "-w", "1", *HASHES]
    rc, err, _, _ = _signal_at(cmd, sig, f"{point}=60", lambda: True, tmp_path)
    assert rc == 128 + sig, err
    line = _one_line(err, sig, "run")
    assert f": {N_SHARDS} of {N_SHARDS} shards done;" in line
    assert not (out / ".lock").exists()
    assert not (out / "manifest.parquet").exists()
    assert _temp_files(out) == []
    r = subprocess.run(EXE + cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    _same_manifest(out, reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGS)
def test_signal_during_apply_resumes(sig, corpus, reference, tmp_path):
    """Held while writing the second clean shard: the first stays done, the second leaves no
    temp file, and the rerun writes exactly the clean shards of an uninterrupted apply."""
    run, ref_clean, _ = reference
    clean = tmp_path / "clean"
    cmd = ["apply", str(run), "--out", str(clean)]
    rc, err, _, _ = _signal_at(cmd, sig, "write:shard-00001.tar=60", lambda: True, tmp_path)
    assert rc == 128 + sig, err
    _one_line(err, sig, "apply")
    assert sorted(p.name for p in clean.glob("_done/*")) == ["shard-00000.json"]
    assert _temp_files(clean) == [] and not (run / ".lock").exists()
    r = subprocess.run(EXE + cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert "1 shard(s) already done" in " ".join(r.stderr.split())  # rich wraps lines
    for ref in sorted(ref_clean.rglob("*")):
        if ref.is_file():
            assert (clean / ref.relative_to(ref_clean)).read_bytes() == ref.read_bytes(), ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGS)
def test_signal_during_report(sig, reference, tmp_path):
    run, _, ref_report = reference
    out = tmp_path / "report.html"
    cmd = ["report", str(run), "--out", str(out)]
    rc, err, _, _ = _signal_at(cmd, sig, "write:report.html=60", lambda: True, tmp_path)
    assert rc == 128 + sig, err
    _one_line(err, sig, "report")
    assert not out.exists() and _temp_files(tmp_path) == []
    r = subprocess.run(EXE + cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref_report.read_bytes()


@pytest.mark.slow
def test_sigkill_of_the_main_process_takes_the_workers_along(corpus, reference, tmp_path):
    """No handler runs on SIGKILL (OOM killer, preempted node): the workers notice that their
    parent is gone and exit; then the lock is stale and a rerun takes it over and resumes."""
    out = tmp_path / "run"
    cmd = ["run", str(corpus), "--out", str(out), "-w", "2", *HASHES]
    flag = tmp_path / "flag"
    p = subprocess.Popen(EXE + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env=_env(DEDUP_DELAY_AT="features:before_marker=1.5", DEDUP_DELAY_FLAG=str(flag)))
    try:
        assert _until(lambda: flag.exists() and len(flag.read_text().splitlines()) >= 2 or p.poll() is not None, 60)
        assert p.poll() is None
        workers = [pid for pid in _session(p.pid) if pid != p.pid]
        assert len(workers) >= 2, workers
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _until(lambda: not _session(p.pid), GONE_S), f"outlived their parent: {_session(p.pid)}"
    finally:
        if _session(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
    lock = json.loads((out / ".lock").read_text())  # left behind, naming the dead owner and its workers
    assert lock["pid"] == p.pid and {w[0] for w in lock["workers"]} <= set(workers)
    cmd[cmd.index("-w") + 1] = "1"  # (quicker; the worker count does not change results)
    r = subprocess.run(EXE + cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    _same_manifest(out, reference[0])


def test_lock_is_not_taken_over_while_a_worker_of_its_dead_owner_runs(tmp_path):
    from dedup.errors import ConfigError
    from dedup.io.rundir import RunDir
    from dedup.runner import RunLock

    def _start_time(pid):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])

    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": dead.pid, "host": socket.gethostname(), "workers": [[worker.pid, _start_time(worker.pid)]]}
        with open(run.p(".lock"), "w") as f:
            json.dump(lock, f)
        with pytest.raises(ConfigError, match=rf"is gone, but its worker process\(es\) \[{worker.pid}\] still run"):
            RunLock(run).__enter__()
        # the same pid, but another process (pid reused): not the worker
        lock["workers"] = [[worker.pid, _start_time(worker.pid) + 1]]
        with open(run.p(".lock"), "w") as f:
            json.dump(lock, f)
        with RunLock(run) as held:
            assert json.loads(open(run.p(".lock")).read())["pid"] == os.getpid()
            held.add_workers([worker.pid])
            assert json.loads(open(run.p(".lock")).read())["workers"] == [[worker.pid, _start_time(worker.pid)]]
            worker.kill()
            worker.wait()
        assert not os.path.exists(run.p(".lock"))
    finally:
        worker.kill()
        worker.wait()


def test_thread_map_does_not_run_its_queue_when_interrupted():
    """The candidate search's thread map (pmap) is left by an interrupt: only the units
    already running finish, the queued ones are cancelled (before: all 40 ran, ~2 s)."""
    from dedup.compute.search.threads import pmap

    ran = []

    def unit(i):
        time.sleep(0.05)
        ran.append(i)
        return i

    gen = pmap(unit, list(range(40)), 2)
    next(gen)
    t0 = time.monotonic()
    gen.close()  # what an exception at the consumer does to the generator
    assert time.monotonic() - t0 < 0.5
    assert len(ran) <= 4, ran


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_of_a_ray_run(corpus, tmp_path):
    """--executor ray (a local Ray this run starts): ray.init sets its own SIGTERM handler (exit
    at once); ours is put back, so the driver cancels its tasks, kills its actors and shuts its
    Ray down (every process of the session gone), then the same line and 143."""
    pytest.importorskip("ray")
    out = tmp_path / "run"
    cmd = ["run", str(corpus), "--out", str(out), "-w", "2", "--executor", "ray", *HASHES]
    rc, err, before, _ = _signal_at(cmd, signal.SIGTERM, "features:before_marker=30", lambda: True, tmp_path)
    assert rc == 143, err
    assert len(before) > 3, before  # Ray's own processes were in the session, and are gone
    _one_line(err, signal.SIGTERM, "run")
    assert not (out / ".lock").exists()
