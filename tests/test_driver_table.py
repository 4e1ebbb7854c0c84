"""The driver's features table is compact (issue #18): no ``key`` column (the manifest derives
it from sample_id and shard_id), ``shard_id`` / ``status`` / ``error`` dictionary-encoded; the
written manifest keeps plain string columns and the keys the shards gave."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.config import load_config
from dedup.io.rundir import RunDir
from dedup.phases.candidates import load_features
from dedup.records import sample_keys, status_mask
from dedup.runner import run_pipeline
from dedup.schema import MANIFEST_SCHEMA
from tinyrun import jpeg, write_shard

# shard ids with "/" and "." (one a prefix of another, so their rows interleave in sample_id
# order), keys with "/" and "." (a member in a directory)
SHARDS = {
    "a": ["0001", "c/0002", "v1.0/0003", "z"],
    "a/b": ["0001", "d.e/0002"],
    "2024.01/part.7": ["x/y/0001", "0002"],
}


def _image(k: int) -> bytes:
    im = Image.new("RGB", (64, 48), (40 * k % 256, 90, 160))
    for x in range(0, 64, 8):
        for y in range(0, 48, 6):
            im.putpixel((x, y), ((x * k) % 256, (y * 7) % 256, 20))
    return jpeg(im)


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str]]]:
    root = tmp_path_factory.mktemp("table")
    shards = root / "shards"
    expect: dict[str, tuple[str, str]] = {}  # sample_id -> (shard_id, key)
    k = 0
    for sid, keys in SHARDS.items():
        path = shards / f"{sid}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        members = []
        for key in keys:
            # every third sample an exact copy of the first (clusters name a keeper), one broken
            data = b"not an image" if key == "z" else _image(0 if k % 3 == 0 else k)
            members.append((f"{key}.jpg", data))
            expect[f"{sid}/{key}"] = (sid, key)
            k += 1
        write_shard(path, members)
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    run_pipeline([str(shards)], str(root / "run"), cfg, progress=False)
    return root / "run", expect


def test_driver_table_compact(nested_run):
    run_dir, expect = nested_run
    run = RunDir(str(run_dir))
    fs = load_features(run, sorted(SHARDS), with_embeddings=False)
    t = fs.table
    assert "key" not in t.column_names
    for name in ("shard_id", "status", "error"):
        assert pa.types.is_dictionary(t.schema.field(name).type), name
        assert t.schema.field(name).type.index_type == pa.int8()
    for name in ("width", "height"):  # 64 × 48 pixels
        assert t.schema.field(name).type == pa.uint8(), name
    assert t.schema.field("file_size").type == pa.uint16()
    assert t["sample_id"].to_pylist() == sorted(expect)
    assert t["shard_id"].to_pylist() == [expect[s][0] for s in sorted(expect)]
    assert sample_keys(t["sample_id"], t["shard_id"]).to_pylist() == [expect[s][1] for s in sorted(expect)]
    assert fs.ok().tolist() == [not s.endswith("/z") for s in sorted(expect)]
    assert t["status"].to_pylist().count("decode_error") == 1


def test_manifest_keys_and_types(nested_run):
    run_dir, expect = nested_run
    m = pq.read_table(run_dir / "manifest.parquet")
    assert m.schema.remove_metadata() == MANIFEST_SCHEMA.remove_metadata()  # plain strings, no dictionaries
    assert sorted(m["sample_id"].to_pylist()) == sorted(expect)
    for sid, shard, key in zip(m["sample_id"].to_pylist(), m["shard_id"].to_pylist(), m["key"].to_pylist()):
        assert (shard, key) == expect[sid]
        assert sid == f"{shard}/{key}"
    assert m["is_keeper"].to_pylist().count(False) >= 2  # the exact copies: clusters were formed


def test_sample_keys_slices_chunks_and_checks():
    shards = ["a/b", "a", "x.y", "", "é/ü"]
    keys = ["c/d.e", "b", "", "z", "ñ/ö"]
    ids = pa.array([f"{s}/{k}" for s, k in zip(shards, keys)])
    for sh in (pa.array(shards), pa.array(shards).dictionary_encode()):
        assert sample_keys(ids, sh).to_pylist() == keys
        assert sample_keys(ids.slice(1, 3), sh.slice(1, 3)).to_pylist() == keys[1:4]
        assert sample_keys(pa.chunked_array([ids[:2], ids[2:]]), sh).to_pylist() == keys
    assert sample_keys(pa.array([], pa.string()), pa.array([], pa.string())).to_pylist() == []
    with pytest.raises(ValueError, match="does not start"):
        sample_keys(pa.array(["ab/c"]), pa.array(["a"]))
    with pytest.raises(ValueError, match="does not start"):
        sample_keys(pa.array(["a"]), pa.array(["abc"]))


def test_status_mask():
    plain = pa.chunked_array([pa.array(["ok", "empty", None]), pa.array(["ok"])])
    want = [True, False, False, True]
    assert status_mask(plain, "ok").tolist() == want
    assert status_mask(plain.combine_chunks().dictionary_encode(), "ok").tolist() == want
    assert status_mask(pa.array(["empty"]).dictionary_encode(), "ok").tolist() == [False]
    assert status_mask(pa.chunked_array([], pa.string()), "ok").tolist() == []


def _noise(seed: int, size: int) -> bytes:
    import numpy as np

    px = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return jpeg(Image.fromarray(px), 95)


def test_incremental_against_other_types(tmp_path):
    """Day 1's keepers (file sizes past 64 KiB, 300 px: narrowed to uint32 / uint16) meet day 2's
    samples (small: uint16 / uint8) in one table; a copy of a day-1 sample is found."""
    assert len(_noise(1, 300)) > 2**16
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    for k in range(2):
        (day1 / f"d1.{k}").mkdir(parents=True)
        write_shard(day1 / f"d1.{k}" / "p.tar", [(f"big{k}.jpg", _noise(10 + k, 300)), (f"v.1/small{k}.jpg", _image(k + 1))])
    run_pipeline([str(day1)], str(tmp_path / "run1"), cfg, progress=False)
    (day2 / "d2").mkdir(parents=True)
    write_shard(day2 / "d2" / "p.tar", [("copy.jpg", _image(1)), ("new.jpg", _image(7))])
    out = run_pipeline([str(day2)], str(tmp_path / "run2"), cfg, progress=False, against=str(tmp_path / "run1"))
    t1 = load_features(RunDir(str(tmp_path / "run1")), ["d1.0/p", "d1.1/p"], with_embeddings=False).table
    t2 = load_features(RunDir(str(tmp_path / "run2")), ["d2/p"], with_embeddings=False).table
    assert (t1.schema.field("file_size").type, t2.schema.field("file_size").type) == (pa.uint32(), pa.uint16())
    assert (t1.schema.field("width").type, t2.schema.field("width").type) == (pa.uint16(), pa.uint8())
    m = pq.read_table(tmp_path / "run2" / "manifest.parquet")
    assert m.schema.remove_metadata() == MANIFEST_SCHEMA.remove_metadata()
    assert m["key"].to_pylist() == ["copy", "new"] and m["shard_id"].to_pylist() == ["d2/p"] * 2
    assert m["cluster_id"].to_pylist()[0] == "d1.0/p/v.1/small0"  # the copy's keeper: day 1's sample
    assert out.stats["duplicates_of_previous"] == 1


def test_prefix_table_gives_the_same_pairs_ranks_and_manifest(nested_run):
    """The run's global phases load sha256 as 8-byte prefixes (``digests=False``) and read whole
    digests from the features files where prefixes repeat: the same digests row by row (file
    rows interleave in sample_id order here), the same exact pairs, copy counts and manifest as
    from a table holding the digests."""
    import numpy as np

    from dedup.phases.candidates import find_pairs
    from dedup.phases.digests import sha_prefixes
    from dedup.phases.manifest import cluster_manifest, keeper_rank

    run = RunDir(str(nested_run[0]))
    full = load_features(run, sorted(SHARDS), with_embeddings=False)
    lean = load_features(run, sorted(SHARDS), with_embeddings=False, digests=False)
    assert "sha256" not in lean.table.column_names and lean.table.schema.field("sha256_prefix").type == pa.uint64()
    pf, kf = sha_prefixes(full.table)
    pl, kl = sha_prefixes(lean.table)
    assert np.array_equal(pf, pl) and np.array_equal(kf, kl)
    rows = np.array([5, 0, 3, 3, 7, 1])
    (da, ka), (db, kb) = full.digests(rows), lean.digests(rows)
    assert np.array_equal(da, db) and np.array_equal(ka, kb)
    want = full.table["sha256"].take(pa.array(rows)).to_pylist()
    assert [bytes(d) if k else None for d, k in zip(db, kb)] == want
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "clusters.keeper_policy": ["-copies", "sample_id"]})
    a, b = find_pairs(cfg, full), find_pairs(cfg, lean)
    assert a.table.equals(b.table) and a.info["pairs"]["exact"] >= 1
    assert np.array_equal(keeper_rank(cfg, full.table), keeper_rank(cfg, lean.table, digests=lean.digests))
    ma, _ = cluster_manifest(cfg, full.table, a.table, rows=a.rows)
    mb, _ = cluster_manifest(cfg, lean.table, b.table.select(["method", "score"]), rows=b.rows, digests=lean.digests)
    assert ma.to_table().equals(mb.to_table())
