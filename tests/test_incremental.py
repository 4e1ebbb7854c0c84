"""Incremental runs: day-2 against day-1 gives the same decisions as a full run over both."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from dedup.config import load_config
from dedup.errors import SchemaMismatchError
from dedup.runner import run_pipeline


@pytest.mark.slow
def test_incremental_equals_full_run_for_day2_samples(synth_shards, tmp_path):
    shards, truth = synth_shards
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    day1, day2 = tars[:2], tars[2:]
    # Older data ranks first (shard ids sort by day): the policy that makes increments exact.
    kw = {"methods": ["exact", "phash", "dhash", "embedding"], "embedding.spec": "pixel", "run.workers": 1,
          "clusters.keeper_policy": ["sample_id"],
          # equal to a full run by construction with keeper-centred clusters (docs/operations.md)
          "clusters.grouping": "keeper", "embedding.threshold": 0.95}
    cfg = load_config(None, None, **kw)
    assert run_pipeline(tars, str(tmp_path / "full"), cfg, progress=False).exit_code == 0
    assert run_pipeline(day1, str(tmp_path / "day1"), cfg, progress=False).exit_code == 0
    out = run_pipeline(day2, str(tmp_path / "day2"), cfg, progress=False, against=str(tmp_path / "day1"), merge=True)
    assert out.exit_code == 0, out.stats
    full = {r["sample_id"]: r for r in pq.read_table(tmp_path / "full" / "manifest.parquet").to_pylist()}
    delta = pq.read_table(tmp_path / "day2" / "manifest.parquet").to_pylist()
    day2_ids = {s.sample_id for s in truth.samples if s.shard_id in ("shard-00002", "shard-00003")}
    assert {r["sample_id"] for r in delta} == day2_ids
    for r in delta:
        f = full[r["sample_id"]]
        assert (r["is_keeper"], r["cluster_id"], r["cluster_size"]) == (f["is_keeper"], f["cluster_id"], f["cluster_size"]), r["sample_id"]
    assert out.stats["duplicates_of_previous"] > 0  # cross-day copies were found against day 1
    merged = pq.read_table(tmp_path / "day2" / "merged_manifest.parquet").to_pylist()
    assert len(merged) == len(full)
    for r in merged:
        f = full[r["sample_id"]]
        assert (r["is_keeper"], r["cluster_id"], r["cluster_size"]) == (f["is_keeper"], f["cluster_id"], f["cluster_size"])
    # A different model is refused with a clear message.
    other = load_config(None, None, **{**kw, "embedding.spec": "pixel:8"})
    with pytest.raises(SchemaMismatchError, match="same model"):
        run_pipeline(day2, str(tmp_path / "day2b"), other, progress=False, against=str(tmp_path / "day1"))
    # The same model with other features (here: decode settings; or a dedup version that prepares
    # images differently) says how to get a compatible previous run.
    other = load_config(None, None, **{**kw, "decode.draft": False})
    with pytest.raises(SchemaMismatchError, match="run it again with this version first"):
        run_pipeline(day2, str(tmp_path / "day2d"), other, progress=False, against=str(tmp_path / "day1"))
    # The keepers' index was cached in the previous run and is reused.
    assert (tmp_path / "day1" / "index" / "keepers" / "vectors.f16.npy").exists()
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "run", *day2, "--out", str(tmp_path / "day2c"), "--against", str(tmp_path / "day1"),
                        "--embedder", "pixel", "--set", "clusters.keeper_policy=[sample_id]", "--set", "clusters.grouping=keeper", "--set", "embedding.threshold=0.95", "-q", "-w", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "day2c" / "manifest.parquet").equals(pq.read_table(tmp_path / "day2" / "manifest.parquet"))
    # A previous run whose index/ cannot be written (here a file where the directory should
    # be; a read-only copy behaves alike): the embeddings are staged in the temp dir, the index
    # is built in memory, and the result is the same.
    import shutil

    shutil.rmtree(tmp_path / "day1" / "index")
    (tmp_path / "day1" / "index").write_text("not a directory")
    out = run_pipeline(day2, str(tmp_path / "day2d"), cfg, progress=False, against=str(tmp_path / "day1"))
    assert out.exit_code == 0, out.stats
    assert pq.read_table(tmp_path / "day2d" / "manifest.parquet").equals(pq.read_table(tmp_path / "day2" / "manifest.parquet"))
    assert (tmp_path / "day1" / "index").read_text() == "not a directory"


@pytest.mark.slow
def test_incremental_through_the_ivf_keepers_index(synth_shards, tmp_path, monkeypatch):
    """The same day-2 decisions as a full run when the previous keepers' embeddings go through
    the IVF index (normally from 50 000 keepers; forced here), built, cached and reloaded.
    A fixed threshold: an auto one is chosen per run, for each run's own n."""
    import dedup.compute.crossmatch as crossmatch

    monkeypatch.setattr(crossmatch, "FLAT_MAX", 10)
    shards, truth = synth_shards
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    day1, day2 = tars[:2], tars[2:]
    cfg = load_config(None, None, **{"methods": ["embedding"], "embedding.spec": "pixel", "run.workers": 1,
                                     "clusters.keeper_policy": ["sample_id"],
          # equal to a full run by construction with keeper-centred clusters (docs/operations.md)
          "clusters.grouping": "keeper", "embedding.threshold": 0.95})
    assert run_pipeline(tars, str(tmp_path / "full"), cfg, progress=False).exit_code == 0
    assert run_pipeline(day1, str(tmp_path / "day1"), cfg, progress=False).exit_code == 0
    out = run_pipeline(day2, str(tmp_path / "day2"), cfg, progress=False, against=str(tmp_path / "day1"))
    assert out.exit_code == 0, out.stats
    assert (tmp_path / "day1" / "index" / "keepers" / "ivf.npz").exists()  # an IVF was built and cached
    full = {r["sample_id"]: r for r in pq.read_table(tmp_path / "full" / "manifest.parquet").to_pylist()}
    delta = pq.read_table(tmp_path / "day2" / "manifest.parquet").to_pylist()
    assert delta and any(r["cluster_id"] and r["cluster_id"].startswith(("shard-00000", "shard-00001")) for r in delta)
    for r in delta:
        f = full[r["sample_id"]]
        assert (r["is_keeper"], r["cluster_id"]) == (f["is_keeper"], f["cluster_id"]), r["sample_id"]
    # again, from the cached index (loaded, not rebuilt: its files stay untouched): the same delta
    cached = tmp_path / "day1" / "index" / "keepers" / "ivf.npz"
    stamp = cached.stat().st_mtime_ns
    again = run_pipeline(day2, str(tmp_path / "day2b"), cfg, progress=False, against=str(tmp_path / "day1"))
    assert again.exit_code == 0 and cached.stat().st_mtime_ns == stamp
    assert pq.read_table(tmp_path / "day2b" / "manifest.parquet").equals(pq.read_table(tmp_path / "day2" / "manifest.parquet"))
