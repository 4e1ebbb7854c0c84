"""`dedup eval` and `dedup calibrate` run and write their outputs; numbers behave."""

import csv
import json
import subprocess
import sys

import pytest

from dedup.config import load_config
from dedup.evaluation import calibrate_images
from dedup.runner import run_pipeline
from dedup.testing.synth import real_photos


def test_calibrate_hashes_catch_mild_edits_and_miss_flips():
    cfg = load_config(None, None, methods=["exact", "phash", "dhash"])
    res = calibrate_images(real_photos(256)[:6], cfg)
    rec = res["recall"]
    assert rec["reencode_q40"]["phash"] == 1.0 and rec["resize_50"]["phash"] == 1.0
    assert rec["flip"]["phash"] == 0.0  # pHash is not flip-invariant: calibrate must show it
    assert res["false_positive_rate"]["combined"] == 0.0  # the photos are unrelated
    assert all(r["combined"] >= max(r["phash"], r["dhash"]) for r in rec.values())


@pytest.mark.slow
def test_eval_cli_writes_curves_and_plot(synth_shards, tmp_path):
    shards, truth = synth_shards
    run = tmp_path / "run"
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash", "embedding"], "embedding.spec": "pixel", "run.workers": 1})
    assert run_pipeline([str(shards)], str(run), cfg, progress=False).exit_code == 0
    dup = sorted(truth.duplicate_pairs())
    ids = sorted(s.sample_id for s in truth.samples)
    neg = [(a, b) for a, b in zip(ids, ids[1:]) if (a, b) not in truth.duplicate_pairs()][:40]
    labelled = tmp_path / "pairs.csv"
    with open(labelled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "is_duplicate"])
        w.writerows([(a, b, 1) for a, b in dup] + [(a, b, 0) for a, b in neg])
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "eval", str(run), "--pairs", str(labelled)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "eval.json").read_text())
    assert summary["pairs"] == len(dup) + len(neg) and summary["positives"] == len(dup)
    assert (run / "eval.png").stat().st_size > 1000 and (run / "eval.parquet").exists()
    comb = summary["at_configured_thresholds"]["combined"]
    assert comb["recall"] >= summary["at_configured_thresholds"]["phash"]["recall"]
    # A bad CSV is a usage error, not a traceback.
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "eval", str(run), "--pairs", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
