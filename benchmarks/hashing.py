"""Hashing speed and agreement: imagehash vs imagededup vs dedup's hash-only and full paths.

    python benchmarks/hashing.py            # full run (a few minutes), writes docs/benchmarks.md
    python benchmarks/hashing.py --quick    # small run to check that everything works
    python benchmarks/hashing.py --no-write # print only

Inputs: real photos (scikit-image's bundled photos, the UKBench/Holidays samples in
/work/shared/data/ukbench_holidays and crops of the 8-Mpx Holidays photos) resized (LANCZOS) to
a long side of 256/512/1024/2048 px and encoded in memory as JPEG (q90) and PNG. Sources
smaller than the target are upscaled.

Methods, all single-threaded on ONE pinned core, each timed (CPU time of the process, so other
load on the machine is not counted) over the whole image set, the minimum of several interleaved
repetitions:

- imagehash:        ``imagehash.phash(Image.open(bytes))`` (full decode; pHash only) — the
                    baseline of the "vs imagehash" column; also pHash + dHash on one decode
- floor:            Pillow open + draft + load alone: no hash-only path built on Pillow's
                    decoder can beat it
- imagededup:       ``PHash().encode_image(image_file=path)`` (files in a temp dir; if installed)
- ours, hash-only:  ``decode_image(bytes, min_size=HASH_MIN_SIZE)`` (JPEG draft decode) +
                    ``hash_images`` (pHash AND dHash, batched)
- ours, full:       ``decode_image(bytes)`` + ``hash_images``

Agreement: share of images whose pHash (and dHash for ours) equals imagehash's on the full
decode of the same bytes, and the Hamming distances where they differ.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import imagehash  # noqa: E402

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402
from dedup.compute.decode import decode_image  # noqa: E402
from dedup.compute.hashes import HASH_MIN_SIZE, hamming, hash_images  # noqa: E402

UKB = Path("/work/shared/data/ukbench_holidays")
SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
                  "retina", "coins", "moon", "brick", "grass", "gravel", "clock", "cell"]


# ----------------------------------------------------------------------------------- inputs
def load_photos(quick: bool) -> list[tuple[str, Image.Image]]:
    import skimage.data as skd

    names = SKIMAGE_PHOTOS[:5] if quick else SKIMAGE_PHOTOS
    out = [(n, Image.fromarray(getattr(skd, n)()).convert("RGB")) for n in names]
    if not quick:
        left, right = skd.stereo_motorcycle()[:2]
        out += [("motorcycle_left", Image.fromarray(left)), ("motorcycle_right", Image.fromarray(right))]
    files = sorted(UKB.glob("*/*.jpg"))
    for p in files[:3] if quick else files:
        im = Image.open(p).convert("RGB")
        out.append((p.stem, im))
        if not quick and max(im.size) > 2000:
            rng = np.random.default_rng(len(out))
            w, h = im.size
            for k in range(4):
                cw, ch = int(w * rng.uniform(0.45, 0.8)), int(h * rng.uniform(0.45, 0.8))
                x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
                out.append((f"{p.stem}_crop{k}", im.crop((x, y, x + cw, y + ch))))
    return out


def resize_long(im: Image.Image, long_side: int) -> Image.Image:
    w, h = im.size
    s = long_side / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


JPEG_QUALITY = 90


def encode(im: Image.Image, fmt: str) -> bytes:
    """fmt: "PNG", "JPEG" (quality JPEG_QUALITY) or "JPEG q<N>"."""
    b = io.BytesIO()
    if fmt.startswith("JPEG"):
        q = int(fmt.split("q")[1]) if " q" in fmt else JPEG_QUALITY
        im.save(b, "JPEG", quality=q)
    else:
        im.save(b, fmt)
    return b.getvalue()


# ----------------------------------------------------------------------------------- methods
def m_imagehash(datas, paths):
    return [int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16) for b in datas]


def m_imagehash_both(datas, paths):
    out = []
    for b in datas:
        im = Image.open(io.BytesIO(b))
        out.append((int(str(imagehash.phash(im)), 16), int(str(imagehash.dhash(im)), 16)))
    return [p for p, _ in out], [d for _, d in out]


def make_imagededup():
    try:
        from imagededup.methods import PHash
    except ImportError:
        return None
    import logging

    logging.getLogger("imagededup").setLevel(logging.ERROR)
    hasher = PHash(verbose=False)

    def m_imagededup(datas, paths):
        return [int(hasher.encode_image(image_file=p), 16) for p in paths]

    return m_imagededup


def ours(min_size):
    """The pipeline's path: hash-only runs draft-decode JPEG luma (decode_plan: gray=True)."""
    gray = min_size is not None

    def run(datas, paths):
        images = [decode_image(b, min_size=min_size, gray=gray).image for b in datas]
        ph, dh = hash_images(images)
        return [int(v) for v in ph], [int(v) for v in dh]

    return run


def ours_pillow(datas, paths):
    """The hash-only path with the JPEG decode left to Pillow (what it was before simplejpeg):
    the same bits (tests/test_decode.py), for the speed difference."""
    import dedup.compute.decode as dec

    saved = dec._turbo
    dec._turbo = None  # the module's documented fallback when simplejpeg is missing
    try:
        return ours(HASH_MIN_SIZE)(datas, paths)
    finally:
        dec._turbo = saved


FLOOR = f"floor: Pillow draft luma decode alone (≥{HASH_MIN_SIZE} px, no hashing)"
FLOOR_TJ = f"floor: libjpeg-turbo luma decode alone via simplejpeg, Pillow's draft scale (≥{HASH_MIN_SIZE} px, no header parsing, no hashing)"
FLOOR_TJ8 = f"floor: libjpeg-turbo luma decode alone via simplejpeg, smallest M/8 scale (≥{HASH_MIN_SIZE} px, no header parsing, no hashing)"
OURS = f"ours hash-only (draft ≥{HASH_MIN_SIZE} px + phash + dhash)"


def floor_draft_only(datas, paths):
    """Lower bound for any Pillow-based hash-only path: open + draft (luma) + load, nothing else."""
    for b in datas:
        im = Image.open(io.BytesIO(b))
        if im.format == "JPEG" and min(im.size) >= 2 * HASH_MIN_SIZE:
            im.draft("L", (HASH_MIN_SIZE, HASH_MIN_SIZE))
        im.load()
    return None


def make_turbo_floors():
    """Entropy decoding bounds: libjpeg-turbo called directly (simplejpeg, if installed), luma
    only — at Pillow's draft scale (1/2, 1/4, 1/8: the pixels the pipeline hashes) and at the
    smallest of libjpeg-turbo's M/8 scales that keeps both sides ≥ HASH_MIN_SIZE (fewer pixels,
    other bits) — what no JPEG hash path built on libjpeg can beat."""
    try:
        import simplejpeg
    except ImportError:
        return None, None

    def pillow_scale(datas, paths):
        for b in datas:
            h, w = simplejpeg.decode_jpeg_header(b)[:2]
            q = min(w // HASH_MIN_SIZE, h // HASH_MIN_SIZE) if min(w, h) >= 2 * HASH_MIN_SIZE else 1
            s = next(d for d in (8, 4, 2, 1) if q >= d)
            simplejpeg.decode_jpeg(b, colorspace="GRAY", min_height=-(-h // s), min_width=-(-w // s))
        return None

    def m8(datas, paths):
        for b in datas:
            simplejpeg.decode_jpeg(b, colorspace="GRAY", min_height=HASH_MIN_SIZE, min_width=HASH_MIN_SIZE)
        return None

    return pillow_scale, m8


def time_methods(methods: dict, datas, paths, reps: int) -> tuple[dict, dict]:
    best = {k: float("inf") for k in methods}
    results = {}
    for _ in range(reps):
        for name, fn in methods.items():  # interleaved: noise hits every method alike
            t = time.process_time()  # CPU time of this (single-threaded) process: per-core cost
            results[name] = fn(datas, paths)
            best[name] = min(best[name], time.process_time() - t)
    return best, results


def histogram(d: np.ndarray) -> str:
    c = collections.Counter(int(v) for v in d if v)
    return ", ".join(f"{k} bit{'s' if k > 1 else ''}: {n}" for k, n in sorted(c.items())) or "—"


def agreement(ref: list[int], got: list[int]) -> tuple[str, str]:
    d = hamming(np.array(ref, np.uint64), np.array(got, np.uint64))
    return f"{100 * (d == 0).mean():.0f}%", histogram(d)


# ----------------------------------------------------------------------------------- runs
def main_table(photos, sizes, formats, reps, tmp: Path) -> str:
    dedup_fn = make_imagededup()
    methods = {"imagehash (decode + phash)": m_imagehash, "imagehash (decode + phash + dhash)": m_imagehash_both}
    if dedup_fn is not None:
        methods["imagededup PHash (file)"] = dedup_fn
    methods[OURS] = ours(HASH_MIN_SIZE)
    turbo, turbo8 = make_turbo_floors()
    if turbo is not None:
        methods[OURS + ", JPEG decoded by Pillow"] = ours_pillow
    methods["ours full (full decode + phash + dhash)"] = ours(None)
    methods[FLOOR] = floor_draft_only
    rows = []
    ratios = []
    for size, fmt in itertools.product(sizes, formats):
        if turbo is not None:
            methods[FLOOR_TJ], methods[FLOOR_TJ8] = turbo, turbo8
            if not fmt.startswith("JPEG"):
                methods.pop(FLOOR_TJ), methods.pop(FLOOR_TJ8)
        datas = [encode(resize_long(im, size), fmt) for _, im in photos]
        paths = []
        for k, b in enumerate(datas):
            p = tmp / f"{size}_{k}.{fmt.split()[0].lower()}"
            p.write_bytes(b)
            paths.append(str(p))
        ref_d = [int(str(imagehash.dhash(Image.open(io.BytesIO(b)))), 16) for b in datas]
        best, res = time_methods(methods, datas, paths, reps)
        base = best["imagehash (decode + phash)"]
        floors = {k: best[k] for k in (FLOOR, FLOOR_TJ, FLOOR_TJ8) if k in best and k in methods}
        fastest = min(floors, key=lambda k: floors[k])
        ratios.append([size, fmt, f"{len(datas) / best[OURS]:.0f}", fastest.split("(")[0].removeprefix("floor: ").strip(),
                       f"{len(datas) / floors[fastest]:.0f}", f"{floors[fastest] / best[OURS]:.2f}"])
        for name in methods:
            r = res[name]
            if r is None:  # the floor row: speed only
                rows.append([size, fmt, name, f"{len(datas) / best[name]:.0f}", f"{base / best[name]:.2f}×", "", "", "", ""])
                continue
            ph, dh = (r if isinstance(r, tuple) else (r, None))
            ident, hist = agreement(res["imagehash (decode + phash)"], ph)
            d_ident = agreement(ref_d, dh)[0] if dh is not None else "—"
            d_hist = agreement(ref_d, dh)[1] if dh is not None else "—"
            rows.append([size, fmt, name, f"{len(datas) / best[name]:.0f}", f"{base / best[name]:.2f}×",
                         ident if name != "imagehash (decode + phash)" else "(reference)", hist if name != "imagehash (decode + phash)" else "",
                         d_ident, d_hist])
        print(f"  done {size}px {fmt}", file=sys.stderr)
    headers = ["long side", "format", "method", "images/s per core", "vs imagehash", "pHash = imagehash",
               "pHash Hamming where different (count)", "dHash = imagehash", "dHash Hamming where different"]
    note = "" if dedup_fn is not None else "\nimagededup is not installed: its row is missing.\n"
    if turbo is None:
        note += "\nsimplejpeg is not installed: the libjpeg-turbo floor row is missing.\n"
    ratio_headers = ["long side", "format", "ours hash-only, images/s", "fastest decode floor", "its images/s",
                     "hash path / floor"]
    return (markdown_table(headers, rows) + "\n" + note + "\nThe hash-only path against the fastest decode floor of its row "
            "(issue #21: ≥ 0.9 wanted at 512 px q90; docs/hashing.md says where the rest goes):\n\n"
            + markdown_table(ratio_headers, ratios) + "\n")


def min_size_sweep(photos, reps) -> str:
    """Candidates for HASH_MIN_SIZE: speed of the hash-only path and bits moved by draft decoding."""
    sizes = (256, 512, 1024, 2048)
    cands = (64, 96, 128, 192)
    data = {s: [encode(resize_long(im, s), "JPEG") for _, im in photos] for s in sizes}
    ref = {s: [(int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16), int(str(imagehash.dhash(Image.open(io.BytesIO(b)))), 16))
               for b in data[s]] for s in sizes}
    hashes = {}
    speed = {}
    for s in sizes:
        methods = {c: ours(c) for c in (*cands, None)}
        best, res = time_methods(methods, data[s], None, reps)
        for c in methods:
            hashes[(c, s)] = res[c]
            speed[(c, s)] = len(data[s]) / best[c]
    rows = []
    for c in (*cands, None):
        row = [c if c else "full decode"]
        for s in (512, 1024, 2048):
            ph, dh = hashes[(c, s)]
            dp = hamming(np.array([r[0] for r in ref[s]], np.uint64), np.array(ph, np.uint64))
            dd = hamming(np.array([r[1] for r in ref[s]], np.uint64), np.array(dh, np.uint64))
            row.append(f"{speed[(c, s)]:.0f} img/s; pHash {dp.mean():.2f}/{dp.max()}, dHash {dd.mean():.2f}/{dd.max()}")
        across_p, across_d = [], []
        for k in range(len(photos)):
            for a, b in itertools.combinations(sizes, 2):
                across_p.append(int(hamming(hashes[(c, a)][0][k], hashes[(c, b)][0][k])))
                across_d.append(int(hamming(hashes[(c, a)][1][k], hashes[(c, b)][1][k])))
        row.append(f"pHash {np.mean(across_p):.2f}/{max(across_p)}, dHash {np.mean(across_d):.2f}/{max(across_d)}")
        rows.append(row)
    headers = ["min_size", "512 px JPEG: speed; bits vs imagehash mean/max", "1024 px", "2048 px",
               "same photo at 256/512/1024/2048 px: distance mean/max"]
    return markdown_table(headers, rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few photos, two sizes, no min_size sweep")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (minimum is kept)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the test files (default 90)")
    ap.add_argument("--formats", default="JPEG q90,JPEG q75,PNG",
                    help='comma-separated: "JPEG q<N>" (or JPEG = --quality), PNG (default "JPEG q90,JPEG q75,PNG")')
    ap.add_argument("--sizes", default=None, help="comma-separated long sides (default 256,512,1024,2048; quick: 512,1024)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the HASH_MIN_SIZE sweep")
    args = ap.parse_args(argv)
    global JPEG_QUALITY
    JPEG_QUALITY = args.quality
    reps = args.reps or (2 if args.quick else 5)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})  # per core: one pinned core, one thread
    photos = load_photos(args.quick)
    sizes = tuple(int(v) for v in args.sizes.split(",")) if args.sizes else ((512, 1024) if args.quick else (256, 512, 1024, 2048))
    print(f"{len(photos)} photos, sizes {sizes}, {reps} reps, pinned to CPU {cpus[-1]}", file=sys.stderr)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        table = main_table(photos, sizes, tuple(f.strip().upper().replace("Q", "q") for f in args.formats.split(",")), reps, Path(tmp))
    sweep = "" if args.quick or args.no_sweep else min_size_sweep(photos, max(2, reps - 2))
    body = [f"### Hashing: pHash/dHash speed and agreement with imagehash{' (quick run)' if args.quick else ''}", "",
            f"`python benchmarks/hashing.py{' --quick' if args.quick else ''}` — {machine_description()}; one pinned core, "
            f"one thread, CPU time, best of {reps} interleaved repetitions; {len(photos)} real photos per row "
            f"(scikit-image photos, UKBench/Holidays samples and crops), resized to the long side shown and encoded as shown (JPEG quality q). "
            f"Our paths compute pHash **and** dHash; 'vs imagehash' is relative to imagehash computing pHash only. HASH_MIN_SIZE = {HASH_MIN_SIZE}. "
            f"Details and the HASH_MIN_SIZE decision: docs/hashing.md.", "", table]
    if sweep:
        body += ["", f"HASH_MIN_SIZE candidates (JPEG q{JPEG_QUALITY}, hash-only path: draft decode to a short side ≥ min_size). "
                 "'bits vs imagehash' = Hamming distance to imagehash on the full decode of the same file; "
                 "last column = distances between the 4 sizes of the same photo (what near-duplicate search sees):", "", sweep]
    body.append(f"\n(run took {time.time() - t0:.0f} s)")
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("hashing", text)


if __name__ == "__main__":
    main()
