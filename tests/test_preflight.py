"""Offline machines: an open_clip hub tag must fail within seconds with one line naming the way
out (local checkpoint, HF_HUB_OFFLINE=1 with a filled cache, or sscd), never retry the hub for
minutes. No test reaches the internet: the hub endpoint is a closed or a local port."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("huggingface_hub")

SPEC = "open_clip:ViT-B-32:laion2b_s34b_b79k"
WAY_OUT = ["open_clip:ViT-B-32:/path/to/open_clip_pytorch_model.bin", "HF_HUB_OFFLINE=1", "--embedder sscd"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connecting is refused at once


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A machine without the weights: empty HF/open_clip caches, hub variables only as given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1,localhost",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


# One interpreter (open_clip's import costs seconds) tries each situation in turn; the hub
# variables are read at call time, the cache directory (HF_HOME) at import.
_SCENARIOS = textwrap.dedent(
    """
    import json, os, sys, time
    import open_clip  # noqa: F401 - its import (seconds) is not what is timed
    from dedup.compute.embedders import open_clip_weights, preflight
    from dedup.errors import ConfigError

    spec, closed, served, fake = sys.argv[1:5]
    out = {}

    def attempt(name, **env):
        for k in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
            os.environ.pop(k, None)
        os.environ.update(env)
        t = time.perf_counter()
        try:
            preflight(spec)
            out[name] = {"ok": True, "s": time.perf_counter() - t}
        except ConfigError as e:
            out[name] = {"ok": False, "s": time.perf_counter() - t, "msg": str(e)}

    attempt("offline_empty", HF_HUB_OFFLINE="1", HF_ENDPOINT=closed)
    attempt("refused", HF_ENDPOINT=closed)
    attempt("reachable", HF_ENDPOINT=served)
    # a warm cache, laid out as huggingface_hub stores it: fine offline, and it is the very
    # file open_clip itself resolves the tag to
    snap = os.path.join(os.environ["HF_HOME"], "hub", "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K")
    os.makedirs(os.path.join(snap, "refs"))
    os.makedirs(os.path.join(snap, "snapshots", "abc"))
    open(os.path.join(snap, "refs", "main"), "w").write("abc")
    open(os.path.join(snap, "snapshots", "abc", fake), "wb").write(b"weights")
    attempt("warm_cache", HF_HUB_OFFLINE="1", HF_ENDPOINT=closed)
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg
    out["ours"] = open_clip_weights("ViT-B-32", "laion2b_s34b_b79k")[0]
    out["open_clip"] = download_pretrained(get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k"))
    print(json.dumps(out))
    """
)


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = subprocess.run(
            [sys.executable, "-c", _SCENARIOS, SPEC, f"http://127.0.0.1:{_closed_port()}",
             f"http://127.0.0.1:{server.server_address[1]}", "open_clip_model.safetensors"],
            env=_env(tmp), capture_output=True, text=True, timeout=120,
        )
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_offline_env_and_empty_cache_fails_at_once(scenarios):
    s = scenarios["offline_empty"]
    assert not s["ok"] and s["s"] < 1.0
    assert "HF_HUB_OFFLINE is set" in s["msg"] and "\n" not in s["msg"]
    for w in WAY_OUT:
        assert w in s["msg"]


@pytest.mark.slow
def test_unreachable_hub_fails_within_seconds(scenarios):
    s = scenarios["refused"]
    assert not s["ok"] and s["s"] < 6.0
    assert "cannot be reached" in s["msg"] and "\n" not in s["msg"]
    for w in WAY_OUT:
        assert w in s["msg"]


@pytest.mark.slow
def test_reachable_hub_and_warm_cache_pass(scenarios):
    assert scenarios["reachable"]["ok"], scenarios["reachable"]
    assert scenarios["warm_cache"]["ok"], scenarios["warm_cache"]
    # the cache check looks where open_clip looks
    assert scenarios["ours"] and scenarios["ours"] == scenarios["open_clip"]


def test_preflight_local_specs(tmp_path):
    from dedup.compute.embedders import preflight
    from dedup.errors import ConfigError

    preflight("pixel")
    preflight("open_clip:ViT-B-32:none")
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        preflight(f"open_clip:ViT-B-32:{tmp_path}/open_clip_pytorch_model.bin")


def _tiny_shard(path: Path) -> None:
    import io

    from PIL import Image

    with tarfile.open(path, "w") as tf:
        for k in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (40 * k, 90, 160)).save(buf, "JPEG")
            ti = tarfile.TarInfo(f"{k:04d}.jpg")
            ti.size = len(buf.getvalue())
            tf.addfile(ti, io.BytesIO(buf.getvalue()))


@pytest.mark.slow
@pytest.mark.parametrize("offline", [False, True])
def test_dedup_run_offline_exits_2_quickly_without_features(tmp_path, offline):
    """`dedup run` with an open_clip hub tag on a machine without the hub and without the
    weights: one line, exit 2, within seconds, no features or manifest."""
    shard = tmp_path / "s.tar"
    _tiny_shard(shard)
    run = tmp_path / "run"
    extra = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    if offline:
        extra["HF_HUB_OFFLINE"] = "1"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "run", str(shard), "--out", str(run), "--embedder", SPEC, "--no-report", "-q", "--workers", "1"],
                       env=_env(tmp_path, COLUMNS="2000", **extra), capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t
    assert r.returncode == 2, r.stderr[-3000:]
    assert elapsed < 20, elapsed
    assert "Traceback" not in r.stderr
    msg = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(msg) == 1 and all(w in msg[0] for w in WAY_OUT), r.stderr
    assert not (run / "manifest.parquet").exists()
    assert not list(run.rglob("*.parquet"))
