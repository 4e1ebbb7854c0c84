"""Group-level quality of the real pipeline on data it was not designed around; writes a section
of docs/quality.md (between <!-- groups:begin --> and <!-- groups:end -->).

    python benchmarks/quality_groups.py --embedder sscd-distilled
    python benchmarks/quality_groups.py --embedder sscd --set embedding.threshold=0.7 --no-write
    python benchmarks/quality_groups.py --quick --no-peers      # small sets, for development

Three sets, each written as shuffled tar shards (random keys) and run through
``dedup.runner.run_pipeline``:

1. groups   real photos, each with its original (JPEG q95), 7 light edits and 8 strong ones
            (incl. pasted on a plain canvas and letterboxed), plus hard negatives: non-overlapping
            crops of texture photos and unrelated photos pasted on one shared plain canvas;
2. tiny     32-px and 64-px versions of the real photos with light edits;
3. cifar    the 10,000 CIFAR-10 photos of ../shared/data/cifar10_dev plus ~300 planted light edits.

Peers, side by side (``--no-peers`` skips them): SSCD union-find at a fixed cosine 0.6 on the same
run's embeddings, and fastdup 2.54 (its own model) at its defaults and at its best threshold. fastdup
pins old numpy/Pillow, so it is not imported here: it runs in a subprocess of ``--fastdup-python``
($FASTDUP_PYTHON, default: this interpreter if it imports fastdup, else /tmp/fastdup-venv/bin/python);
set up with ``python -m venv /tmp/fastdup-venv && /tmp/fastdup-venv/bin/pip install fastdup==2.54``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, run_peer, stop_on_sigterm  # noqa: E402
from dedup.config import METHODS, load_config  # noqa: E402
from dedup.runner import run_pipeline  # noqa: E402
from dedup.testing.synth import real_photos  # noqa: E402
from dedup.testing.variants import (  # noqa: E402
    CANVAS_COLOURS, LIGHT_EDITS, STRONG_EDITS, Member, decode, jpeg_bytes, largest_keepers, make_variant,
    paste_on_canvas, score_clusters, union_find_components, write_members,
)

DOC = ROOT / "docs" / "quality.md"
BEGIN, END = "<!-- groups:begin -->", "<!-- groups:end -->"
TEXTURES = ("brick", "grass", "gravel")
TINY_EDITS = ("jpeg_q40", "png_resave", "brightness_15")
TINY_ROWS = ("resize_32",) + tuple(f"{e}@{s}" for s in (64, 32) for e in TINY_EDITS)
CIFAR_EDITS = ("jpeg_q40", "shift_1px", "brightness_up10", "brightness_down10", "png_resave")
PEER_COSINE = 0.6
MAX_SWEEP_PAIRS = 3_000_000
FASTDUP_SWEEP = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def _shared() -> Path:
    return Path(os.environ.get("DEDUP_SHARED_DATA") or ROOT.parent / "shared" / "data")


def cifar_images(n: int | None = None, seed: int = 0):
    """[(file, label, jpeg bytes)] of the CIFAR-10 dev sample (all, or ``n`` at random)."""
    base = _shared() / "cifar10_dev"
    if not (base / "images.zip").exists():
        return []
    labels = {r["file"]: int(r["label"]) for r in csv.DictReader(open(base / "labels.csv"))}
    with zipfile.ZipFile(base / "images.zip") as z:
        names = sorted(n_ for n_ in z.namelist() if n_ in labels)
        if n is not None:
            names = [names[k] for k in sorted(np.random.default_rng(seed).choice(len(names), n, replace=False))]
        return [(name, labels[name], z.read(name)) for name in names]


# ---------------------------------------------------------------- data sets


def build_groups(out: Path, quick: bool, seed: int):
    rng = np.random.default_rng(seed)
    photos = real_photos(512)
    textures = [(n, im) for n, im in photos if n in TEXTURES]
    others = [(n, im) for n, im in photos if n not in TEXTURES]
    others = [others[k] for k in rng.permutation(len(others))]
    n_canvas_photos = 3
    originals = others[n_canvas_photos:]
    if quick:
        originals = originals[:5]
    items: list[tuple[Member, bytes, str]] = []
    for name, im in originals:
        ob = jpeg_bytes(im, 95)
        items.append((Member("", name, "original"), ob, "jpg"))
        for e in LIGHT_EDITS + STRONG_EDITS:
            data, ext = make_variant(im, e, rng, original_bytes=ob)
            items.append((Member("", name, e, canvas="canvas" if e == "canvas_paste" else None), data, ext))
    # Hard negatives (1): non-overlapping crops of texture photos not used as originals.
    for name, im in textures:
        w, h = im.size
        cw, ch = w // 2, h // 2
        for k, (x, y) in enumerate(((0, 0), (cw, 0), (0, ch), (cw, ch))[: 2 if quick else 4]):
            items.append((Member("", f"{name}_crop{k}", "negative"), jpeg_bytes(im.crop((x, y, x + cw, y + ch)), 92), "jpg"))
    # Hard negatives (2): unrelated photos on one shared canvas (same colour and size).
    canvas_size, colour = (768, 768), CANVAS_COLOURS["white"]
    pasted = [(n, im) for n, im in others[:n_canvas_photos]]
    for fname, _label, data in cifar_images(8 if quick else 21, seed=seed + 1):
        im = decode(data)
        pasted.append((f"cifar_{fname}", im.resize((384, 384), 3)))  # bicubic upscale to half the canvas
    for name, im in pasted:
        im = im.copy()
        im.thumbnail((384, 384))
        items.append((Member("", f"canvas_{name}", "negative", canvas="canvas"), jpeg_bytes(paste_on_canvas(im, canvas_size, colour), 92), "jpg"))
    members = write_members(items, out / "shards", n_shards=3, seed=seed, folder=out / "images")
    return members, f"{len(originals)} photos × (original + {len(LIGHT_EDITS)} light + {len(STRONG_EDITS)} strong edits), " \
        f"{sum(1 for m in members if m.group.startswith(TEXTURES))} texture crops, {len(pasted)} unrelated photos on one white {canvas_size[0]}² canvas"


def build_tiny(out: Path, quick: bool, seed: int):
    rng = np.random.default_rng(seed)
    photos = real_photos(512)
    if quick:
        photos = photos[:8]
    items = []
    for name, im in photos:
        # one group per photo: the 64-px JPEG q95 is the original; the 32-px version is a
        # (light) resize of it; each size gets the same three light edits
        for side in (64, 32):
            small = im.copy()
            small.thumbnail((side, side), 1)  # LANCZOS
            ob = jpeg_bytes(small, 95)
            items.append((Member("", name, "original" if side == 64 else "resize_32"), ob, "jpg"))
            for e in TINY_EDITS:
                data, ext = make_variant(small, e, rng, original_bytes=ob)
                items.append((Member("", name, f"{e}@{side}"), data, ext))
    members = write_members(items, out / "shards", n_shards=2, seed=seed, folder=out / "images")
    return members, f"{len(photos)} photos: original at 64 px (long side), its 32-px resize, and JPEG q40, PNG re-save, brightness +15 % of each size"


def build_cifar(out: Path, quick: bool, seed: int):
    imgs = cifar_images(1000 if quick else None, seed=seed)
    if not imgs:
        return None, "cifar10_dev not found"
    rng = np.random.default_rng(seed)
    n_plant = 30 if quick else 300
    planted = set(rng.choice(len(imgs), n_plant, replace=False).tolist())
    items = []
    n_edit = 0
    for k, (fname, label, data) in enumerate(imgs):
        items.append((Member("", fname, "original" if k in planted else "negative", label=label), data, "jpg"))
        if k in planted:
            e = CIFAR_EDITS[n_edit % len(CIFAR_EDITS)]
            n_edit += 1
            vdata, ext = make_variant(decode(data), e, rng, original_bytes=data)
            items.append((Member("", fname, e, label=label), vdata, ext))
    members = write_members(items, out / "shards", n_shards=4, seed=seed, folder=out / "images")
    return members, f"{len(imgs)} CIFAR-10 photos (32 px) + {n_plant} planted light edits ({', '.join(CIFAR_EDITS)})"


# ---------------------------------------------------------------- runners


def run_ours(shards: Path, run_dir: Path, cfg):
    outcome = run_pipeline([str(shards)], str(run_dir), cfg, force=True, progress=False)
    if outcome.exit_code != 0:
        print(f"warning: pipeline exit code {outcome.exit_code}", file=sys.stderr)
    m = pq.read_table(run_dir / "manifest.parquet", columns=["sample_id", "cluster_id", "is_keeper"])
    stats = json.loads((run_dir / "stats.json").read_text())
    return m["sample_id"].to_pylist(), m["cluster_id"].to_pylist(), m["is_keeper"].to_pylist(), stats


def _features(run_dir: Path):
    import pyarrow as pa

    t = pa.concat_tables([pq.read_table(p, columns=["sample_id", "status", "width", "height", "file_size", "embedding"])
                          for p in sorted((run_dir / "features").glob("*.parquet"))])
    return t.to_pydict()


def _cosine_pairs(x: np.ndarray, threshold: float, block: int = 2048):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ii, jj, ss = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for s in range(0, len(x), block):
        sim = x[s:s + block] @ x.T
        a, b = np.nonzero(sim >= threshold)
        keep = a + s < b
        ss.append(sim[a[keep], b[keep]].astype(np.float32))
        ii.append(a[keep] + s)
        jj.append(b[keep])
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(ss)


def _components(ids, pixels, file_size, i, j):
    labels = union_find_components(len(ids), i, j)
    keep = largest_keepers(labels, pixels, file_size)
    return ids, labels.tolist(), keep.tolist()


def peer_sscd_union_find(run_dir: Path):
    f = _features(run_dir)
    ok = [k for k, s in enumerate(f["status"]) if s == "ok" and f["embedding"][k] is not None]
    ids = [f["sample_id"][k] for k in ok]
    x = np.asarray([f["embedding"][k] for k in ok], np.float32)
    pixels = np.array([f["width"][k] * f["height"][k] for k in ok], np.int64)
    size = np.array([f["file_size"][k] for k in ok], np.int64)
    i, j, _ = _cosine_pairs(x, PEER_COSINE)
    return _components(ids, pixels, size, i, j)


def alone_copies(members: list[Member], ids, cids, run_dir: Path) -> list[list]:
    """Why each copy left alone was not linked: its best cosine (the run's embeddings) to an
    image of its own group and to an image of any other group — when the second is as high as
    the first, no threshold links the copy without also linking unrelated images."""
    by_id = {m.sample_id: m for m in members}
    cluster = dict(zip(ids, cids))
    f = _features(run_dir)
    ok = [k for k, s in enumerate(f["status"]) if s == "ok" and f["embedding"][k] is not None and f["sample_id"][k] in by_id]
    sid = [f["sample_id"][k] for k in ok]
    x = np.asarray([f["embedding"][k] for k in ok], np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    group = np.array([by_id[s].group for s in sid])
    sizes = {g: int(n) for g, n in zip(*np.unique(group, return_counts=True))}
    rows = []
    for a, s in enumerate(sid):
        m = by_id[s]
        if sizes[m.group] < 2 or any(cluster.get(t) == cluster.get(s) for t in sid if t != s and by_id[t].group == m.group):
            continue
        sim = x @ x[a]
        sim[a] = -np.inf
        own, other = sim[group == m.group], sim[group != m.group]
        rows.append([m.group, m.edit, _f(float(own.max())), _f(float(other.max()))])
    return sorted(rows, key=lambda r: (r[1], r[0]))


def unplanted_sheet(members: list[Member], scored: dict, judged: set, folder: Path, out: Path, cols: int = 8) -> None:
    """A contact sheet of the predicted pairs between two unplanted CIFAR images (2× size,
    side by side), to look at what the lower-bound precision counts as false."""
    from PIL import Image

    fname = {m.sample_id: m.filename for m in members}
    pairs = [(a, b) for a, b in scored["false_pairs"] if a not in judged and b not in judged]
    if not pairs:
        return
    rows = (len(pairs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * 140, rows * 70), "white")
    for k, (a, b) in enumerate(pairs):
        x, y = (k % cols) * 140, (k // cols) * 70
        for dx, sid in ((0, a), (66, b)):
            with Image.open(folder / fname[sid]) as im:
                sheet.paste(im.convert("RGB").resize((64, 64), Image.Resampling.NEAREST), (x + dx, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256).save(out, optimize=True)  # a palette keeps the file ~0.2 MB


_FASTDUP_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("SENTRY_OPT_OUT", "1")
import fastdup, numpy as np
img, work = sys.argv[1], sys.argv[2]
fastdup.run(img, work_dir=work, num_threads=int(sys.argv[3]))   # defaults: threshold 0.9, k 2, ccthreshold 0.96
files, feats = fastdup.load_binary_feature(os.path.join(work, "atrain_features.dat"), d=576)
np.save(os.path.join(work, "feats.npy"), np.asarray(feats, np.float32))
json.dump([os.path.basename(f) for f in files], open(os.path.join(work, "files.json"), "w"))
"""


def fastdup_python(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("FASTDUP_PYTHON")):
        if cand:
            return cand
    try:
        import importlib.util

        if importlib.util.find_spec("fastdup") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    return "/tmp/fastdup-venv/bin/python" if Path("/tmp/fastdup-venv/bin/python").exists() else None


def peer_fastdup(py: str, folder: Path, work: Path, members: list[Member], run_dir: Path, sweep_score):
    """fastdup's own connected components at its defaults, and union-find over its embeddings
    (brute force, all pairs) at each threshold of FASTDUP_SWEEP. Returns (default, {t: clustering})."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, SENTRY_OPT_OUT="1")
    env.pop("PYTHONPATH", None)
    r = run_peer([py, "-c", _FASTDUP_SCRIPT, str(folder), str(work), str(min(2, os.cpu_count() or 1))],
                 env=env, capture_output=True, text=True, cwd=work)
    if r.returncode != 0:
        raise RuntimeError(f"fastdup failed: {r.stderr.strip()[-800:]}")
    files = json.loads((work / "files.json").read_text())
    feats = np.load(work / "feats.npy")
    by_file = {m.filename: m.sample_id for m in members}
    f = _features(run_dir)
    info = {sid: (w * h if w else 0, fs or 0) for sid, w, h, fs in zip(f["sample_id"], f["width"], f["height"], f["file_size"])}
    ids = [by_file[x] for x in files]
    pixels = np.array([info[s][0] for s in ids], np.int64)
    size = np.array([info[s][1] for s in ids], np.int64)
    cc = {}
    with open(work / "connected_components.csv") as fh:
        for row in csv.DictReader(fh):
            cc[int(row["__id"])] = int(row["component_id"])
    labels = np.array([cc.get(k, -1 - k) for k in range(len(files))])
    default = (ids, labels.tolist(), largest_keepers(labels, pixels, size).tolist())
    i, j, sims = _cosine_pairs(feats, min(FASTDUP_SWEEP))
    best = None
    for t in FASTDUP_SWEEP:
        sel = sims >= t
        res = _components(ids, pixels, size, i[sel], j[sel])
        sizes = np.bincount(np.asarray(res[1]))
        if int((sizes * (sizes - 1) // 2).sum()) > MAX_SWEEP_PAIRS:
            continue  # chained into giant components: F1 ~ 0, and too many pairs to score
        sc = sweep_score(res)
        if best is None or sc.get("judged_f1", sc["f1"]) > best[1].get("judged_f1", best[1]["f1"]):
            best = (t, sc, res)
    return default, best


# ---------------------------------------------------------------- report


def _f(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _threshold_info(stats: dict) -> str:
    th = stats.get("thresholds", {})
    extra = {k: v for k, v in stats.items() if re.search(r"embedding_threshold|auto", k)}
    extra.update({k: v for k, v in th.items() if re.search(r"auto|source|calib", k)})
    s = f"cosine {th.get('embedding_cosine')}, pHash ≤ {th.get('phash_radius')}, dHash ≤ {th.get('dhash_radius')}"
    if extra:
        s += ", " + json.dumps(extra, sort_keys=True, default=str)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="sscd-distilled", help="sscd or sscd-distilled (default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for our pipeline (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small sets (development)")
    ap.add_argument("--no-peers", action="store_true", help="skip SSCD union-find 0.6 and fastdup")
    ap.add_argument("--fastdup-python", default=None, help="interpreter with fastdup installed (see module doc)")
    ap.add_argument("--sets", default="groups,tiny,cifar", help="comma-separated subset of groups,tiny,cifar")
    ap.add_argument("--workdir", default=None, help="keep shards/runs here (default: a temp dir, removed)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/quality.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stop_on_sigterm()

    cfg = load_config(None, args.set, methods=list(METHODS), **{"embedding.spec": args.embedder})
    py = None if args.no_peers else fastdup_python(args.fastdup_python)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qgroups-"))
    tmp.mkdir(parents=True, exist_ok=True)
    builders = {"groups": build_groups, "tiny": build_tiny, "cifar": build_cifar}
    t_all = time.time()
    sections, notes, walls = [], [], []
    alone: list[list] = []
    if not args.no_peers and py is None:
        notes.append("fastdup skipped: not importable here and no --fastdup-python / $FASTDUP_PYTHON / /tmp/fastdup-venv.")
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        d = tmp / name
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        members, desc = builders[name](d, args.quick, args.seed)
        if members is None:
            notes.append(f"{name}: skipped ({desc})")
            continue
        t_build = time.time() - t0

        # CIFAR-10 holds near-identical photos of its own (docs/quality.md): only the pairs that
        # touch a planted original or copy are judged there
        judged = {m.sample_id for m in members if m.edit != "negative"} if name == "cifar" else None

        def score(res, members=members, judged=judged):
            return score_clusters(members, *res, judged=judged)

        rows: list[tuple[str, dict]] = []
        t0 = time.time()
        ids, cids, keep, stats = run_ours(d / "shards", d / "run", cfg)
        t_ours = time.time() - t0
        rows.append((f"ours ({args.embedder})", score((ids, cids, keep))))
        if name == "cifar" and not args.no_write:
            unplanted_sheet(members, rows[-1][1], judged or set(), d / "images", ROOT / "docs" / "img" / "cifar_unplanted_pairs.png")
        if name == "groups":
            alone = alone_copies(members, ids, cids, d / "run")
        part_walls = {"build": t_build, "ours": t_ours}
        if not args.no_peers:
            t0 = time.time()
            rows.append((f"SSCD union-find cos ≥ {PEER_COSINE}", score(peer_sscd_union_find(d / "run"))))
            part_walls["sscd-uf"] = time.time() - t0
            if py is not None:
                t0 = time.time()
                try:
                    default, best = peer_fastdup(py, d / "images", d / "fastdup", members, d / "run", score)
                    rows.append(("fastdup default (cc 0.96)", score(default)))
                    if best is None:
                        notes.append(f"{name}: every fastdup sweep threshold chains into > {MAX_SWEEP_PAIRS} pairs")
                    else:
                        rows.append((f"fastdup best (cos ≥ {best[0]})", best[1]))
                except Exception as e:  # noqa: BLE001 - a peer failing must not stop the benchmark
                    notes.append(f"{name}: fastdup failed: {e}")
                part_walls["fastdup"] = time.time() - t0
        walls.append((name, part_walls))
        sections.append((name, desc, len(members), stats, rows))
        print(f"[{name}] {len(members)} images; " + ", ".join(f"{k} {v:.1f} s" for k, v in part_walls.items()), file=sys.stderr)
        print(f"[{name}] run thresholds: {_threshold_info(stats)}", file=sys.stderr)
    if not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)

    text = render(args, sections, notes, walls, time.time() - t_all, alone=alone)
    print(text)
    if not args.no_write:
        write_doc(text)
        print(f"wrote {DOC} (between {BEGIN} and {END})", file=sys.stderr)


def render(args, sections, notes, walls, total, alone=()) -> str:
    cmd = "python benchmarks/quality_groups.py --embedder " + args.embedder + "".join(f" --set {s}" for s in args.set) \
        + (" --quick" if args.quick else "") + (" --no-peers" if args.no_peers else "")
    out = [
        "## Groups: edited copies, padded canvases, tiny images, CIFAR-10",
        "",
        f"Generated by `{cmd}` on {machine_description()} in {total:.0f} s.",
        "Every set is written as shuffled tar shards with random keys and run through the real pipeline "
        "(`run_pipeline`, all four signals). Rows: **ours** = the pipeline with the settings of the command; "
        f"**SSCD union-find** = all pairs of the same run's embeddings with cosine ≥ {PEER_COSINE}, connected components, "
        "keeper = most pixels; **fastdup default** = fastdup 2.54's own connected components at its defaults "
        "(similarity ≥ 0.9 among 2 nearest neighbours, components at ≥ 0.96), keeper = most pixels; **fastdup best** = "
        "union-find over fastdup's embeddings (all pairs) at the threshold of the sweep "
        f"{list(FASTDUP_SWEEP)} with the best pair F1 on that set (on cifar: the best planted F1; an oracle choice, flattering fastdup).",
        "",
        "Columns: **P / R / F1** = pair precision, recall, F1 over all same-cluster pairs against the ground-truth "
        "groups (every pair inside a group is a duplicate; every other predicted pair is false); **light R / strong R** "
        "= share of (original, edited copy) pairs in one cluster; **keeper=orig** = share of groups whose keeper (in the "
        "cluster holding the original) is the original or its byte-identical copy; **split** = groups cut into linked "
        "parts (≥ 2 clusters that each hold ≥ 2 of the group's images); **alone** = copies whose cluster holds no other "
        "image of their group (a copy no signal linked: a recall miss, in the recall columns too); **spread** = groups "
        "over ≥ 2 clusters, either way (the **split** column of earlier versions of this table); **canvas FP** = predicted pairs of two images pasted on a plain canvas but of different photos; "
        "**pairs** = predicted pairs; **cross-class** = share of predicted pairs whose two CIFAR-10 labels differ "
        "(certainly false: a lower bound on the false-positive share); **P / F1 (planted)** = precision and F1 over "
        "the predicted pairs that touch a planted original or copy (the pairs the labels decide: CIFAR-10 holds "
        "copies of its own photos (shifted, recoloured or rescaled, as the data's README says) and other shots of one scene, which no "
        "label covers and `benchmarks/same_photo.py` tells apart by pixels; [docs/img/cifar_unplanted_pairs.png](img/cifar_unplanted_pairs.png) "
        "shows every unplanted pair one run made); **P / F1 (lower bound)** = every unplanted pair counted as false.",
        "",
    ]
    for name, desc, n, stats, rows in sections:
        out += [f"### {name}: {desc} ({n} images)", "", f"Run thresholds (stats.json): {_threshold_info(stats)}.", ""]
        if name == "groups":
            hdr = ["method", "P", "R", "F1", "light R", "strong R", "keeper=orig", "split", "alone", "spread", "canvas FP", "pairs"]
            body = [[r, _f(s["precision"]), _f(s["recall"]), _f(s["f1"]), _f(s["light_recall"]), _f(s["strong_recall"]),
                     _f(s["keeper_original"], 2), s["divided_groups"], s["alone_copies"], s["split_groups"], s["canvas_false_pairs"],
                     s["predicted_pairs"]] for r, s in rows]
            out += [markdown_table(hdr, body), ""]
            edits = list(LIGHT_EDITS) + list(STRONG_EDITS)
            out += ["Recall per edit (original ↔ copy in one cluster):", ""]
            out += [markdown_table(["edit"] + [r for r, _ in rows],
                                   [[e + (" (strong)" if e in STRONG_EDITS else "")] + [_f(s["per_edit"].get(e), 2) for _, s in rows] for e in edits]), ""]
            if alone:
                out += [f"Copies left alone by ours ({len(alone)}): the best cosine of each to an image of its own group "
                        "and to an image of any other group (the run's embeddings). Where the second is as high as the first, "
                        "no embedding threshold links the copy without linking unrelated images as well.", "",
                        markdown_table(["group", "edit", "best cosine, own group", "best cosine, other groups"], list(alone)), ""]
        elif name == "tiny":
            hdr = ["method", "P", "R", "F1", "light R", "keeper=orig", "split", "alone", "spread", "pairs"]
            body = [[r, _f(s["precision"]), _f(s["recall"]), _f(s["f1"]), _f(s["light_recall"]), _f(s["keeper_original"], 2),
                     s["divided_groups"], s["alone_copies"], s["split_groups"], s["predicted_pairs"]] for r, s in rows]
            out += [markdown_table(hdr, body), ""]
            out += [markdown_table(["edit"] + [r for r, _ in rows],
                                   [[e] + [_f(s["per_edit"].get(e), 2) for _, s in rows] for e in TINY_ROWS]), ""]
        else:
            hdr = ["method", "planted light R", "pairs", "cross-class", "P (planted)", "F1 (planted)", "P (lower bound)",
                   "F1 (lower bound)", "keeper=orig"]
            body = [[r, _f(s["light_recall"]), s["predicted_pairs"], _f(s["cross_class_share"]), _f(s.get("judged_precision")),
                     _f(s.get("judged_f1")), _f(s["precision"]), _f(s["f1"]), _f(s["keeper_original"], 2)] for r, s in rows]
            out += [markdown_table(hdr, body), ""]
            out += [markdown_table(["planted edit"] + [r for r, _ in rows],
                                   [[e] + [_f(s["per_edit"].get(e), 2) for _, s in rows] for e in CIFAR_EDITS]), ""]
    if walls:
        out += ["Wall time per part (s): " + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.0f}" for k, v in w.items()) for n, w in walls) + ".", ""]
    out += [f"Note: {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def write_doc(text: str, doc: Path = DOC) -> None:
    body = f"{BEGIN}\n{text.rstrip()}\n{END}"
    cur = doc.read_text() if doc.exists() else "# Detection quality\n"
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    cur = pat.sub(lambda _m: body, cur) if pat.search(cur) else cur.rstrip() + "\n\n" + body + "\n"
    doc.write_text(cur)


if __name__ == "__main__":
    main()
