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


def test_changed_input_shard_leaves_no_partial_output(finished_run, tmp_path):
    """A shard that no longer matches the manifest is refused, and neither its clean shard nor
    a temp file is left behind (the output is streamed to a temp name, renamed only when whole)."""
    import shutil

    from dedup.errors import DedupError
    from dedup.phases.apply import apply_run

    shards, run = finished_run
    src = tmp_path / "shards"
    shutil.copytree(shards, src)
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    first = sorted(src.glob("*.tar"))[0]
    for done in (run2 / "done").glob("*.json"):  # point the run at the copies
        done.write_text(done.read_text().replace(str(shards), str(src)))
    with tarfile.open(first, "w"):  # the shard is now empty
        pass
    clean = tmp_path / "clean"
    with pytest.raises(DedupError, match="changed since the run"):
        apply_run(str(run2), str(clean))
    left = [p.name for p in clean.rglob("*") if p.is_file()]
    assert first.name not in left
    assert not [n for n in left if n.startswith(".tmp-")]


def test_open_atomic_remote_uploads_only_complete_files():
    import fsspec

    from dedup.io.rundir import RunDir

    rd = RunDir("memory://atomic-test")
    fs = fsspec.filesystem("memory")
    with pytest.raises(RuntimeError):
        with rd.open_atomic(rd.p("a.tar")) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not fs.exists("/atomic-test/a.tar")
    with rd.open_atomic(rd.p("b.tar")) as f:
        f.write(b"x" * 100_000)
    assert fs.cat("/atomic-test/b.tar") == b"x" * 100_000


def test_apply_streams_one_shard_at_a_time_and_handles_nested_shard_ids(tmp_path):
    """`dedup apply` holds one shard's kept keys at a time (the manifest is in sample_id order,
    so a shard's rows are consecutive) — except when one shard id is another's directory
    ("a" beside "a/b": "a/b/m0" sorts between "a/a1" and "a/z0"), where it falls back to every
    kept key at once. Both ways every kept sample is written, nothing else."""
    import io

    import numpy as np
    from PIL import Image

    from dedup.io.rundir import RunDir
    from dedup.phases.apply import apply_run, keep_set, shard_rows

    def jpeg(seed):
        im = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    layout = {src / "a.tar": ["a0", "a1", "z0", "z1"], src / "a" / "b.tar": ["m0", "m1"], src / "c.tar": ["x0", "x1"]}
    seed = 0
    for path, keys in layout.items():
        with wds.TarWriter(str(path)) as tw:
            for k in keys:
                seed += 1
                # every second sample repeats the previous one's bytes: an exact duplicate
                tw.write({"__key__": k, "jpg": jpeg(seed - (seed % 2 == 0))})
    run = tmp_path / "run"
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    assert run_pipeline([str(src)], str(run), cfg, progress=False).exit_code == 0
    rows, consecutive = shard_rows(RunDir(str(run)))
    assert set(rows) == {"a", "a/b", "c"} and sum(rows.values()) == 8
    assert not consecutive  # "a/b/m0" sorts between "a/a1" and "a/z0"
    keys, _ = keep_set(RunDir(str(run)))
    summary = apply_run(str(run), str(tmp_path / "clean"))
    assert summary["samples_written"] == summary["expected"] == sum(len(v) for v in keys.values()) == 4
    for sid, want in keys.items():
        got = {s["__key__"] for s in wds.WebDataset(str(tmp_path / "clean" / f"{sid}.tar"), shardshuffle=False)}
        assert got == want, sid

    # without the nested shard: consecutive rows, streamed, the same result for the others
    import shutil

    shutil.rmtree(src / "a")
    run2 = tmp_path / "run2"
    assert run_pipeline([str(src)], str(run2), cfg, progress=False).exit_code == 0
    rows2, consecutive2 = shard_rows(RunDir(str(run2)))
    assert consecutive2 and list(rows2) == ["a", "c"]
    summary2 = apply_run(str(run2), str(tmp_path / "clean2"))
    assert summary2["samples_written"] == 3 and summary2["shards"] == 2
    for sid in ("a", "c"):
        got = {s["__key__"] for s in wds.WebDataset(str(tmp_path / "clean2" / f"{sid}.tar"), shardshuffle=False)}
        assert got == keys[sid], sid
