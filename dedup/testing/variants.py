"""Image variant makers, group ground truth and a group-aware manifest scorer.

Used by ``benchmarks/quality_groups.py`` and reusable by tests. Nothing here is imported by the
pipeline itself.

Variants (``make_variant(image, edit, rng)`` → ``(bytes, ext)``), from an RGB PIL image:

*light*  ``exact`` (caller passes the original's bytes through), ``png_resave``, ``jpeg_q40``,
         ``resize_half``, ``crop_5pct``, ``brightness_15`` (+15 %), ``saturation`` (+35 %);
*strong* ``crop_30pct``, ``grayscale``, ``hflip``, ``rotate_8``, ``jpeg_q8``, ``text_overlay``,
         ``canvas_paste`` (centred on a plain white/grey/black square canvas 1.6–2× the long
         side), ``letterbox`` (black bars to 1:1 for landscape photos, 16:9 otherwise).

Ground truth is a list of :class:`Member`; :func:`score_clusters` scores any clustering (the
pipeline's manifest, or a peer tool's components) against it: pair precision/recall/F1, recall
per edit and per edit class, keeper-is-original share, split groups and false pairs among images
pasted on a shared canvas.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

LIGHT_EDITS = ("exact", "png_resave", "jpeg_q40", "resize_half", "crop_5pct", "brightness_15", "saturation")
STRONG_EDITS = ("crop_30pct", "grayscale", "hflip", "rotate_8", "jpeg_q8", "text_overlay", "canvas_paste", "letterbox")
CANVAS_COLOURS = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (0, 0, 0)}
_MTIME = 1_700_000_000


def jpeg_bytes(im: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as f:
        return f.convert("RGB")


def paste_on_canvas(im: Image.Image, size: tuple[int, int], colour=(255, 255, 255)) -> Image.Image:
    """``im`` centred on a plain canvas of ``size`` (shrunk to fit first if it is larger)."""
    im = im.convert("RGB")
    if im.width > size[0] or im.height > size[1]:
        im = im.copy()
        im.thumbnail(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", size, tuple(colour))
    canvas.paste(im, ((size[0] - im.width) // 2, (size[1] - im.height) // 2))
    return canvas


def letterbox(im: Image.Image, aspect: float | None = None, colour=(0, 0, 0)) -> Image.Image:
    """Black bars to ``aspect`` (w/h); default 1:1 for landscape photos (aspect ≥ 1.2), else 16:9."""
    w, h = im.size
    if aspect is None:
        aspect = 1.0 if w / h >= 1.2 else 16 / 9
    if w / h < aspect:
        size = (round(h * aspect), h)
    else:
        size = (w, round(w / aspect))
    return paste_on_canvas(im, size, colour)


def font(size: int):
    """Pillow's default font at ``size`` px (a fixed small bitmap font before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_overlay(im: Image.Image, text: str = "SALE  -50%  www.example.com") -> Image.Image:
    im = im.convert("RGB").copy()
    w, h = im.size
    draw = ImageDraw.Draw(im)
    size = max(8, h // 9)
    font_ = font(size)
    for k, y in enumerate((h // 10, h // 2 - size // 2, h - h // 10 - size)):
        draw.text((w // 20 + k * w // 30, y), text, fill=(255, 255, 255), font=font_, stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))
    return im


def make_variant(im: Image.Image, edit: str, rng: np.random.Generator, *, original_bytes: bytes | None = None) -> tuple[bytes, str]:
    """One edited copy of ``im`` as ``(bytes, ext)``; ``exact`` needs ``original_bytes``."""
    im = im.convert("RGB")
    w, h = im.size
    if edit == "exact":
        if original_bytes is None:
            raise ValueError("exact needs original_bytes")
        return original_bytes, "jpg"
    if edit == "png_resave":
        return png_bytes(im), "png"
    if edit == "jpeg_q40":
        return jpeg_bytes(im, 40), "jpg"
    if edit == "jpeg_q8":
        return jpeg_bytes(im, 8), "jpg"
    if edit == "resize_half":
        return jpeg_bytes(im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS)), "jpg"
    if edit in ("crop_5pct", "crop_30pct"):
        frac = 0.05 if edit == "crop_5pct" else 0.30
        cw, ch = round(w * frac), round(h * frac)
        left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
        return jpeg_bytes(im.crop((left, top, w - (cw - left), h - (ch - top)))), "jpg"
    if edit == "brightness_15":
        return jpeg_bytes(ImageEnhance.Brightness(im).enhance(1.15)), "jpg"
    if edit == "saturation":
        return jpeg_bytes(ImageEnhance.Color(im).enhance(1.35)), "jpg"
    if edit == "grayscale":
        return jpeg_bytes(im.convert("L").convert("RGB")), "jpg"
    if edit == "hflip":
        return jpeg_bytes(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), "jpg"
    if edit == "rotate_8":
        return jpeg_bytes(im.rotate(8, resample=Image.Resampling.BICUBIC, expand=False)), "jpg"
    if edit == "text_overlay":
        return jpeg_bytes(text_overlay(im)), "jpg"
    if edit == "canvas_paste":
        f = float(rng.uniform(1.6, 2.0))
        side = round(max(w, h) * f)
        colour = list(CANVAS_COLOURS.values())[int(rng.integers(0, len(CANVAS_COLOURS)))]
        return jpeg_bytes(paste_on_canvas(im, (side, side), colour)), "jpg"
    if edit == "letterbox":
        return jpeg_bytes(letterbox(im)), "jpg"
    # small-image light edits (tiny and cifar sets)
    if edit == "brightness_up10":
        return jpeg_bytes(ImageEnhance.Brightness(im).enhance(1.10), 95), "jpg"
    if edit == "brightness_down10":
        return jpeg_bytes(ImageEnhance.Brightness(im).enhance(0.90), 95), "jpg"
    if edit == "shift_1px":
        dx, dy = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        return jpeg_bytes(im.crop((dx, dy, w - 1 + dx, h - 1 + dy)).resize((w, h), Image.Resampling.BICUBIC), 95), "jpg"
    raise ValueError(f"unknown edit {edit!r}")


def edit_class(edit: str) -> str:
    if edit in STRONG_EDITS:
        return "strong"
    if edit in ("original", "negative"):
        return edit
    return "light"


@dataclass(frozen=True)
class Member:
    """One image of a benchmark set.

    ``group``: the source photo (members of one group are duplicates of each other; a
    negative is its own group of one). ``edit``: "original", an edit name, or "negative".
    ``canvas``: a tag shared by images pasted on the same kind of plain canvas (their pairs
    across groups are the "canvas false pairs"). ``label``: a class label, when known.
    """

    sample_id: str
    group: str
    edit: str
    canvas: str | None = None
    label: int | None = None
    filename: str = ""

    @property
    def kind(self) -> str:
        return edit_class(self.edit)


def write_members(
    items: list[tuple[Member, bytes, str]], out_dir, *, n_shards: int = 3, seed: int = 0, folder=None,
) -> list[Member]:
    """Write ``items`` ((member without sample_id, bytes, ext)) shuffled over ``n_shards`` tar shards
    with random keys, so neither order nor key tells the group. Returns the members with their
    ``sample_id`` (``shard-0000N/KEY``) and, with ``folder``, the file name under ``folder`` where
    the same bytes are also written (for tools that read image folders)."""
    from webdataset import TarWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    keys = [f"{int(k):012x}" for k in rng.choice(2**40, size=len(items), replace=False)]
    per_shard: list[list[tuple[str, int]]] = [[] for _ in range(n_shards)]
    for pos, idx in enumerate(order):
        per_shard[pos % n_shards].append((keys[pos], int(idx)))
    members: list[Member] = []
    for s, rows in enumerate(per_shard):
        shard_id = f"shard-{s:05d}"
        with open(out / f"{shard_id}.tar", "wb") as f, TarWriter(f, user="b", group="b", mode=0o644, encoder=False, mtime=_MTIME) as tw:
            for key, idx in rows:
                m, data, ext = items[idx]
                tw.write({"__key__": key, ext: data})
                fname = ""
                if folder is not None:
                    fname = f"{shard_id}_{key}.{ext}"
                    (Path(folder) / fname).write_bytes(data)
                members.append(Member(f"{shard_id}/{key}", m.group, m.edit, m.canvas, m.label, fname))
    return sorted(members, key=lambda m: m.sample_id)


def save_members(members: list[Member], path) -> None:
    Path(path).write_text(json.dumps([asdict(m) for m in members]))


def load_members(path) -> list[Member]:
    return [Member(**d) for d in json.loads(Path(path).read_text())]


# ---------------------------------------------------------------- scoring


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_true if n_true else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def predicted_pairs(sample_ids, cluster_ids) -> set[tuple[str, str]]:
    """Every unordered pair (a < b) of samples with the same non-null cluster id."""
    groups: dict[object, list[str]] = defaultdict(list)
    for sid, cid in zip(sample_ids, cluster_ids):
        if cid is not None:
            groups[cid].append(sid)
    return {(a, b) for ms in groups.values() if len(ms) > 1 for a, b in combinations(sorted(ms), 2)}


def score_clusters(members: list[Member], sample_ids, cluster_ids, is_keeper, judged=None) -> dict:
    """Score a clustering against the members' groups.

    ``sample_ids``/``cluster_ids``/``is_keeper``: parallel sequences, one per sample (a sample
    missing from them, or with a null cluster id, is a singleton that keeps itself).
    Returns pair precision/recall/F1, light/strong recall and recall per edit over
    (original, variant) pairs, ``keeper_original`` (share of groups with ≥ 2 members whose
    keeper, in the cluster holding the original, is the original or its ``exact`` copy),
    ``split_groups`` (groups whose members lie in ≥ 2 clusters, counting a copy left alone),
    ``divided_groups`` (groups with ≥ 2 clusters that each hold ≥ 2 of its members: the group
    cut into linked parts), ``alone_copies`` (members of a multi-member group whose cluster holds
    no other member of it: a copy no link reached), ``canvas_false_pairs``
    (predicted pairs of two canvas-tagged samples of different groups), ``predicted_pairs`` and
    ``cross_class_share`` (predicted pairs whose labels differ, over pairs with both labels).

    ``judged`` (sample ids): for a corpus whose own duplicates are not labelled (CIFAR-10 holds
    near-identical photos of its own), the pairs that touch one of these samples are the ones
    the labels decide; ``judged_precision`` / ``judged_f1`` count only those pairs as
    predictions (a pair of two unjudged samples is neither right nor wrong).
    """
    by_id = {m.sample_id: m for m in members}
    cid: dict[str, object] = {}
    keep: dict[str, bool] = {}
    for sid, c, k in zip(sample_ids, cluster_ids, is_keeper):
        if sid in by_id:
            cid[sid] = c if c is not None else ("__single__", sid)
            keep[sid] = bool(k)
    for sid in by_id:
        if sid not in cid:
            cid[sid], keep[sid] = ("__single__", sid), True
    pred = predicted_pairs(list(cid), list(cid.values()))

    groups: dict[str, list[Member]] = defaultdict(list)
    for m in members:
        groups[m.group].append(m)
    truth = {tuple(sorted((a.sample_id, b.sample_id))) for ms in groups.values() for a, b in combinations(ms, 2)}
    tp = len(pred & truth)
    p, r, f1 = _prf(tp, len(pred), len(truth))

    per_edit: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    keeper_ok = n_multi = split = divided = alone = 0
    cluster_members: dict[object, list[str]] = defaultdict(list)
    for sid, c in cid.items():
        cluster_members[c].append(sid)
    for ms in groups.values():
        if len(ms) < 2:
            continue
        n_multi += 1
        per_cluster = Counter(cid[m.sample_id] for m in ms)
        if len(per_cluster) > 1:
            split += 1
        divided += sum(1 for c in per_cluster.values() if c >= 2) >= 2
        alone += sum(1 for c in per_cluster.values() if c == 1)
        origs = [m for m in ms if m.edit == "original"]
        if not origs:
            continue
        o = origs[0]
        for m in ms:
            if m.edit == "original":
                continue
            hit = cid[m.sample_id] == cid[o.sample_id]
            for d in (per_edit[m.edit], per_class[m.kind]):
                d[0] += hit
                d[1] += 1
        keepers = [s for s in cluster_members[cid[o.sample_id]] if keep[s]]
        good = {o.sample_id} | {m.sample_id for m in ms if m.edit == "exact"}
        keeper_ok += bool(keepers) and all(k in good for k in keepers)

    canvas_fp = sum(1 for a, b in pred if by_id[a].canvas and by_id[b].canvas and by_id[a].group != by_id[b].group)
    labelled = [(by_id[a].label, by_id[b].label) for a, b in pred if by_id[a].label is not None and by_id[b].label is not None]
    cross = sum(1 for x, y in labelled if x != y)
    judged_stats = {}
    if judged is not None:
        judged = set(judged)
        n_judged = sum(1 for a, b in pred if a in judged or b in judged)
        jp, _, jf1 = _prf(tp, n_judged, len(truth))
        judged_stats = {"judged_pairs": n_judged, "judged_precision": jp, "judged_f1": jf1}
    return {
        **judged_stats,
        "predicted_pairs": len(pred),
        "true_pairs": len(truth),
        "true_positives": tp,
        "precision": p,
        "recall": r,
        "f1": f1,
        "light_recall": per_class["light"][0] / per_class["light"][1] if per_class["light"][1] else None,
        "strong_recall": per_class["strong"][0] / per_class["strong"][1] if per_class["strong"][1] else None,
        "per_edit": {e: v[0] / v[1] for e, v in sorted(per_edit.items())},
        "groups": n_multi,
        "keeper_original": keeper_ok / n_multi if n_multi else None,
        "split_groups": split,
        "divided_groups": divided,
        "alone_copies": alone,
        "canvas_false_pairs": canvas_fp,
        "cross_class_pairs": cross,
        "cross_class_share": cross / len(labelled) if labelled else None,
        "false_pairs": sorted(pred - truth),
    }


def union_find_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label per node for the undirected edges (i, j) (scipy connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    return connected_components(g, directed=False)[1]


def largest_keepers(labels: np.ndarray, pixels: np.ndarray, file_size: np.ndarray) -> np.ndarray:
    """is_keeper per node: the member with most pixels (then largest file, then lowest index)."""
    order = np.lexsort((np.arange(len(labels)), -file_size, -pixels, labels))
    keep = np.zeros(len(labels), bool)
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keep[order[first]] = True
    return keep
