"""Every command run the way a hurried or careless user would: wrong, missing, contradictory and
hostile arguments. Each answer is one line starting with ``error:`` (no traceback), exit code
2, and nothing is written anywhere (the working folder and the run are compared before/after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dedup.cli import app

HASHES = "exact,phash,dhash"


def _tree(root) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, synth_shards):
    """A working folder: shards/, a finished hashes-only run/, a directory that is not a run,
    a file, a directory of images, a non-UTF-8 'config', a labelled-pairs CSV."""
    shards, _ = synth_shards
    root = tmp_path_factory.mktemp("adv")
    shutil.copytree(shards, root / "shards")
    res = CliRunner().invoke(app, ["run", str(root / "shards"), "--out", str(root / "run"), "--methods", HASHES,
                                   "-q", "--no-report", "-w", "1"])
    assert res.exit_code == 0, res.output
    (root / "notarun").mkdir()
    (root / "notarun" / "photo.txt").write_text("mine")
    (root / "afile.txt").write_text("mine")
    (root / "afile.json").write_text('{"mine": 1}')
    (root / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (root / "queries").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "queries" / "q.png")
    import pyarrow.parquet as pq

    ids = pq.read_table(root / "run" / "manifest.parquet")["sample_id"].to_pylist()
    (root / "pairs.csv").write_text(f"a,b,is_duplicate\n{ids[0]},{ids[1]},1\n{ids[2]},{ids[3]},0\n")
    return root


CASES = {
    # run
    "run: missing directory": ["run", "nope/", "--out", "r"],
    "run: missing .tar": ["run", "nope.tar", "--out", "r"],
    "run: pattern matching nothing": ["run", "shards/*.tgzz", "--out", "r"],
    "run: --out an existing file": ["run", "shards", "--out", "afile.txt", "--methods", HASHES],
    "run: --out a directory of user files": ["run", "shards", "--out", "notarun", "--methods", HASHES],
    "run: --out inside the input": ["run", "shards", "--out", "shards/run", "--methods", HASHES],
    "run: --config a directory": ["run", "shards", "--out", "r", "--config", "notarun"],
    "run: --config not UTF-8": ["run", "shards", "--out", "r", "--config", "binary.yaml"],
    "run: --config missing": ["run", "shards", "--out", "r", "--config", "nope.yaml"],
    "run: --merge without --against": ["run", "shards", "--out", "r", "--merge", "--methods", HASHES],
    "run: --ray-address without --executor ray": ["run", "shards", "--out", "r", "--ray-address", "auto", "--methods", HASHES],
    "run: --embedder without embedding": ["run", "shards", "--out", "r", "--embedder", "sscd", "--methods", "exact"],
    "run: --methods empty": ["run", "shards", "--out", "r", "--methods", ""],
    "run: --methods blank list": ["run", "shards", "--out", "r", "--methods", " , "],
    "run: --methods unknown": ["run", "shards", "--out", "r", "--methods", "exact,md5"],
    "run: unknown decode format": ["run", "shards", "--out", "r", "--methods", HASHES, "--set", "decode.formats=[JPEG,FOO]"],
    "run: no image extensions": ["run", "shards", "--out", "r", "--methods", HASHES, "--set", "input.image_exts=[]"],
    "run: --set without =": ["run", "shards", "--out", "r", "--set", "hashes.phash_radius"],
    "run: --set out of range": ["run", "shards", "--out", "r", "--set", "hashes.phash_radius=-1"],
    "run: --set unknown key": ["run", "shards", "--out", "r", "--set", "hashes.radius=3"],
    "run: --executor unknown": ["run", "shards", "--out", "r", "--executor", "slurm", "--methods", HASHES],
    "run: --workers negative": ["run", "shards", "--out", "r", "--workers", "-1", "--methods", HASHES],
    "run: --against missing": ["run", "shards", "--out", "r", "--against", "nope", "--methods", HASHES],
    "run: --against not a run": ["run", "shards", "--out", "r", "--against", "notarun", "--methods", HASHES],
    "run: bad embedder spec": ["run", "shards", "--out", "r", "--embedder", "resnet9000"],
    # apply
    "apply: no output named": ["apply", "run"],
    "apply: missing run": ["apply", "nope", "--out", "clean"],
    "apply: not a run": ["apply", "notarun", "--out", "clean"],
    "apply: --out an existing file": ["apply", "run", "--out", "afile.txt"],
    "apply: --out the input": ["apply", "run", "--out", "shards"],
    "apply: --keep-list a directory": ["apply", "run", "--keep-list", "notarun"],
    "apply: --keep-list an existing file": ["apply", "run", "--keep-list", "afile.txt"],
    "apply: --keep-list equals --out": ["apply", "run", "--out", "clean", "--keep-list", "clean"],
    # report / summary
    "report: missing run": ["report", "nope"],
    "report: not a run": ["report", "notarun"],
    "report: --out a directory": ["report", "run", "--out", "notarun"],
    "report: --out a user file": ["report", "run", "--out", "afile.txt"],
    "report: --out a run file": ["report", "run", "--out", "run/manifest.parquet"],
    "summary: missing run": ["summary", "nope"],
    "summary: not a run": ["summary", "notarun"],
    # eval
    "eval: --target-precision above 1": ["eval", "run", "--pairs", "pairs.csv", "--target-precision", "1.5"],
    "eval: --target-precision 0": ["eval", "run", "--pairs", "pairs.csv", "--target-precision", "0"],
    "eval: --out a directory": ["eval", "run", "--pairs", "pairs.csv", "--out", "notarun"],
    "eval: --out over a user file": ["eval", "run", "--pairs", "pairs.csv", "--out", "afile"],
    "eval: --out onto an input shard": ["eval", "run", "--pairs", "pairs.csv", "--out", "shards/shard-00000"],
    # check
    "check: --against missing": ["check", "queries", "--against", "nope", "--out", "c"],
    "check: --against not a run": ["check", "queries", "--against", "notarun", "--out", "c"],
    "check: --out a directory of user files": ["check", "queries", "--against", "run", "--out", "notarun"],
    "check: --out inside the queries": ["check", "queries", "--against", "run", "--out", "queries/c"],
    "check: --out inside the run": ["check", "queries", "--against", "run", "--out", "run/c"],
    "check: --max-regions 0": ["check", "queries", "--against", "run", "--out", "c", "--max-regions", "0"],
    # calibrate / config
    "calibrate: --sample 0": ["calibrate", "shards", "--sample", "0", "--methods", HASHES],
    "calibrate: --methods empty": ["calibrate", "shards", "--methods", ""],
    "calibrate: --embedder without embedding": ["calibrate", "shards", "--methods", "exact", "--embedder", "sscd"],
    "calibrate: --out a directory": ["calibrate", "shards", "--methods", HASHES, "--out", "notarun"],
    "calibrate: --out an input shard": ["calibrate", "shards", "--methods", HASHES, "--out", "shards/shard-00000.tar"],
    "calibrate: --out inside the input": ["calibrate", "shards", "--methods", HASHES, "--out", "shards/cal.json"],
    "calibrate: --out over a user file": ["calibrate", "shards", "--methods", HASHES, "--out", "afile.json"],
    "config: --config a directory": ["config", "--config", "notarun"],
    "config: --set unknown section": ["config", "--set", "nope.x=1"],
}


@pytest.mark.parametrize("argv", list(CASES.values()), ids=list(CASES))
def test_one_line_exit_2_nothing_written(ws, argv, monkeypatch):
    monkeypatch.chdir(ws)
    before = _tree(ws)
    res = CliRunner().invoke(app, argv)
    err = res.stderr
    assert res.exit_code == 2, (res.exit_code, err, res.output, res.exception)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert not res.exception or isinstance(res.exception, SystemExit), res.exception
    # one line, except a config validation error may list one field per line
    assert len(lines) == 1 or lines[0].startswith("error: invalid configuration"), err
    assert _tree(ws) == before, "a refused command wrote something"


def test_usage_errors_from_the_parser_exit_2(ws, monkeypatch):
    monkeypatch.chdir(ws)
    for argv in (["run"], ["run", "shards"], ["frobnicate"], ["run", "shards", "--out", "r", "--bogus"],
                 ["apply", "run", "--out"], ["check", "queries"]):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 2, argv


def test_help_and_version(ws):
    for argv in (["-h"], ["--help"], ["run", "-h"], ["apply", "-h"]):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 0 and "Usage" in res.output, argv
    res = CliRunner().invoke(app, ["--version"])
    from dedup import __version__

    assert res.exit_code == 0 and res.output.strip() == f"dedup {__version__}"


def test_real_process_one_line_no_traceback(ws):
    """Through the console script's ``main()`` as a user runs it: a missing input is one line,
    exit 2, and no run directory is left behind (it used to leave run.json after a KeyError)."""
    exe = shutil.which("dedup") or None
    cmd = [exe] if exe else [sys.executable, "-m", "dedup.cli"]
    p = subprocess.run([*cmd, "run", "nope.tar", "--out", "fresh-run"], cwd=ws, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error:"), p.stderr
    assert not (ws / "fresh-run").exists()


def test_summary_counts_a_failed_shard_and_prints_its_whole_reason(tmp_path):
    """It said 'shards 1/1 done' for a shard that failed, and cut reasons at 80 columns."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "broken.tar").write_bytes(b"x" * 3000)
    res = CliRunner().invoke(app, ["run", str(d), "--out", str(tmp_path / "r"), "--methods", HASHES, "--no-report", "-w", "1"])
    assert res.exit_code == 3, res.output
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "r")])
    out = " ".join(res.output.split())
    assert "shards read completely │ 0/1" in out and "shards failed │ 1" in out, res.output
    assert "failed shard broken: unreadable: not a tar archive" in out


def test_cluster_size_histogram_in_numeric_order(ws):
    """stats.json and the report listed buckets as strings sort: 1, 11-100, 2, ..."""
    import json

    from dedup.phases.manifest import _bucket, size_bucket_order

    buckets = [_bucket(s) for s in (1, 2, 3, 7, 50, 500, 5000)]
    assert sorted(buckets, key=size_bucket_order) == buckets
    hist = json.loads((ws / "run" / "stats.json").read_text())["cluster_size_histogram"]
    assert list(hist) == sorted(hist, key=size_bucket_order) and len(hist) > 1, hist


def test_faiss_loader_lines_are_not_shown():
    """Six faiss.loader INFO lines on every run, one reading like an error."""
    import logging

    from dedup.cli import _setup_logging

    _setup_logging(False)
    assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)
    assert logging.getLogger("faiss.loader").isEnabledFor(logging.WARNING)
