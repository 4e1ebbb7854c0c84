"""Are two CIFAR-10 images the same photo? A pixel check that does not use our descriptor.

CIFAR-10 holds near-duplicates of its own ("the same photo shifted, recoloured or rescaled",
../shared/data/cifar10_dev/README.md) and no labels for them, so a predicted pair between two
CIFAR photos of one class is neither known right nor known wrong. This script decides such a
pair from the pixels alone:

    score(a, b) = the best correlation of high-passed grey levels (grey − Gaussian blur of
    2 px) between a 24 × 24 window of one image and the other image, over every shift, a
    horizontal flip, and scales 0.8–1.25 of the second image (both ways round).

High-passing removes colour, brightness and smooth backgrounds (two unrelated photos of sky
correlate strongly in plain grey levels), so what must line up is edges and texture. The script
measures the two reference distributions that give the score its meaning, in one run:

* **same photo** — the planted light edits of benchmarks/quality_groups.py's cifar set (JPEG
  q40, 1-px shift, brightness ±10 %, PNG re-save) against their originals;
* **different photos** — the cross-class pairs (certainly different photos) that
  ``sscd-distilled`` finds most similar, the hardest negatives for a copy detector;

then scores the pairs given (default: the three CIFAR-10 pairs discussed in docs/embedders.md
"Choosing the default"). Writes the table into docs/benchmarks.md (``same_photo``).

    python benchmarks/same_photo.py                      # ~4 min on 2 cores
    python benchmarks/same_photo.py --pair dog_1718.jpg,dog_2507.jpg --no-write
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402
from benchmarks.quality_groups import CIFAR_EDITS, cifar_images  # noqa: E402

WINDOW = 24
SCALES = (0.8, 0.87, 0.93, 1.0, 1.07, 1.15, 1.25)
HIGH_PASS = 2.0
DEFAULT_PAIRS = ("dog_1718.jpg,dog_2507.jpg", "dog_1718.jpg,dog_4562.jpg", "airplane_2466.jpg,airplane_1940.jpg")


def _grey_detail(im: Image.Image) -> np.ndarray:
    g = im.convert("L")
    return np.asarray(g, np.float32) - np.asarray(g.filter(ImageFilter.GaussianBlur(HIGH_PASS)), np.float32)


def _best_correlation(window: np.ndarray, image: np.ndarray) -> float:
    """Largest Pearson correlation of ``window`` with any same-sized window of ``image``."""
    v = sliding_window_view(image, window.shape).reshape(-1, window.size)
    v = v - v.mean(axis=1, keepdims=True)
    w = (window - window.mean()).ravel()
    den = np.sqrt((v * v).sum(axis=1) * float(w @ w)) + 1e-6
    return float(((v @ w) / den).max())


def same_photo_score(a: Image.Image, b: Image.Image) -> float:
    """The pixel score of the module doc (1 = the same pixels up to shift, flip, scale, colour)."""
    a = a.convert("RGB").resize((32, 32), Image.BICUBIC) if a.size != (32, 32) else a.convert("RGB")
    A = _grey_detail(a)
    c = (32 - WINDOW) // 2
    best = -1.0
    for flip in (False, True):
        bb = b.convert("RGB").transpose(Image.FLIP_LEFT_RIGHT) if flip else b.convert("RGB")
        for s in SCALES:
            m = max(WINDOW, round(32 * s))
            B = _grey_detail(bb.resize((m, m), Image.BICUBIC))
            cb = (m - WINDOW) // 2
            best = max(best, _best_correlation(A[c : c + WINDOW, c : c + WINDOW], B),
                       _best_correlation(B[cb : cb + WINDOW, cb : cb + WINDOW], A))
    return best


def _planted_scores(images: list, seed: int, n: int) -> dict[str, list[float]]:
    from dedup.testing.variants import make_variant

    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {e: [] for e in CIFAR_EDITS}
    for k in rng.choice(len(images), n, replace=False):
        _, _, data = images[int(k)]
        im = Image.open(io.BytesIO(data)).convert("RGB")
        for e in CIFAR_EDITS:
            vdata, _ = make_variant(im, e, rng, original_bytes=data)
            out[e].append(same_photo_score(im, Image.open(io.BytesIO(vdata))))
    return out


def _hard_negatives(images: list, k: int) -> list[tuple[str, str, float]]:
    """The ``k`` most similar cross-class pairs by ``sscd-distilled`` cosine."""
    from dedup.compute.embedders import make_embedder

    emb = make_embedder("sscd-distilled")
    pics = [Image.open(io.BytesIO(d)).convert("RGB") for _, _, d in images]
    x = np.concatenate([emb.embed(pics[i : i + 256]) for i in range(0, len(pics), 256)]).astype(np.float32)
    labels = np.array([lab for _, lab, _ in images])
    best: list[tuple[float, int, int]] = []
    for s in range(0, len(x), 1024):
        sim = x[s : s + 1024] @ x.T
        rows = np.arange(s, min(s + 1024, len(x)))
        sim[labels[rows][:, None] == labels[None, :]] = -1  # same class (and self): not a negative
        sim[np.arange(len(rows))[:, None] >= (np.arange(len(x))[None, :] - s)] = -1  # each pair once (j > i)
        flat = np.argpartition(sim.ravel(), -k)[-k:]
        best += [(float(sim.ravel()[f]), int(rows[f // len(x)]), int(f % len(x))) for f in flat]
    best.sort(reverse=True)
    return [(images[i][0], images[j][0], c) for c, i, j in best[:k]]


def _pct(v: list[float] | np.ndarray, q: float) -> str:
    return f"{np.percentile(v, q):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", default=[], metavar="A.jpg,B.jpg", help="CIFAR-10 files to score (repeatable)")
    ap.add_argument("--negatives", type=int, default=600, help="hardest cross-class pairs to score")
    ap.add_argument("--planted", type=int, default=60, help="originals to plant each light edit of")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    images = cifar_images()
    if not images:
        sys.exit("cifar10_dev not found (set DEDUP_SHARED_DATA)")
    by_name = {name: Image.open(io.BytesIO(data)) for name, _, data in images}
    planted = _planted_scores(images, args.seed, args.planted)
    negatives = _hard_negatives(images, args.negatives)
    neg = np.array([same_photo_score(by_name[a], by_name[b]) for a, b, _ in negatives])
    rows = [[f"same photo: {e}", len(v), *(_pct(v, q) for q in (0, 1, 50, 99, 100))] for e, v in planted.items()]
    rows.append([f"different photos: the {len(neg)} most similar cross-class pairs (cosine {negatives[-1][2]:.2f}–{negatives[0][2]:.2f})",
                 len(neg), *(_pct(neg, q) for q in (0, 1, 50, 99, 100))])
    floor = min(min(v) for v in planted.values())
    table = markdown_table(["reference", "pairs", "min", "p1", "median", "p99", "max"], rows)
    pair_rows = []
    for p in args.pair or DEFAULT_PAIRS:
        a, b = p.split(",")
        s = same_photo_score(by_name[a], by_name[b])
        verdict = ("same photo" if s > neg.max() else
                   "not shown to be the same photo (within the cross-class range)" if s < floor else "between the two ranges")
        pair_rows.append([f"{a} / {b}", f"{s:.3f}", verdict])
    text = (
        "## Same photo? A pixel check of CIFAR-10 pairs (`benchmarks/same_photo.py`)\n\n"
        f"Generated by `python benchmarks/same_photo.py` on {machine_description()} in {time.time() - t0:.0f} s. "
        "Score: the best correlation of high-passed grey levels (2-px Gaussian removed) over shifts, a flip and "
        "scales 0.8–1.25 (module doc); it does not use our descriptor. A pair scoring above every "
        "different-photo pair is called the same photo; one below every planted copy is not shown to be.\n\n"
        + table + "\n\n" + markdown_table(["pair", "score", "verdict"], pair_rows) + "\n"
    )
    print(text)
    if not args.no_write:
        write_section("same_photo", text)


if __name__ == "__main__":
    main()
