"""`dedup check` with and without region matches: memorized photos hidden in bigger pictures.

Real photos (``dedup.testing.synth.real_photos(512)``): every other one is a training sample,
run through ``run_pipeline`` into a run directory; the rest are unrelated material. Queries:

* each training photo hidden in a 2×2 and a 3×3 collage (the other cells: unrelated photos),
  pasted at 30–60 % of the area into an unrelated photo, photographed on a wall (a coloured
  frame, a random perspective, an unrelated photo behind), recoloured, under a caption bar;
* unrelated queries: the unrelated photos themselves, collages of only unrelated photos, and
  the same pastes / perspective / recolour / caption edits made from unrelated photos only.

Per kind: caught (flagged with the RIGHT training sample first), wrong (flagged with any other
training sample), and for unrelated queries the flagged share; regions on and off, same run.
The table goes into docs/quality.md between ``<!-- check:begin -->`` / ``<!-- check:end -->``;
the query cost (images/s) into docs/benchmarks.md, section ``check_regions``.

    python benchmarks/check_quality.py [--embedder sscd] [--no-write]
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
from dedup.testing.synth import real_photos
from dedup.testing import variants
from dedup.testing.variants import jpeg_bytes

QUALITY = Path(__file__).resolve().parent.parent / "docs" / "quality.md"
BEGIN, END = "<!-- check:begin -->", "<!-- check:end -->"
KINDS = ("collage_2x2", "collage_3x3", "pasted", "photographed", "recoloured", "caption")


# -- query makers ------------------------------------------------------------------------------
def cover(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``im`` scaled to cover ``size`` and centre-cropped to it (how grids fill their cells)."""
    return ImageOps.fit(im.convert("RGB"), size, Image.Resampling.LANCZOS)


def collage(cells: list[Image.Image], n: int, cell=(320, 240), gutter: int = 6) -> Image.Image:
    w, h = cell
    out = Image.new("RGB", (n * w + (n + 1) * gutter, n * h + (n + 1) * gutter), (255, 255, 255))
    for k, im in enumerate(cells):
        r, c = divmod(k, n)
        out.paste(cover(im, cell), (gutter + c * (w + gutter), gutter + r * (h + gutter)))
    return out


def pasted(im: Image.Image, bg: Image.Image, rng, size=(640, 480)) -> Image.Image:
    out = cover(bg, size)
    share = rng.uniform(0.30, 0.60)
    a = im.width / im.height
    h = int(round((share * size[0] * size[1] / a) ** 0.5))
    w = int(round(h * a))
    if w > size[0]:
        w, h = size[0], int(round(size[0] / a))
    x, y = int(rng.integers(0, size[0] - w + 1)), int(rng.integers(0, size[1] - h + 1))
    out.paste(im.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (x, y))
    return out


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
    return out


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
    return out


def make_queries(train, other, rng, n_unrel_collages: int = 24):
    """[(file name, kind, true training name or None, image)]."""
    q = []

    def pick(k, exclude=()):
        pool = [p for p in other if p[0] not in exclude]
        return [pool[i] for i in rng.choice(len(pool), k, replace=False)]

    for name, im in train:
        for n, kind in ((2, "collage_2x2"), (3, "collage_3x3")):
            cells = [o for _, o in pick(n * n - 1)]
            cells.insert(int(rng.integers(0, n * n)), im)
            q.append((f"{kind}__{name}.jpg", kind, name, collage(cells, n)))
        bg = pick(1)[0][1]
        q.append((f"pasted__{name}.jpg", "pasted", name, pasted(im, bg, rng)))
        bg = pick(1)[0][1]
        q.append((f"photographed__{name}.jpg", "photographed", name, photographed(im, bg, rng)))
        q.append((f"recoloured__{name}.jpg", "recoloured", name, recoloured(im, rng)))
        q.append((f"caption__{name}.jpg", "caption", name, caption(im, rng)))
    for name, im in other:  # unrelated: the photos, and every edit made of unrelated photos only
        q.append((f"unrelated_photo__{name}.jpg", "unrelated_photo", None, im))
        bg = pick(1, exclude=(name,))[0][1]
        q.append((f"unrelated_pasted__{name}.jpg", "unrelated_edit", None, pasted(im, bg, rng)))
        bg = pick(1, exclude=(name,))[0][1]
        q.append((f"unrelated_photographed__{name}.jpg", "unrelated_edit", None, photographed(im, bg, rng)))
        q.append((f"unrelated_recoloured__{name}.jpg", "unrelated_edit", None, recoloured(im, rng)))
        q.append((f"unrelated_caption__{name}.jpg", "unrelated_edit", None, caption(im, rng)))
    for k in range(n_unrel_collages):
        n = 2 if k % 2 == 0 else 3
        q.append((f"unrelated_collage_{n}x{n}__{k:02d}.jpg", "unrelated_collage", None, collage([o for _, o in pick(n * n)], n)))
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
    for fname, kind, true, _ in queries:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="sscd-distilled", choices=("sscd-distilled", "sscd"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the run and the queries here (default: a temporary folder)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pyarrow.parquet as pq

    from dedup.phases.check import check

    rng = np.random.default_rng(args.seed)
    photos = real_photos(512)
    train, other = photos[0::2], photos[1::2]
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    t0 = time.perf_counter()
    run, by_name = build_run(train, root, args.embedder)
    t_run = time.perf_counter() - t0
    queries = make_queries(train, other, rng)
    qdir = root / "queries"
    qdir.mkdir()
    for fname, _, _, im in queries:
        (qdir / fname).write_bytes(jpeg_bytes(im, 90))
    results, scores, cost = {}, {}, {}
    for mode, on in (("regions", True), ("global", False)):
        t = time.perf_counter()
        res = check([str(qdir)], str(run), str(root / f"out_{mode}"), regions=on, record=False)
        dt = time.perf_counter() - t
        rows = {r["query_id"]: r for r in pq.read_table(root / f"out_{mode}" / "check.parquet").to_pylist()}
        results[mode], scores[mode] = rows, score(rows, queries, by_name)
        cost[mode] = (res["ok"] / dt, res.get("regions_per_query", 1.0), res.get("seconds_per_query"), res.get("region_threshold"))
    th = cost["regions"][3]
    kinds = list(KINDS) + ["unrelated_photo", "unrelated_collage", "unrelated_edit"]
    table_rows = []
    for kind in kinds:
        n = scores["regions"][kind][0]
        row = [kind, n]
        for mode in ("regions", "global"):
            _, c, w, f = scores[mode][kind]
            row += ([f"{c / n:.2f}", w] if not kind.startswith("unrelated") else ["-", w]) + [f"{f / n:.3f}" if kind.startswith("unrelated") else "-"]
        table_rows.append(row)
    unrel = [fn for fn, k, t, _ in queries if t is None]
    for mode in ("regions", "global"):
        fl = sum(results[mode][fn]["flagged"] for fn in unrel)
        cost[mode] = cost[mode] + (fl / len(unrel),)
    headers = ["kind", "queries", "caught (regions)", "wrong (regions)", "unrelated flagged (regions)",
               "caught (global)", "wrong (global)", "unrelated flagged (global)"]
    table = markdown_table(headers, table_rows)
    # how close unrelated queries came, and how far above the threshold the copies stayed
    pos = [r for fn, k, t, _ in queries if t is not None for r in [results["regions"][fn]]]
    true_cos = [r["region_cosine"] for fn, k, t, _ in queries if t is not None for r in [results["regions"][fn]]
                if r["region_nearest"] == by_name[t] and r["region_cosine"] is not None]
    unrel_cos = [max(x for x in (r["region_cosine"], r["embedding_cosine"]) if x is not None)
                 for fn in unrel for r in [results["regions"][fn]]]
    del pos
    spread = (f"Best region cosine of each copy to its training sample: min {min(true_cos):.3f}, median "
              f"{float(np.median(true_cos)):.3f}; best region (or whole-image) cosine of unrelated queries to any "
              f"training sample: max {max(unrel_cos):.3f}, 99th percentile {float(np.quantile(unrel_cos, 0.99)):.3f}.")
    summary = (
        f"{len(train)} training photos (run `{args.embedder}`, threshold {th['base']}), {len(other)} unrelated photos; "
        f"{len(queries) - len(unrel)} copy queries, {len(unrel)} unrelated queries. Regions: "
        f"{cost['regions'][1]:.1f} per query, threshold {th['value']} ({th['method']}"
        f"{', margin %.2f' % th['margin'] if th.get('margin') is not None else ''}). "
        f"Unrelated flagged overall: {cost['regions'][4]:.3f} with regions, {cost['global'][4]:.3f} global only."
    )
    print(table)
    print()
    print(summary)
    print(spread)
    cost_table = markdown_table(
        ["mode", "regions per query", "queries/s (check end to end)", "s per query (decode, embed, match)"],
        [[m, f"{cost[m][1]:.1f}", f"{cost[m][0]:.2f}", f"{cost[m][2]:.3f}"] for m in ("regions", "global")],
    )
    print()
    print(cost_table)
    print(f"(training run built in {t_run:.1f} s)")
    if args.no_write:
        return
    cmd = "python benchmarks/check_quality.py" + ("" if args.embedder == "sscd-distilled" else f" --embedder {args.embedder}")
    body = (f"## Memorization check: copies inside bigger pictures\n\nGenerated by `{cmd}` "
            f"({machine_description()}). Caught: flagged with the right training sample first; wrong: flagged with "
            f"any other training sample. *regions*: whole image + content box + 2×2 and 3×3 grids with half-step "
            f"cells (`dedup check` default); *global*: one descriptor per query (before issue #19), same run.\n\n"
            f"{table}\n\n{summary}\n{spread}\n")
    text = QUALITY.read_text() if QUALITY.exists() else "# Quality\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END)
        text = text[: a + len(BEGIN)] + "\n" + body + text[b:]
    else:
        text = text.rstrip() + f"\n\n{BEGIN}\n{body}{END}\n"
    QUALITY.write_text(text)
    write_section("check_regions", f"## check: query cost with and without regions\n\n`{cmd}` ({machine_description()}), "
                  f"{len(queries)} queries against a {len(train)}-sample run, `{args.embedder}` on CPU.\n\n{cost_table}\n")


if __name__ == "__main__":
    main()
