"""Phase 2: candidate duplicate pairs from all shards' features, one method at a time.

Reads ``features/*.parquet`` of the run's shards; the runner writes ``pairs/pairs.parquet``
(PAIRS_V1). Embeddings are staged into a float16 memory-mapped file under ``index/`` so the
search never holds more than the index's working set in RAM; the embedding search is the one
driver :func:`dedup.compute.search.driver.search_embeddings`, its tasks on the run's executor.
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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup.config import Config
from dedup.errors import DedupError, SchemaMismatchError
from dedup.io.rundir import RunDir
from dedup.memory import MappedTable, return_freed_memory
from dedup.records import Status, status_mask
from dedup.schema import FEATURES_VERSION, PAIRS_SCHEMA, check_version

if TYPE_CHECKING:
    from dedup.compute.search.driver import TaskMap
    from dedup.compute.search.ivf import NearestLists, PlanSource
    from dedup.phases.lists import ShardRows

log = logging.getLogger(__name__)

# The driver table's columns. No ``key``: it is ``sample_id`` less the ``f"{shard_id}/"`` prefix
# (:func:`dedup.records.sample_keys` derives it where the manifest is written). ``shard_id``,
# ``status`` and ``error`` (few distinct values; error mostly null) are dictionary-encoded with
# the narrowest index type that holds their dictionary (:data:`DICTIONARY_COLS`).
_SCALAR_COLS = [
    "sample_id", "shard_id", "status", "error", "file_size", "caption_len",
    "width", "height", "sha256", "phash", "dhash", "content_fraction",
]
DICTIONARY_COLS = ("shard_id", "status", "error")
# integer columns on the narrowest type that holds their values (pixels, bytes, caption lengths:
# 8, 16 or 32 bits where the files say 32 or 64; the manifest casts them back to its schema's types)
NARROW_COLS = ("file_size", "caption_len", "width", "height")
# error stays a plain string column when its dictionary would need 32-bit indices (as many
# distinct messages as that: a dictionary would not be smaller)
_PLAIN_ABOVE = {"error": 2**15 - 1}


@dataclass
class FeatureSet:
    # scalar columns (_SCALAR_COLS: no key; DICTIONARY_COLS dictionary-encoded, NARROW_COLS
    # narrowed), sorted by sample_id
    table: pa.Table
    embeddings: np.ndarray | None  # (n, d) float16, row-aligned with table (memmap)
    model_tag: str | None
    features_hash: str | None
    # where the rows came from (the out-of-core embedding search reads the features files):
    run: RunDir | None = None
    shard_ids: tuple[str, ...] = ()
    shard_offsets: np.ndarray | None = None  # (shards + 1,) rows of each file, concatenated
    position: np.ndarray | None = None  # (n,) int32 (int64 from 2³¹ rows): the table row of each file row (files concatenated)
    mapped: MappedTable | None = None  # the table's file mapping, once :meth:`map_table` moved it out of the heap

    def map_table(self, directory: str | None) -> None:
        """Move the table out of the heap into a file mapping in ``directory``
        (:class:`~dedup.memory.MappedTable`; the same rows and columns). Kept in memory if it
        cannot be written there."""
        mapped = MappedTable.of(self.table, directory)
        if mapped is not None:
            self.table, self.mapped = mapped.table, mapped

    def drop_pages(self) -> None:
        """Unmap the pages of a mapped table read so far (e.g. between phases; see :meth:`map_table`)."""
        if self.mapped is not None:
            self.mapped.drop_pages()

    def shard_rows(self, valid: np.ndarray) -> list[ShardRows]:
        """Each features file with the table row of each of its rows (-1 where not ``valid``)."""
        from dedup.phases.lists import ShardRows

        assert self.position is not None and self.shard_offsets is not None
        out = []
        for k, sid in enumerate(self.shard_ids):
            pos = self.position[self.shard_offsets[k] : self.shard_offsets[k + 1]]
            out.append(ShardRows(sid, np.where(valid[pos], pos, -1).astype(np.int64)))
        return out

    def digests(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The whole sha256 digests of table ``rows`` (rows × 32 uint8, zero rows where unknown)
        and where they are known: from the table's ``sha256`` when it holds them, else read
        from the features files (only their ``sha256`` column, only the files holding a row:
        the run's table holds the 8-byte prefixes, ``load_features(digests=False)``)."""
        from dedup.phases.digests import digest_bytes, table_digests

        rows = np.asarray(rows, np.int64)
        if "sha256" in self.table.column_names or self.run is None:
            return table_digests(self.table)(rows)
        assert self.position is not None and self.shard_offsets is not None
        uniq, inv = np.unique(rows, return_inverse=True)
        want = np.zeros(self.n, bool)
        want[uniq] = True
        out = np.zeros((len(uniq), 32), np.uint8)
        known = np.zeros(len(uniq), bool)
        import pyarrow.parquet as pq

        for k, sid in enumerate(self.shard_ids):
            pos = self.position[self.shard_offsets[k] : self.shard_offsets[k + 1]]
            hit = np.flatnonzero(want[pos])
            if len(hit) == 0:
                continue
            with self.run.fs.open(self.run.features(sid), "rb") as f:
                col = pq.ParquetFile(f).read(columns=["sha256"])["sha256"].combine_chunks().take(pa.array(hit))
            d = digest_bytes(col)
            at = np.searchsorted(uniq, pos[hit])
            out[at, : d.shape[1]] = d[:, :32]
            known[at] = col.is_valid().to_numpy(zero_copy_only=False)
        return out[inv], known[inv]

    @property
    def n(self) -> int:
        return self.table.num_rows

    def ok(self) -> np.ndarray:
        return status_mask(self.table["status"], Status.OK)


def load_features(run: RunDir, shard_ids: list[str], with_embeddings: bool, *, digests: bool = True) -> FeatureSet:
    """The scalar features of ``shard_ids`` as one table sorted by sample_id (and the
    embeddings staged). ``digests=False`` (a run's global phases): the table holds each
    sha256's first 8 bytes (``sha256_prefix``, uint64) instead of the 32-byte digest, and
    :meth:`FeatureSet.digests` reads whole digests from the files where needed."""
    import pyarrow.parquet as pq

    metas, with_emb, counts, d = [], [], [], 0
    for sid in shard_ids:  # the files' footers: schema, metadata, rows
        path = run.features(sid)
        with run.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            check_version(schema, FEATURES_VERSION, f"features file {path}")
            md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
            metas.append((sid, md))
            with_emb.append(with_embeddings and "embedding" in schema.names)
            if with_emb[-1]:
                d = schema.field("embedding").type.list_size
            counts.append(pf.metadata.num_rows)
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
    if not metas:  # no shard finished: an empty table of the features schema (scalar columns)
        from dedup.schema import features_schema

        empty = features_schema(None).empty_table().select(_SCALAR_COLS)
        for name in DICTIONARY_COLS:
            k = empty.schema.get_field_index(name)
            f = empty.schema.field(k)
            empty = empty.set_column(k, f.with_type(pa.dictionary(pa.int8(), f.type)),
                                     empty[name].cast(pa.dictionary(pa.int8(), f.type)))
        return FeatureSet(empty, None, None, None)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    # One column at a time, read from every file and put in sample_id order before the next
    # is read: a column's file chunks are freed together, so the allocators can hand them back
    # (read file by file, every column's chunks were interleaved in memory and the sorted copy
    # came on top of all of them: load peak 1 124 MB → 700 MB for a 371 MB table at 3·10⁶ rows).
    ids, field = _read_column(run, shard_ids, "sample_id")
    fields = [field]
    order = pc.sort_indices(ids).to_numpy()
    # position of each file row in the sorted table
    inv = np.empty(len(order), np.int32 if len(order) < 1 << 31 else np.int64)  # held through the search
    inv[order] = np.arange(len(order), dtype=inv.dtype)
    take = pa.array(order)
    cols = [ids.take(take)]
    del ids
    emb = None
    if any(with_emb):
        # staged one file at a time, never all embeddings in memory at once (files without
        # embeddings leave zero rows)
        emb = _stage_embeddings(run, [s if w else None for s, w in zip(shard_ids, with_emb)], offsets, inv, d)
    for name in _SCALAR_COLS[1:]:
        if name == "sha256" and not digests:
            col, field = _read_prefixes(run, shard_ids)
        else:
            col, field = _read_column(run, shard_ids, name, dictionary=name in DICTIONARY_COLS)
        col = col.take(take)
        if name in DICTIONARY_COLS:
            col = _narrow(col, _PLAIN_ABOVE.get(name))
        elif name in NARROW_COLS:
            col = _narrow_int(col)
        field = field.with_type(col.type)
        cols.append(col)
        fields.append(field)
        del col
        return_freed_memory()
    table = pa.table(cols, schema=pa.schema(fields, metadata=metas[0][1]))  # the first file's metadata
    return FeatureSet(table, emb, model_tag, fhash, run, tuple(shard_ids), offsets, inv)


def _read_column(run: RunDir, shard_ids: list[str], name: str, dictionary: bool = False) -> tuple[pa.ChunkedArray, pa.Field]:
    """Column ``name`` of every features file, in file order, and its field (type promoted as
    ``pa.concat_tables(..., promote_options="permissive")`` does). ``dictionary``: read
    dictionary-encoded (the files' dictionaries unified into one)."""
    import pyarrow.parquet as pq

    parts = []
    for sid in shard_ids:
        with run.fs.open(run.features(sid), "rb") as f:
            parts.append(pq.ParquetFile(f, read_dictionary=[name] if dictionary else None).read(columns=[name]))
    t = pa.concat_tables(parts, promote_options="permissive")
    if dictionary:
        t = t.unify_dictionaries()
    return t[name], t.schema.field(name)


def _read_prefixes(run: RunDir, shard_ids: list[str]) -> tuple[pa.ChunkedArray, pa.Field]:
    """Every features file's sha256 as its first 8 bytes (uint64, null where the digest is),
    file by file: the 32-byte digests of one file at a time only."""
    import pyarrow.parquet as pq

    from dedup.compute.search.exact import digest_prefixes
    from dedup.phases.digests import digest_bytes

    parts = []
    for sid in shard_ids:
        with run.fs.open(run.features(sid), "rb") as f:
            col = pq.ParquetFile(f).read(columns=["sha256"])["sha256"].combine_chunks()
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        prefix = digest_prefixes(digest_bytes(col)) if len(col) else np.zeros(0, np.uint64)
        parts.append(pa.array(prefix, pa.uint64(), mask=~valid))
    return pa.chunked_array(parts, pa.uint64()), pa.field("sha256_prefix", pa.uint64())


def _narrow(col: pa.ChunkedArray, plain_above: int | None = None) -> pa.ChunkedArray:
    """A dictionary column (one dictionary for all chunks) with the narrowest signed index type
    that holds its dictionary; a plain column of the dictionary's values when it holds more than
    ``plain_above`` values."""
    size = max((len(c.dictionary) for c in col.chunks), default=0)
    value = col.type.value_type
    if plain_above is not None and size > plain_above:
        return col.cast(value)
    index = pa.int8() if size <= 2**7 else pa.int16() if size <= 2**15 else pa.int32()
    return col.cast(pa.dictionary(index, value))


def _narrow_int(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An integer column on the narrowest type of its signedness that holds its values (no wider
    than it was; all null: 8 bits)."""
    lo, hi = (v.as_py() for v in pc.min_max(col).values())
    lo, hi = lo or 0, hi or 0
    for t in ((pa.uint8(), pa.uint16(), pa.uint32()) if lo >= 0 else (pa.int8(), pa.int16(), pa.int32())):
        info = np.iinfo(t.to_pandas_dtype())
        if t.bit_width < col.type.bit_width and info.min <= lo and hi <= info.max:
            return col.cast(t)
    return col


def _stage_embeddings(run: RunDir, shard_ids: list[str | None], offsets: np.ndarray, inv: np.ndarray, d: int) -> np.ndarray:
    """Write embeddings (in sample_id order) to a float16 memmap, one features file at a time;
    nulls become zero rows."""
    n = len(inv)
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
        hint = ("set TMPDIR to a disk with room (the embeddings are staged in the temp dir: the run "
                "directory is remote or not writable)") if scratch else "free space there or use another --out"
        raise DedupError(
            f"not enough disk space to stage {n:,} × {d} float16 embeddings for the candidate search: "
            f"{need / 2**30:.1f} GiB needed in {base}, {free / 2**30:.1f} GiB free; {hint}. "
            "The features are kept: rerun the same command to resume."
        )
    path = os.path.join(base, "embeddings.f16")
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    from dedup.phases.lists import read_embeddings

    from dedup.compute.search.kernels import drop_pages

    for k, sid in enumerate(shard_ids):
        if sid is not None:
            mm[inv[offsets[k] : offsets[k + 1]]] = read_embeddings(run, sid)
            if k % 8 == 7:  # written pages would stay resident (1 KB a row): hand them to the page cache
                mm.flush()
                drop_pages(mm)
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


@dataclass(frozen=True)
class CandidateResult:
    """What :func:`find_pairs` found: the pairs (PAIRS_SCHEMA, sorted), how each search went,
    and the embedding search's nearest lists (for the outlier score; None unless asked for and
    the search ran on IVF lists)."""

    table: pa.Table
    info: dict
    lists: NearestLists | PlanSource | None = None
    rows: tuple[np.ndarray, np.ndarray] | None = None  # each pair's (a, b) as rows of the FeatureSet's table


def find_pairs(cfg: Config, fs: FeatureSet, progress: Callable[[str, int, int], None] | None = None, *,
               executor: TaskMap | None = None, keep_lists: bool = False,
               partitioned: bool | None = None) -> CandidateResult:
    """Candidate pairs of every method in ``cfg.methods`` (+ how the searches went). The
    embedding search runs its tasks on ``executor`` (a :class:`TaskMap`: the Ray executor, or
    by default worker threads here); ``keep_lists``: keep its rows' nearest lists for the
    outlier score (:func:`dedup.compute.search.driver.search_embeddings`). ``partitioned``:
    shuffle the rows by list through ``index/lists/`` (None: on a cluster executor or from
    :data:`dedup.phases.lists.PARTITION_ROWS` rows)."""
    from dedup.compute import search as cand
    from dedup.compute.search.driver import SearchTaskError, search_embeddings
    from dedup.compute.search.hamming import popcount64

    ok = fs.ok()
    found: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # (method, i, j, score)
    info: dict = {"timings": {}, "pairs": {}}
    lists: NearestLists | PlanSource | None = None

    def add(method: str, p) -> None:
        found.append((method, np.asarray(p.i, np.int64), np.asarray(p.j, np.int64), np.asarray(p.score, np.float32)))
        info["pairs"][method] = len(p.i)

    for method in cfg.methods:
        t0 = time.perf_counter()
        if method == "exact":
            add(method, _exact_pairs(fs, ok))
        elif method in ("phash", "dhash"):
            col = fs.table[method]
            valid = ok & col.is_valid().to_numpy(zero_copy_only=False)
            h = col.fill_null(0).to_numpy().astype(np.uint64)
            ones = popcount64(h)
            k = cfg.hashes.min_informative_bits
            informative = (ones >= k) & (ones <= 64 - k)
            del ones
            info.setdefault("uninformative_hashes", {})[method] = int((valid & ~informative).sum())
            valid &= informative
            del informative
            # the searched rows' hashes only (the search's own copy: nothing n-sized beside it)
            hrows = np.flatnonzero(valid).astype(np.int32 if len(h) < 1 << 31 else np.int64)
            h = h[hrows]
            del valid
            radius = cfg.hashes.phash_radius if method == "phash" else cfg.hashes.dhash_radius
            hcb = (lambda done, total, m=method: progress(m, done, total)) if progress else None
            add(method, cand.remap_rows(cand.hash_pairs(h, radius, progress=hcb), hrows))
            del h, hrows
        elif method == "embedding":
            fs.drop_pages()  # the hash searches' columns: not read again here
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
            gpu = bool(params.use_gpu) if params.use_gpu is not None else cand.gpu_available()
            try:
                from dedup.phases.lists import use_partitions

                shuffle = use_partitions(n_valid, executor is not None) if partitioned is None else partitioned
                if shuffle and fs.run is not None and fs.position is not None and not gpu \
                        and n_valid >= max(2, params.exact_below) and min(params.nlist, n_valid) > 1:
                    # out of core: tasks read the features files and shuffle rows by list (index/lists/)
                    from dedup.compute.search.driver import ThreadMap
                    from dedup.phases.lists import search_run_lists

                    res = search_run_lists(fs.run, fs.shard_rows(ok), fs.n, n_valid, th, params,
                                           executor if executor is not None else ThreadMap(params.threads),
                                           features_hash=fs.features_hash, keep_nearest=keep_lists, staged=fs.embeddings, progress=cb,
                                           plan_progress=pcb)
                else:
                    res = search_embeddings(fs.embeddings, th, params, valid=ok, executor=executor,
                                            keep_nearest=keep_lists, progress=cb, plan_progress=pcb)
            except SearchTaskError as e:  # a task failed after the executor's retries
                raise DedupError(str(e)) from None
            add(method, res.pairs)
            lists = res.lists
            # how the search went (for tuning nlist/nprobe): where the time went, visits per row
            info["ivf_search"] = {**res.stats.to_dict(), "executor": "local" if executor is None else cfg.run.executor}
        info["timings"][method] = round(time.perf_counter() - t0, 3)
    table, rows = _pairs_table(fs.table["sample_id"], found)
    return CandidateResult(table, info, lists, rows)


def _pairs_table(ids: pa.ChunkedArray, found: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]
                 ) -> tuple[pa.Table, tuple[np.ndarray, np.ndarray]]:
    """The pairs as PAIRS_SCHEMA, sorted by (a, b, method), and their (i, j) table rows. The
    table is in sample_id order and a pair's i < j, so the rows sort as the sample ids do:
    sorted as integers, the ids taken once (no string sort, no Python string a pair)."""
    names = sorted({m for m, *_ in found})
    code = {m: k for k, m in enumerate(names)}  # method names in string order
    i = np.concatenate([f[1] for f in found]) if found else np.empty(0, np.int64)
    j = np.concatenate([f[2] for f in found]) if found else np.empty(0, np.int64)
    mc = np.concatenate([np.full(len(f[1]), code[f[0]], np.int8) for f in found]) if found else np.empty(0, np.int8)
    score = np.concatenate([f[3] for f in found]) if found else np.empty(0, np.float32)
    found.clear()
    order = np.lexsort((mc, j, i))
    i, j, mc, score = i[order], j[order], mc[order], score[order]
    del order
    table = pa.table(
        {
            "a": pc.take(ids, pa.array(i)).cast(pa.string()),
            "b": pc.take(ids, pa.array(j)).cast(pa.string()),
            "method": pc.take(pa.array(names, pa.string()), pa.array(mc)),
            "score": pa.array(score, pa.float32()),
        },
        schema=PAIRS_SCHEMA,
    )
    return table, (i, j)


def _exact_pairs(fs: FeatureSet, ok: np.ndarray):
    """Star pairs of the ok rows with identical bytes: their sha256 prefixes sorted (8 bytes a
    row), the whole digests read for the rows whose prefixes repeat."""
    from dedup.compute import search as cand
    from dedup.compute.search.exact import digest_groups, star_pairs
    from dedup.phases.digests import sha_prefixes

    prefix, known = sha_prefixes(fs.table)
    idx = np.flatnonzero(ok & known)
    del known
    p = star_pairs(*digest_groups(prefix[idx], lambda r: fs.digests(idx[r])[0]))
    return cand.Pairs(idx[p.i], idx[p.j], p.score)


def embedding_threshold(cfg: Config, fs: FeatureSet, ok: np.ndarray):
    """The run's cosine threshold: fixed, or chosen for this corpus (:mod:`dedup.compute.threshold`)."""
    from dedup.compute import threshold as T

    n = int(ok.sum())
    if not cfg.embedding.auto:
        return T.fixed(cfg.embedding.resolved_threshold(), n)
    t0 = time.perf_counter()
    copies = None
    table = fs.table
    if {"phash", "dhash"} <= set(cfg.methods):  # pairs the hashes call copies are no unrelated pairs
        from dedup.compute.search.hamming import popcount64

        rp, rd = 2 * cfg.hashes.phash_radius, 2 * cfg.hashes.dhash_radius

        def copies(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            # the sampled rows' hashes taken (a few thousand rows), no n-sized copy of the columns
            rows = np.unique(np.concatenate([i, j]))
            ph, dh = (table[c].take(pa.array(rows)).fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)
                      for c in ("phash", "dhash"))
            a, b = np.searchsorted(rows, i), np.searchsorted(rows, j)
            return (popcount64(ph[a] ^ ph[b]) <= rp) & (popcount64(dh[a] ^ dh[b]) <= rd)

    def digests(rows: np.ndarray) -> list:  # the sampled rows' sha256 (not a Python object for every row)
        d, known = fs.digests(rows)
        return [bytes(v) if k else None for v, k in zip(d, known)]

    assert fs.embeddings is not None  # an embedding run
    choice = T.choose(fs.embeddings, ok, cfg.embedding.resolved_threshold(), rate=cfg.embedding.false_pair_rate,
                      sha=digests, copies=copies)
    log.info("embedding threshold auto: %.4f (family %.2f; %s; expected false pairs %s, budget %.1f) in %.1f s",
             choice.value, choice.floor, choice.note,
             "-" if choice.expected_false_pairs is None else f"{choice.expected_false_pairs:.2f}", choice.budget,
             time.perf_counter() - t0)
    return choice
