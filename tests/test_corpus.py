"""Nothing lost: the whole bad-input corpus through `dedup run`, one row per sample read."""

import json

import pyarrow.parquet as pq
import pytest

from dedup.config import load_config
from dedup.runner import run_pipeline
from dedup.testing.corpus import make_bad_corpus


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    paths, expected = make_bad_corpus(base / "in")
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash", "embedding"], "embedding.spec": "pixel", "run.workers": 1})
    outcome = run_pipeline(paths, str(base / "run"), cfg, progress=False)
    return base / "run", outcome, expected


def test_every_readable_sample_has_a_row_with_the_expected_status(corpus_run):
    run, outcome, expected = corpus_run
    rows = pq.read_table(run / "manifest.parquet").to_pylist()
    got = {r["sample_id"]: r["status"] for r in rows}
    assert len(rows) == len(got), "one row per sample"
    assert got == expected.sample_rows
    for lost in expected.lost:
        assert lost not in got
    for r in rows:
        if r["status"] != "ok":
            assert r["error"], f"{r['sample_id']} has no error message"
            assert r["is_keeper"] is False and r["cluster_id"] is None


def test_shard_conditions_exit_code_and_stats(corpus_run):
    run, outcome, expected = corpus_run
    assert outcome.exit_code == 3  # truncated, empty and missing shards
    stats = json.loads((run / "stats.json").read_text())
    failed = stats["shards"]["failed"]
    for shard_id, flag in expected.shard_flags.items():
        if flag == "ok":
            assert shard_id not in failed
        else:
            assert shard_id in failed and flag in failed[shard_id], (shard_id, failed.get(shard_id))
    counts = {}
    for s in expected.sample_rows.values():
        counts[s] = counts.get(s, 0) + 1
    assert stats["status_counts"] == dict(sorted(counts.items()))
    assert stats["partial"] is True
    assert pq.read_schema(run / "manifest.parquet").metadata[b"partial"] == b"true"


def test_decode_traps(corpus_run):
    run, _, expected = corpus_run
    rows = {r["sample_id"]: r for r in pq.read_table(run / "manifest.parquet").to_pylist()}
    # The EXIF-rotated copy is found as a duplicate of its upright original.
    for copy, orig in expected.duplicates.items():
        assert rows[copy]["cluster_id"] == rows[orig]["cluster_id"]
    # The 16-bit grey PNG did not turn white (a white image's pHash is all zeros after the DC bit).
    gray16 = next(r for sid, r in rows.items() if sid.endswith("/gray16"))
    assert gray16["phash"] not in (None, 0, 0x8000000000000000)
    dup = next(r for sid, r in rows.items() if sid.endswith("/dupname"))
    assert "duplicate member" in (dup["error"] or "")
    nc = next(r for sid, r in rows.items() if sid.endswith("/noncontig"))
    assert nc["status"] == "ok" and "not contiguous" in (nc["error"] or "")
