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
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from dedup.compute.search.hamming import popcount64
from dedup.config import Config
from dedup.errors import ConfigError
from dedup.extras import require

log = logging.getLogger(__name__)

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
    from dedup.compute.signals import SignalPlan, hash_batch

    plan = SignalPlan.build(cfg.decode.draft, cfg.decode.max_pixels, cfg.decode.formats, want_hash=True,
                            embed_size=int(embedder.input_size) if embedder is not None else None)
    images, shas = [], []
    for b in blobs:
        read = plan.read(b)
        if read.decoded.image is None:
            raise ConfigError(f"calibration image could not be decoded: {read.decoded.error}")
        assert read.sha256 is not None  # decoded, so not zero bytes
        images.append(read.decoded.image)
        shas.append(read.sha256)
    ph, dh, _ = hash_batch(images)  # as the run hashes: the content box
    emb = embedder.embed(images) if embedder is not None else None
    return Signals(shas, ph, dh, emb)


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
def calibrate_images(originals: list[tuple[str, Image.Image]], cfg: Config, embedder=None, edits: dict | None = None,
                     corpus_size: int | None = None) -> dict:
    """Recall per edit on these images, the false-positive rate among their unrelated pairs,
    and what that rate means at the corpus's size (``corpus_size``; default 10⁶ samples): a
    rate of 0.0023 looks harmless, but is ~1.2 billion false pairs among 10⁶ samples."""
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
    size = int(corpus_size or 10**6)
    total = size * (size - 1) / 2.0
    at_n = {
        "corpus_size": size,
        "assumed": corpus_size is None,
        # observed rate x all pairs; with no false pair seen, the 95 % upper bound (3 / pairs)
        "expected_false_pairs": {m: r * total for m, r in fpr.items()},
        "expected_false_pairs_upper_95": {m: (max(r * len(ii), 3.0) / len(ii)) * total for m, r in fpr.items()},
        "budget": max(cfg.embedding.false_pair_rate * size, 1.0),
    }
    if sig.emb is not None and "embedding" in cfg.methods:
        from dedup.compute.threshold import choose

        ch = choose(sig.emb[:n], np.ones(n, bool), cfg.embedding.resolved_threshold(), rate=cfg.embedding.false_pair_rate,
                    n_total=size)
        at_n["auto_threshold"] = ch.to_dict()
    return {"images": n, "unrelated_pairs": int(len(ii)), "recall": per_edit, "false_positive_rate": fpr,
            "at_corpus_size": at_n}


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
# A metric that the labels cannot measure (precision without any negative pair or without any
# predicted duplicate, recall without any positive) is NaN, never a flattering 1.0; it is written
# as null in eval.json. Labels are parsed strictly: an unknown label is an error, never a 0.

NAN = float("nan")
_LABELS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_label(value: str | None, where: str) -> bool:
    """``1``/``0``, ``1.0``/``0.0`` (as pandas writes floats), ``true``/``false``, ``yes``/``no``."""
    v = (value or "").strip().lower()
    if v in _LABELS:
        return _LABELS[v]
    try:
        f = float(v)
    except ValueError:
        f = NAN
    if f in (0.0, 1.0):
        return f == 1.0
    raise ConfigError(f"{where}: is_duplicate {value!r} is not a label; use 1/0, 1.0/0.0, true/false or yes/no")


def read_pairs(path: str) -> list[tuple[str, str, bool]]:
    """Labelled pairs ``(a, b, is_duplicate)`` of a CSV with a header naming a, b, is_duplicate."""
    import csv
    import os

    if not os.path.exists(path):
        raise ConfigError(f"--pairs file not found: {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"--pairs {path} is not a file: want a CSV with columns a,b,is_duplicate")
    want = ("a", "b", "is_duplicate")
    pairs = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (Excel) is not part of 'a'
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{path} is empty: want a header a,b,is_duplicate and one labelled pair per line")
            names = [h.strip().lower() for h in header]
            if not set(want) <= set(names):
                raise ConfigError(f"{path} must be a CSV with columns a,b,is_duplicate (sample ids of the run); its header is {header}")
            col = [names.index(w) for w in want]
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                where = f"{path} line {reader.line_num}"
                if len(row) <= max(col):
                    raise ConfigError(f"{where}: {len(row)} field(s), want a,b,is_duplicate: {row}")
                a, b, lab = (row[c].strip() for c in col)
                if not a or not b:
                    raise ConfigError(f"{where}: empty sample id in {row}")
                pairs.append((a, b, parse_label(lab, where)))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text CSV file") from None
    except csv.Error as e:
        raise ConfigError(f"{path}: not a readable CSV: {e}") from None
    if not pairs:
        raise ConfigError(f"{path} has a header but no labelled pairs")
    return pairs


def _precision(tp: int, fp: int, nneg: int) -> float:
    return tp / (tp + fp) if (tp + fp and nneg) else NAN


def _f1(tp: int, fp: int, npos: int) -> float:
    return 2 * tp / (tp + fp + npos) if npos else NAN  # 2tp / (2tp + fp + fn)


def _curve(score: np.ndarray, label: np.ndarray, higher_is_dup: bool) -> list[dict]:
    thresholds = np.unique(score)
    rows = []
    npos, nneg = int(label.sum()), int((~label).sum())
    for t in thresholds:
        pred = score >= t if higher_is_dup else score <= t
        tp = int((pred & label).sum())
        fp = int((pred & ~label).sum())
        rows.append({"threshold": float(t), "precision": _precision(tp, fp, nneg), "recall": tp / npos if npos else NAN, "f1": _f1(tp, fp, npos)})
    return rows


def _at_precision(rows: list[dict], target: float) -> dict | None:
    ok = [r for r in rows if r["precision"] >= target and r["recall"] == r["recall"]]  # NaN compares False
    return max(ok, key=lambda r: (r["recall"], r["threshold"])) if ok else None


def _prf(pred: np.ndarray, label: np.ndarray) -> dict:
    npos, nneg = int(label.sum()), int((~label).sum())
    tp = int((pred & label).sum())
    fp = int((pred & ~label).sum())
    return {"precision": _precision(tp, fp, nneg), "recall": tp / npos if npos else NAN, "f1": _f1(tp, fp, npos), "tp": tp, "fp": fp}


def evaluate_scores(cfg: Config, scores: dict[str, np.ndarray], label: np.ndarray, target_precision: float = 0.99) -> dict:
    label = np.asarray(label, bool)
    npos, nneg = int(label.sum()), int((~label).sum())
    warnings = []
    if not nneg:
        warnings.append(f"all {npos} labelled pairs are duplicates: precision is undefined (shown as -, null in eval.json); add pairs labelled 0 to measure it")
    if not npos:
        warnings.append(f"none of the {nneg} labelled pairs is a duplicate: recall and F1 are undefined (shown as -, null in eval.json); add pairs labelled 1 to measure them")
    curves, best = {}, {}
    for m, s in scores.items():
        if m == "exact":
            continue
        higher = m == "embedding"
        curves[m] = _curve(np.asarray(s, np.float64), label, higher)
        best[m] = _at_precision(curves[m], target_precision) if npos and nneg else None
    dec = decisions(cfg, scores)
    at_config = {m: _prf(v, label) for m, v in dec.items()}
    return {"pairs": int(len(label)), "positives": npos, "negatives": nneg, "target_precision": target_precision,
            "warnings": warnings, "at_configured_thresholds": at_config, "threshold_for_target_precision": best, "curves": curves}


def finished_run(run_dir: str) -> tuple:
    """(RunDir, run.json) of a finished run (:func:`dedup.io.rundir.finished_run`, plus a
    run.json this version can read), or a :class:`ConfigError` saying what it is not."""
    from dedup.io import rundir

    run = rundir.finished_run(run_dir)
    try:
        info = run.read_json(run.run_json)
        Config.model_validate(info["config"])
    except Exception as e:  # noqa: BLE001 - unreadable or foreign run.json: a usage problem
        raise ConfigError(f"{run_dir}/run.json is not a dedup run description: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return run, info


def run_features(run, info: dict, with_embeddings: bool):
    """The run's stored features, of the shards that have them (a failed shard has none)."""
    from dedup.phases.candidates import load_features

    shards = [s for s in info.get("shards", []) if run.exists(run.features(s))]
    return load_features(run, shards, with_embeddings=with_embeddings)


def eval_run(run_dir: str, pairs_csv: str, cfg: Config | None = None, target_precision: float = 0.99, out_prefix: str | None = None) -> dict:
    if not 0.0 < target_precision <= 1.0:
        raise ConfigError(f"--target-precision {target_precision}: want a number in (0, 1]")
    run, runinfo = finished_run(run_dir)
    cfg = cfg or Config.model_validate(runinfo["config"])
    if cfg.embedding.auto:  # decide at the threshold the run chose for its corpus
        from dedup.compute.threshold import recorded

        cfg = cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"threshold": recorded(run, cfg)})})
    pairs = read_pairs(pairs_csv)
    fs = run_features(run, runinfo, with_embeddings="embedding" in cfg.methods)
    t = fs.table
    ids = t["sample_id"].to_pylist()
    status = t["status"].to_pylist()
    pos = {s: k for k, s in enumerate(ids)}
    usable, absent, failed = [], [], []
    for a, b, lab in pairs:
        if a not in pos or b not in pos:
            absent.append(a if a not in pos else b)
        elif status[pos[a]] != "ok" or status[pos[b]] != "ok":  # no features: scores would be made up
            x = a if status[pos[a]] != "ok" else b
            failed.append(f"{x} ({status[pos[x]]})")
        else:
            usable.append((pos[a], pos[b], lab))
    why = []
    if absent:
        why.append(f"{len(absent)} name a sample id not in the run (e.g. {absent[0]!r})")
    if failed:
        why.append(f"{len(failed)} name a sample that has no features (e.g. {failed[0]})")
    if not usable:
        raise ConfigError(f"none of the {len(pairs)} labelled pairs in {pairs_csv} can be scored: " + "; ".join(why))
    if why:
        log.warning("skipped %d of %d labelled pairs: %s", len(pairs) - len(usable), len(pairs), "; ".join(why))
    i = np.array([u[0] for u in usable])
    j = np.array([u[1] for u in usable])
    label = np.array([u[2] for u in usable], bool)
    sig = Signals(t["sha256"].to_pylist(), t["phash"].fill_null(0).to_numpy().astype(np.uint64), t["dhash"].fill_null(0).to_numpy().astype(np.uint64),
                  None if fs.embeddings is None else np.asarray(fs.embeddings))
    result = evaluate_scores(cfg, pair_scores(sig, i, j), label, target_precision)
    result["skipped"] = {"not_in_run": len(absent), "no_features": len(failed)}
    result["at_corpus_size"] = _at_corpus_size(result, int(sum(st == "ok" for st in status)), run)
    for w in result["warnings"]:
        log.warning("%s", w)
    prefix = out_prefix or run.eval_prefix
    try:
        write_eval_outputs(result, prefix)
    except OSError as e:
        raise ConfigError(f"cannot write the eval outputs {prefix}.json/.parquet/.png: {e}") from None
    return result


def _nulls(x):
    """NaN → None, recursively (eval.json is strict JSON)."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nulls(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nulls(v) for v in x]
    return x


def _at_corpus_size(result: dict, n: int, run) -> dict:
    """The labelled negatives' false-positive rate per signal, in false pairs among the run's
    n(n-1)/2 pairs — meaningful when the negatives are a random sample of unrelated pairs —
    beside the run's own estimate (``embedding.threshold: auto``)."""
    total = n * (n - 1) / 2.0
    nneg = result.get("negatives") or 0
    out: dict = {"samples": n, "pairs": total, "expected_false_pairs": {}}
    for m, r in result["at_configured_thresholds"].items():
        fp = r.get("fp")
        if fp is not None and nneg:
            out["expected_false_pairs"][m] = fp / nneg * total
    try:
        out["run_estimate"] = run.read_json(run.stats).get("embedding_threshold")
    except (OSError, ValueError):
        out["run_estimate"] = None
    return out


def write_eval_outputs(result: dict, prefix: str) -> list[str]:
    """``prefix.json`` (summary), ``prefix.parquet`` (curve points), ``prefix.png`` (PR curves)."""
    import pyarrow.parquet as pq

    summary = _nulls({k: v for k, v in result.items() if k != "curves"})
    with open(prefix + ".json", "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
    rows = [{"signal": m, **r} for m, rs in result["curves"].items() for r in rs]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("signal", pa.string()), ("threshold", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64())])), prefix + ".parquet")
    matplotlib = require("the precision-recall plot", "matplotlib")
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
