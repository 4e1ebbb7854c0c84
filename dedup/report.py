"""``dedup report``: one self-contained HTML file (jinja2, thumbnails embedded as data URIs,
charts as inline SVG, no scripts or network) for deciding about duplicates by looking.

Sizes stay bounded on million-sample runs: at most ``max_clusters`` clusters and
``max_pairs`` borderline pairs get thumbnails; histograms are computed over all pairs.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from jinja2 import Environment, select_autoescape

from dedup.io.manifests import iter_manifest, manifest_rows
from dedup.io.rundir import RunDir
from dedup.io.shards import ShardReadResult, image_member, iter_samples
from dedup.records import METHODS, ShardRef, Status

_ENV = Environment(autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)

TEMPLATE = _ENV.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>dedup report: {{ run_dir }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#f3f3f3} .num{text-align:right}
.cluster{border:1px solid #ccc;border-radius:6px;padding:.5em;margin:.6em 0}
.row{display:flex;flex-wrap:wrap;gap:.5em}
figure{margin:0;width:140px;font-size:.75em;word-break:break-all}
figure img{max-width:136px;max-height:136px;display:block;border:2px solid #bbb}
figure.keeper img{border-color:#2a7}
.pair{display:flex;gap:.5em;align-items:center;border-bottom:1px dashed #ddd;padding:.3em 0}
.above{color:#b30} .below{color:#06c} .warn{background:#fff4d6;padding:.5em;border:1px solid #e0c060}
svg text{font-size:10px}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
</style></head><body>
<h1>dedup report</h1>
<p>Run directory <code>{{ run_dir }}</code>, finished {{ stats.finished_at or "?" }}, model <code>{{ stats.model_tag or "none" }}</code>.</p>
{% if stats.partial %}<p class="warn" id="partial">PARTIAL run: some shards failed or the error budget was exceeded. Failed shards: {{ stats.shards.failed|length if stats.shards else 0 }}.</p>{% endif %}

<h2 id="counts">Counts</h2>
<table id="counts-table">
<tr><th>samples read</th><td class="num">{{ stats.samples }}</td></tr>
<tr><th>kept</th><td class="num">{{ stats.kept }}</td></tr>
<tr><th>duplicates removed</th><td class="num">{{ stats.duplicates }}</td></tr>
<tr><th>clusters with duplicates</th><td class="num">{{ stats.clusters_with_duplicates }}</td></tr>
{% for k, v in stats.status_counts.items() %}<tr><th>status {{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}
{% for k, v in stats.duplicates_by_method.items() %}<tr><th>removed by {{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}
{% for k, v in stats.pairs.items() %}<tr><th>candidate pairs, {{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}
</table>
{% if stats.embedding_threshold %}{% set et = stats.embedding_threshold %}
<p id="threshold">Embedding threshold <b>{{ et.value }}</b> ({{ et.mode }}{% if et.mode == "auto" %}; the family's value {{ et.floor }};
expected unrelated pairs above it among the {{ et.n }} samples: {{ "%.3g"|format(et.expected_false_pairs) if et.expected_false_pairs is not none else "-" }}
(at {{ et.floor }}: {{ "%.3g"|format(et.expected_false_pairs_at_floor) if et.expected_false_pairs_at_floor is not none else "-" }}; budget {{ "%.3g"|format(et.budget) }}){% endif %}).
{{ et.note }}</p>{% endif %}

<h2 id="sizes">Cluster sizes (copy counts: the memorization risk)</h2>
{{ size_svg|safe }}

<h2 id="clusters">Largest clusters</h2>
{% if not clusters %}<p>No duplicates found.</p>{% endif %}
{% for c in clusters %}
<div class="cluster" data-keeper="{{ c.keeper }}" data-size="{{ c.size }}">
<div>cluster of <b>{{ c.size }}</b>, keeper <code>{{ c.keeper }}</code>{% if c.size > c.members|length %} (showing {{ c.members|length }}){% endif %}</div>
<div class="row">
{% for m in c.members %}
<figure class="{{ 'keeper' if m.is_keeper else '' }}">{% if m.thumb %}<img src="{{ m.thumb }}" alt="{{ m.sample_id }}">{% else %}<div>(no image)</div>{% endif %}
<figcaption>{{ m.sample_id }}<br>{% if m.sample_id == c.keeper %}keeper{% else %}{{ m.dup_method }} {{ m.score }}{% endif %}</figcaption></figure>
{% endfor %}
</div></div>
{% endfor %}

<h2 id="borderline">Borderline pairs</h2>
<p>Pairs just <span class="above">above</span> each method's threshold (counted as duplicates) and just <span class="below">below</span> it (not counted; from a bounded sample). Look here to move a threshold.</p>
{% for method, rows in borderline.items() %}
<h3>{{ method }} (threshold {{ thresholds[method] }})</h3>
{% for p in rows %}
<div class="pair {{ p.side }}"><figure>{% if p.a_thumb %}<img src="{{ p.a_thumb }}" alt="{{ p.a }}">{% endif %}<figcaption>{{ p.a }}</figcaption></figure>
<figure>{% if p.b_thumb %}<img src="{{ p.b_thumb }}" alt="{{ p.b }}">{% endif %}<figcaption>{{ p.b }}</figcaption></figure>
<div>{{ p.side }}: score {{ p.score }}</div></div>
{% endfor %}
{% endfor %}

<h2 id="distributions">Score distributions of candidate pairs</h2>
{% for method, svg in score_svgs.items() %}<h3>{{ method }}</h3>{{ svg|safe }}{% endfor %}

{% if checks %}
<h2 id="checks">Memorization checks against this run</h2>
<p>Written by <code>dedup check QUERIES --against</code> this run (RUN/checks.json).</p>
{% for c in checks %}
<div class="cluster check"><div><b>{{ c.flagged }}</b> of {{ c.queries }} queries flagged, {{ c.written_at }}:
<a href="{{ c.html_href }}">check.html</a> (<code>{{ c.out }}</code>){% if c.region_threshold %}; regions matched at cosine &ge; {{ c.region_threshold }}{% endif %}</div>
{% if c.top %}<table><tr><th>query</th><th>training sample</th><th>flagged by</th><th>cosine</th><th>region</th></tr>
{% for t in c.top %}<tr><td>{{ t.query_id }}</td><td>{% if thumbs_checks.get(t.match) %}<img src="{{ thumbs_checks[t.match] }}" alt="{{ t.match }}" style="max-height:48px;display:block">{% endif %}{{ t.match }}</td><td>{{ t.flagged_by }}</td>
<td class="num">{{ "%.3f"|format(t.cosine) if t.cosine is not none else "-" }}</td><td>{{ "whole image" if t.whole or not t.box else t.box|join(", ") }}</td></tr>
{% endfor %}</table>{% endif %}</div>
{% endfor %}
{% endif %}

<h2 id="config">Configuration and timings</h2>
<pre>{{ config_json }}</pre>
<pre>{{ timings_json }}</pre>
</body></html>
"""
)


def _bar_svg(labels: list[str], values: list[int], width: int = 640, height: int = 180) -> str:
    if not values:
        return "<p>(no data)</p>"
    vmax = max(values) or 1
    n = len(values)
    bw = (width - 40) / n
    parts = [f'<svg width="{width}" height="{height + 30}" role="img">']
    for k, (lab, v) in enumerate(zip(labels, values)):
        h = (height - 20) * v / vmax
        x = 30 + k * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" fill="#4a8"><title>{lab}: {v}</title></rect>')
        if n <= 30 or k % max(1, n // 15) == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height + 12}" text-anchor="middle">{lab}</text>')
        if n <= 30:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - h - 3:.1f}" text-anchor="middle">{v}</text>')
    parts.append("</svg>")
    return "".join(parts)


def thumbnails(run: RunDir, wanted: set[str], image_exts: tuple[str, ...], size: int = 136) -> dict[str, str]:
    """Data-URI JPEG thumbnails for the wanted sample ids, read from their shards."""
    from PIL import Image, ImageOps

    by_shard: dict[str, set[str]] = defaultdict(set)
    for sid in wanted:
        shard, key = sid.rsplit("/", 1) if "/" in sid else ("", sid)
        by_shard[shard].add(sid)
    out: dict[str, str] = {}
    for shard, ids in by_shard.items():
        done_path = run.done(shard)
        if not run.exists(done_path):
            continue
        url = run.read_json(done_path)["url"]
        for sample in iter_samples(ShardRef(url, shard), ShardReadResult(), image_exts):
            sid = f"{shard}/{sample.key}"
            if sid not in ids or sid in out:
                continue
            _, data = image_member(sample, image_exts)
            if data is None:
                continue  # no image member: no thumbnail
            try:
                im: Image.Image = Image.open(io.BytesIO(data))
                im.draft("RGB", (size * 2, size * 2))
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
                out[sid] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            except Exception:  # noqa: BLE001 - a thumbnail is best effort; the row says why
                continue
            if len(out) >= len(wanted) or ids.issubset(out):
                break  # this shard's thumbnails are done: do not read the rest of it
    return out


def build_report(run_dir: str, max_clusters: int = 12, max_members: int = 8, max_pairs: int = 6) -> str:
    run = RunDir(run_dir)
    stats = run.read_json(run.stats)
    cfg = run.read_json(run.run_json)
    image_exts = tuple(cfg["config"]["input"]["image_exts"])
    pairs = run.read_parquet(run.pairs)
    clusters = _largest_clusters(run, max_clusters, max_members)

    thresholds = stats.get("thresholds", {})
    th = {"phash": thresholds.get("phash_radius"), "dhash": thresholds.get("dhash_radius"), "embedding": thresholds.get("embedding_cosine"), "exact": "identical bytes"}
    borderline: dict[str, list[dict]] = {}
    score_svgs: dict[str, str] = {}
    for method in (x for x in METHODS if x != "exact"):  # the methods with a score scale
        sub = pairs.filter(pc.equal(pairs["method"], method))
        if sub.num_rows:
            scores = sub["score"].to_numpy()
            if method == "embedding":
                edges: np.ndarray = np.linspace(max(-1.0, float(scores.min()) - 1e-6), 1.0, 21)
                labels = [f"{e:.2f}" for e in edges[:-1]]
            else:
                edges = np.arange(0, int(scores.max()) + 2)
                labels = [str(int(e)) for e in edges[:-1]]
            counts, _ = np.histogram(scores, bins=edges)
            score_svgs[method] = _bar_svg(labels, counts.tolist())
            # Just above the threshold = the weakest accepted pairs.
            order = np.argsort(-scores if method != "embedding" else scores, kind="stable")[:max_pairs]
            borderline[method] = [{"a": sub["a"][int(k)].as_py(), "b": sub["b"][int(k)].as_py(), "score": round(float(scores[k]), 4), "side": "above"} for k in order]
        if method in ("phash", "dhash") and th.get(method) is not None:
            borderline.setdefault(method, []).extend(_below_hash(run, method, int(th[method]), max_pairs))
        if method == "embedding" and th.get("embedding") is not None:
            below = _below_embedding(run, float(th["embedding"]), max_pairs)
            if below:
                borderline.setdefault(method, []).extend(below)
    from dedup.phases.manifest import size_bucket_order

    hist = dict(sorted(stats.get("cluster_size_histogram", {}).items(), key=lambda kv: size_bucket_order(kv[0])))
    stats["cluster_size_histogram"] = hist
    size_svg = _bar_svg(list(hist.keys()), list(hist.values()))

    wanted = {mm["sample_id"] for c in clusters for mm in c["members"]}
    wanted |= {p[x] for rows in borderline.values() for p in rows for x in ("a", "b")}
    thumbs = thumbnails(run, wanted, image_exts)
    for c in clusters:
        for mm in c["members"]:
            mm["thumb"] = thumbs.get(mm["sample_id"])
    for rows in borderline.values():
        for p in rows:
            p["a_thumb"], p["b_thumb"] = thumbs.get(p["a"]), thumbs.get(p["b"])

    checks = _checks(run)
    thumbs_checks = thumbnails(run, {t["match"] for c in checks for t in c.get("top", [])[:5] if t.get("match")}, image_exts, size=64) if checks else {}
    stats.setdefault("duplicates_by_method", {})
    stats.setdefault("pairs", {})
    stats.setdefault("status_counts", {})
    return TEMPLATE.render(
        run_dir=run_dir, stats=stats, clusters=clusters, borderline=borderline, thresholds=th,
        size_svg=size_svg, score_svgs=score_svgs, checks=checks, thumbs_checks=thumbs_checks,
        config_json=json.dumps(cfg.get("config", {}), indent=1), timings_json=json.dumps(stats.get("timings", {}), indent=1),
    )


def _checks(run: RunDir) -> list[dict]:
    """The ``dedup check`` results recorded in RUN/checks.json, newest first, with a link to
    each check.html (relative to the run directory where both are local)."""
    import os

    try:
        checks = run.read_json(run.checks) if run.exists(run.checks) else []
    except (OSError, ValueError):
        return []
    out = []
    for c in checks if isinstance(checks, list) else []:
        if not isinstance(c, dict) or "html" not in c:
            continue
        c = dict(c)
        c["html_href"] = os.path.relpath(c["html"], run.path) if run.local and "://" not in c["html"] else c["html"]
        out.append(c)
    return sorted(out, key=lambda c: c.get("written_at") or "", reverse=True)


def _largest_clusters(run: RunDir, max_clusters: int, max_members: int) -> list[dict[str, Any]]:
    """The ``max_clusters`` largest clusters (rows with cluster_size > 1, by their number of
    rows, then keeper id), each with its first ``max_members`` members (the keeper, other
    keepers, then by sample_id). Two passes over the manifest, a batch at a time: the
    cluster_id column of the clustered rows (Arrow, to count the rows per cluster), then the
    members of the chosen clusters only."""
    filt = [("cluster_size", ">", 1)]
    ids = [t["cluster_id"] for t in iter_manifest(run, ["cluster_id"], filt)]
    if not ids or not sum(len(c) for c in ids):
        return []
    counts = pc.value_counts(pa.chunked_array([c for t in ids for c in t.chunks]))
    del ids
    order = pc.sort_indices(pa.table({"n": counts.field("counts"), "c": counts.field("values")}),
                            sort_keys=[("n", "descending"), ("c", "ascending")])[:max_clusters]
    top = counts.take(order).to_pylist()
    size = {x["values"]: int(x["counts"]) for x in top}
    shown: dict[str, list[dict]] = defaultdict(list)
    cols = ["sample_id", "cluster_id", "is_keeper", "dup_method", "score_to_keeper"]
    for t in iter_manifest(run, cols, [*filt, ("cluster_id", "in", list(size))]):
        for r in t.to_pylist():
            shown[r["cluster_id"]].append(r)
        for keeper, members in shown.items():  # only the first max_members stay
            members.sort(key=functools.partial(_member_order, keeper))
            del members[max_members:]
    return [{"keeper": x["values"], "size": size[x["values"]], "members": [
        {"sample_id": r["sample_id"], "is_keeper": r["is_keeper"], "dup_method": r["dup_method"],
         "score": None if r["score_to_keeper"] is None else round(float(r["score_to_keeper"]), 4)} for r in shown[x["values"]]
    ]} for x in top]


def _member_order(keeper: str, r: dict) -> tuple:
    return (r["sample_id"] != keeper, not r["is_keeper"], r["sample_id"])


def _below_hash(run: RunDir, method: str, radius: int, limit: int, sample: int = 50_000) -> list[dict]:
    """Pairs just outside the radius (radius+1 .. radius+4 bits), from a bounded sample (the
    search at radius+4 is often exhaustive: 50 000 rows take ~1 s, 200 000 took ~12 s): the
    first ``sample`` ok rows with this hash, read from the manifest until there are as many."""
    from dedup.compute.search.hamming import hash_pairs

    got: list[pa.Table] = []
    n = 0
    for t in iter_manifest(run, ["sample_id", method], [("status", "=", Status.OK.value)]):
        t = t.filter(pc.is_valid(t[method]))
        got.append(t)
        n += t.num_rows
        if n >= sample:
            break
    ok = pa.concat_tables(got).slice(0, sample) if got else None
    if ok is None or ok.num_rows < 2:
        return []
    h = ok[method].to_numpy().astype(np.uint64)
    p = hash_pairs(h, min(radius + 4, 32))
    sel = np.flatnonzero(np.asarray(p.score) > radius)
    sel = sel[np.argsort(np.asarray(p.score)[sel], kind="stable")][:limit]
    ids = ok["sample_id"]
    return [{"a": ids[int(p.i[k])].as_py(), "b": ids[int(p.j[k])].as_py(), "score": float(p.score[k]), "side": "below"} for k in sel]


def _below_embedding(run: RunDir, threshold: float, limit: int, sample: int = 20_000) -> list[dict]:
    """Nearest-neighbour pairs just under the cosine threshold, from a bounded sample of the
    staged embeddings (``index/embeddings.f16``, sample_id order = manifest order): the first
    ``sample`` ok rows, found by reading the manifest's status column until there are as many."""
    import os

    from dedup.compute.crossmatch import VectorIndex

    path = run.embeddings
    if not run.local or not os.path.exists(path):
        return []
    emb = np.load(path, mmap_mode="r")
    if len(emb) != manifest_rows(run):
        return []
    pos: list[np.ndarray] = []
    sid: list[pa.ChunkedArray] = []
    start = n = 0
    for t in iter_manifest(run, ["sample_id", "status"]):
        okb = pc.equal(t["status"], Status.OK.value).to_numpy(zero_copy_only=False)
        at = np.flatnonzero(okb)[: sample - n]
        pos.append(at + start)
        sid.append(t["sample_id"].take(pa.array(at)))
        start, n = start + t.num_rows, n + len(at)
        if n >= sample:
            break
    ok = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    if len(ok) < 2:
        return []
    names = dict(zip(ok.tolist(), pa.chunked_array([c for a in sid for c in a.chunks], pa.string()).to_pylist()))
    x = np.asarray(emb[ok], np.float32)
    nn, sims = VectorIndex(x).topk(x, 2)
    a, b, s = np.minimum(ok, ok[nn[:, 1]]), np.maximum(ok, ok[nn[:, 1]]), sims[:, 1]
    cand = np.flatnonzero((s < threshold) & (s >= threshold - 0.15) & (a != b))
    _, first = np.unique(a[cand] * (len(emb) + 1) + b[cand], return_index=True)  # each pair once
    sel = cand[first]
    sel = sel[np.argsort(-s[sel], kind="stable")][:limit]
    return [{"a": names[int(a[k])], "b": names[int(b[k])], "score": round(float(s[k]), 4), "side": "below"} for k in sel]


def write_report(run_dir: str, path: str | None = None, overwrite: bool = False) -> str:
    from dedup.io.rundir import finished_run
    from dedup.io.safety import guard_file_output, run_reads

    run = finished_run(run_dir)
    if path is not None:  # never replace an input, a run file or a file that is not a report
        guard_file_output(path, reads=run_reads(run), runs=[run_dir], ours=_is_report(path), overwrite=overwrite)
    html = build_report(run_dir)
    target = path or run.report
    run.write_bytes(target, html.encode())
    return target


def _is_report(path: str) -> bool:
    """An existing local file that an earlier ``dedup report`` wrote (safe to replace)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"<!doctype html>") and b"<title>dedup report" in head
