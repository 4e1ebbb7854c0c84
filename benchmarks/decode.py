"""Decoding at the model's size: speed, embedding agreement and recall against a full decode.

    python benchmarks/decode.py                 # writes docs/benchmarks.md (section "decode")
    python benchmarks/decode.py --no-write      # print only
    python benchmarks/decode.py --embedder sscd # the default is sscd-distilled

Inputs: real photos of at least 1,000 px on the short side — the three 8-Mpx Holidays photos in
/work/shared/data/ukbench_holidays and random crops of them (45-80 % per side), EXIF-transposed
and re-encoded as JPEG q90 — and the calibration edits of ``dedup.evaluation.EDITS`` (re-encodes,
resizes, crops, flip, rotation, text, grey, colour, padding) of each, made from the full-size
photo.

Each file is decoded these ways and embedded with the same model (ONNX, one thread, one core):

- full decode:  ``decode_image(bytes)``, then the embedder's own resize;
- Pillow draft: ``decode_image(bytes, min_size=input_size)`` with the JPEG decode left to Pillow
                — the largest of 1/2, 1/4, 1/8 keeping both sides ≥ the model's input (the
                pipeline before simplejpeg, and its fallback without it);
- pipeline:     the same call with libjpeg-turbo (simplejpeg), Pillow's scales: what features,
                check and calibration do (``decode_plan``);
- 3/8:          the same with ``dedup.compute.decode.THREE_EIGHTHS`` on (off in the pipeline: the
                decode also feeds the hashes, and 3/8 changes their bits);
- any M/8:      libjpeg-turbo's smallest M/8 scale (7/8, 3/4, 5/8 too) keeping both sides ≥ the
                input (simplejpeg ``min_height``/``min_width``), for comparison.

Reported per way: decode and embed CPU time per image, cosine of each file's vector to its
full-decode vector (mean / 1st percentile / min), and recall of the edits at the family's
threshold (an edit counts when its cosine to the original, both decoded that way, reaches it),
with the number of (original, edit) decisions that differ from the full decode's.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402
from dedup.compute.decode import decode_image  # noqa: E402
from dedup.compute.embedders import make_embedder  # noqa: E402
from dedup.config import DEFAULT_THRESHOLDS  # noqa: E402
from dedup.evaluation import EDITS  # noqa: E402

HOLIDAYS = Path("/work/shared/data/ukbench_holidays/holidays")


def photos(crops: int) -> list[Image.Image]:
    out = []
    rng = np.random.default_rng(21)
    for p in sorted(HOLIDAYS.glob("*.jpg")):
        im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        out.append(im)
        w, h = im.size
        for _ in range(crops):
            cw, ch = int(w * rng.uniform(0.45, 0.8)), int(h * rng.uniform(0.45, 0.8))
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            out.append(im.crop((x, y, x + cw, y + ch)))
    return [im for im in out if min(im.size) >= 1000]


def jpeg(im: Image.Image, q: int = 90) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=q)
    return b.getvalue()


def way_full(b: bytes, size: int) -> Image.Image:
    d = decode_image(b)
    assert d.image is not None, d.error
    return d.image


def way_pipeline(b: bytes, size: int) -> Image.Image:
    d = decode_image(b, min_size=size)
    assert d.image is not None, d.error
    return d.image


def way_three_eighths(b: bytes, size: int) -> Image.Image:
    import dedup.compute.decode as dec

    saved = dec.THREE_EIGHTHS
    dec.THREE_EIGHTHS = True  # the switch the pipeline leaves off (it would change hash bits)
    try:
        return way_pipeline(b, size)
    finally:
        dec.THREE_EIGHTHS = saved


def way_pipeline_pillow(b: bytes, size: int) -> Image.Image:
    import dedup.compute.decode as dec

    saved = dec._turbo
    dec._turbo = None  # the module's documented fallback when simplejpeg is missing
    try:
        return way_pipeline(b, size)
    finally:
        dec._turbo = saved


def way_m8(b: bytes, size: int) -> Image.Image:
    import simplejpeg

    if not b.startswith(b"\xff\xd8"):
        return way_full(b, size)  # a PNG edit: no DCT scaling
    return Image.fromarray(simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=size, min_width=size), "RGB")


def run(embedder_spec: str, crops: int) -> str:
    emb = make_embedder(embedder_spec, device="cpu", batch_size=16)
    size = int(emb.input_size)
    family = embedder_spec.split(":")[0]
    threshold = DEFAULT_THRESHOLDS.get(family, 0.6)
    srcs = photos(crops)
    originals = [jpeg(im) for im in srcs]
    edits = [(k, name, fn(im)) for k, im in enumerate(srcs) for name, fn in EDITS.items()]
    files = originals + [b for _, _, b in edits]
    print(f"{len(srcs)} photos ≥1000 px, {len(edits)} edits, {len(files)} files; {emb.tag} input {size}", file=sys.stderr)
    ways: dict[str, Callable[[bytes, int], Image.Image]] = {"full decode": way_full}
    try:
        import simplejpeg  # noqa: F401

        ways["Pillow draft 1/2, 1/4, 1/8 (the pipeline before, and without simplejpeg)"] = way_pipeline_pillow
        ways["pipeline: libjpeg-turbo 1/2, 1/4, 1/8"] = way_pipeline
        ways["libjpeg-turbo 1/2, 3/8, 1/4, 1/8 (THREE_EIGHTHS, off: changes hash bits)"] = way_three_eighths
        ways["libjpeg-turbo, any M/8 scale (7/8 … 1/8)"] = way_m8
    except ImportError:
        ways["pipeline: Pillow draft 1/2, 1/4, 1/8 (simplejpeg not installed)"] = way_pipeline
    vecs, rows = {}, []
    for name, fn in ways.items():
        t = time.process_time()
        ims = [fn(b, size) for b in files]
        t_dec = time.process_time() - t
        px = np.mean([im.width * im.height for im in ims[: len(originals)]])
        t = time.process_time()
        vecs[name] = emb.embed(ims)
        t_emb = time.process_time() - t
        rows.append([name, f"{px / 1e6:.2f}", f"{1e3 * t_dec / len(files):.1f}", f"{1e3 * t_emb / len(files):.1f}"])
        print(f"  {name}: decode {t_dec:.1f} s, embed {t_emb:.1f} s", file=sys.stderr)
    ref = vecs["full decode"]
    n0 = len(originals)
    oi = np.array([k for k, _, _ in edits])
    ref_pair = np.einsum("nd,nd->n", ref[oi], ref[n0:])
    for row, name in zip(rows, ways):
        v = vecs[name]
        agree = np.einsum("nd,nd->n", v, ref)
        pair = np.einsum("nd,nd->n", v[oi], v[n0:])
        recall = (pair >= threshold).mean()
        changed = int(((pair >= threshold) != (ref_pair >= threshold)).sum())
        row += [f"{agree.mean():.4f} / {np.percentile(agree, 1):.4f} / {agree.min():.4f}",
                f"{100 * recall:.1f}%", str(changed), f"{np.abs(pair - ref_pair).mean():.4f}"]
    headers = ["decode", "Mpx decoded per original", "decode ms/file", "preprocess + embed ms/file",
               "cosine to the full-decode vector, mean / p1 / min", f"edits found at cosine ≥ {threshold}",
               "decisions ≠ full decode", "mean abs. change of the (original, edit) cosine"]
    return (f"{len(srcs)} photos ≥ 1,000 px (3 Holidays photos of 3264×2448 and crops), {len(edits)} edits of them "
            f"({len(EDITS)} kinds, dedup.evaluation.EDITS), {len(files)} files; embedder {embedder_spec} "
            f"(input {size} px), one thread, CPU time:\n\n" + markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", default="sscd-distilled")
    ap.add_argument("--crops", type=int, default=5, help="random crops per Holidays photo (default 5)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    t0 = time.time()
    table = run(args.embedder, args.crops)
    text = "\n".join([
        "### Decoding at the model's size (`benchmarks/decode.py`)", "",
        f"`python benchmarks/decode.py` — {machine_description()}. " + table, "",
        f"(run took {time.time() - t0:.0f} s)"])
    print(text)
    if not args.no_write:
        write_section("decode", text)


if __name__ == "__main__":
    main()
