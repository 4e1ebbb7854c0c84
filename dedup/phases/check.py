"""``dedup check``: are these images near-copies of training samples? And ``--within``: do
many of them coincide with each other (per prompt)?

The training side is a finished run: its stored hashes and embeddings are reused, never
recomputed. Queries are decoded, hashed and embedded with the run's own configuration and
model; a different model is refused.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from dedup.compute.clusters import Edges, keeper_clusters
from dedup.compute.crossmatch import VectorIndex, nearest_hash
from dedup.compute.regions import DEFAULT_GRIDS, Box, RegionSpec
from dedup.compute.search.hamming import popcount64
from dedup.config import Config
from dedup.errors import ConfigError, SchemaMismatchError
from dedup.io.rundir import RunDir
from dedup.phases.manifest import hash_rule
from dedup.records import Status

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

CHECK_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()), ("path", pa.string()), ("status", pa.string()), ("error", pa.string()), ("group", pa.string()),
        ("flagged", pa.bool_()), ("flagged_by", pa.string()),
        ("exact_match", pa.string()),
        ("phash_nearest", pa.string()), ("phash_distance", pa.int32()),
        ("dhash_nearest", pa.string()), ("dhash_distance", pa.int32()),
        ("embedding_nearest", pa.string()), ("embedding_cosine", pa.float32()),
        ("embedding_matches", pa.int32()),
        # V3: region matches (dedup.compute.regions). region_box: [left, top, right, bottom] in the
        # query's pixels of the best embedding match (the whole image when that was best),
        # region_cosine / region_nearest its cosine and training sample, region_whole whether
        # it is the whole image; regions: how many regions were embedded; matched: every
        # training sample the query is flagged for (best first)
        ("region_box", pa.list_(pa.int32())), ("region_cosine", pa.float32()), ("region_nearest", pa.string()),
        ("region_whole", pa.bool_()), ("regions", pa.int32()), ("matched", pa.list_(pa.string())),
    ],
    metadata={"schema_version": "CHECK_V3"},  # V2: query_id keeps the extension; path added. V3: regions
)


def iter_queries(inputs: list[str], cfg: Config, group_by: str | None) -> Iterator[tuple[str, str, bytes | None, str | None, str | None]]:
    """(query_id, path, image bytes or None, group value, error) from image folders/files or shards.

    query_id: an image's path relative to its folder argument, extension kept (``a.jpg`` and
    ``a.png`` are two queries), a file argument's name, or ``SHARD_ID/KEY``; path: the file, or
    ``SHARD_URL#KEY``. :func:`_unique_ids` makes the ids unique across arguments.
    """
    from dedup.io.shards import ShardReadResult, image_member, iter_samples, list_shards

    shard_inputs = []
    for item in inputs:
        p = Path(item)
        if "://" not in item and p.is_dir() and not any(p.rglob("*.tar")):
            for f in sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_SUFFIXES and x.is_file()):
                yield f.relative_to(p).as_posix(), str(f), f.read_bytes(), _sidecar_group(f, group_by), None
        elif "://" not in item and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            yield p.name, str(p), p.read_bytes(), _sidecar_group(p, group_by), None
        else:
            shard_inputs.append(item)
    if shard_inputs:
        refs, missing = list_shards(shard_inputs)
        if missing:
            raise ConfigError(f"query input not found: {missing[0].url}")
        for ref in refs:
            res = ShardReadResult()
            for s in iter_samples(ref, res, cfg.input.image_exts):
                _, data = image_member(s, cfg.input.image_exts)
                yield f"{ref.shard_id}/{s.key}", f"{ref.url}#{s.key}", data, _group_from(s.members.get("json"), group_by), s.read_error


def _sidecar_group(image: Path, field: str | None) -> str | None:
    js = image.with_suffix(".json")
    return _group_from(js.read_bytes() if field and js.is_file() else None, field)


def _unique_ids(rows: list[dict]) -> None:
    """Make ``query_id`` unique in place: a repeated id becomes the query's path (two folder
    arguments with the same layout), then ``path#N`` (the same file given twice)."""
    seen: set[str] = set()
    for r in rows:
        qid = r["query_id"]
        if qid in seen:
            qid = r["path"]
            n = 2
            while qid in seen:
                qid, n = f"{r['path']}#{n}", n + 1
            r["query_id"] = qid
        seen.add(qid)


def _check_group_field(rows: list[dict], field: str | None) -> int:
    """How many queries lack the --group-by field; an error when none has it."""
    if not field:
        return 0
    missing = sum(r["group"] is None for r in rows)
    if rows and missing == len(rows):
        raise ConfigError(
            f"--group-by {field!r}: none of the {len(rows)} queries has that field in its sidecar JSON "
            f"(NAME.json next to an image, or a shard sample's .json member)"
        )
    if missing:
        log.warning("--group-by %r: %d of %d queries have no such field; they form the group '(none)'", field, missing, len(rows))
    return missing


def _group_from(js: bytes | None, field: str | None) -> str | None:
    if not field or not js:
        return None
    try:
        obj = json.loads(js)
    except ValueError:
        return None
    v = obj.get(field) if isinstance(obj, dict) else None
    return None if v is None else str(v)


def _query_features(inputs, cfg: Config, embedder, group_by):
    from dedup.compute.decode import decode_image
    from dedup.compute.signals import SignalPlan, hash_batch

    plan = SignalPlan.build(cfg.decode.draft, cfg.decode.max_pixels, cfg.decode.formats, want_hash=True,
                            embed_size=int(embedder.input_size) if embedder else None)
    policy, gray = plan.policy, plan.gray
    images: list[Image.Image] = []
    rows, thumbs, blobs = [], {}, []
    for qid, path, data, group, err in iter_queries(inputs, cfg, group_by):
        row: dict[str, Any] = {"query_id": qid, "path": path, "group": group, "status": Status.OK.value, "error": err, "sha": None}
        if err or data is None:
            row["status"] = Status.READ_ERROR.value if err else Status.NO_IMAGE.value
            row["error"] = err or "no image member"
            rows.append(row)
            continue
        read = plan.read(data)
        row["sha"], d = read.sha256, read.decoded
        if not read.ok:
            row["status"], row["error"] = d.status.value, d.error
            rows.append(row)
            continue
        row["img_index"] = len(images)
        assert d.image is not None  # status OK
        images.append(d.image)
        blobs.append(data)
        rows.append(row)
    if not rows:
        raise ConfigError(f"no query images found in {', '.join(map(str, inputs))} (image files {', '.join(IMAGE_SUFFIXES)}, or shards)")
    _unique_ids(rows)
    missing_group = _check_group_field(rows, group_by)  # before the costly part
    ph, dh, _ = hash_batch(images)  # as the run hashes
    emb = embedder.embed(images) if (embedder is not None and images) else None
    for k, im in enumerate(images):
        if im.mode == "L" and gray:  # hashes wanted luma only; the page shows colour
            im = decode_image(blobs[k], policy, min_size=128).image or im
        t = im.copy()
        t.thumbnail((128, 128))
        buf = io.BytesIO()
        t.save(buf, "JPEG", quality=80)
        thumbs[k] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return rows, ph, dh, emb, thumbs, missing_group, blobs, policy


def _region_matches(index: VectorIndex, embedder, blobs: list[bytes], policy, spec, region_th: float, chunk: int = 256,
                    final_threshold=None, refine_below: float | None = None):
    """Every region of every query (but the whole image, matched by the caller) against the
    training index, ``chunk`` regions at a time (decoded crops never pile up).

    Returns ``(hits, nearest, counts)``: ``hits`` {query: {ref: (cosine, box)}} — per query and
    training sample the best region at or above ``region_th`` (the caller raises it later); ``nearest`` {query: (ref, cosine,
    box)} — the best region whatever its score; ``counts`` regions per query, whole image
    included. Boxes are [left, top, right, bottom] in the query's stored pixels.

    Refinement (``spec.refine``): a grid cell rarely frames a pasted or photographed copy
    exactly, and the extra background costs cosine. A query whose best region came within
    ``refine_below`` (default ``spec.refine_below``) of the final threshold (``final_threshold(counts)``) but not to it has that
    box refined towards its nearest training sample: each side moved in and out by a shrinking
    step while the cosine rises (a few dozen embeddings, only for those queries)."""
    from PIL import Image

    from dedup.compute.decode import decode_image
    from dedup.compute.regions import region_boxes, scale_box

    min_size = int(int(embedder.input_size) * spec.finest)  # a finest cell still has the model's input size
    hits: dict[int, dict[int, tuple[float, list[int]]]] = defaultdict(dict)
    nearest: dict[int, tuple[int, float, list[int], Box]] = {}  # + the box in decoded pixels
    counts = np.ones(len(blobs), np.int64)
    crops: list[Image.Image] = []
    owner: list[int] = []
    boxes: list[list[int]] = []

    def flush():
        if not crops:
            return
        e = embedder.embed(crops)
        o = np.array(owner, np.int64)
        ti, td = index.topk(e, 1)
        for j in range(len(o)):
            k, r, c = int(o[j]), int(ti[j, 0]), float(td[j, 0])
            if r >= 0 and c == c and (k not in nearest or c > nearest[k][1]):
                nearest[k] = (r, c, boxes[j], raw[j])
        m = index.range(e, region_th)
        for j, r, c in zip(m.q.tolist(), m.r.tolist(), m.score.tolist()):
            k = int(o[j])
            if r not in hits[k] or c > hits[k][r][0]:
                hits[k][r] = (float(c), boxes[j])
        for acc in (crops, owner, boxes, raw):
            acc.clear()

    def load(data):
        d = decode_image(data, policy, min_size=min_size)
        if d.image is None:
            return None, None
        im = d.image.convert("RGB")
        try:
            with Image.open(io.BytesIO(data)) as f:
                size = f.size
            if (size[0] > size[1]) != (im.width > im.height) and size[0] != size[1]:
                size = size[::-1]  # EXIF-rotated on decode
        except Exception:  # noqa: BLE001 - the decoded size then
            size = im.size
        return im, size

    raw = []
    for k, data in enumerate(blobs):
        im, size = load(data)
        if im is None:
            continue
        bxs = region_boxes(im, spec)
        counts[k] = len(bxs)
        for b in bxs[1:]:  # [0]: the whole image, embedded and matched with the run's threshold
            crops.append(im.crop(b))
            owner.append(k)
            boxes.append(scale_box(b, im.size, size))
            raw.append(b)
        if len(crops) >= chunk:
            flush()
    flush()
    if spec.refine and final_threshold is not None:
        th, band = float(final_threshold(counts)), spec.refine_below if refine_below is None else refine_below
        for k, (r, c, _, b) in list(nearest.items()):
            if not (th - band <= c < th) or any(v[0] >= th for v in hits.get(k, {}).values()):
                continue
            im, size = load(blobs[k])
            rb, rc = _refine_box(im, b, np.asarray(index.ref[r], np.float32), embedder, min_side=spec.min_side)
            log.debug("refined query %d towards %d: cosine %.4f -> %.4f", k, r, c, rc)
            if rc > c:
                nearest[k] = (r, rc, scale_box(rb, im.size, size), rb)
                if rc >= region_th and (r not in hits[k] or rc > hits[k][r][0]):
                    hits[k][r] = (rc, scale_box(rb, im.size, size))
    return hits, nearest, counts


def _refine_box(im, box, target: np.ndarray, embedder, *, steps=(0.2, 0.1, 0.05), rounds: int = 4, min_side: int = 32):
    """Coordinate ascent of ``box`` on the cosine of its crop with ``target``: each side moved
    by ``step`` of the box's size, in or out, the best of the 8 moves taken while it improves;
    then a smaller step."""
    target = target / max(float(np.linalg.norm(target)), 1e-12)
    W, H = im.size
    best = tuple(box)
    best_c = float(embedder.embed([im.crop(best)])[0] @ target)
    for step in steps:
        for _ in range(rounds):
            left, top, right, bottom = best
            dx, dy = max(1, round((right - left) * step)), max(1, round((bottom - top) * step))
            cands = []
            for side, d in ((0, dx), (1, dy), (2, dx), (3, dy)):
                for sgn in (-1, 1):
                    moved = list(best)
                    moved[side] += sgn * d
                    b = (max(0, moved[0]), max(0, moved[1]), min(W, moved[2]), min(H, moved[3]))
                    if b != best and b[2] - b[0] >= min_side and b[3] - b[1] >= min_side and b not in cands:
                        cands.append(b)
            if not cands:
                break
            cs = embedder.embed([im.crop(b) for b in cands]) @ target
            j = int(np.argmax(cs))
            if cs[j] <= best_c + 1e-4:
                break
            best, best_c = cands[j], float(cs[j])
    return best, best_c


def _record_check(run: RunDir, out: RunDir, result: dict, flagged: list[dict]) -> None:
    """Append this check to ``RUN/checks.json`` (``dedup report`` lists them); a read-only run
    directory only gets a warning."""
    import datetime
    import os

    entry = {
        "out": out.path if not out.local else os.path.abspath(out.path),
        "html": out.check_html if not out.local else os.path.abspath(out.check_html),
        "parquet": out.check_parquet if not out.local else os.path.abspath(out.check_parquet),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "queries": result["queries"], "flagged": result["flagged"],
        "regions": result.get("regions", False), "region_threshold": (result.get("region_threshold") or {}).get("value"),
        "top": [{"query_id": r["query_id"], "path": r["path"], "match": (r.get("matched") or [None])[0],
                 "cosine": r.get("region_cosine"), "box": r.get("region_box"), "whole": r.get("region_whole"),
                 "flagged_by": r["flagged_by"]} for r in flagged[:10]],
    }
    path = run.checks
    try:
        checks = run.read_json(path) if run.exists(path) else []
        if not isinstance(checks, list):
            checks = []
    except (OSError, ValueError):
        checks = []
    checks = [c for c in checks if not (isinstance(c, dict) and c.get("out") == entry["out"])] + [entry]
    try:
        run.write_json(path, checks, sort_keys=False)
    except OSError as e:  # a read-only training run: the check itself succeeded
        log.warning("could not record this check in %s (%s: %s); `dedup report` will not list it", path, type(e).__name__, e)


def check(inputs: list[str], run_dir: str, out_dir: str, *, within: bool = False, group_by: str | None = None, min_copies: int = 2,
          regions: bool = True, grids: tuple[float, ...] = DEFAULT_GRIDS, half_steps: bool = True, content_boxes: bool = True,
          max_regions: int | None = None, region_budget: float = 0.01, region_margin: float | None = None,
          record: bool = True) -> dict:
    """Flag queries that are near-copies of the run's training samples (or, ``within``, groups
    of queries that coincide). ``regions``: also match regions of each query (a multi-scale
    grid ``grids`` with ``half_steps``, and ``content_boxes``; at most ``max_regions`` per
    query) under a region threshold that keeps the expected false flags per query under
    ``region_budget`` (:func:`dedup.compute.threshold.region_threshold`; ``region_margin``
    overrides its fallback margin). ``record``: append this check to ``RUN/checks.json``."""
    import time

    from dedup.evaluation import finished_run, run_features

    run, info = finished_run(run_dir)
    cfg = Config.model_validate(info["config"])
    from dedup.compute.threshold import recorded

    run_th = recorded(run, cfg)  # the threshold the run itself used (auto: chosen for its corpus)
    fs = None
    if not within:  # the references first: a run with nothing to compare against fails before any work
        fs = run_features(run, info, with_embeddings="embedding" in cfg.methods)
        ok = fs.ok()
        if not ok.any():
            raise ConfigError(
                f"{run_dir} has no ok samples to compare against ({fs.n} sample(s) with features, none of them ok); "
                f"check its manifest.parquet status/error columns"
            )
    embedder = None
    if "embedding" in cfg.methods:
        from dedup.compute.embedders import make_embedder

        embedder = make_embedder(cfg.embedding.spec, device=cfg.embedding.device, batch_size=cfg.embedding.batch_size)
        if info.get("model_tag") and embedder.tag != info["model_tag"]:
            raise SchemaMismatchError(f"the run was embedded with {info['model_tag']!r} but this machine loads {embedder.tag!r} for the same spec; refusing to compare")
    t0 = time.perf_counter()
    rows, ph, dh, emb, thumbs, missing_group, blobs, policy = _query_features(inputs, cfg, embedder, group_by)
    result: dict = {"queries": len(rows), "missing_group": missing_group}
    ok_rows = [r for r in rows if r["status"] == Status.OK.value]
    qi = np.array([r["img_index"] for r in ok_rows], np.int64)
    result["ok"] = len(ok_rows)
    out = RunDir(out_dir)
    if not within:
        assert fs is not None  # read above when not within
        t = fs.table
        ids = np.array(t["sample_id"].to_pylist(), dtype=object)
        ref_idx = np.flatnonzero(ok)
        sha_map: dict[bytes | None, str] = {}
        for k, s in zip(ref_idx.tolist(), t["sha256"].take(pa.array(ref_idx)).to_pylist()):
            sha_map.setdefault(s, ids[k])
        for r in rows:
            r["exact_match"] = sha_map.get(r["sha"]) if r["sha"] is not None and r["status"] == Status.OK.value else None
        refs = {name: t[name].fill_null(0).to_numpy().astype(np.uint64)[ref_idx] for name in ("phash", "dhash")}
        qhs = {"phash": ph, "dhash": dh}
        for name in ("phash", "dhash"):
            if name not in cfg.methods or not len(ok_rows):
                continue
            bi, bd = nearest_hash(refs[name], qhs[name][qi])
            other = "dhash" if name == "phash" else "phash"
            # the other hash's distance to this nearest sample, for the cross-check (hash_rule)
            cross = np.where(bi >= 0, popcount64(refs[other][np.maximum(bi, 0)] ^ qhs[other][qi]), -1)
            for r, i_, d_, c_ in zip(ok_rows, bi, bd, cross):
                r[f"{name}_nearest"], r[f"{name}_distance"] = (ids[ref_idx[i_]], int(d_)) if i_ >= 0 else (None, None)
                r[f"_{name}_cross"] = int(c_)
        use_regions = bool(regions) and embedder is not None
        result["regions"] = use_regions
        if embedder is not None and len(ok_rows):
            index = VectorIndex(np.asarray(fs.embeddings)[ref_idx], threshold=run_th)
            ti, td = index.topk(emb[qi], 1)
            m = index.range(emb[qi], run_th)
            ti, td = _nearest_covers_matches(ti, td, m)
            counts = np.bincount(m.q, minlength=len(ok_rows))
            whole_hits: dict[int, dict[int, float]] = defaultdict(dict)
            for q_, r_, s_ in zip(m.q.tolist(), m.r.tolist(), m.score.tolist()):
                whole_hits[q_][r_] = float(s_)
            for k, r in enumerate(ok_rows):
                if ti[k, 0] >= 0:
                    r["embedding_nearest"], r["embedding_cosine"] = ids[ref_idx[ti[k, 0]]], float(td[k, 0])
                r["embedding_matches"] = int(counts[k])
            hits, nearest, nreg, rth = {}, {}, np.ones(len(ok_rows), np.int64), {"value": run_th}
            if use_regions:
                from dedup.compute.threshold import region_threshold

                spec = RegionSpec(grids=tuple(float(g) for g in grids), half_steps=half_steps, content=content_boxes, max_regions=max_regions)
                # matched at the run's threshold, then kept at the region threshold, which
                # depends on how many regions the queries had
                try:
                    choice = run.read_json(run.stats).get("embedding_threshold")
                except (OSError, ValueError):
                    choice = None
                kw = {} if region_margin is None else {"margin": float(region_margin)}
                got: dict = {}

                def final_threshold(counts: np.ndarray) -> float:
                    got["rth"] = region_threshold(choice, run_th, regions_per_query=float(np.mean(counts)) if len(counts) else 1.0,
                                                  n_ref=len(ref_idx), budget=region_budget, **kw)
                    return got["rth"]["value"]

                hits, nearest, nreg = _region_matches(index, embedder, [blobs[int(i)] for i in qi], policy, spec, run_th,
                                                      final_threshold=final_threshold)
                if "rth" not in got:
                    final_threshold(nreg)
                rth = got["rth"]
                hits = {k: {r_: v for r_, v in h.items() if v[0] >= rth["value"]} for k, h in hits.items()}
                result["region_threshold"] = rth
            for k, r in enumerate(ok_rows):
                full = _full_box(blobs[int(qi[k])])
                # per training sample the best evidence: margin over the threshold it had to pass
                cands: dict[int, tuple[float, float, list[int], bool]] = {}
                for r_, s_ in whole_hits.get(k, {}).items():
                    cands[r_] = (s_ - run_th, s_, full, True)
                for r_, (s_, b_) in hits.get(k, {}).items():
                    if r_ not in cands or s_ - rth["value"] > cands[r_][0]:
                        cands[r_] = (s_ - rth["value"], s_, b_, False)
                order = sorted(cands.items(), key=lambda kv: -kv[1][0])
                r["matched"] = [ids[ref_idx[r_]] for r_, _ in order]
                r["_region_hit"] = any(not v[3] for v in cands.values())
                r["regions"] = int(nreg[k])
                if order:
                    r_, (_, s_, b_, w_) = order[0]
                else:  # nothing passed: the nearest, whole image or region, by margin
                    r_, s_, b_, w_ = (int(ti[k, 0]), float(td[k, 0]), full, True) if ti[k, 0] >= 0 else (-1, float("nan"), full, True)
                    if k in nearest and (r_ < 0 or nearest[k][1] - rth["value"] > s_ - run_th):
                        r_, s_, b_, w_ = nearest[k][0], nearest[k][1], nearest[k][2], False
                if r_ >= 0:
                    r["region_nearest"], r["region_cosine"], r["region_box"], r["region_whole"] = ids[ref_idx[r_]], s_, b_, w_
        result["seconds_per_query"] = (time.perf_counter() - t0) / max(len(ok_rows), 1)
        reg = [r["regions"] for r in ok_rows if r.get("regions")]
        result["regions_per_query"] = float(np.mean(reg)) if reg else 1.0
        th = run_th
        for r in rows:
            why = []
            if r.get("exact_match"):
                why.append("exact")
            if r.get("phash_distance") is not None and hash_rule(cfg, np.array([r["phash_distance"]]), np.array([r["_phash_cross"]]))[0][0]:
                why.append("phash")
            if r.get("dhash_distance") is not None and hash_rule(cfg, np.array([r["_dhash_cross"]]), np.array([r["dhash_distance"]]))[1][0]:
                why.append("dhash")
            if r.get("embedding_cosine") is not None and r["embedding_cosine"] >= th:
                why.append("embedding")
            if r.get("_region_hit"):
                why.append("region")
            r["flagged"], r["flagged_by"] = bool(why), ",".join(why) or None
            matched = list(r.get("matched") or [])
            for name, flag in (("exact_match", "exact"), ("phash_nearest", "phash"), ("dhash_nearest", "dhash")):
                if flag in why and r.get(name) and r[name] not in matched:
                    matched.insert(0, r[name]) if flag == "exact" else matched.append(r[name])
            r["matched"] = matched if r["status"] == Status.OK.value else None
            r["_top"] = matched[0] if matched else (r.get("region_nearest") or r.get("embedding_nearest") or r.get("phash_nearest"))
        meta = dict(CHECK_SCHEMA.metadata or {})
        meta[b"embedding_threshold"] = json.dumps(run_th).encode()
        meta[b"region_threshold"] = json.dumps(result.get("region_threshold")).encode()
        schema = CHECK_SCHEMA.with_metadata(meta)
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
        out.write_parquet(out.check_parquet, table)
        result["flagged"] = int(sum(r["flagged"] for r in rows))
        flagged = [r for r in rows if r["flagged"]]
        train_thumbs = _train_thumbs(run, info, {r["_top"] for r in flagged[:50]})
        for r in flagged[:50]:
            r["_box_pct"] = _box_pct(r.get("region_box"), blobs[r["img_index"]]) if r.get("region_box") and not r.get("region_whole") else None
        html = _CHECK_HTML.render(title=f"dedup check against {run_dir}", rows=flagged[:50], thumbs=thumbs, train=train_thumbs, result=result)
        out.write_bytes(out.check_html, html.encode())
        if record:
            _record_check(run, out, result, flagged)
    else:
        result["groups"] = _within(cfg, rows, ok_rows, qi, ph, dh, emb, out, min_copies, run_th)
    return result


def _full_box(data: bytes) -> list[int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as f:
            w, h = f.size
            if f.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
        return [0, 0, int(w), int(h)]
    except Exception:  # noqa: BLE001
        return [0, 0, 0, 0]


def _box_pct(box, data: bytes) -> dict | None:
    """A box in query pixels as CSS percentages of the image (the outline over its thumbnail)."""
    _, _, w, h = _full_box(data)
    if not w or not h:
        return None
    x0, y0, x1, y1 = box
    return {"left": 100 * x0 / w, "top": 100 * y0 / h, "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h}


def _nearest_covers_matches(ti: np.ndarray, td: np.ndarray, m) -> tuple[np.ndarray, np.ndarray]:
    """The nearest reference per query (``ti``/``td``, (q, 1), from ``topk``), raised to the best
    match ``range`` found where that is better: above the flat limit ``topk`` looks into a
    query's nearest lists while ``range`` also meets references visiting them, and a query
    with matches must not be reported (and left unflagged) with a nearest below them."""
    ti, td = ti.copy(), td.copy()
    if len(m.q) == 0:
        return ti, td
    order = np.lexsort((-m.score, m.q))  # per query, best match first
    q_sorted = m.q[order]
    first = order[np.r_[True, q_sorted[1:] != q_sorted[:-1]]]
    bq, br, bs = m.q[first], m.r[first], m.score[first]
    better = (ti[bq, 0] < 0) | ~(td[bq, 0] >= bs)  # also where topk gave NaN
    ti[bq[better], 0] = br[better]
    td[bq[better], 0] = bs[better]
    return ti, td


def _within(cfg, rows, ok_rows, qi, ph, dh, emb, out: RunDir, min_copies: int, run_th: float) -> list[dict]:
    """Clusters among the queries of each group; groups whose largest cluster has >= min_copies."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(ok_rows):
        groups[r["group"] or ""].append(k)
    report: list[dict[str, Any]] = []
    th = run_th
    for g, members in sorted(groups.items()):
        m = np.array(members)
        ii, jj = np.triu_indices(len(m), 1)
        a, b = m[ii], m[jj]
        p_ok, d_ok = hash_rule(cfg, popcount64(ph[qi[a]] ^ ph[qi[b]]), popcount64(dh[qi[a]] ^ dh[qi[b]]))
        dup = p_ok | d_ok
        if emb is not None:
            dup |= np.einsum("nd,nd->n", emb[qi[a]], emb[qi[b]]) >= th
        e = Edges(ii[dup].astype(np.int64), jj[dup].astype(np.int64), np.zeros(int(dup.sum()), np.int8), np.ones(int(dup.sum()), np.float32))
        cl = keeper_clusters(len(m), e, rank=np.arange(len(m)))
        largest = int(cl.size.max()) if len(m) else 0
        keeper = int(np.argmax(cl.size)) if len(m) else -1
        report.append({
            "group": g, "samples": len(m), "largest_cluster": largest, "flagged": largest >= min_copies,
            "members": [ok_rows[m[k]]["query_id"] for k in np.flatnonzero(cl.keeper == cl.keeper[keeper])] if len(m) else [],
        })
    report.sort(key=lambda x: (-x["largest_cluster"], x["group"]))
    tbl = pa.Table.from_pylist(report, schema=pa.schema([("group", pa.string()), ("samples", pa.int32()), ("largest_cluster", pa.int32()), ("flagged", pa.bool_()), ("members", pa.list_(pa.string()))]))
    out.write_parquet(out.within_parquet, tbl)
    return report


def _train_thumbs(run: RunDir, info: dict, ids: set) -> dict:
    from dedup.report import thumbnails

    ids = {i for i in ids if i}
    return thumbnails(run, ids, tuple(info["config"]["input"]["image_exts"]), size=128) if ids else {}


from jinja2 import Environment, select_autoescape  # noqa: E402

_CHECK_HTML = Environment(autoescape=select_autoescape(default=True)).from_string(
    """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;margin:1.5em} .row{display:flex;gap:1em;align-items:center;border-bottom:1px solid #ddd;padding:.4em 0}
img{max-width:128px;max-height:128px;border:2px solid #bbb;display:block} td,th{padding:.2em .6em}
.q{position:relative;display:inline-block;line-height:0} .q img{border:0} .box{position:absolute;outline:2px solid #e00;box-sizing:border-box}</style></head><body>
<h1>{{ title }}</h1>
<h2 id="check">Memorization check</h2>
<p>{{ result.queries }} queries, {{ result.flagged }} flagged as near-copies of training samples{% if rows|length < result.flagged %} (showing {{ rows|length }}){% endif %}.</p>
{% if result.region_threshold %}<p>Regions: {{ '%.1f'|format(result.regions_per_query) }} per query (whole image, content box, grid and square windows), matched at cosine &ge; {{ result.region_threshold.value }}
({{ result.region_threshold.method }}); whole images at &ge; {{ result.region_threshold.base }}. The red outline is the region that matched.</p>{% endif %}
{% for r in rows %}<div class="row flagged"><div><div class="q">{% if r.img_index is defined and thumbs.get(r.img_index) %}<img src="{{ thumbs[r.img_index] }}" alt="{{ r.query_id }}">{% if r._box_pct %}<div class="box" style="left:{{ '%.1f'|format(r._box_pct.left) }}%;top:{{ '%.1f'|format(r._box_pct.top) }}%;width:{{ '%.1f'|format(r._box_pct.width) }}%;height:{{ '%.1f'|format(r._box_pct.height) }}%"></div>{% endif %}{% endif %}</div><br><span title="{{ r.path }}">{{ r.query_id }}</span></div>
{% set t = r._top %}<div>{% if train.get(t) %}<img src="{{ train[t] }}" alt="{{ t }}">{% endif %}<br>{{ t }}</div>
<div>flagged by <b>{{ r.flagged_by }}</b><br>pHash {{ r.phash_distance }} bits, cosine {{ '%.3f'|format(r.embedding_cosine) if r.get('embedding_cosine') is not none else '-' }}
{% if r.get('region_cosine') is not none and not r.region_whole %}<br>region [{{ r.region_box|join(', ') }}]: cosine {{ '%.3f'|format(r.region_cosine) }}{% endif %}
{% if r.matched and r.matched|length > 1 %}<br>also: {{ r.matched[1:6]|join(', ') }}{% endif %}</div></div>{% endfor %}
</body></html>"""
)
