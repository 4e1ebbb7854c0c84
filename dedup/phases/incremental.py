"""Incremental runs for scheduled jobs: ``dedup run NEW... --out NEW_RUN --against PREV_RUN``.

New samples are deduplicated among themselves and against the previous run's **kept**
samples, which stay fixed: they rank ahead of every new sample and are never demoted. The run
directory holds a *delta* manifest (rows for the new samples only; ``cluster_id`` may name a
previous sample) and, with ``--merge``, ``merged_manifest.parquet`` (previous manifest + delta,
cluster sizes updated).

Cost grows with the new data: previous keepers' hashes go into chunk tables (sorted arrays)
and their embeddings into an index (:class:`~dedup.compute.crossmatch.VectorIndex`: the
candidate search's IVF lists) that is built once and cached in ``PREV_RUN/index/keepers/``
(with ``keepers.json`` naming the model, features hash, keepers and threshold; a different
model is refused, other keepers or another threshold rebuild it). The result equals a full run
over old + new data whenever the keeper policy ranks old samples first (e.g.
``keeper_policy: [sample_id]`` with shard ids that sort by date) — tested in
tests/test_incremental.py.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup.compute.crossmatch import HashTable, VectorIndex
from dedup.config import Config
from dedup.errors import ConfigError, SchemaMismatchError
from dedup.io.manifests import iter_manifest, manifest_files, read_manifest
from dedup.io.rundir import RunDir
from dedup.records import Status
from dedup.schema import PAIRS_SCHEMA

log = logging.getLogger(__name__)

# no key: the manifest derives it from sample_id and shard_id (dedup.records.sample_keys)
_PREV_COLS = ["sample_id", "shard_id", "status", "error", "file_size", "caption_len", "width", "height", "sha256", "phash", "dhash"]


def _common_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with its dictionary columns on 32-bit indices and its integer columns on the
    features files' types: the previous keepers' and the new samples' tables were narrowed
    (load_features) to types that depend on their own values."""
    from dedup.schema import features_schema

    files = features_schema(None)

    def common(f: pa.Field) -> pa.Field:
        if pa.types.is_dictionary(f.type):
            return f.with_type(pa.dictionary(pa.int32(), f.type.value_type))
        if pa.types.is_integer(f.type) and f.name in files.names:
            return f.with_type(files.field(f.name).type)
        return f

    return pa.schema([common(f) for f in schema], metadata=schema.metadata)


def check_previous(prev: RunDir, features_hash: str, model_tag: str | None) -> dict:
    if not prev.exists(prev.run_json) or not prev.exists(prev.manifest):
        raise ConfigError(f"--against {prev.url}: not a finished dedup run (no run.json / manifest.parquet)")
    manifest_files(prev)  # a directory manifest whose write was interrupted: refused, with why
    info = prev.read_json(prev.run_json)
    if info.get("features_hash") != features_hash:
        raise SchemaMismatchError(
            f"--against {prev.url} was made with model {info.get('model_tag') or 'none'!r} / features "
            f"{info.get('features_hash')}, this run uses model {model_tag or 'none'!r} / features {features_hash}; "
            "an incremental run must use the same model and decode settings"
            + ("; the model is the same, so either the decode/input settings differ or the previous run was made "
               "by a dedup version whose decode, hashing or image preparation differ — then run it again with this "
               "version first (its features are recomputed) and --against it" if info.get("model_tag") == model_tag else "")
        )
    return info


def _keepers(prev: RunDir, info: dict, with_embeddings: bool, threshold: float = 0.9):
    """Previous keepers' scalar columns (sorted by sample_id) and, if asked, their embeddings."""
    from dedup.phases.candidates import load_features

    # the keepers' ids, a batch of the manifest at a time (a join key: all of them are needed)
    keep_ids = read_manifest(prev, ["sample_id"], [("is_keeper", "=", True), ("status", "=", Status.OK.value)])["sample_id"]
    fs = load_features(prev, info["shards"], with_embeddings=False)
    mask = pc.is_in(fs.table["sample_id"], value_set=keep_ids)
    table = fs.table.filter(mask).select(_PREV_COLS)
    emb = None
    if with_embeddings:
        emb = _keeper_vectors(prev, info, table["sample_id"], threshold)
    return table, emb


def _keeper_vectors(prev: RunDir, info: dict, ids: pa.ChunkedArray, threshold: float) -> VectorIndex:
    """The index over previous keepers' embeddings, cached in PREV/index/keepers/ (built once):
    the vectors (float16 .npy, mapped, not loaded) and the IVF lists as arrays + JSON."""
    cache_dir = prev.index_dir
    kdir = os.path.join(cache_dir, "keepers")
    meta_path = os.path.join(cache_dir, "keepers.json")
    vec_path = os.path.join(kdir, "vectors.f16.npy")
    n = len(ids)
    # which keepers, exactly: a manifest recomputed with another keeper policy (--force) can
    # keep as many samples, but not the same ones
    ids_hash = hashlib.sha256("\n".join(ids.to_pylist()).encode()).hexdigest()
    if prev.local and os.path.exists(meta_path) and os.path.exists(vec_path):
        try:
            meta = json.load(open(meta_path))
        except ValueError:
            meta = {}
        if (meta.get("format") == _CACHE_FORMAT and meta.get("features_hash") == info.get("features_hash")
                and meta.get("count") == n and meta.get("ids_hash") == ids_hash and meta.get("threshold") == threshold):
            vi = VectorIndex.load(kdir, np.load(vec_path, mmap_mode="r"))
            if vi is not None:
                return vi
    from dedup.phases.candidates import load_features

    fs = load_features(prev, info["shards"], with_embeddings=True)
    pos = pc.index_in(ids, value_set=fs.table["sample_id"]).to_numpy()
    ref = np.asarray(fs.embeddings)[pos]
    if not prev.local:
        return VectorIndex(ref, threshold=threshold)
    try:
        os.makedirs(kdir, exist_ok=True)
        np.save(vec_path + ".tmp.npy", ref)
        os.replace(vec_path + ".tmp.npy", vec_path)
    except OSError as e:  # a read-only or full previous run: search without a cache
        log.warning("cannot cache the previous keepers' index in %s (%s); building it in memory for this run", kdir, e)
        return VectorIndex(ref, threshold=threshold)
    del ref
    vi = VectorIndex(np.load(vec_path, mmap_mode="r"), threshold=threshold)
    try:
        vi.save(kdir)
        with open(meta_path + ".tmp", "w") as f:
            json.dump({"format": _CACHE_FORMAT, "features_hash": info.get("features_hash"),
                       "model_tag": info.get("model_tag"), "count": n, "ids_hash": ids_hash, "threshold": threshold}, f)
        os.replace(meta_path + ".tmp", meta_path)
        old = os.path.join(cache_dir, "keepers.faiss")  # format 1's index (the vectors in float32)
        if os.path.exists(old):
            os.remove(old)
    except OSError as e:
        log.warning("cannot cache the previous keepers' index in %s (%s); it is rebuilt next time", kdir, e)
    return vi


_CACHE_FORMAT = 2


def write_merged(run: RunDir, prev: RunDir, delta: pa.Table) -> None:
    """``merged_manifest.parquet``: the previous manifest and the delta in sample_id order,
    ``cluster_size`` counted again over both. Up to ``MANIFEST_PART_ROWS`` rows as one table,
    as always; above, streamed a batch of the previous manifest at a time into part files
    (both sides are in sample_id order: each batch takes the delta rows that sort before its
    last id)."""
    from dedup.io import manifests

    n_prev = manifests.manifest_rows(prev)
    schema = delta.schema
    if n_prev + delta.num_rows <= manifests.MANIFEST_PART_ROWS:
        files = manifests.manifest_files(prev)
        full_prev = prev.read_parquet(files[0]) if files == [prev.manifest] else read_manifest(prev)
        merged = pa.concat_tables([full_prev.cast(schema), delta.cast(schema)])
        merged = merged.take(pc.sort_indices(merged, sort_keys=[("sample_id", "ascending")]))
        counts: dict = {}
        for c in merged["cluster_id"].to_pylist():
            if c is not None:
                counts[c] = counts.get(c, 0) + 1
        merged = merged.set_column(merged.schema.get_field_index("cluster_size"), "cluster_size",
                                   pa.array([counts.get(c) if c is not None else None for c in merged["cluster_id"].to_pylist()], pa.int32()))
        merged = merged.replace_schema_metadata(schema.metadata)
        manifests.write_manifest_data(run, run.merged_manifest, merged.schema, merged, merged.num_rows)
        return
    # rows per cluster over both: the one whole column read (Arrow, not Python objects)
    ids = [t["cluster_id"].drop_null() for t in iter_manifest(prev, ["cluster_id"])] + [delta["cluster_id"].drop_null()]
    vc = pc.value_counts(pa.chunked_array([c for a in ids for c in a.chunks], schema.field("cluster_id").type))
    del ids
    values, sizes = vc.field("values"), vc.field("counts").cast(pa.int32())
    at = schema.get_field_index("cluster_size")
    dids = delta["sample_id"].to_pylist()

    def chunks():
        d = 0
        for t in itertools.chain(iter_manifest(prev), [None]):
            if t is None:
                piece = delta.slice(d)
            else:
                k = bisect.bisect_left(dids, t["sample_id"][-1].as_py(), lo=d) if t.num_rows else d
                piece = pa.concat_tables([t.cast(schema), delta.slice(d, k - d)])
                d = k
            piece = piece.take(pc.sort_indices(piece, sort_keys=[("sample_id", "ascending")]))
            piece = piece.set_column(at, "cluster_size", pc.take(sizes, pc.index_in(piece["cluster_id"], value_set=values)))
            for s in range(0, piece.num_rows, manifests.BATCH_ROWS):
                yield piece.slice(s, manifests.BATCH_ROWS)

    manifests.write_manifest_data(run, run.merged_manifest, schema, chunks(), n_prev + delta.num_rows)


def incremental_finish(run: RunDir, prev: RunDir, cfg: Config, shard_ids: list[str], info: dict, *, merge: bool = False, failed_shards: bool = False) -> dict:
    """Candidates + delta manifest for the new shards against the previous run's keepers."""
    from dedup.phases.candidates import find_pairs, load_features
    from dedup.phases.manifest import build_manifest, write_manifest

    t0 = time.perf_counter()
    new = load_features(run, sorted(shard_ids), with_embeddings="embedding" in cfg.methods)
    overlap = set(info["shards"]) & set(shard_ids)
    if overlap:
        raise ConfigError(f"shard(s) {sorted(overlap)[:3]} are already in {prev.url}; an incremental run takes new shards only")
    found = find_pairs(cfg, new)
    pairs_new, pinfo = found.table, found.info
    from dedup.compute.threshold import recorded

    # the new shards meet the previous keepers at the previous run's threshold (or the new
    # shards' own auto choice, if that is higher)
    th = recorded(prev, cfg)
    if pinfo.get("embedding_threshold"):
        th = max(th, float(pinfo["embedding_threshold"]["value"]))
    prev_tbl, prev_vi = _keepers(prev, info, with_embeddings="embedding" in cfg.methods, threshold=th)
    ok = new.ok()
    nid = np.array(new.table["sample_id"].to_pylist(), dtype=object)
    pid = np.array(prev_tbl["sample_id"].to_pylist(), dtype=object)
    cross = []

    def add(method, qi, ri, score):
        if len(qi):
            a, b = nid[qi], pid[ri]
            lo, hi = np.where(a < b, a, b), np.where(a < b, b, a)
            cross.append(pa.table({"a": pa.array(lo, pa.string()), "b": pa.array(hi, pa.string()), "method": [method] * len(qi), "score": pa.array(np.asarray(score, np.float32))}, schema=PAIRS_SCHEMA))

    qidx = np.flatnonzero(ok)
    if "exact" in cfg.methods and len(pid):
        lookup: dict[bytes | None, int] = {}
        for k, s in enumerate(prev_tbl["sha256"].to_pylist()):
            lookup.setdefault(s, k)
        shas = new.table["sha256"].to_pylist()
        hits = [(q, lookup[shas[q]]) for q in qidx if shas[q] in lookup]
        if hits:
            add("exact", np.array([h[0] for h in hits]), np.array([h[1] for h in hits]), np.ones(len(hits)))
    for method, radius in (("phash", cfg.hashes.phash_radius), ("dhash", cfg.hashes.dhash_radius)):
        if method in cfg.methods and len(pid) and len(qidx):
            table = HashTable(prev_tbl[method].fill_null(0).to_numpy().astype(np.uint64), radius)
            m = table.query(new.table[method].fill_null(0).to_numpy().astype(np.uint64)[qidx])
            add(method, qidx[m.q], m.r, m.score)
    if prev_vi is not None and len(qidx):
        m = prev_vi.range(np.asarray(new.embeddings)[qidx], th)
        add("embedding", qidx[m.q], m.r, m.score)
    pairs = pa.concat_tables([pairs_new, *cross]).sort_by([("a", "ascending"), ("b", "ascending"), ("method", "ascending")])
    run.write_parquet(run.pairs, pairs)

    # Cluster old keepers + new samples together; old keepers rank first and stay keepers.
    schema = _common_schema(new.table.select(_PREV_COLS).schema)
    combined = pa.concat_tables([prev_tbl.cast(schema), new.table.select(_PREV_COLS).cast(schema)])
    order = pc.sort_indices(combined, sort_keys=[("sample_id", "ascending")])
    combined = combined.take(order)
    is_prev = np.zeros(combined.num_rows, bool)
    is_prev[: prev_tbl.num_rows] = True
    is_prev = is_prev[order.to_numpy()]
    from dedup.phases.manifest import keeper_rank

    base = keeper_rank(cfg, combined)
    rank = np.lexsort((base, ~is_prev))  # previous keepers first, then the policy
    r = np.empty(len(rank), np.int64)
    r[rank] = np.arange(len(rank))
    manifest, _ = build_manifest(cfg, combined, pairs, rank=r)
    # Cluster sizes count the previous cluster's members too: the sizes of the previous samples
    # that the delta's clusters name (read for those rows only).
    delta = manifest.filter(pa.array(~is_prev))
    cids = delta["cluster_id"].to_pylist()
    named = sorted({c for c in cids if c is not None})
    prev_sizes: dict = {}
    if named:
        for t in iter_manifest(prev, ["sample_id", "cluster_size"], [("sample_id", "in", named)]):
            prev_sizes.update(zip(t["sample_id"].to_pylist(), t["cluster_size"].to_pylist()))
    extra: dict[str, int] = {}
    for c in cids:
        if c is not None:
            extra[c] = extra.get(c, 0) + 1
    sizes: list[int | None] = []
    for c, s in zip(cids, delta["cluster_size"].to_pylist()):
        if c is None:
            sizes.append(None)
        elif c in prev_sizes:
            sizes.append(int(prev_sizes[c] or 1) + extra[c])
        else:
            sizes.append(s)
    delta = delta.set_column(delta.schema.get_field_index("cluster_size"), "cluster_size", pa.array(sizes, pa.int32()))
    written = write_manifest(run, cfg, delta, failed_shards=failed_shards, metadata={b"against": prev.url.encode()})
    assert written.table is not None  # written from a table
    delta = written.table
    total = delta.num_rows
    if merge:
        write_merged(run, prev, delta)
    keep = delta["is_keeper"].to_numpy(zero_copy_only=False)
    st = delta["status"].to_numpy(zero_copy_only=False)
    ok = st == Status.OK.value
    return {
        "samples": total,
        "ok": int(ok.sum()),
        "kept": int(keep.sum()),
        "duplicates": int((ok & ~keep).sum()),
        "duplicates_of_previous": int(sum(1 for c, k in zip(cids, keep) if c in prev_sizes and not k)),
        "status_counts": dict(sorted((x["values"], x["counts"]) for x in pc.value_counts(delta["status"]).to_pylist())),
        "pairs": {**pinfo["pairs"], "against_previous": int(sum(t.num_rows for t in cross))},
        "against": prev.url,
        "previous_keepers": prev_tbl.num_rows,
        **written.stats(),
        "methods": list(cfg.methods),
        "timings": {"incremental": round(time.perf_counter() - t0, 3)},
        "merged": merge,
    }
