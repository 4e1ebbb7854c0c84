"""Fast tests of dedup.testing.variants: the variant makers and the group scorer on hand-made
clusterings (no pipeline run)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from dedup.testing.variants import (
    LIGHT_EDITS, STRONG_EDITS, Member, jpeg_bytes, largest_keepers, letterbox, make_variant, paste_on_canvas,
    score_clusters, union_find_components, write_members,
)


def _img(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _decode(b):
    return Image.open(io.BytesIO(b))


@pytest.mark.parametrize("edit", LIGHT_EDITS + STRONG_EDITS + ("shift_1px", "brightness_up10", "brightness_down10"))
def test_every_edit_decodes(edit):
    im = _img()
    ob = jpeg_bytes(im, 95)
    data, ext = make_variant(im, edit, np.random.default_rng(0), original_bytes=ob)
    out = _decode(data)
    assert out.format == ("PNG" if ext == "png" else "JPEG")
    if edit == "exact":
        assert data == ob
    if edit in ("png_resave", "jpeg_q40", "hflip", "rotate_8", "text_overlay", "grayscale", "shift_1px"):
        assert out.size == im.size
    if edit == "resize_half":
        assert out.size == (32, 24)
    if edit == "canvas_paste":
        assert 1.6 * 64 - 1 <= out.width <= 2 * 64 + 1 and out.width == out.height


def test_unknown_edit_refused():
    with pytest.raises(ValueError):
        make_variant(_img(), "nope", np.random.default_rng(0))


def test_canvas_and_letterbox_geometry():
    im = _img(100, 50)
    c = paste_on_canvas(im, (200, 200), (255, 255, 255))
    a = np.asarray(c)
    assert c.size == (200, 200) and (a[0, 0] == 255).all() and (a[100, 100] == np.asarray(im)[25, 50]).all()
    assert letterbox(im).size == (100, 100)  # landscape -> 1:1, bars top and bottom
    assert letterbox(_img(50, 50)).size == (89, 50)  # square -> 16:9
    assert (np.asarray(letterbox(im))[0] == 0).all()


def test_write_members_shuffles_and_keeps_bytes(tmp_path):
    items = [(Member("", f"g{k // 2}", "original" if k % 2 == 0 else "exact"), jpeg_bytes(_img(seed=k // 2)), "jpg") for k in range(8)]
    ms = write_members(items, tmp_path / "s", n_shards=2, seed=1, folder=tmp_path / "img")
    assert len(ms) == 8 and len({m.sample_id for m in ms}) == 8
    assert sorted((tmp_path / "s").glob("*.tar")) and len(list((tmp_path / "img").iterdir())) == 8
    names = []
    for p in sorted((tmp_path / "s").glob("*.tar")):
        with tarfile.open(p) as tf:
            names += [n.name for n in tf.getmembers()]
    assert len(names) == 8
    for m in ms:  # the folder copy carries the same bytes as the tar member
        shard, key = m.sample_id.split("/")
        with tarfile.open(tmp_path / "s" / f"{shard}.tar") as tf:
            assert tf.extractfile(f"{key}.jpg").read() == (tmp_path / "img" / m.filename).read_bytes()


def _members():
    return [
        Member("a0", "A", "original"), Member("a1", "A", "exact"), Member("a2", "A", "jpeg_q40"),
        Member("a3", "A", "canvas_paste", canvas="canvas"),
        Member("b0", "B", "original"), Member("b1", "B", "hflip"),
        Member("n1", "n1", "negative", canvas="canvas"), Member("n2", "n2", "negative", canvas="canvas"),
        Member("n3", "n3", "negative"),
    ]


def test_scorer_split_group_wrong_keeper_and_canvas_pairs():
    ms = _members()
    # A's canvas copy lands with two unrelated canvas images (c2); B is found; n3 alone.
    ids = ["a0", "a1", "a2", "a3", "b0", "b1", "n1", "n2", "n3"]
    cids = ["c1", "c1", "c1", "c2", "c3", "c3", "c2", "c2", None]
    keep = [False, False, True, True, True, False, False, False, True]
    s = score_clusters(ms, ids, cids, keep)
    # predicted: c1 3 pairs, c2 3 pairs, c3 1 pair = 7; true: A 6 + B 1 = 7; TP = 3 + 1 = 4
    assert (s["predicted_pairs"], s["true_pairs"], s["true_positives"]) == (7, 7, 4)
    assert s["precision"] == pytest.approx(4 / 7) and s["recall"] == pytest.approx(4 / 7)
    assert s["split_groups"] == 1  # A over c1 and c2
    assert s["divided_groups"] == 0 and s["alone_copies"] == 1  # a3 has no other A in c2
    assert s["canvas_false_pairs"] == 3  # a3-n1, a3-n2, n1-n2
    assert s["keeper_original"] == 0.5  # A's keeper is the JPEG q40 copy (wrong), B's is the original
    assert s["light_recall"] == 1.0  # a1, a2 with a0
    assert s["strong_recall"] == 0.5  # b1 yes, a3 no
    assert s["per_edit"] == {"canvas_paste": 0.0, "exact": 1.0, "hflip": 1.0, "jpeg_q40": 1.0}


def test_scorer_exact_copy_counts_as_original_and_cross_class():
    ms = [Member("x0", "X", "original", label=1), Member("x1", "X", "exact", label=1),
          Member("y0", "Y", "negative", label=2), Member("z0", "Z", "negative", label=1)]
    s = score_clusters(ms, ["x0", "x1", "y0", "z0"], ["k", "k", "k", "z"], [False, True, False, True])
    assert s["keeper_original"] == 1.0  # the byte-identical copy is as good as the original
    assert s["predicted_pairs"] == 3 and s["cross_class_pairs"] == 2 and s["cross_class_share"] == pytest.approx(2 / 3)
    # a sample missing from the clustering is a singleton keeper
    s2 = score_clusters(ms, ["x0", "x1"], ["k", "k"], [True, False])
    assert s2["predicted_pairs"] == 1 and s2["split_groups"] == 0 and s2["keeper_original"] == 1.0


def test_scorer_divided_group_vs_copy_left_alone():
    ms = [Member(f"a{k}", "A", "original" if k == 0 else "jpeg_q40") for k in range(5)] + [Member("n", "n", "negative")]
    # A cut into two linked parts (a0 a1 | a2 a3) and a4 alone: divided, one copy alone
    s = score_clusters(ms, [m.sample_id for m in ms], ["c1", "c1", "c2", "c2", "c3", "c4"], [True] * 6)
    assert (s["split_groups"], s["divided_groups"], s["alone_copies"]) == (1, 1, 1)
    # one cluster and a copy left alone: spread, not divided
    s = score_clusters(ms, [m.sample_id for m in ms], ["c1", "c1", "c1", "c1", "c3", "c4"], [True] * 6)
    assert (s["split_groups"], s["divided_groups"], s["alone_copies"]) == (1, 0, 1)
    # whole: neither
    s = score_clusters(ms, [m.sample_id for m in ms], ["c1"] * 5 + ["c4"], [True] * 6)
    assert (s["split_groups"], s["divided_groups"], s["alone_copies"]) == (0, 0, 0)


def test_scorer_judges_only_pairs_touching_judged_samples():
    ms = [Member("p0", "P", "original"), Member("p1", "P", "jpeg_q40"),
          Member("u1", "u1", "negative"), Member("u2", "u2", "negative"), Member("u3", "u3", "negative")]
    # planted pair found; u1-u2 (an unlabelled pair of the corpus) and p0-u3 predicted too
    s = score_clusters(ms, ["p0", "p1", "u1", "u2", "u3"], ["a", "a", "b", "b", "a"], [True] * 5, judged={"p0", "p1"})
    assert s["predicted_pairs"] == 4 and s["true_positives"] == 1  # p0-p1, p0-u3, p1-u3, u1-u2
    assert s["judged_pairs"] == 3 and s["judged_precision"] == pytest.approx(1 / 3)
    assert s["precision"] == pytest.approx(1 / 4)
    assert "judged_f1" not in score_clusters(ms, ["p0"], ["a"], [True])


def test_union_find_and_largest_keepers():
    labels = union_find_components(5, np.array([0, 1]), np.array([1, 2]))
    assert labels[0] == labels[1] == labels[2] and len(set(labels.tolist())) == 3
    keep = largest_keepers(labels, np.array([10, 50, 50, 1, 1]), np.array([1, 1, 9, 1, 1]))
    assert keep.tolist() == [False, False, True, True, True]
