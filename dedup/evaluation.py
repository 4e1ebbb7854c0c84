"""Calibrated decisions: ``dedup calibrate`` and ``dedup eval``.

* **calibrate** applies known edits (re-encode, resize, crop, flip, rotate, text overlay,
  grayscale, colour change, padding) at several strengths to a sample of the user's own images,
  computes every signal the pipeline uses, and reports recall per edit type at the configured
  thresholds, plus the false-positive rate among pairs of *different* sampled images.
* **eval** scores labelled pairs (``a,b,is_duplicate``, sample ids of a finished run) from the
  run's stored features: precision/recall curves per signal and for the combined rule, and the
  threshold per signal that reaches a target precision.

The combined rule is the pipeline's rule: a pair is a duplicate when ANY enabled signal passes
its threshold (exact bytes, pHash radius, dHash radius, embedding cosine).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from dedup.compute.crossmatch import popcount64
from dedup.config import Config
from dedup.errors import ConfigError


# -- edits ------------------------------------------------------------------------------------
def _jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _crop(im: Image.Image, frac: float) -> Image.Image:
    w, h = im.size
    dx, dy = int(w * frac / 2), int(h * frac / 2)
    return im.crop((dx, dy, w - dx, h - dy))


def _text(im: Image.Image) -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    w, h = im.size
    d.rectangle((0, int(h * 0.82), w, h), fill=(0, 0, 0))
    d.text((int(w * 0.05), int(h * 0.86)), "SAMPLE TEXT OVERLAY 2026", fill=(255, 255, 255))
    return im


def _pad(im: Image.Image, frac: float) -> Image.Image:
    w, h = im.size
    canvas = Image.new("RGB", (int(w * (1 + frac)), int(h * (1 + frac))), (255, 255, 255))
    canvas.paste(im, ((canvas.width - w) // 2, (canvas.height - h) // 2))
    return canvas


EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "reencode_q40": lambda im: _jpeg(im, 40),
    "reencode_q15": lambda im: _jpeg(im, 15),
    "resize_50": lambda im: _jpeg(im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.LANCZOS), 90),
    "resize_25": lambda im: _jpeg(im.resize((max(1, im.width // 4), max(1, im.height // 4)), Image.Resampling.LANCZOS), 90),
    "crop_5": lambda im: _jpeg(_crop(im, 0.05), 90),
    "crop_10": lambda im: _jpeg(_crop(im, 0.10), 90),
    "crop_25": lambda im: _jpeg(_crop(im, 0.25), 90),
    "flip": lambda im: _jpeg(ImageOps.mirror(im), 90),
    "rotate_5": lambda im: _jpeg(im.rotate(5, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)), 90),
    "text_overlay": lambda im: _jpeg(_text(im), 90),
    "grayscale": lambda im: _jpeg(ImageOps.grayscale(im).convert("RGB"), 90),
    "colour": lambda im: _jpeg(ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.6)).enhance(1.15), 90),
    "pad_20": lambda im: _jpeg(_pad(im, 0.20), 90),
}


# -- signals ----------------------------------------------------------------------------------
@dataclass
class Signals:
    sha: list[bytes]
    phash: np.ndarray
    dhash: np.ndarray
    emb: np.ndarray | None


def compute_signals(blobs: list[bytes], cfg: Config, embedder=None) -> Signals:
    """Every signal for encoded images, decoded exactly as the pipeline decodes them."""
    import hashlib

    from dedup.compute.decode import DecodePolicy, decode_image
    from dedup.compute.hashes import hash_images
    from dedup.phases.features import decode_plan

    policy = DecodePolicy(max_pixels=cfg.decode.max_pixels, formats=tuple(cfg.decode.formats))
    min_size, gray = decode_plan(cfg.decode.draft, True, int(embedder.input_size) if embedder is not None else None)
    images = []
    for b in blobs:
        d = decode_image(b, policy, min_size=min_size, gray=gray)
        if d.image is None:
            raise ConfigError(f"calibration image could not be decoded: {d.error}")
        images.append(d.image)
    ph, dh = hash_images(images)
    emb = embedder.embed(images) if embedder is not None else None
    return Signals([hashlib.sha256(b).digest() for b in blobs], ph, dh, emb)


def pair_scores(s: Signals, i: np.ndarray, j: np.ndarray) -> dict[str, np.ndarray]:
    out = {
        "exact": np.array([s.sha[a] == s.sha[b] for a, b in zip(i, j)], bool),
        "phash": popcount64(s.phash[i] ^ s.phash[j]),
        "dhash": popcount64(s.dhash[i] ^ s.dhash[j]),
    }
    if s.emb is not None:
        out["embedding"] = np.einsum("nd,nd->n", s.emb[i].astype(np.float32), s.emb[j].astype(np.float32))
    return out


def decisions(cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-signal decisions at the configured thresholds, and the combined (OR) rule."""
    dec = {}
    if "exact" in cfg.methods:
        dec["exact"] = scores["exact"]
    from dedup.phases.manifest import hash_rule

    p_ok, d_ok = hash_rule(cfg, scores["phash"], scores["dhash"])  # cross-check included
    if "phash" in cfg.methods:
        dec["phash"] = p_ok
    if "dhash" in cfg.methods:
        dec["dhash"] = d_ok
    if "embedding" in cfg.methods and "embedding" in scores:
        dec["embedding"] = scores["embedding"] >= cfg.embedding.resolved_threshold()
    dec["combined"] = np.logical_or.reduce(list(dec.values())) if dec else np.zeros(0, bool)
    return dec


# -- calibrate --------------------------------------------------------------------------------
def calibrate_images(originals: list[tuple[str, Image.Image]], cfg: Config, embedder=None, edits: dict | None = None) -> dict:
    edits = edits or EDITS
    n = len(originals)
    if n < 2:
        raise ConfigError("calibration needs at least 2 images")
    blobs = [_jpeg(im, 92) for _, im in originals]
    names = list(edits)
    for _, im in originals:
        for e in names:
            blobs.append(edits[e](im.convert("RGB")))
    sig = compute_signals(blobs, cfg, embedder)
    per_edit = {}
    for k, e in enumerate(names):
        i = np.arange(n)
        j = n + i * len(names) + k
        dec = decisions(cfg, pair_scores(sig, i, j))
        sc = pair_scores(sig, i, j)
        per_edit[e] = {m: float(v.mean()) for m, v in dec.items()}
        per_edit[e]["median_phash"] = float(np.median(sc["phash"]))
        if "embedding" in sc:
            per_edit[e]["median_cosine"] = float(np.median(sc["embedding"]))
    ii, jj = np.triu_indices(n, 1)
    dec = decisions(cfg, pair_scores(sig, ii, jj))
    fpr = {m: float(v.mean()) for m, v in dec.items()}
    return {"images": n, "unrelated_pairs": int(len(ii)), "recall": per_edit, "false_positive_rate": fpr}


def sample_images(inputs: list[str], cfg: Config, n: int) -> list[tuple[str, Image.Image]]:
    """The first ``n`` decodable images of the inputs (shards in id order)."""
    from dedup.compute.decode import DecodePolicy, decode_image
    from dedup.io.shards import ShardReadResult, image_member, iter_samples, list_shards

    refs, _ = list_shards(inputs)
    policy = DecodePolicy(max_pixels=cfg.decode.max_pixels, formats=tuple(cfg.decode.formats))
    out: list[tuple[str, Image.Image]] = []
    seen: set[bytes] = set()
    for ref in refs:
        for s in iter_samples(ref, ShardReadResult(), cfg.input.image_exts):
            _, data = image_member(s, cfg.input.image_exts)
            if not data or data in seen:
                continue
            d = decode_image(data, policy, min_size=512)
            if d.image is not None:
                seen.add(data)
                im = d.image
                im.thumbnail((768, 768))
                out.append((f"{ref.shard_id}/{s.key}", im))
            if len(out) >= n:
                return out
    return out


# -- eval -------------------------------------------------------------------------------------
def _curve(score: np.ndarray, label: np.ndarray, higher_is_dup: bool) -> list[dict]:
    thresholds = np.unique(score)
    rows = []
    npos = int(label.sum())
    for t in thresholds:
        pred = score >= t if higher_is_dup else score <= t
        tp = int((pred & label).sum())
        fp = int((pred & ~label).sum())
        p = tp / (tp + fp) if tp + fp else 1.0
        r = tp / npos if npos else 1.0
        rows.append({"threshold": float(t), "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0})
    return rows


def _at_precision(rows: list[dict], target: float) -> dict | None:
    ok = [r for r in rows if r["precision"] >= target]
    return max(ok, key=lambda r: (r["recall"], r["threshold"])) if ok else None


def _prf(pred: np.ndarray, label: np.ndarray) -> dict:
    tp = int((pred & label).sum())
    fp = int((pred & ~label).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / int(label.sum()) if label.sum() else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "fp": fp}


def evaluate_scores(cfg: Config, scores: dict[str, np.ndarray], label: np.ndarray, target_precision: float = 0.99) -> dict:
    label = np.asarray(label, bool)
    curves, best = {}, {}
    for m, s in scores.items():
        if m == "exact":
            continue
        higher = m == "embedding"
        curves[m] = _curve(np.asarray(s, np.float64), label, higher)
        best[m] = _at_precision(curves[m], target_precision)
    dec = decisions(cfg, scores)
    at_config = {m: _prf(v, label) for m, v in dec.items()}
    return {"pairs": int(len(label)), "positives": int(label.sum()), "target_precision": target_precision,
            "at_configured_thresholds": at_config, "threshold_for_target_precision": best, "curves": curves}


def eval_run(run_dir: str, pairs_csv: str, cfg: Config | None = None, target_precision: float = 0.99, out_prefix: str | None = None) -> dict:
    import csv

    from dedup.io.rundir import RunDir
    from dedup.phases.candidates import load_features

    run = RunDir(run_dir)
    runinfo = run.read_json(run.p("run.json"))
    cfg = cfg or Config.model_validate(runinfo["config"])
    with open(pairs_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"a", "b", "is_duplicate"} <= set(rows[0]):
        raise ConfigError(f"{pairs_csv} must be a CSV with columns a,b,is_duplicate (sample ids of the run)")
    fs = load_features(run, runinfo["shards"], with_embeddings="embedding" in cfg.methods)
    ids = fs.table["sample_id"].to_pylist()
    pos = {s: k for k, s in enumerate(ids)}
    missing = [r for r in rows if r["a"] not in pos or r["b"] not in pos]
    if missing:
        raise ConfigError(f"{len(missing)} labelled pair(s) name samples not in the run, e.g. {missing[0]['a']}, {missing[0]['b']}")
    i = np.array([pos[r["a"]] for r in rows])
    j = np.array([pos[r["b"]] for r in rows])
    label = np.array([str(r["is_duplicate"]).strip() in ("1", "true", "True") for r in rows])
    sha = fs.table["sha256"].to_pylist()
    sig = Signals(sha, fs.table["phash"].fill_null(0).to_numpy().astype(np.uint64), fs.table["dhash"].fill_null(0).to_numpy().astype(np.uint64),
                  None if fs.embeddings is None else np.asarray(fs.embeddings))
    result = evaluate_scores(cfg, pair_scores(sig, i, j), label, target_precision)
    prefix = out_prefix or run.p("eval")
    write_eval_outputs(result, prefix)
    return result


def write_eval_outputs(result: dict, prefix: str) -> list[str]:
    """``prefix.json`` (summary), ``prefix.parquet`` (curve points), ``prefix.png`` (PR curves)."""
    import pyarrow.parquet as pq

    summary = {k: v for k, v in result.items() if k != "curves"}
    with open(prefix + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    rows = [{"signal": m, **r} for m, rs in result["curves"].items() for r in rs]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("signal", pa.string()), ("threshold", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64())])), prefix + ".parquet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, rs in result["curves"].items():
        ax.plot([r["recall"] for r in rs], [r["precision"] for r in rs], marker=".", label=m)
    for m, r in result["at_configured_thresholds"].items():
        ax.scatter([r["recall"]], [r["precision"]], marker="x", s=60, label=f"{m} (configured)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{result['pairs']} labelled pairs ({result['positives']} duplicates)")
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)
    plt.close(fig)
    return [prefix + ext for ext in (".json", ".parquet", ".png")]


def f1_table(result: dict) -> list[tuple[str, float, float, float]]:
    return [(m, r["precision"], r["recall"], r["f1"]) for m, r in result["at_configured_thresholds"].items()]
