"""`dedup apply`: clean shards hold exactly the kept samples, byte-identical; keep-list; resume."""

import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dedup.config import load_config
from dedup.runner import run_pipeline


@pytest.fixture(scope="module")
def finished_run(synth_shards, tmp_path_factory):
    shards, _ = synth_shards
    out = tmp_path_factory.mktemp("apply") / "run"
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    assert run_pipeline([str(shards)], str(out), cfg, progress=False).exit_code == 0
    return shards, out


def _members(tar_path):
    out = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                out[m.name] = tf.extractfile(m).read()
    return out


def test_apply_writes_exactly_the_kept_samples_byte_identical(finished_run, tmp_path):
    shards, run = finished_run
    clean = tmp_path / "clean"
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "apply", str(run), "--out", str(clean), "--keep-list", str(tmp_path / "keep.txt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = pq.read_table(run / "manifest.parquet").to_pylist()
    kept = {r["sample_id"] for r in m if r["is_keeper"]}
    dropped = {r["sample_id"] for r in m if not r["is_keeper"]}
    assert dropped, "the synthetic shards have planted duplicates, some must be dropped"
    assert set((tmp_path / "keep.txt").read_text().split()) == kept

    # Read the clean shards back with webdataset: exactly the kept samples.
    urls = sorted(str(p) for p in clean.glob("*.tar"))
    got = set()
    for url in urls:
        shard_id = url.rsplit("/", 1)[1][: -len(".tar")]
        for sample in wds.WebDataset(url, shardshuffle=False):
            got.add(f"{shard_id}/{sample['__key__']}")
    assert got == kept
    # Every member of every kept key, byte-identical to the input shard.
    for src in sorted(shards.glob("*.tar")):
        before = _members(src)
        after = _members(clean / src.name)
        sid = src.name[: -len(".tar")]
        expect = {name: data for name, data in before.items() if f"{sid}/{name.split('.', 1)[0]}" in kept}
        assert after == expect


def test_apply_resumes_and_skips_finished_shards(finished_run, tmp_path):
    from dedup.phases.apply import apply_run

    _, run = finished_run
    first = apply_run(str(run), str(tmp_path / "clean"))
    assert first["samples_written"] == first["expected"] and first["skipped"] == 0
    second = apply_run(str(run), str(tmp_path / "clean"))
    assert second["shards"] == 0 and second["skipped"] == first["shards"]
    assert second["samples_written"] == first["samples_written"]
