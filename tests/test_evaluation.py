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


# -- eval on a tiny hash-only run: labels, undefined metrics, unusable pairs, usage errors -----
import math  # noqa: E402

from dedup.errors import ConfigError  # noqa: E402
from dedup.evaluation import eval_run  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinyrun import tiny_run

    return tiny_run(tmp_path_factory.mktemp("evalrun"))


def _csv(path, rows, header=("a", "b", "is_duplicate")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return str(path)


# s0/0004 is an exact copy of s0/0000, s0/0005 a JPEG q40 copy of s0/0001; 0000..0003 unrelated.
DUPS = [("s0/0000", "s0/0004"), ("s0/0001", "s0/0005")]
NONDUPS = [("s0/0000", "s0/0002"), ("s0/0002", "s0/0003"), ("s0/0001", "s0/0003")]


@pytest.mark.parametrize("yes, no", [("1.0", "0.0"), ("1", "0"), ("True", "false"), ("YES", "no"), (" 1 ", "0.00")])
def test_eval_reads_float_and_word_labels(tiny, tmp_path, yes, no):
    _, run, _ = tiny
    pairs = _csv(tmp_path / "p.csv", [(a, b, yes) for a, b in DUPS] + [(a, b, no) for a, b in NONDUPS])
    res = eval_run(str(run), pairs, out_prefix=str(tmp_path / "ev"))
    assert (res["pairs"], res["positives"], res["negatives"]) == (5, 2, 3)
    comb = res["at_configured_thresholds"]["combined"]
    assert comb["precision"] == 1.0 and comb["recall"] == 1.0


def test_eval_unknown_label_is_an_error_naming_line_and_value(tiny, tmp_path):
    _, run, _ = tiny
    pairs = _csv(tmp_path / "p.csv", [(*DUPS[0], "1"), (*NONDUPS[0], "dup")])
    with pytest.raises(ConfigError, match=r"line 3: is_duplicate 'dup' is not a label"):
        eval_run(str(run), pairs, out_prefix=str(tmp_path / "ev"))
    with pytest.raises(ConfigError, match="'2'"):
        eval_run(str(run), _csv(tmp_path / "q.csv", [(*DUPS[0], "2")]), out_prefix=str(tmp_path / "ev"))


def test_eval_one_class_reports_undefined_never_one(tiny, tmp_path):
    _, run, _ = tiny
    res = eval_run(str(run), _csv(tmp_path / "p.csv", [(a, b, 1) for a, b in DUPS]), out_prefix=str(tmp_path / "pos"))
    comb = res["at_configured_thresholds"]["combined"]
    assert math.isnan(comb["precision"]) and comb["recall"] == 1.0
    assert any("precision is undefined" in w for w in res["warnings"])
    assert all(v is None for v in res["threshold_for_target_precision"].values())
    saved = json.loads((tmp_path / "pos.json").read_text())
    assert saved["at_configured_thresholds"]["combined"]["precision"] is None
    res = eval_run(str(run), _csv(tmp_path / "n.csv", [(a, b, 0) for a, b in NONDUPS]), out_prefix=str(tmp_path / "neg"))
    for m, r in res["at_configured_thresholds"].items():
        assert math.isnan(r["recall"]) and math.isnan(r["precision"]), m  # nothing predicted, nothing to find
    assert any("recall and F1 are undefined" in w for w in res["warnings"])


def test_eval_skips_pairs_it_cannot_score_and_says_so(tiny, tmp_path, caplog):
    _, run, _ = tiny
    rows = [(a, b, 1) for a, b in DUPS] + [(a, b, 0) for a, b in NONDUPS]
    rows += [("s0/0000", "no/such", 0), ("s0/0006", "s0/0002", 0)]  # unknown id; undecodable sample
    res = eval_run(str(run), _csv(tmp_path / "p.csv", rows), out_prefix=str(tmp_path / "ev"))
    assert res["pairs"] == 5 and res["skipped"] == {"not_in_run": 1, "no_features": 1}
    assert "skipped 2 of 7 labelled pairs" in caplog.text and "'no/such'" in caplog.text and "decode_error" in caplog.text
    with pytest.raises(ConfigError, match="none of the 2 labelled pairs"):
        eval_run(str(run), _csv(tmp_path / "q.csv", rows[-2:]), out_prefix=str(tmp_path / "ev"))


def test_eval_usage_errors_are_one_line(tiny, tmp_path):
    _, run, _ = tiny
    good = _csv(tmp_path / "good.csv", [(*DUPS[0], 1)])
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "notrun").mkdir()
    cases = [
        (str(run), str(tmp_path / "missing.csv"), "--pairs file not found"),
        (str(run), str(tmp_path), "is not a file"),
        (str(run), str(tmp_path / "empty.csv"), "is empty"),
        (str(run), _csv(tmp_path / "h.csv", []), "no labelled pairs"),
        (str(run), _csv(tmp_path / "c.csv", [("x", "y")], header=("x", "y")), "columns a,b,is_duplicate"),
        (str(run), _csv(tmp_path / "s.csv", [("s0/0000",)]), "line 2: 1 field"),
        (str(tmp_path / "nope"), good, "does not exist"),
        (str(tmp_path / "notrun"), good, "not a finished dedup run"),
    ]
    for run_dir, pairs, words in cases:
        with pytest.raises(ConfigError, match=words) as ei:
            eval_run(run_dir, pairs, out_prefix=str(tmp_path / "ev"))
        assert "\n" not in str(ei.value)


def test_eval_cli_missing_run_or_pairs_exits_2(tiny, tmp_path):
    _, run, _ = tiny
    good = _csv(tmp_path / "good.csv", [(*DUPS[0], 1)])
    for args in ([str(tmp_path / "nope"), "--pairs", good], [str(run), "--pairs", str(tmp_path / "missing.csv")]):
        r = subprocess.run([sys.executable, "-m", "dedup.cli", "eval", *args], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:"), r.stderr
