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

import numpy as np
import pyarrow as pa

from dedup.compute.clusters import Edges, keeper_clusters
from dedup.compute.crossmatch import HashTable, VectorIndex, nearest_hash, popcount64
from dedup.config import Config
from dedup.errors import ConfigError, SchemaMismatchError
from dedup.io.rundir import RunDir
from dedup.phases.manifest import hash_rule
from dedup.records import Status

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
    ],
    metadata={"schema_version": "CHECK_V2"},  # V2: query_id keeps the extension; path added
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
    import hashlib

    from dedup.compute.decode import DecodePolicy, decode_image
    from dedup.compute.hashes import content_hashes
    from dedup.phases.features import decode_plan

    policy = DecodePolicy(max_pixels=cfg.decode.max_pixels, formats=tuple(cfg.decode.formats))
    min_size, gray = decode_plan(cfg.decode.draft, True, int(embedder.input_size) if embedder else None)
    rows, images, thumbs, blobs = [], [], {}, []
    for qid, path, data, group, err in iter_queries(inputs, cfg, group_by):
        row = {"query_id": qid, "path": path, "group": group, "status": Status.OK.value, "error": err, "sha": None}
        if err or data is None:
            row["status"] = Status.READ_ERROR.value if err else Status.NO_IMAGE.value
            row["error"] = err or "no image member"
            rows.append(row)
            continue
        row["sha"] = hashlib.sha256(data).digest()
        d = decode_image(data, policy, min_size=min_size, gray=gray)
        if d.status != Status.OK:
            row["status"], row["error"] = d.status.value, d.error
            rows.append(row)
            continue
        row["img_index"] = len(images)
        images.append(d.image)
        blobs.append(data)
        rows.append(row)
    if not rows:
        raise ConfigError(f"no query images found in {', '.join(map(str, inputs))} (image files {', '.join(IMAGE_SUFFIXES)}, or shards)")
    _unique_ids(rows)
    missing_group = _check_group_field(rows, group_by)  # before the costly part
    ph, dh = content_hashes(images)[:2] if images else (np.empty(0, np.uint64), np.empty(0, np.uint64))  # as the run hashes
    emb = embedder.embed(images) if (embedder is not None and images) else None
    for k, im in enumerate(images):
        if im.mode == "L" and gray:  # hashes wanted luma only; the page shows colour
            im = decode_image(blobs[k], policy, min_size=128).image or im
        t = im.copy()
        t.thumbnail((128, 128))
        buf = io.BytesIO()
        t.save(buf, "JPEG", quality=80)
        thumbs[k] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return rows, ph, dh, emb, thumbs, missing_group


def check(inputs: list[str], run_dir: str, out_dir: str, *, within: bool = False, group_by: str | None = None, min_copies: int = 2) -> dict:
    from dedup.evaluation import finished_run, run_features

    run, info = finished_run(run_dir)
    cfg = Config.model_validate(info["config"])
    from dedup.compute.threshold import recorded

    run_th = recorded(run, cfg)  # the threshold the run itself used (auto: chosen for its corpus)
    fs = None
    if not within:  # the references first: a run with nothing to compare against fails before any work
        fs = run_features(run, info, with_embeddings="embedding" in cfg.methods)
        ok = np.array([s == "ok" for s in fs.table["status"].to_pylist()], bool)
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
    rows, ph, dh, emb, thumbs, missing_group = _query_features(inputs, cfg, embedder, group_by)
    result: dict = {"queries": len(rows), "missing_group": missing_group}
    ok_rows = [r for r in rows if r["status"] == Status.OK.value]
    qi = np.array([r["img_index"] for r in ok_rows], np.int64)
    result["ok"] = len(ok_rows)
    out = RunDir(out_dir)
    if not within:
        t = fs.table
        ids = np.array(t["sample_id"].to_pylist(), dtype=object)
        ref_idx = np.flatnonzero(ok)
        sha_map = {}
        for k, s in zip(ref_idx, t["sha256"].take(pa.array(ref_idx)).to_pylist()):
            sha_map.setdefault(s, ids[k])
        for r in rows:
            r["exact_match"] = sha_map.get(r["sha"]) if r["sha"] is not None and r["status"] == "ok" else None
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
        if embedder is not None and len(ok_rows):
            index = VectorIndex(np.asarray(fs.embeddings)[ref_idx], threshold=run_th)
            ti, td = index.topk(emb[qi], 1)
            m = index.range(emb[qi], run_th)
            ti, td = _nearest_covers_matches(ti, td, m)
            counts = np.bincount(m.q, minlength=len(ok_rows))
            for k, r in enumerate(ok_rows):
                if ti[k, 0] >= 0:
                    r["embedding_nearest"], r["embedding_cosine"] = ids[ref_idx[ti[k, 0]]], float(td[k, 0])
                r["embedding_matches"] = int(counts[k])
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
            r["flagged"], r["flagged_by"] = bool(why), ",".join(why) or None
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in CHECK_SCHEMA} for r in rows], schema=CHECK_SCHEMA)
        out.write_parquet(out.p("check.parquet"), table)
        result["flagged"] = int(sum(r["flagged"] for r in rows))
        flagged = [r for r in rows if r["flagged"]]
        train_thumbs = _train_thumbs(run, info, {r.get("embedding_nearest") or r.get("phash_nearest") or r.get("exact_match") for r in flagged[:50]})
        html = _CHECK_HTML.render(title=f"dedup check against {run_dir}", rows=flagged[:50], thumbs=thumbs, train=train_thumbs, result=result)
        out.write_bytes(out.p("check.html"), html.encode())
    else:
        result["groups"] = _within(cfg, rows, ok_rows, qi, ph, dh, emb, out, min_copies, run_th)
    return result


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
    report = []
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
    out.write_parquet(out.p("within.parquet"), tbl)
    return report


def _train_thumbs(run: RunDir, info: dict, ids: set) -> dict:
    from dedup.report import _thumbs

    ids = {i for i in ids if i}
    return _thumbs(run, ids, tuple(info["config"]["input"]["image_exts"]), size=128) if ids else {}


from jinja2 import Environment, select_autoescape  # noqa: E402

_CHECK_HTML = Environment(autoescape=select_autoescape(default=True)).from_string(
    """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;margin:1.5em} .row{display:flex;gap:1em;align-items:center;border-bottom:1px solid #ddd;padding:.4em 0}
img{max-width:128px;max-height:128px;border:2px solid #bbb} td,th{padding:.2em .6em}</style></head><body>
<h1>{{ title }}</h1>
<h2 id="check">Memorization check</h2>
<p>{{ result.queries }} queries, {{ result.flagged }} flagged as near-copies of training samples{% if rows|length < result.flagged %} (showing {{ rows|length }}){% endif %}.</p>
{% for r in rows %}<div class="row flagged"><div>{% if r.img_index is defined and thumbs.get(r.img_index) %}<img src="{{ thumbs[r.img_index] }}" alt="{{ r.query_id }}">{% endif %}<br><span title="{{ r.path }}">{{ r.query_id }}</span></div>
{% set t = r.embedding_nearest or r.phash_nearest or r.exact_match %}<div>{% if train.get(t) %}<img src="{{ train[t] }}" alt="{{ t }}">{% endif %}<br>{{ t }}</div>
<div>flagged by <b>{{ r.flagged_by }}</b><br>pHash {{ r.phash_distance }} bits, cosine {{ '%.3f'|format(r.embedding_cosine) if r.get('embedding_cosine') is not none else '-' }}</div></div>{% endfor %}
</body></html>"""
)
