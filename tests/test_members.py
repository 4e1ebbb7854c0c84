"""Every tar member is accounted for, and the inputs a WebDataset user has are read.

Shards are real tar files (some with link, directory, hidden and extension-less members);
runs are real ``run_pipeline`` calls with hashes only. The accounting is checked against an
independent count with Python's :mod:`tarfile`.
"""

import gzip
import io
import json
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.config import load_config
from dedup.phases.apply import apply_run
from dedup.io.shards import ShardReadResult, iter_samples, list_shards, pick_image
from dedup.records import ShardRef
from dedup.runner import run_pipeline

# WebDataset's own key rule (webdataset.tariterators.base_plus_ext), written independently.
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def _jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    """A distinct noise picture per colour (flat pictures would all be near-duplicates)."""
    rng = np.random.default_rng(sum(c * 256**i for i, c in enumerate(color)))
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(b, "JPEG")
    return b.getvalue()


def _png(color=(30, 200, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(b, "PNG")
    return b.getvalue()


def _add(tf, name, data=b"", **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    if ti.isfile():
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def _odd_shard(path, fmt=tarfile.GNU_FORMAT):
    """A shard with every kind of member a real tar can hold."""
    with tarfile.open(path, "w", format=fmt) as tf:
        _add(tf, "a.jpg", _jpeg())
        _add(tf, "a.json", b'{"caption": "red"}')
        _add(tf, ".hidden.jpg", _jpeg((1, 2, 3)))
        _add(tf, "noext", _jpeg((4, 5, 6)))
        _add(tf, "sub", type=tarfile.DIRTYPE)
        _add(tf, "sub/b.jpg", _jpeg((9, 9, 200)))
        _add(tf, "link.jpg", type=tarfile.SYMTYPE, linkname="a.jpg")
        _add(tf, "hard.jpg", type=tarfile.LNKTYPE, linkname="a.jpg")
        _add(tf, "k.jpg", _jpeg((0, 100, 0)))
        _add(tf, "k.png", _png())
        _add(tf, "x.svg", _jpeg((50, 50, 50)))
        _add(tf, "x.txt", b"a caption")
        _add(tf, "t.txt", b"BMW parked outside, 1998")
        _add(tf, "t.json", b'{"caption": "BM"}')
        _add(tf, "fifo.jpg", type=tarfile.FIFOTYPE)
    return path


def _run(inputs, out):
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1, "run.max_error_fraction": 1.0})
    outcome = run_pipeline([str(i) for i in inputs], str(out), cfg, progress=False)
    return outcome, pq.read_table(out / "manifest.parquet").to_pylist()


def test_every_member_is_a_row_or_a_note_in_the_done_marker(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shard = _odd_shard(d / "odd.tar")
    _, rows = _run([d], tmp_path / "run")
    marker = json.loads((tmp_path / "run" / "done" / "odd.json").read_text())

    with tarfile.open(shard) as tf:  # independent count: every member, of every type
        members = tf.getmembers()
    keys = {r["key"] for r in rows}
    ignored = {i["name"]: i for i in marker["ignored_members"]}
    assert marker["members"] == len(members) == 15
    in_rows = [m.name for m in members if m.isfile() and _WDS_KEY.match(m.name) and _WDS_KEY.match(m.name)[1] in keys]
    # Each member is in exactly one of the two places, and together they are all members.
    assert not set(in_rows) & set(ignored)
    assert len(in_rows) + len(ignored) == len(members), (in_rows, sorted(ignored))
    assert sorted(keys) == ["a", "k", "sub/b", "t", "x"]

    assert ignored["sub"]["type"] == "directory"
    assert ignored["link.jpg"]["type"] == "symlink" and "link member" in ignored["link.jpg"]["why"]
    assert "not followed" in ignored["hard.jpg"]["why"] and ignored["hard.jpg"]["type"] == "hardlink"
    assert ignored["fifo.jpg"]["type"] == "fifo"
    assert "hidden dot-name" in ignored[".hidden.jpg"]["why"]
    assert "no extension" in ignored["noext"]["why"] and "JPEG image" in ignored["noext"]["why"]


def test_second_image_member_and_image_by_content_are_noted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _odd_shard(d / "odd.tar")
    _run([d], tmp_path / "run")
    by_key = {r["key"]: r for r in pq.read_table(tmp_path / "run" / "features" / "odd.parquet").to_pylist()}
    k = by_key["k"]
    assert k["status"] == "ok" and k["image_member"] == "jpg"
    assert "second image member 'k.png' ignored; 'k.jpg' used" in k["error"]
    x = by_key["x"]
    assert x["status"] == "ok" and x["image_member"] == "svg" and x["format"] == "JPEG"
    assert "image found by content in member 'x.svg' (JPEG)" in x["error"]
    # Text sidecars are never images, even when they start like a BMP ("BM").
    assert by_key["t"]["status"] == "no_image"


def test_noncontiguous_second_image_member_is_named(tmp_path):
    p = tmp_path / "nc.tar"
    with tarfile.open(p, "w") as tf:
        _add(tf, "k.jpg", _jpeg())
        _add(tf, "j.jpg", _jpeg((1, 1, 1)))
        _add(tf, "k.png", _png())
    _, rows = _run([p], tmp_path / "run")
    k = {r["key"]: r for r in rows}["k"]
    assert "second image member 'k.png' ignored; 'k.jpg' used" in k["error"]


def test_pick_image_prefers_extensions_and_never_sniffs_text():
    from dedup.io.shards import Sample

    s = Sample("k", {"txt": _jpeg(), "json": _png(), "bin": b"\x89PNG\r\n\x1a\n...."})
    ext, _, notes = pick_image(s, ("jpg", "png"))
    assert ext == "bin" and "(PNG)" in notes[0]
    assert pick_image(Sample("k", {"txt": _jpeg()}), ("jpg",))[0] is None


# --- .tar.gz / .tgz -------------------------------------------------------------------------


def _gz_shard(path, n=4, gz=True):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for i in range(n):
            _add(tf, f"s{i}.jpg", _jpeg((i * 40, 10, 10)))
            _add(tf, f"s{i}.txt", b"cap")
    path.write_bytes(gzip.compress(raw.getvalue()) if gz else raw.getvalue())
    return path


def _read(path):
    res = ShardReadResult()
    samples = list(iter_samples(ShardRef(str(path), "s"), res, ("jpg",)))
    return samples, res


def test_tar_gz_and_tgz_are_listed_and_read(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _gz_shard(d / "a.tar.gz")
    _gz_shard(d / "b.tgz")
    refs, _ = list_shards([str(d)])
    assert [r.shard_id for r in refs] == ["a", "b"]
    refs, _ = list_shards([str(d / "*")])
    assert [r.shard_id for r in refs] == ["a", "b"]
    samples, res = _read(d / "a.tar.gz")
    assert res.condition == "ok", res.error
    assert [s.key for s in samples] == ["s0", "s1", "s2", "s3"] and res.members == 8
    assert res.bytes_read == (d / "a.tar.gz").stat().st_size

    outcome, rows = _run([d / "a.tar.gz"], tmp_path / "run")
    assert outcome.exit_code == 0 and len(rows) == 4 and all(r["status"] == "ok" for r in rows)


def test_cut_tar_gz_is_truncated(tmp_path):
    full = _gz_shard(tmp_path / "full.tar.gz", n=6).read_bytes()
    # Cut in the middle of the compressed stream, and just before the gzip trailer (the tar
    # itself is then complete up to its padding: only gzip knows it was cut).
    for cut in (len(full) // 2, len(full) - 4):
        p = tmp_path / f"cut{cut}.tar.gz"
        p.write_bytes(full[:cut])
        samples, res = _read(p)
        assert res.condition == "truncated", (cut, res)
    # A damaged byte in the compressed stream (bad data or a CRC mismatch) never reads as ok.
    bad = bytearray(full)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "bad.tar.gz").write_bytes(bytes(bad))
    assert _read(tmp_path / "bad.tar.gz")[1].condition != "ok"
    # A gzipped tar cut exactly at a header boundary (re-compressed): the end-of-archive check
    # runs on the decompressed bytes.
    tar = gzip.decompress(full)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        cut = tf.getmembers()[4].offset  # header of the 5th member
    p = tmp_path / "hdr.tar.gz"
    p.write_bytes(gzip.compress(tar[:cut]))
    samples, res = _read(p)
    assert res.condition == "truncated" and "header boundary" in res.error


# --- input paths ----------------------------------------------------------------------------


def test_brace_expansions_share_their_static_prefix_as_root(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "coll" / sub).mkdir(parents=True)
        _gz_shard(tmp_path / "coll" / sub / "s.tar", n=1, gz=False)
    braced, _ = list_shards([str(tmp_path / "coll" / "{a,b}" / "s.tar")])
    globbed, _ = list_shards([str(tmp_path / "coll" / "*" / "s.tar")])
    assert [r.shard_id for r in braced] == [r.shard_id for r in globbed] == ["a/s", "b/s"]
    # A missing expansion keeps the same root.
    _, missing = list_shards([str(tmp_path / "coll" / "{a,c}" / "s.tar")])
    assert [m.shard_id for m in missing] == ["c/s"]


def test_one_file_under_two_spellings_is_one_input(tmp_path):
    (tmp_path / "wds").mkdir()
    _gz_shard(tmp_path / "wds" / "x.tar", n=1, gz=False)
    refs, _ = list_shards([str(tmp_path / "wds" / "x.tar"), str(tmp_path / "wds" / ".." / "wds" / "x.tar")])
    assert len(refs) == 1 and ".." not in refs[0].url


# --- apply keeps original headers -----------------------------------------------------------


def _raw_members(path):
    """name -> (header blocks as in the file, data) for the regular members of a plain tar."""
    blob = path.read_bytes()
    with tarfile.open(path) as tf:
        return {m.name: (blob[m.offset : m.offset_data], blob[m.offset_data : m.offset_data + m.size])
                for m in tf.getmembers() if m.isfile()}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_apply_copies_kept_members_with_their_original_header_bytes(tmp_path, fmt):
    d = tmp_path / "in"
    d.mkdir()
    long = "sub/" + "l" * 120  # GNU: a long-name header; PAX: an extended header; ustar: prefix field
    pax = {"comment": "global header"} if fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(d / "h.tar", "w", format=fmt, pax_headers=pax) as tf:
        _add(tf, "README", b"not a sample")  # never copied; a global PAX header before it is
        for i, name in enumerate(["a", "b", "sub/c" if fmt == tarfile.USTAR_FORMAT else long]):
            _add(tf, f"{name}.jpg", _jpeg((i, 7, 7)), uname="alice", gname="staff", mode=0o640, mtime=1234567890)
            _add(tf, f"{name}.json", b'{"caption": "x"}', uname="alice", gname="staff", mtime=1234567890)
        _add(tf, "link.jpg", type=tarfile.SYMTYPE, linkname="a.jpg")
    _run([d], tmp_path / "run")
    summary = apply_run(str(tmp_path / "run"), str(tmp_path / "clean"))
    assert summary["samples_written"] == 3 and summary["members_written"] == 6
    before, after = _raw_members(d / "h.tar"), _raw_members(tmp_path / "clean" / "h.tar")
    before.pop("README")
    assert list(after) == list(before)
    with tarfile.open(tmp_path / "clean" / "h.tar") as tf:
        assert tf.pax_headers == (pax or {})
    for name in before:
        assert after[name] == before[name], name  # header blocks and data, byte for byte


def test_apply_reads_tar_gz_and_writes_a_plain_tar(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _gz_shard(d / "z.tgz", n=3)
    _run([d], tmp_path / "run")
    summary = apply_run(str(tmp_path / "run"), str(tmp_path / "clean"))
    assert summary["samples_written"] == 3
    with tarfile.open(tmp_path / "clean" / "z.tar", "r:") as tf:
        assert len(tf.getmembers()) == 6
