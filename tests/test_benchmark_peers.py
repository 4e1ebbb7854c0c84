"""A benchmark stopped early must not leave the peer tools it started running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from benchmarks._table import run_peer, stop_on_sigterm
    stop_on_sigterm()
    # a "peer" whose worker (the sleep) is a grandchild of the benchmark
    run_peer(["bash", "-c", f"sleep 300 & echo $! > {sys.argv[2]}; wait"])
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_to_a_benchmark_kills_its_peer_and_the_peer_s_workers(tmp_path):
    pidfile = tmp_path / "worker.pid"
    bench = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT), str(pidfile)])
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        assert _alive(worker)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 143
        for _ in range(100):
            if not _alive(worker):
                break
            time.sleep(0.05)
        assert not _alive(worker), "the peer's worker outlived the benchmark"
    finally:
        bench.kill()
