import io
import tarfile

import pytest

from dedup.errors import ConfigError
from dedup.io.shards import ShardReadResult, image_member, iter_samples, list_shards
from dedup.records import ShardRef

IMG_EXTS = ("jpg", "png")


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def read(path):
    res = ShardReadResult()
    samples = list(iter_samples(ShardRef(str(path), "s"), res, IMG_EXTS))
    return samples, res


def test_listing_dirs_globs_braces_and_missing(tmp_path):
    for sub, name in [("a", "x-0.tar"), ("a", "x-1.tar"), ("a/nested", "y.tar"), ("b", "x-0.tar")]:
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        write_tar(tmp_path / sub / name, [("k.txt", b"t")])
    refs, missing = list_shards([str(tmp_path / "a")])
    assert [r.shard_id for r in refs] == ["nested/y", "x-0", "x-1"]
    refs, missing = list_shards([str(tmp_path / "a" / "x-{0..1}.tar"), str(tmp_path / "a" / "x-7.tar")])
    assert [r.shard_id for r in refs] == ["x-0", "x-1"] and [m.shard_id for m in missing] == ["x-7"]
    refs, _ = list_shards([str(tmp_path / "*" / "x-*.tar")])
    assert [r.shard_id for r in refs] == ["a/x-0", "a/x-1", "b/x-0"]
    # The same shard_id from two roots is refused (ids must be unique).
    with pytest.raises(ConfigError, match="same shard_id"):
        list_shards([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ConfigError, match="no .tar"):
        list_shards([str(tmp_path / "*.nothing")])
    refs, _ = list_shards(["file://" + str(tmp_path / "a" / "x-0.tar")])
    assert refs[0].url.startswith("file://") and refs[0].shard_id == "x-0"


def test_groups_by_webdataset_key_including_dotted_and_noncontiguous(tmp_path):
    p = write_tar(
        tmp_path / "t.tar",
        [("a.v2.jpg", b"A"), ("a.v2.json", b"{}"), ("dir/b.json", b"{}"), ("c.png", b"C"), ("c.png", b"C2"), ("dir/b.jpg", b"B")],
    )
    samples, res = read(p)
    assert res.condition == "ok", res.error
    # Non-contiguous members of dir/b come out as two runs with one key (the features phase merges them).
    assert [s.key for s in samples] == ["a", "dir/b", "c", "dir/b"]
    assert image_member(samples[0], IMG_EXTS) == ("v2.jpg", b"A")
    assert image_member(samples[1], IMG_EXTS) == (None, None) and image_member(samples[3], IMG_EXTS)[1] == b"B"
    # A repeated member name keeps the first and says so.
    assert samples[2].members["png"] == b"C" and "duplicate member" in samples[2].notes[0]


def test_truncation_inside_member_and_at_header_boundary(tmp_path):
    members = [(f"k{i}.jpg", bytes([i]) * 3000) for i in range(4)]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    samples, res = read(tmp_path / "full.tar")
    assert res.condition == "ok" and len(samples) == 4

    # Cut inside the data of the 3rd member: 2 samples ok, the 3rd has a read error.
    # Each member: 512 header + 3072 data (3000 padded).
    (tmp_path / "cut_data.tar").write_bytes(full[: 2 * 3584 + 512 + 1000])
    samples, res = read(tmp_path / "cut_data.tar")
    assert res.condition == "truncated"
    assert [s.key for s in samples] == ["k0", "k1", "k2"] and samples[2].read_error and not samples[1].read_error

    # Cut exactly at a header boundary: tarfile sees a shorter valid tar. We must flag it.
    (tmp_path / "cut_hdr.tar").write_bytes(full[: 2 * 3584])
    with tarfile.open(tmp_path / "cut_hdr.tar") as tf:
        assert len(tf.getmembers()) == 2  # the trap: no error from tarfile
    samples, res = read(tmp_path / "cut_hdr.tar")
    assert [s.key for s in samples] == ["k0", "k1"]
    assert res.condition == "truncated" and "header boundary" in res.error


def test_empty_missing_and_not_a_tar(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    assert read(tmp_path / "zero.tar")[1].condition == "empty"
    assert read(tmp_path / "missing.tar")[1].condition == "missing"
    (tmp_path / "junk.tar").write_bytes(b"x" * 2000)
    samples, res = read(tmp_path / "junk.tar")
    assert samples == [] and res.condition in ("unreadable", "truncated")
