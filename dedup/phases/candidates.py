"""Phase 2: candidate duplicate pairs from all shards' features, one method at a time.

Reads ``features/*.parquet`` of the run's shards, writes ``pairs/pairs.parquet`` (PAIRS_V1)
and ``pairs/done.json`` last. Embeddings are staged into a float16 memory-mapped file under
``index/`` so the search never holds more than the index's working set in RAM.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup.config import Config
from dedup.errors import SchemaMismatchError
from dedup.io.rundir import RunDir
from dedup.schema import FEATURES_VERSION, PAIRS_SCHEMA, check_version

log = logging.getLogger(__name__)

_SCALAR_COLS = [
    "sample_id", "shard_id", "key", "status", "error", "file_size", "caption_len",
    "width", "height", "sha256", "phash", "dhash", "content_fraction",
]


@dataclass
class FeatureSet:
    table: pa.Table  # scalar columns, sorted by sample_id
    embeddings: np.ndarray | None  # (n, d) float16, row-aligned with table (memmap)
    model_tag: str | None
    features_hash: str | None

    @property
    def n(self) -> int:
        return self.table.num_rows

    def ok(self) -> np.ndarray:
        return pc.equal(self.table["status"], "ok").to_numpy(zero_copy_only=False)


def load_features(run: RunDir, shard_ids: list[str], with_embeddings: bool) -> FeatureSet:
    tables, metas = [], []
    for sid in shard_ids:
        path = run.features(sid)
        with run.fs.open(path, "rb") as f:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            check_version(schema, FEATURES_VERSION, f"features file {path}")
            md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
            metas.append((sid, md))
            cols = _SCALAR_COLS + (["embedding"] if with_embeddings and "embedding" in schema.names else [])
            tables.append(pf.read(columns=cols))
    if metas:
        first_sid, first = metas[0]
        for sid, md in metas[1:]:
            if md.get("config_hash") != first.get("config_hash"):
                raise SchemaMismatchError(
                    f"features of shard {sid!r} were made with model {md.get('model_tag') or 'none'!r} / config "
                    f"{md.get('config_hash')}, but shard {first_sid!r} with model {first.get('model_tag') or 'none'!r} / "
                    f"config {first.get('config_hash')}; refusing to mix them (rerun with the same config or --force)"
                )
    model_tag = metas[0][1].get("model_tag") or None if metas else None
    fhash = metas[0][1].get("config_hash") if metas else None
    if not tables:  # no shard finished: an empty table of the features schema (scalar columns)
        from dedup.schema import features_schema

        empty = features_schema(None).empty_table().select(_SCALAR_COLS)
        return FeatureSet(empty, None, None, None)
    table = pa.concat_tables(tables, promote_options="permissive")
    order = pc.sort_indices(table, sort_keys=[("sample_id", "ascending")])
    emb = None
    if "embedding" in table.column_names:
        emb = _stage_embeddings(run, table["embedding"], order)
        table = table.drop(["embedding"])
    table = table.take(order)
    return FeatureSet(table, emb, model_tag, fhash)


def _stage_embeddings(run: RunDir, col: pa.ChunkedArray, order: pa.Array) -> np.ndarray:
    """Write embeddings (in sample_id order) to a float16 memmap; nulls become zero rows."""
    d = col.type.list_size
    n = len(col)
    scratch = not run.local
    if run.local:
        base = run.p("index")
        try:
            os.makedirs(base, exist_ok=True)
            with tempfile.TemporaryFile(dir=base):
                pass
        except OSError as e:  # e.g. a read-only previous run read by --against
            log.warning("cannot write to %s (%s); staging the embeddings in the temp dir instead", base, e)
            scratch = True
    if scratch:
        base = tempfile.mkdtemp(prefix="dedup-index-")
    need = n * d * 2 + (1 << 20)
    free = shutil.disk_usage(base).free
    if free < need:
        # say so before writing, instead of a "No space left on device" half-way through
        if scratch:
            shutil.rmtree(base, ignore_errors=True)
        from dedup.errors import DedupError

        hint = ("set TMPDIR to a disk with room (the embeddings are staged in the temp dir: the run "
                "directory is remote or not writable)") if scratch else "free space there or use another --out"
        raise DedupError(
            f"not enough disk space to stage {n:,} × {d} float16 embeddings for the candidate search: "
            f"{need / 2**30:.1f} GiB needed in {base}, {free / 2**30:.1f} GiB free; {hint}. "
            "The features are kept: rerun the same command to resume."
        )
    path = os.path.join(base, "embeddings.f16")
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    # Position of each original row in the sorted order.
    inv = np.empty(n, np.int64)
    inv[order.to_numpy()] = np.arange(n)
    start = 0
    for chunk in col.chunks:
        m = len(chunk)
        vals = chunk.flatten().to_numpy(zero_copy_only=False)
        block = np.zeros((m, d), np.float16)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        if valid.all():
            block[:] = vals.reshape(m, d)
        elif valid.any():
            block[valid] = vals.reshape(-1, d)
        mm[inv[start : start + m]] = block
        start += m
    mm.flush()
    del mm
    out = np.load(path, mmap_mode="r")
    if scratch:
        # A scratch copy (the run dir is remote or read-only): remove the name now. The mapping
        # stays valid until it is released and the space is freed then, even if the process is
        # killed, so nothing is left in the temp dir (n × d × 2 bytes: 100 GB at 1e8 × 512).
        try:
            os.unlink(path)
            os.rmdir(base)
        except OSError:  # pragma: no cover - platforms that refuse to unlink a mapped file
            atexit.register(shutil.rmtree, base, True)
    return out


def find_pairs(cfg: Config, fs: FeatureSet, progress: Callable[[str, int, int], None] | None = None,
               lists_out: dict | None = None) -> tuple[pa.Table, dict]:
    """Candidate pairs of every method in ``cfg.methods`` (+ how the searches went). With
    ``lists_out``, an embedding search on IVF lists (serial driver or Ray) leaves its rows'
    nearest lists there for the outlier score (:func:`dedup.compute.search.cosine.embedding_pairs`)."""
    from dedup.compute import search as cand
    from dedup.compute.search.hamming import popcount64

    ok = fs.ok()
    ids = fs.table["sample_id"].to_numpy(zero_copy_only=False)
    parts: list[pa.Table] = []
    info: dict = {"timings": {}, "pairs": {}}

    def add(method: str, p) -> None:
        t = pa.table(
            {
                "a": pa.array(ids[p.i], pa.string()),
                "b": pa.array(ids[p.j], pa.string()),
                "method": pa.array([method] * len(p.i), pa.string()),
                "score": pa.array(np.asarray(p.score, np.float32), pa.float32()),
            },
            schema=PAIRS_SCHEMA,
        )
        parts.append(t)
        info["pairs"][method] = len(p.i)

    for method in cfg.methods:
        t0 = time.perf_counter()
        if method == "exact":
            idx = np.flatnonzero(ok & pc.is_valid(fs.table["sha256"]).to_numpy(zero_copy_only=False))
            if len(idx):
                digests = np.frombuffer(b"".join(fs.table["sha256"].take(pa.array(idx)).to_pylist()), np.uint8).reshape(-1, 32)
                p = cand.exact_pairs(digests)
                p = cand.Pairs(idx[p.i], idx[p.j], p.score)
            else:
                p = cand.Pairs(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
            add(method, p)
        elif method in ("phash", "dhash"):
            col = fs.table[method]
            valid = ok & col.is_valid().to_numpy(zero_copy_only=False)
            h = col.fill_null(0).to_numpy().astype(np.uint64)
            ones = popcount64(h)
            k = cfg.hashes.min_informative_bits
            informative = (ones >= k) & (ones <= 64 - k)
            info.setdefault("uninformative_hashes", {})[method] = int((valid & ~informative).sum())
            valid = valid & informative
            radius = cfg.hashes.phash_radius if method == "phash" else cfg.hashes.dhash_radius
            hcb = (lambda done, total, m=method: progress(m, done, total)) if progress else None
            add(method, cand.hash_pairs(h, radius, valid=valid, progress=hcb))
        elif method == "embedding":
            if fs.embeddings is None:
                if fs.table.num_rows == 0:
                    continue  # no shard finished: nothing to compare (the run is partial)
                raise SchemaMismatchError("method 'embedding' requested but the features hold no embeddings")
            choice = embedding_threshold(cfg, fs, ok)
            info["embedding_threshold"] = choice.to_dict()
            th = choice.value
            n_valid = int(ok.sum())
            over = {k: v for k, v in (("nlist", cfg.embedding.nlist), ("nprobe", cfg.embedding.nprobe)) if v}
            params = cand.IVFParams.auto(n_valid, fs.embeddings.shape[1], threshold=th, **over)
            info["ivf"] = {k: v for k, v in vars(params).items() if isinstance(v, (int, float, bool, str, type(None)))}
            cb = (lambda done, total: progress("embedding", done, total)) if progress else None
            # the coarse stage (k-means, then row blocks assigned to lists) as its own bar
            pcb = (lambda done, total: progress("embedding-assign", done, total)) if progress else None
            st: dict = {}
            if cfg.run.executor == "ray" and n_valid >= params.exact_below:
                add(method, _embedding_pairs_on_ray(cfg, cand, fs.embeddings, ok, th, params, cb, pcb, stats=st,
                                                    lists_out=lists_out))
            else:
                add(method, cand.embedding_pairs(fs.embeddings, th, params=params, valid=ok, progress=cb,
                                                 plan_progress=pcb, stats=st, lists_out=lists_out))
            # how the search went (for tuning nlist/nprobe): where the time went, visits per row
            info["ivf_search"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()
                                  if k in _SEARCH_STATS}
        info["timings"][method] = round(time.perf_counter() - t0, 3)
    table = pa.concat_tables(parts) if parts else PAIRS_SCHEMA.empty_table()
    table = table.sort_by([("a", "ascending"), ("b", "ascending"), ("method", "ascending")])
    return table, info


def embedding_threshold(cfg: Config, fs: FeatureSet, ok: np.ndarray):
    """The run's cosine threshold: fixed, or chosen for this corpus (:mod:`dedup.compute.threshold`)."""
    from dedup.compute import threshold as T

    n = int(ok.sum())
    if not cfg.embedding.auto:
        return T.fixed(cfg.embedding.resolved_threshold(), n)
    t0 = time.perf_counter()
    copies = None
    if {"phash", "dhash"} <= set(cfg.methods):  # pairs the hashes call copies are no unrelated pairs
        from dedup.compute.search.hamming import popcount64

        ph = fs.table["phash"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)
        dh = fs.table["dhash"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)
        rp, rd = 2 * cfg.hashes.phash_radius, 2 * cfg.hashes.dhash_radius

        def copies(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            return (popcount64(ph[i] ^ ph[j]) <= rp) & (popcount64(dh[i] ^ dh[j]) <= rd)

    assert fs.embeddings is not None  # an embedding run
    choice = T.choose(fs.embeddings, ok, cfg.embedding.resolved_threshold(), rate=cfg.embedding.false_pair_rate,
                      sha=fs.table["sha256"].to_pylist(), copies=copies)
    log.info("embedding threshold auto: %.4f (family %.2f; %s; expected false pairs %s, budget %.1f) in %.1f s",
             choice.value, choice.floor, choice.note,
             "-" if choice.expected_false_pairs is None else f"{choice.expected_false_pairs:.2f}", choice.budget,
             time.perf_counter() - t0)
    return choice


_SEARCH_STATS = ("method", "valid", "nlist", "nprobe", "mean_probes", "list_size_max", "list_size_mean",
                 "dot_products", "bound_width", "train_seconds", "assign_seconds", "pairs_seconds", "seconds")


def _unit_task(x: np.ndarray, item) -> object:
    """One IVF work unit (a group of lists) on a Ray worker; ``x`` arrives from the object store.
    With the quantizer's :class:`Bound` (~0.3 MB), the unit projects its own rows for the
    prefilter: the n × 130 bound rows of the serial driver never travel."""
    from dedup.compute.search.cosine import unit_pairs

    unit, threshold, params, bound = item
    return unit_pairs(x, unit, threshold, params, bound=bound)


def _assign_task(x: np.ndarray, item) -> object:
    """Rows of the coarse stage on a Ray worker: their lists, one block at a time."""
    import ray

    from dedup.compute.search.coarse import assign_rows
    from dedup.compute.search.threads import single_threaded_libs

    _, coarse_ref, spans, keep = item
    coarse = ray.get(coarse_ref) if isinstance(coarse_ref, ray.ObjectRef) else coarse_ref
    out = []
    with single_threaded_libs():
        for rows in spans:
            near = np.empty((len(rows), keep), np.int32) if keep else None
            out.append((*assign_rows(x, coarse, rows, near), near))
    return out


# Row blocks per coarse-stage task: ~0.5M rows, seconds to minutes of work each.
_ASSIGN_BLOCKS_PER_TASK = 64


def _embedding_pairs_on_ray(cfg: Config, cand, x: np.ndarray, ok: np.ndarray, threshold: float, params, progress,
                            plan_progress=None, stats: dict | None = None, lists_out: dict | None = None):
    """Both halves spread as Ray tasks, the embeddings put in the object store once: the
    coarse quantizer is trained in the driver (a sample), the rows are assigned to lists by
    tasks of row blocks, then each work unit is a task. Same pairs as the serial driver: row
    blocks and units are independent, and their merges are order-free. ``lists_out``: as in
    :func:`dedup.compute.search.cosine.embedding_pairs` (the assignment tasks also return each
    row's nearest lists, 20 bytes a row)."""
    from dedup.errors import DedupError
    from dedup.executors.ray import RayExecutor

    t0 = time.perf_counter()
    n = x.shape[0]
    idx = np.flatnonzero(ok).astype(np.int64)
    blocks = cand.assign_blocks(len(idx))
    if plan_progress:
        plan_progress(0, len(blocks))
    coarse = cand.train_ivf(x, params, valid=ok, threshold=threshold)
    t1 = time.perf_counter()
    with RayExecutor(cfg) as ex:
        x_ref = ex.put(np.asarray(x))
        coarse_ref = ex.put(coarse)
        # a task gets the row indices of its blocks (never the whole index array)
        groups = [list(range(k, min(len(blocks), k + _ASSIGN_BLOCKS_PER_TASK)))
                  for k in range(0, len(blocks), _ASSIGN_BLOCKS_PER_TASK)]
        keep = min(cand.OUTLIER_NPROBE, coarse.params.nprobe) if lists_out is not None else 0
        items = [(k, coarse_ref, [idx[blocks[b][0] : blocks[b][1]] for b in g], keep) for k, g in enumerate(groups)]
        results: list = [None] * len(groups)
        done = 0
        for item, res, err in ex.map_units(_assign_task, items, shared=x_ref):
            if err:
                raise DedupError(f"candidate search coarse stage failed after retries: {err}")
            k = item[0]
            results[k] = res
            done += len(groups[k])
            if plan_progress:
                plan_progress(done, len(blocks))
        prim = np.empty(len(idx), np.int32)
        near = np.empty((len(idx), keep), np.int32) if keep else None
        visits = []
        for g, res in zip(groups, results):
            for b, (p, vr, vl, nb) in zip(g, res):
                prim[blocks[b][0] : blocks[b][1]] = p
                if near is not None:
                    near[blocks[b][0] : blocks[b][1]] = nb
                visits.append((vr, vl))
        del results
        plan = cand.build_plan(n, coarse, idx, prim, visits)
        if near is not None:
            assert lists_out is not None  # near is kept only for lists_out
            plan = cand.with_nearest(plan, idx, near)
            lists_out.update(cand.outlier_lists(plan))
            del near
        t2 = time.perf_counter()
        units = cand.make_units(plan)
        parts = []
        for k, (_unit, res, err) in enumerate(ex.map_units(_unit_task, [(u, threshold, params, coarse.bound) for u in units],
                                                          shared=x_ref)):
            if err:
                raise DedupError(f"candidate search unit failed after retries: {err}")
            parts.append(res)
            if progress:
                progress(k + 1, len(units))
    out = cand.merge_pairs(parts)
    if stats is not None:
        stats.update(method="ivf-ray", valid=len(idx), train_seconds=t1 - t0, assign_seconds=t2 - t1,
                     pairs_seconds=time.perf_counter() - t2, seconds=time.perf_counter() - t0,
                     **cand.plan_figures(plan, units, 0 if coarse.bound is None else coarse.bound.width))
    return out
