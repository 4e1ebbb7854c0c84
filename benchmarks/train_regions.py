"""Training-side regions (issue #19, build item 2): is it worth embedding regions of every
training image, so that `dedup run` finds a training image that contains another one?

Training set (real photos, ``benchmarks/check_quality.py``'s ``photo_split``): its 16 training
photos as originals; for each a composite that contains it (a 2×2 or 3×3 collage, a paste at
30–60 % of the area, a photographed print: ``check_quality.py``'s makers, other cells and
backgrounds from its unrelated photos, which are not in the set); as many composites made of
unrelated photos only. ``run_pipeline`` runs on it as usual (the baseline: one descriptor per
image). Then every training image's regions (``dedup.compute.regions.region_boxes``, whole image
left out) are embedded into a second index, and each image's whole descriptor is searched in
it: a match with a region of another image is a pair "A is inside B", kept at the region
threshold (``region_threshold``: the run's tail model or margin, for R regions × n images).

Reported per region spec: regions per image, extra embedding time per image (against the run's
own time per image), index size (vectors and bytes per image, float16 as the run stores them),
containment pairs found (of the planted ones) and false pairs; the baseline's own pairs beside
them. Written to docs/benchmarks.md, section ``train_regions``.

    python benchmarks/train_regions.py [--per-photo 1] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._table import machine_description, markdown_table, write_section
from benchmarks.check_quality import collage, pasted, photo_split, photographed
from dedup.testing.variants import jpeg_bytes

KINDS = ("collage_2x2", "collage_3x3", "pasted", "photographed")
SPECS = {  # name -> RegionSpec keyword arguments
    "check default (grids 1.5, 2, 3 and squares, half steps, content boxes)": {},
    "light (2×2 + 3×3 cells, content boxes)": {"grids": (2.0, 3.0), "half_steps": False, "square": ()},
    "lightest (2×2 cells, content boxes)": {"grids": (2.0,), "half_steps": False, "square": ()},
}


def composites(train, other, rng, per_photo: int):
    """[(name, image, contained original's name or None, names of every photo in it)]."""
    def pick(k):
        return [other[i] for i in rng.choice(len(other), k, replace=False)]

    def make(kind, im, parts):
        if kind.startswith("collage"):
            n = int(kind[-1])
            cells = [o for _, o in parts]
            at = int(rng.integers(0, n * n)) if im is not None else None
            if im is not None:
                cells.insert(at, im)
            return collage(cells, n)
        if kind == "pasted":
            return pasted(im if im is not None else parts[-1][1], parts[0][1], rng)[0]
        return photographed(im if im is not None else parts[-1][1], parts[0][1], rng)[0]

    def need(kind, with_original):
        return (int(kind[-1]) ** 2 - with_original) if kind.startswith("collage") else 2 - with_original

    out = []
    for v in range(per_photo):
        for j, (name, im) in enumerate(train):
            kind = KINDS[(j + v) % len(KINDS)]
            parts = pick(need(kind, 1))
            out.append((f"with_{kind}_{v}__{name}", make(kind, im, parts), name, {name} | {n for n, _ in parts}))
            kind = KINDS[(j + v + 1) % len(KINDS)]  # a composite of unrelated photos only
            parts = pick(need(kind, 0))
            out.append((f"unrel_{kind}_{v}_{j:02d}", make(kind, None, parts), None, {n for n, _ in parts}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="sscd-distilled", choices=("sscd-distilled", "sscd"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-photo", type=int, default=1, help="composites containing each original (default 1)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pyarrow.parquet as pq

    from dedup.compute.crossmatch import VectorIndex
    from dedup.compute.embedders import make_embedder
    from dedup.compute.regions import RegionSpec, region_boxes
    from dedup.compute.threshold import region_threshold
    from dedup.config import load_config
    from dedup.runner import run_pipeline

    rng = np.random.default_rng(args.seed)
    train, other = photo_split()
    comps = composites(train, other, rng, args.per_photo)
    items = [(n, im, None, {n}) for n, im in train] + comps
    planted = {(f"t-000/{inside}", f"t-000/{n}") for n, _, inside, _ in comps if inside is not None}
    sources = {f"t-000/{n}": src for n, _, _, src in items}
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    (root / "shards").mkdir()
    blobs = {}
    with tarfile.open(root / "shards" / "t-000.tar", "w") as tf:
        for name, im, _, _ in items:
            data = blobs[name] = jpeg_bytes(im, 92)
            ti = tarfile.TarInfo(f"{name}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    cfg = load_config(None, None, **{"embedding.spec": args.embedder, "run.workers": 1})
    t0 = time.perf_counter()
    res = run_pipeline([str(root / "shards")], str(root / "run"), cfg, progress=False)
    t_run = time.perf_counter() - t0
    assert res.exit_code == 0, res
    run = root / "run"
    import json

    stats = json.loads((run / "stats.json").read_text())
    run_th = float(stats["thresholds"]["embedding_cosine"])
    man = pq.read_table(run / "manifest.parquet").to_pylist()
    cluster = {r["sample_id"]: r["cluster_id"] for r in man}
    base_found = {p for p in planted if cluster[p[0]] == cluster[p[1]]}
    ids = [f"t-000/{n}" for n, _, _, _ in items]
    emb = make_embedder(args.embedder)
    images = [Image.open(io.BytesIO(blobs[n])).convert("RGB") for n, _, _, _ in items]
    t = time.perf_counter()
    whole = emb.embed(images)
    t_whole = (time.perf_counter() - t) / len(images)
    rows, detail, n_other, n_shared = [], [], [], []
    for label, kw in SPECS.items():
        spec = RegionSpec(**kw)
        t = time.perf_counter()
        vecs, owner = [], []
        for k, im in enumerate(images):
            boxes = region_boxes(im, spec)[1:]
            vecs.append(emb.embed([im.crop(b) for b in boxes]))
            owner += [k] * len(boxes)
        t_reg = (time.perf_counter() - t) / len(images)
        ref = np.concatenate(vecs).astype(np.float32)
        own = np.array(owner)
        per = len(ref) / len(images)
        rth = region_threshold(stats.get("embedding_threshold"), run_th, regions_per_query=per, n_ref=len(images))
        m = VectorIndex(ref, threshold=rth["value"]).range(whole, rth["value"])
        pairs = {}
        for q, r, s in zip(m.q.tolist(), m.r.tolist(), m.score.tolist()):
            b = int(own[r])
            if b != q:  # whole image q inside image b
                key = (ids[q], ids[b])
                pairs[key] = max(pairs.get(key, -1.0), float(s))
        found = {p for p in pairs if p in planted}
        false = sorted(p for p in pairs if p not in planted)
        shared = [p for p in false if sources[p[0]] & sources[p[1]]]
        n_other.append(len(false))
        n_shared.append(len(shared))
        rows.append([label, f"{per:.1f}", f"{1000 * t_reg:.0f} ({t_reg / t_whole:.0f}×)",
                     f"{per * emb.dim * 2 / 1024:.1f} KiB ({per + 1:.0f}×)", rth["value"],
                     f"{len(found)} / {len(planted)}", f"{len(found | base_found)} / {len(planted)}",
                     f"{len(false)} ({len(shared)} share a photo)", f"{max((pairs[p] for p in false), default=float('nan')):.3f}"])
        detail.append((label, false, sorted(set(planted) - found)))
    headers = ["regions of each training image", "regions", "extra embedding ms / image (× whole image)",
               "index per image, float16 (× whole only)", "region threshold", "containment pairs found (regions)",
               "found (regions or run)", "other pairs (regions)", "best other pair cosine"]
    table = markdown_table(headers, rows)
    head = (f"{len(items)} training images: {len(train)} real photos, {len(comps) // 2} composites that contain one of them "
            f"({', '.join(KINDS)}), {len(comps) // 2} composites of photos outside the set; run `{args.embedder}`, "
            f"threshold {run_th} ({stats['embedding_threshold'].get('note', '')}). The run itself (one descriptor per "
            f"image) took {t_run:.1f} s ({1000 * t_run / len(items):.0f} ms / image end to end, whole-image embedding "
            f"{1000 * t_whole:.0f} ms / image) and put {len(base_found)} of the {len(planted)} planted containment pairs "
            f"in one cluster.")
    print(head)
    print()
    print(table)
    for label, false, missed in detail:
        for p in false:
            print(f"[{label}] false pair: {p}")
        for p in missed:
            print(f"[{label}] missed: {p}")
    if args.no_write:
        return
    d = rows[0]
    decision = (
        f"**Decision: not offered in `dedup run`.** At the `check` default the index grows {d[3].split('(')[1][:-1]} and "
        f"the embedding time {d[2].split('(')[1][:-1]} per training image (the run's whole-image embedding is about "
        f"half of its per-image cost), to find {d[5]} planted containment pairs (the run's single descriptor: "
        f"{len(base_found)}); lighter specs find fewer ({rows[1][5]}, {rows[2][5]}). And the other pairs "
        f"outnumber the planted ones ({n_other[0]}, {n_shared[0]} of them between images that share a photo; cosine up "
        f"to {d[8]}): a whole image matched inside a region of another is the relation *shares a part* (two "
        f"collages with a photo in common, a collage and a scene with the same photo pasted in), not a near-duplicate; "
        f"as edges of the run's clusters they would delete distinct images, and their comparisons grow as n² · R. "
        f"What issue #19 needs — a generated image that contains a training image — is `dedup check`'s query side, "
        f"which costs nothing per training image. Rerun this to revisit the decision with another embedder or spec."
    )
    write_section("train_regions", f"## Training-side regions (issue #19): measured, not offered\n\n"
                  f"`python benchmarks/train_regions.py` ({machine_description()}). {head}\n\n{table}\n\n{decision}\n")


if __name__ == "__main__":
    main()
