"""`dedup check` with and without region matches: memorized photos hidden in bigger pictures.

Real photos (``dedup.testing.synth.real_photos(512)``): two of every three are training
samples, run through ``run_pipeline`` into a run directory; the third, and the other UKBench
shots of an unrelated photo's object, are unrelated material (:func:`photo_split`). Queries,
``--per-photo`` of each kind per training photo (default 3: 48 per kind):

* each training photo hidden in a 2×2 and a 3×3 collage (the other cells: unrelated photos),
  pasted at 30–60 % of the area into an unrelated photo, photographed on a wall (a coloured
  frame, a random perspective, an unrelated photo behind), recoloured, under a caption bar;
* unrelated queries: the unrelated photos themselves, collages of only unrelated photos, and
  the same pastes / perspective / recolour / caption edits made from unrelated photos only.

Per kind: caught (flagged with the RIGHT training sample first), wrong (flagged with any other
training sample), and for unrelated queries the flagged share; regions on and off, same run.
The table goes into docs/quality.md between ``<!-- check:begin -->`` / ``<!-- check:end -->``;
the query cost (images/s) into docs/benchmarks.md, section ``check_regions``.

    python benchmarks/check_quality.py [--embedder sscd] [--per-photo 3] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._table import machine_description, markdown_table, write_section
from dedup.testing import variants
from dedup.testing.synth import real_photos
from dedup.testing.variants import jpeg_bytes

QUALITY = Path(__file__).resolve().parent.parent / "docs" / "quality.md"
BEGIN, END = "<!-- check:begin -->", "<!-- check:end -->"
KINDS = ("collage_2x2", "collage_3x3", "pasted", "photographed", "recoloured", "caption")


# -- query makers ------------------------------------------------------------------------------
def cover(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``im`` scaled to cover ``size`` and centre-cropped to it (how grids fill their cells)."""
    return ImageOps.fit(im.convert("RGB"), size, Image.Resampling.LANCZOS)


def collage(cells: list[Image.Image], n: int, cell=(320, 240), gutter: int = 6, mark: int | None = None):
    """An ``n × n`` grid of ``cells`` (cover-cropped); with ``mark``: (image, box of that cell)."""
    w, h = cell
    out = Image.new("RGB", (n * w + (n + 1) * gutter, n * h + (n + 1) * gutter), (255, 255, 255))
    box = None
    for k, im in enumerate(cells):
        r, c = divmod(k, n)
        x, y = gutter + c * (w + gutter), gutter + r * (h + gutter)
        out.paste(cover(im, cell), (x, y))
        if k == mark:
            box = (x, y, x + w, y + h)
    return out if mark is None else (out, box)


def pasted(im: Image.Image, bg: Image.Image, rng, size=(640, 480)) -> Image.Image:
    out = cover(bg, size)
    share = rng.uniform(0.30, 0.60)
    a = im.width / im.height
    h = int(round((share * size[0] * size[1] / a) ** 0.5))
    w = int(round(h * a))
    if w > size[0]:
        w, h = size[0], int(round(size[0] / a))
    if h > size[1]:  # a tall photo: as high as the scene
        w, h = int(round(size[1] * a)), size[1]
    x, y = int(rng.integers(0, size[0] - w + 1)), int(rng.integers(0, size[1] - h + 1))
    out.paste(im.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (x, y))
    return out, (x, y, x + w, y + h)


def _coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b = [c for p in src for c in p]
    return np.linalg.solve(np.array(a, float), np.array(b, float)).tolist()


def photographed(im: Image.Image, bg: Image.Image, rng, size=(640, 480)) -> Image.Image:
    """A framed print of ``im`` on a wall (``bg``), seen at an angle."""
    frame = tuple(int(c) for c in rng.integers(0, 256, 3))
    pad = max(8, im.width // 20)
    framed = ImageOps.expand(im.convert("RGB"), border=pad, fill=frame)
    W, H = size
    fw, fh = framed.size
    scale = rng.uniform(0.55, 0.75) * min(W / fw, H / fh)
    w, h = fw * scale, fh * scale
    cx, cy = W / 2 + rng.uniform(-0.12, 0.12) * W, H / 2 + rng.uniform(-0.1, 0.1) * H
    j = lambda: rng.uniform(-0.08, 0.08) * min(w, h)  # noqa: E731 - corner jitter
    dst = [(cx - w / 2 + j(), cy - h / 2 + j()), (cx + w / 2 + j(), cy - h / 2 + j()),
           (cx + w / 2 + j(), cy + h / 2 + j()), (cx - w / 2 + j(), cy + h / 2 + j())]
    src = [(0, 0), (fw, 0), (fw, fh), (0, fh)]
    c = _coeffs(dst, src)
    warped = framed.transform(size, Image.Transform.PERSPECTIVE, c, Image.Resampling.BICUBIC)
    mask = Image.new("L", framed.size, 255).transform(size, Image.Transform.PERSPECTIVE, c, Image.Resampling.BICUBIC)
    out = ImageEnhance.Brightness(cover(bg, size)).enhance(0.8)
    out.paste(warped, (0, 0), mask)
    inner = Image.new("L", framed.size, 0)
    inner.paste(255, (pad, pad, pad + im.width, pad + im.height))
    box = inner.transform(size, Image.Transform.PERSPECTIVE, c, Image.Resampling.NEAREST).getbbox()
    return out, box


def recoloured(im: Image.Image, rng) -> Image.Image:
    im = im.convert("RGB")
    tint = Image.new("RGB", im.size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = Image.blend(im, tint, 0.25)
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.4, 1.6))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.25))


def caption(im: Image.Image, rng, text: str = "when the model remembers  #ai #art") -> Image.Image:
    im = im.convert("RGB")
    w, h = im.size
    bar = int(h * rng.uniform(0.18, 0.3))
    out = Image.new("RGB", (w, h + bar), (255, 255, 255) if rng.random() < 0.5 else (20, 20, 20))
    top = rng.random() < 0.5
    out.paste(im, (0, bar if top else 0))
    d = ImageDraw.Draw(out)
    font = variants.font(max(10, bar // 3))
    fill = (0, 0, 0) if out.getpixel((0, 0 if top else h + bar - 1)) == (255, 255, 255) else (255, 255, 255)
    d.text((w // 30, (0 if top else h) + bar // 3), text, fill=fill, font=font)
    return out, (0, bar if top else 0, w, (bar if top else 0) + h)


def shared_photos(names: list[str], max_side: int = 512) -> list[tuple[str, Image.Image]]:
    """Photos of shared/data/ukbench_holidays by relative path (those present), long side ≤ ``max_side``."""
    import os

    here = Path(__file__).resolve()
    roots = [os.environ.get("DEDUP_SHARED_DATA"), here.parents[1] / "shared" / "data", here.parents[2] / "shared" / "data"]
    base = next((Path(r) / "ukbench_holidays" for r in roots if r and (Path(r) / "ukbench_holidays").is_dir()), None)
    out = []
    for rel in names:
        if base is not None and (base / rel).exists():
            with Image.open(base / rel) as im:
                im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            out.append((Path(rel).stem, im))
    return out


def photo_split() -> tuple[list, list]:
    """Training photos and unrelated material: two of every three real photos
    (``real_photos(512)``, 16 of 24) are trained on, the third are unrelated, and so are the
    other shots of the UKBench object whose first shot is unrelated (never a different shot of
    a training photo's object: that would be a near-duplicate, not an unrelated photo)."""
    photos = real_photos(512)
    train = [p for k, p in enumerate(photos) if k % 3 != 2]
    other = [p for k, p in enumerate(photos) if k % 3 == 2]
    names = {n for n, _ in other}
    for first, rest in (("ukbench_ukbench00000", 1), ("ukbench_ukbench00004", 5), ("ukbench_ukbench00008", 9)):
        if first in names:
            other += shared_photos([f"ukbench/ukbench{i:05d}.jpg" for i in range(rest, min(rest + 3, 10))])
    return train, other


def make_queries(train, other, rng, per_photo: int = 3, n_unrel_collages: int | None = None):
    """[(file name, kind, true training name or None, image, true box or None)]: ``per_photo``
    independent queries of every kind per training photo (other cells, backgrounds, placement,
    warp and colours drawn afresh), as many unrelated edits per unrelated photo, and
    ``n_unrel_collages`` (default 8 per ``per_photo``) collages of unrelated photos only. The
    true box is where the training photo sits in the query's pixels."""
    q = []
    n_unrel_collages = 8 * per_photo if n_unrel_collages is None else n_unrel_collages

    def pick(k, exclude=()):
        pool = [p for p in other if p[0] not in exclude]
        return [pool[i] for i in rng.choice(len(pool), k, replace=False)]

    for v in range(per_photo):
        sfx = "" if v == 0 else f"~{v}"
        for name, im in train:
            for n, kind in ((2, "collage_2x2"), (3, "collage_3x3")):
                cells = [o for _, o in pick(n * n - 1)]
                at = int(rng.integers(0, n * n))
                cells.insert(at, im)
                q.append((f"{kind}__{name}{sfx}.jpg", kind, name, *collage(cells, n, mark=at)))
            bg = pick(1)[0][1]
            q.append((f"pasted__{name}{sfx}.jpg", "pasted", name, *pasted(im, bg, rng)))
            bg = pick(1)[0][1]
            q.append((f"photographed__{name}{sfx}.jpg", "photographed", name, *photographed(im, bg, rng)))
            q.append((f"recoloured__{name}{sfx}.jpg", "recoloured", name, recoloured(im, rng), (0, 0, im.width, im.height)))
            q.append((f"caption__{name}{sfx}.jpg", "caption", name, *caption(im, rng)))
        for name, im in other:  # unrelated: the photos, and every edit made of unrelated photos only
            if v == 0:
                q.append((f"unrelated_photo__{name}.jpg", "unrelated_photo", None, im, None))
            bg = pick(1, exclude=(name,))[0][1]
            q.append((f"unrelated_pasted__{name}{sfx}.jpg", "unrelated_edit", None, pasted(im, bg, rng)[0], None))
            bg = pick(1, exclude=(name,))[0][1]
            q.append((f"unrelated_photographed__{name}{sfx}.jpg", "unrelated_edit", None, photographed(im, bg, rng)[0], None))
            q.append((f"unrelated_recoloured__{name}{sfx}.jpg", "unrelated_edit", None, recoloured(im, rng), None))
            q.append((f"unrelated_caption__{name}{sfx}.jpg", "unrelated_edit", None, caption(im, rng)[0], None))
    for k in range(n_unrel_collages):
        n = 2 if k % 2 == 0 else 3
        q.append((f"unrelated_collage_{n}x{n}__{k:02d}.jpg", "unrelated_collage", None, collage([o for _, o in pick(n * n)], n), None))
    return q


# -- run ----------------------------------------------------------------------------------------
def build_run(train, root: Path, embedder: str) -> tuple[Path, dict]:
    from dedup.config import load_config
    from dedup.runner import run_pipeline

    shards, run = root / "shards", root / "run"
    shards.mkdir(parents=True)
    with tarfile.open(shards / "train-000.tar", "w") as tf:
        for name, im in train:
            data = jpeg_bytes(im, 92)
            ti = tarfile.TarInfo(f"{name}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    cfg = load_config(None, None, **{"embedding.spec": embedder, "run.workers": 1})
    res = run_pipeline([str(shards)], str(run), cfg, progress=False)
    assert res.exit_code == 0, res
    import pyarrow.parquet as pq

    ids = pq.read_table(run / "manifest.parquet", columns=["sample_id"])["sample_id"].to_pylist()
    by_name = {i.split("/", 1)[1]: i for i in ids}
    return run, by_name


def score(rows: dict, queries, by_name: dict) -> dict:
    """kind -> (n, caught, wrong, flagged)."""
    out = defaultdict(lambda: [0, 0, 0, 0])
    for fname, kind, true, _, _ in queries:
        r = rows[fname]
        s = out[kind]
        s[0] += 1
        matched = r["matched"] or []
        if r["flagged"]:
            s[3] += 1
            if true is not None and matched and matched[0] == by_name[true]:
                s[1] += 1
            if any(m != by_name.get(true) for m in matched):
                s[2] += 1
    return dict(out)


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / area if area > 0 else 0.0


def misses(rows: dict, queries, by_name: dict, qdir: Path, run: Path, embedder: str, th: dict) -> list[str]:
    """Why the copies not caught were missed: the best region's cosine and box against the
    region threshold, and the cosine of the true placement's box (an oracle region): high there
    but low at the best region means the proposals missed the copy, low there too means the
    embedder does not see the copy in it."""
    from dedup.compute.embedders import make_embedder

    missed = [(fn, kind, true, box) for fn, kind, true, _, box in queries
              if true is not None and not (rows[fn]["flagged"] and (rows[fn]["matched"] or [None])[0] == by_name[true])]
    if not missed:
        return []
    emb = make_embedder(embedder)
    with tarfile.open(run.parent / "shards" / "train-000.tar") as tf:
        ref = {m.name[:-4]: Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB") for m in tf.getmembers()}
    names = sorted({t for _, _, t, _ in missed})
    ref_e = dict(zip(names, emb.embed([ref[n] for n in names])))
    crops = [Image.open(qdir / fn).convert("RGB").crop(box) for fn, _, _, box in missed]
    oracle = emb.embed(crops)
    out = []
    for (fn, _kind, true, box), e in zip(missed, oracle):
        r = rows[fn]
        rb = r["region_box"]
        out.append(f"{fn}: best {r['region_cosine'] or float('nan'):.3f} at {rb} -> {r['region_nearest']} "
                   f"(threshold {th['value']}); true box {list(box)} IoU {iou(rb, box) if rb else 0:.2f}, "
                   f"cosine there {float(e @ ref_e[true]):.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="sscd-distilled", choices=("sscd-distilled", "sscd"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-photo", type=int, default=3,
                    help="queries of each kind per training photo, each drawn afresh (default 3: 48 per kind)")
    ap.add_argument("--workdir", default=None, help="keep the run and the queries here (default: a temporary folder); "
                    "an existing one with the same --seed/--per-photo is reused")
    ap.add_argument("--modes", default="regions,global", help="which checks to run (default both)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pyarrow.parquet as pq

    from dedup.phases.check import check

    rng = np.random.default_rng(args.seed)
    train, other = photo_split()
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    t0 = time.perf_counter()
    queries = make_queries(train, other, rng, per_photo=args.per_photo)
    qdir = root / "queries"
    if (root / "run" / "manifest.parquet").exists() and qdir.is_dir() and len(list(qdir.iterdir())) == len(queries):
        run = root / "run"
        ids = pq.read_table(run / "manifest.parquet", columns=["sample_id"])["sample_id"].to_pylist()
        by_name = {i.split("/", 1)[1]: i for i in ids}
    else:
        run, by_name = build_run(train, root, args.embedder)
        qdir.mkdir()
        for fname, _, _, im, _ in queries:
            (qdir / fname).write_bytes(jpeg_bytes(im, 90))
    t_run = time.perf_counter() - t0
    modes = [m for m in ("regions", "global") if m in args.modes.split(",")]
    results, scores, cost = {}, {}, {}
    for mode in modes:
        out = root / f"out_{mode}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = time.perf_counter()
        res = check([str(qdir)], str(run), str(out), regions=mode == "regions", record=False)
        dt = time.perf_counter() - t
        rows = {r["query_id"]: r for r in pq.read_table(out / "check.parquet").to_pylist()}
        results[mode], scores[mode] = rows, score(rows, queries, by_name)
        cost[mode] = (res["ok"] / dt, res.get("regions_per_query", 1.0), res.get("seconds_per_query"), res.get("region_threshold"))
    kinds = list(KINDS) + ["unrelated_photo", "unrelated_collage", "unrelated_edit"]
    unrel = [fn for fn, k, t, _, _ in queries if t is None]
    for mode in modes:
        fl = sum(results[mode][fn]["flagged"] for fn in unrel)
        cost[mode] = cost[mode] + (fl / len(unrel),)
    table_rows = []
    for kind in kinds:
        n = scores[modes[0]][kind][0]
        row = [kind, n]
        for mode in modes:
            _, c, w, f = scores[mode][kind]
            row += ([f"{c / n:.2f}", w] if not kind.startswith("unrelated") else ["-", w]) + [f"{f / n:.3f}" if kind.startswith("unrelated") else "-"]
        table_rows.append(row)
    headers = ["kind", "queries"] + [f"{h} ({m})" for m in modes for h in ("caught", "wrong", "unrelated flagged")]
    table = markdown_table(headers, table_rows)
    print(table)
    print()
    if "regions" not in modes:
        return
    th = cost["regions"][3]
    reg = results["regions"]
    # how close unrelated queries came, how far above the threshold the copies stayed, and
    # whether the box shown is where the copy is
    true_cos = [r["region_cosine"] for fn, k, t, _, _ in queries if t is not None for r in [reg[fn]]
                if r["region_nearest"] == by_name[t] and r["region_cosine"] is not None]
    unrel_cos = [max(x for x in (r["region_cosine"], r["embedding_cosine"]) if x is not None) for fn in unrel for r in [reg[fn]]]
    boxed = [iou(reg[fn]["region_box"], box) >= 0.5 for fn, k, t, _, box in queries
             if t is not None and k in ("collage_2x2", "collage_3x3", "pasted", "photographed")
             and reg[fn]["flagged"] and reg[fn]["matched"][0] == by_name[t]]
    spread = (f"Best region cosine of each copy to its training sample: min {min(true_cos):.3f}, median "
              f"{float(np.median(true_cos)):.3f}; best region (or whole-image) cosine of unrelated queries to any "
              f"training sample: max {max(unrel_cos):.3f}, 99th percentile {float(np.quantile(unrel_cos, 0.99)):.3f}. "
              f"The box shown overlaps the copy's true place at IoU ≥ 0.5 in {sum(boxed)} of the {len(boxed)} caught "
              f"collage, pasted and photographed queries.")
    other_mode = [m for m in modes if m != "regions"]
    summary = (
        f"{len(train)} training photos (run `{args.embedder}`, threshold {th['base']}), {len(other)} unrelated photos, "
        f"{args.per_photo} queries of each kind per training photo; "
        f"{len(queries) - len(unrel)} copy queries, {len(unrel)} unrelated queries. Regions: "
        f"{cost['regions'][1]:.1f} per query, threshold {th['value']} ({th['method']}"
        f"{', margin %.2f' % th['margin'] if th.get('margin') is not None else ''}). "
        f"Unrelated flagged overall: {cost['regions'][4]:.3f} with regions"
        + (f", {cost['global'][4]:.3f} global only." if other_mode else ".")
    )
    print(summary)
    print(spread)
    why = misses(reg, queries, by_name, qdir, run, args.embedder, th)
    for line in why:
        print("missed:", line)
    cost_table = markdown_table(
        ["mode", "regions per query", "queries/s (check end to end)", "s per query (decode, embed, match)"],
        [[m, f"{cost[m][1]:.1f}", f"{cost[m][0]:.2f}", f"{cost[m][2]:.3f}"] for m in modes],
    )
    print()
    print(cost_table)
    import os

    load = os.getloadavg()[0]
    print(f"(training run and queries ready in {t_run:.1f} s; load average {load:.1f})")
    if args.no_write or modes != ["regions", "global"]:
        return
    cmd = "python benchmarks/check_quality.py" + ("" if args.embedder == "sscd-distilled" else f" --embedder {args.embedder}")
    missed = ("\n\nMissed copies (best region, its box, and the cosine at the copy's true box):\n\n"
              + "\n".join(f"- {line}" for line in why)) if why else ""
    body = (f"## Memorization check: copies inside bigger pictures\n\nGenerated by `{cmd}` "
            f"({machine_description()}). Caught: flagged with the right training sample first; wrong: flagged with "
            f"any other training sample. *regions*: whole image + content box + grid windows (2/3, 1/2, 1/3 of the "
            f"side, half-window steps) + square windows + refinement of the queries that came close (`dedup check` "
            f"default); *global*: one descriptor per query (before issue #19), same run.\n\n"
            f"{table}\n\n{summary}\n{spread}{missed}\n")
    text = QUALITY.read_text() if QUALITY.exists() else "# Quality\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END)
        text = text[: a + len(BEGIN)] + "\n" + body + text[b:]
    else:
        text = text.rstrip() + f"\n\n{BEGIN}\n{body}{END}\n"
    QUALITY.write_text(text)
    write_section("check_regions", f"## check: query cost with and without regions\n\n`{cmd}` ({machine_description()}), "
                  f"{len(queries)} queries against a {len(train)}-sample run, `{args.embedder}` on CPU; 1-minute load "
                  f"average {load:.1f} when it finished (a shared machine: compare the rows, not runs).\n\n{cost_table}\n")


if __name__ == "__main__":
    main()
