"""Phase 3: clusters around keepers, then the manifest (one row per sample read) and stats."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup.compute.clusters import Clusters, Edges, group_clusters, keeper_clusters, rank_order
from dedup.compute.search.hamming import popcount64
from dedup.compute.search.kernels import rows_f32
from dedup.config import Config
from dedup.io.manifests import write_manifest_data
from dedup.io.rundir import RunDir
from dedup.records import METHODS, Status, sample_keys, status_mask
from dedup.schema import MANIFEST_SCHEMA

if TYPE_CHECKING:
    from dedup.compute.search.driver import TaskMap
    from dedup.compute.search.ivf import NearestLists


def hash_rule(cfg: Config, dp: np.ndarray, dd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's hash decisions for pairs at pHash distance ``dp`` and dHash distance
    ``dd`` (int arrays, -1 = not known): ``(phash_says_duplicate, dhash_says_duplicate)``.

    Each hash decides within its radius; with ``hashes.cross_check`` (the default) and both
    hashes computed, a hash's "duplicate" also needs the other hash within twice its radius.
    A fixed Hamming radius admits a share of unrelated pairs that grows with n²: in a 300 000-
    image hash-only run, 20% of the pHash links were unrelated images (in a sample, at 8 bits
    with dHash 16–27 bits apart, while real copies had dHash ≤ 1); with this rule precision
    went from 0.834 to 0.997 (benchmarks/hash_precision.py, docs/hashing.md)."""
    dp, dd = np.asarray(dp), np.asarray(dd)
    use_p, use_d = "phash" in cfg.methods, "dhash" in cfg.methods
    rp, rd = cfg.hashes.phash_radius, cfg.hashes.dhash_radius
    p_ok = (dp >= 0) & (dp <= rp) if use_p else np.zeros(dp.shape, bool)
    d_ok = (dd >= 0) & (dd <= rd) if use_d else np.zeros(dd.shape, bool)
    if cfg.hashes.cross_check and use_p and use_d:
        p_ok &= (dd < 0) | (dd <= 2 * rd)
        d_ok &= (dp < 0) | (dp <= 2 * rp)
    return p_ok, d_ok


def _hash_distances(table: pa.Table, name: str, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distance of column ``name`` between rows i and j; -1 where either is null."""
    if name not in table.column_names:
        return np.full(len(i), -1, np.int64)
    col = table[name]
    h = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)
    known = col.is_valid().to_numpy(zero_copy_only=False)
    return np.where(known[i] & known[j], popcount64(h[i] ^ h[j]), -1)


def _edges(cfg: Config, table: pa.Table, pairs: pa.Table) -> Edges:
    if pairs.num_rows == 0:
        return Edges.empty()
    ids = table["sample_id"]
    i = pc.index_in(pairs["a"], value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    j = pc.index_in(pairs["b"], value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    lookup = {m: k for k, m in enumerate(METHODS)}
    methods = pairs["method"].to_pylist()
    m = np.array([lookup[x] for x in methods], np.int8)
    score = pairs["score"].to_numpy().astype(np.float32)
    is_p, is_d = m == lookup["phash"], m == lookup["dhash"]
    if cfg.hashes.cross_check and (is_p.any() or is_d.any()):
        keep = np.ones(len(m), bool)
        h = np.flatnonzero(is_p | is_d)
        p_ok, d_ok = hash_rule(cfg, _hash_distances(table, "phash", i[h], j[h]), _hash_distances(table, "dhash", i[h], j[h]))
        keep[h] = np.where(is_p[h], p_ok, d_ok)
        i, j, m, score = i[keep], j[keep], m[keep], score[keep]
    return Edges(i, j, m, score)


def _verified(edges: Edges, large: np.ndarray) -> Edges:
    """Stricter verification for large clusters: an edge touching a sample of a large cluster
    survives only if two different methods found the pair, or the bytes are identical."""
    if len(edges.i) == 0:
        return edges
    a, b = np.minimum(edges.i, edges.j), np.maximum(edges.i, edges.j)
    key = a * (int(max(a.max(), b.max())) + 1) + b
    order = np.lexsort((edges.method, key))
    k, m = key[order], edges.method[order]
    # distinct methods per pair
    first = np.ones(len(k), bool)
    first[1:] = (k[1:] != k[:-1]) | (m[1:] != m[:-1])
    uk, counts = np.unique(k[first], return_counts=True)
    n_methods = counts[np.searchsorted(uk, key)]
    exact = METHODS.index("exact")
    has_exact = np.isin(key, k[m == exact])
    strong = (n_methods >= 2) | has_exact
    keep = strong | ~(large[edges.i] | large[edges.j])
    return Edges(edges.i[keep], edges.j[keep], edges.method[keep], edges.score[keep])


def keeper_rank(cfg: Config, table: pa.Table) -> np.ndarray:
    """Each row's place in the keeper policy's order (``clusters.keeper_policy``; 0 = the best
    keeper), ties broken by sample_id. ``table`` is sorted by sample_id."""
    cols = []
    for spec in cfg.clusters.keeper_policy:
        desc = spec.startswith("-")
        name = spec.lstrip("-+")
        if name == "sample_id":
            values = np.arange(table.num_rows, dtype=np.float64)  # table is sorted by sample_id
        elif name in ("pixels", "content_pixels"):
            w = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)
            h = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)
            values = w * h
            if name == "content_pixels" and "content_fraction" in table.column_names:
                frac = table["content_fraction"].to_numpy(zero_copy_only=False).astype(np.float64)
                values = values * np.where(np.isnan(frac), 1.0, frac)
        elif name == "copies":
            values = _copies(table)
        elif name == "unpadded":  # 0 = uniform borders (padding, bars, a canvas) cover 20 %+ of the image
            if "content_fraction" in table.column_names:
                frac = table["content_fraction"].to_numpy(zero_copy_only=False).astype(np.float64)
                values = np.where(np.isnan(frac) | (frac >= UNPADDED), 1.0, 0.0)
            else:
                values = np.ones(table.num_rows)
        else:
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
        cols.append((values, desc))
    if not any(s.lstrip("-+") == "sample_id" for s in cfg.clusters.keeper_policy):
        cols.append((np.arange(table.num_rows, dtype=np.float64), False))  # total, deterministic order
    return rank_order(cols)


# A member whose uniform borders take 20 % or more of the image is a padded copy for the keeper
# policy; a natural flat margin (a scan, a studio backdrop, a sky band) usually takes less, and
# the original has it too.
UNPADDED = 0.8


def _copies(table: pa.Table) -> np.ndarray:
    """How many ok samples hold exactly the same bytes as each sample (1 = unique)."""
    if "sha256" not in table.column_names:
        return np.ones(table.num_rows, np.float64)
    keys, known = sha_keys(table)
    ok = status_mask(table["status"], Status.OK)
    out = np.ones(table.num_rows, np.float64)
    if known.any():
        at = np.flatnonzero(known)
        _, inv = np.unique(keys[at], return_inverse=True)
        count = np.bincount(inv, weights=ok[at].astype(np.float64))  # ok rows with these bytes
        out[at] = np.where(count[inv] > 0, count[inv], 1.0)
    return out


def sha_keys(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The ``sha256`` column as comparable numpy values without a Python object a row (32 bytes
    a row, ``V32``; zero rows where null) and where it is known (not null)."""
    col = table["sha256"]
    known = col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_binary(col.type) and col.type.byte_width == 32:
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if len(arr) == 0:
            return np.zeros(0, "V32"), known
        raw = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * 32, offset=arr.offset * 32)
        return raw.reshape(-1, 32).copy().view("V32").reshape(-1), known
    vals = col.to_pylist()  # another binary type (older or hand-made tables)
    width = max((len(v) for v in vals if v is not None), default=0)
    return np.array([(v or b"").ljust(width, b"\0") for v in vals], dtype=f"V{max(1, width)}"), known


def _grouping_checks(cfg: Config, table: pa.Table, emb: np.ndarray | None, threshold: float | None):
    """(centrality, joins) for :func:`~dedup.compute.clusters.group_clusters`: from the
    embeddings when the run has them, else from the hashes."""
    ph = table["phash"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64) if "phash" in table.column_names else None
    dh = table["dhash"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64) if "dhash" in table.column_names else None
    if "sha256" in table.column_names:
        sha, sha_known = sha_keys(table)
    else:
        sha, sha_known = np.zeros(table.num_rows, "V1"), np.zeros(table.num_rows, bool)
    use_emb = emb is not None and threshold is not None and "embedding" in cfg.methods
    use_p, use_d = "phash" in cfg.methods and ph is not None, "dhash" in cfg.methods and dh is not None
    i_emb, i_p, i_x = METHODS.index("embedding"), METHODS.index("phash"), METHODS.index("exact")

    def vectors(members: np.ndarray) -> np.ndarray:
        assert emb is not None  # called only when use_emb
        x = rows_f32(emb, members)  # float32 (exact); a memmap's pages are released as it reads
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def centrality(members: np.ndarray) -> np.ndarray:
        if use_emb:
            x = vectors(members)
            mean = x.mean(axis=0)
            return x @ (mean / max(float(np.linalg.norm(mean)), 1e-12))
        if use_p or use_d:
            hashes = ph if use_p else dh
            assert hashes is not None  # use_p / use_d say which is there
            h = hashes[members]
            bits = ((h[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(np.int8)
            majority = (bits.mean(axis=0) >= 0.5).astype(np.int8)
            return 1.0 - np.abs(bits - majority).mean(axis=1)
        return np.zeros(len(members))

    def joins(members: np.ndarray, k: int):
        ok = sha_known[members] & sha_known[k] & (sha[members] == sha[k])
        method = np.where(ok, i_x, -1).astype(np.int8)
        score = np.where(ok, 1.0, np.nan).astype(np.float32)
        if use_emb:
            assert threshold is not None  # part of use_emb
            cos = vectors(members) @ vectors(np.array([k]))[0]
            near = ~ok & (cos >= threshold - cfg.clusters.join_margin)
            ok, method[near], score[near] = ok | near, i_emb, cos[near]
        if use_p and use_d:
            assert ph is not None and dh is not None  # part of use_p / use_d
            dp = popcount64(ph[members] ^ ph[k]).astype(np.int64)
            dd = popcount64(dh[members] ^ dh[k]).astype(np.int64)
            near = ~ok & (dp <= 2 * cfg.hashes.phash_radius) & (dd <= 2 * cfg.hashes.dhash_radius)
            ok, method[near], score[near] = ok | near, i_p, dp[near]
        return ok, method, score

    return centrality, joins


def outlier_scores(emb: np.ndarray, ok: np.ndarray, k: int, stats: dict | None = None,
                   progress: Callable[[int, int], None] | None = None, lists: NearestLists | dict | None = None,
                   executor: TaskMap | None = None) -> np.ndarray:
    """1 - cosine to the k-th nearest other ok sample (NaN where not computable).

    Exact below 10 000 ok samples; above, approximate over IVF lists with one matrix product
    per list (:func:`dedup.compute.search.knn.kth_neighbour_similarity`; ``lists``: the
    duplicate search's nearest lists, reused): measured at 10⁶ on the candidate benchmark's
    data, 48 s on its own, ~950 s for the faiss IVF index this used before, with outlier ranks
    correlating 0.96 with exact ones (benchmarks/outlier.py; docs/manifest.md).
    ``executor``: the lists' work units run as its tasks (e.g. the Ray executor: same scores);
    by default on worker threads here."""
    from dedup.compute.search.knn import kth_neighbour_similarity

    spread = outlier_units(executor, emb) if executor is not None else None
    sim = kth_neighbour_similarity(emb, int(k), valid=np.asarray(ok, bool), stats=stats, progress=progress, lists=lists,
                                   map_units=spread)
    return (1.0 - sim).astype(np.float32)


@dataclass(frozen=True)
class StagedFile:
    """The staged embeddings (``index/embeddings.f16``, a ``.npy`` file) by path: a task opens
    the file and reads its rows itself (``pread``) instead of receiving the whole matrix through
    the executor (on Ray: n × d × 2 bytes in the object store, mapped whole by the driver and by
    every worker — 2.5 GB and 1.3 GB peaks at 10⁶ rows). ``size``/``mtime_ns`` pin the file."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, emb: np.ndarray) -> StagedFile | None:
        """The handle of a matrix mapped from a file that other processes can open by name
        (None for an in-memory matrix or a scratch copy already unlinked)."""
        name = getattr(emb, "filename", None)
        if not isinstance(emb, np.memmap) or not name:
            return None
        try:
            st = os.stat(name)
        except OSError:
            return None
        return cls(str(name), st.st_size, st.st_mtime_ns)

    def open(self) -> np.ndarray:
        from dedup.errors import DedupError

        m = _STAGED_OPEN.get(self)
        if m is None:
            try:
                st = os.stat(self.path)
            except OSError as e:
                raise DedupError(f"cannot read the staged embeddings {self.path} from this worker ({e}): a local "
                                 "run directory must be on a filesystem every node sees (or use an s3:// one)") from e
            if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
                raise DedupError(f"the staged embeddings {self.path} changed while this run's tasks read it (another run on the same directory?)")
            m = np.load(self.path, mmap_mode="r")
            _STAGED_OPEN.clear()  # one staged file open per worker process
            _STAGED_OPEN[self] = m
        return m


_STAGED_OPEN: dict[StagedFile, np.ndarray] = {}


def _outlier_task(x: np.ndarray | StagedFile, item) -> tuple[np.ndarray, np.ndarray]:
    """One work unit of the outlier search on an executor's worker (``x``: what ``put`` gave:
    the matrix, or the staged file to read the unit's rows from)."""
    from dedup.compute.search.knn import outlier_unit
    from dedup.compute.search.threads import single_threaded_libs

    _, unit, k, block = item
    if isinstance(x, StagedFile):
        x = x.open()
    with single_threaded_libs():
        return outlier_unit(x, unit, k, block)


def outlier_units(executor: TaskMap, emb: np.ndarray) -> Callable:
    """``map_units`` for :func:`~dedup.compute.search.knn.kth_neighbour_similarity`: each work
    unit a task of ``executor``, reading its rows from the staged file (:class:`StagedFile`),
    or, for a matrix no other process can open, handed the matrix once with ``put``. Only if
    the search runs on IVF lists; below its exact threshold it stays in this process."""

    def run(units: list, k: int, block: int):
        from dedup.errors import DedupError

        handle = None if getattr(executor, "in_process", False) else StagedFile.of(emb)
        shared = executor.put(handle or np.asarray(emb))
        items = [(pos, u, k, block) for pos, u in enumerate(units)]
        for item, res, err in executor.map_units(_outlier_task, items, shared=shared):
            if err:
                raise DedupError(f"outlier score unit failed after retries: {err}")
            yield item[0], res

    return run


# Rows of the manifest formatted (and written, as one Parquet row group) at a time: its string
# columns (reasons, cluster ids) exist as Python objects for this many rows only.
CHUNK_ROWS = 1 << 16


@dataclass
class ManifestRows:
    """A manifest before it is written: the clusters of every row, the rows formatted
    :data:`CHUNK_ROWS` at a time (:meth:`chunks`, in sample_id order) or all at once
    (:meth:`to_table`)."""

    cfg: Config
    table: pa.Table  # features' scalar columns, sorted by sample_id (FeatureSet.table: no key)
    clusters: Clusters
    ok: np.ndarray
    outlier: np.ndarray | None

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def ok_rows(self) -> int:
        return int(self.ok.sum())

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        if self.num_rows == 0:
            yield self._rows(0, 0)
        for s in range(0, self.num_rows, rows):
            yield self._rows(s, min(self.num_rows, s + rows))

    def to_table(self) -> pa.Table:
        return pa.concat_tables(list(self.chunks()))

    def _rows(self, s: int, e: int) -> pa.Table:
        cl, m = self.clusters, e - s
        t = self.table.slice(s, m)
        keeper = cl.keeper[s:e]
        has = keeper >= 0
        cluster_id = pc.take(self.table["sample_id"], pa.array(np.maximum(keeper, 0), pa.int64(), mask=~has))
        cid = cluster_id.to_pylist()
        primary = has & (keeper == np.arange(s, e))
        dup_method = [METHODS[x] if x >= 0 else None for x in cl.method[s:e]]
        status = t["status"].to_pylist()
        ok, size, is_keeper, score = self.ok[s:e], cl.size[s:e], cl.is_keeper[s:e], cl.score[s:e]
        kpc = self.cfg.clusters.keep_per_cluster
        reasons: list[str] = []
        for k in range(m):
            if not ok[k]:
                reasons.append(f"not deduplicated: status {status[k]}")
            elif primary[k]:
                reasons.append("unique" if size[k] == 1 else f"keeper of a cluster of {size[k]}")
            elif is_keeper[k]:
                reasons.append(f"kept as an extra copy (keep_per_cluster={kpc}); duplicate of {cid[k]} by {dup_method[k]} ({score[k]:.4g})")
            else:
                reasons.append(f"duplicate of {cid[k]} by {dup_method[k]} ({score[k]:.4g})")

        def col(name):
            return t[name] if name in t.column_names else pa.nulls(m)

        outlier = self.outlier[s:e] if self.outlier is not None else None
        return pa.table(
            {
                "sample_id": t["sample_id"],
                "shard_id": t["shard_id"],
                # the driver's table holds no key: sample_id less f"{shard_id}/"
                "key": t["key"] if "key" in t.column_names else sample_keys(t["sample_id"], t["shard_id"]),
                "status": t["status"],
                "error": col("error"),
                "cluster_id": cluster_id,
                "cluster_size": pa.array(size, pa.int32(), mask=~has),
                "is_keeper": pa.array(is_keeper, pa.bool_()),
                "dup_method": pa.array(dup_method, pa.string()),
                "score_to_keeper": pa.array(score, pa.float32(), mask=np.isnan(score)),
                "reason": pa.array(reasons, pa.string()),
                "width": col("width"),
                "height": col("height"),
                "file_size": col("file_size"),
                "phash": col("phash"),
                "dhash": col("dhash"),
                "outlier_score": pa.nulls(m, pa.float32()) if outlier is None else pa.array(outlier, pa.float32(), mask=np.isnan(outlier)),
            }
        ).cast(MANIFEST_SCHEMA)


def cluster_manifest(
    cfg: Config, table: pa.Table, pairs: pa.Table, rank: np.ndarray | None = None, outlier: np.ndarray | None = None,
    embeddings: np.ndarray | None = None, threshold: float | None = None,
) -> tuple[ManifestRows, dict]:
    """``table``: features' scalar columns sorted by sample_id. Returns (the manifest's rows,
    not yet formatted, and the stats part); :func:`build_manifest` formats them all.

    ``rank`` overrides the keeper policy's order (incremental runs rank earlier keepers first).
    ``embeddings`` (row-aligned with ``table``) and the run's embedding ``threshold`` let the
    clusters measure centrality and closeness to the keeper by cosine (else by the hashes)."""
    n = table.num_rows
    ok = status_mask(table["status"], Status.OK)
    rank = keeper_rank(cfg, table) if rank is None else rank
    edges = _edges(cfg, table, pairs)

    def clusters(edges: Edges):
        if cfg.clusters.grouping == "keeper":
            return keeper_clusters(n, edges, rank, valid=ok, keep_per_cluster=cfg.clusters.keep_per_cluster)
        centrality, joins = _grouping_checks(cfg, table, embeddings, threshold)
        tol = cfg.clusters.central_tolerance
        return group_clusters(n, edges, rank, valid=ok, keep_per_cluster=cfg.clusters.keep_per_cluster,
                              centrality=centrality if tol is not None else None, joins=joins, tolerance=tol or 0.0)

    cl = clusters(edges)
    if cfg.clusters.verify_min_size and (cl.size >= cfg.clusters.verify_min_size).any():
        edges = _verified(edges, cl.size >= cfg.clusters.verify_min_size)
        cl = clusters(edges)
    del edges
    has = cl.keeper >= 0
    primary = has & (cl.keeper == np.arange(n))

    sizes = cl.size[primary]
    hist: dict[str, int] = {}
    for sz in sizes:
        b = _bucket(int(sz))
        hist[b] = hist.get(b, 0) + 1
    dup = ok & ~primary & (cl.method >= 0)
    per_method = np.bincount(cl.method[dup].astype(np.int64), minlength=len(METHODS))
    by_method: dict[str, int] = {}  # methods in order of first occurrence (the rows' order)
    firsts = np.unique(cl.method[dup], return_index=True) if dup.any() else (np.zeros(0, np.int8), np.zeros(0, np.int64))
    for mi in firsts[0][np.argsort(firsts[1], kind="stable")]:
        by_method[METHODS[int(mi)]] = int(per_method[int(mi)])
    largest = np.argsort(-cl.size * primary, kind="stable")[:10]
    stats = {
        "samples": n,
        "ok": int(ok.sum()),
        "kept": int(cl.is_keeper.sum()),
        "duplicates": int((ok & ~cl.is_keeper).sum()),
        "clusters": int(primary.sum()),
        "clusters_with_duplicates": int((primary & (cl.size > 1)).sum()),
        "cluster_size_histogram": dict(sorted(hist.items(), key=lambda kv: size_bucket_order(kv[0]))),
        "duplicates_by_method": by_method,
        "largest_clusters": [
            {"keeper": table["sample_id"][int(k)].as_py(), "size": int(cl.size[k])} for k in largest if primary[k] and cl.size[k] > 1
        ],
    }
    return ManifestRows(cfg, table, cl, ok, outlier), stats


def build_manifest(
    cfg: Config, table: pa.Table, pairs: pa.Table, rank: np.ndarray | None = None, outlier: np.ndarray | None = None,
    embeddings: np.ndarray | None = None, threshold: float | None = None,
) -> tuple[pa.Table, dict]:
    """:func:`cluster_manifest`, every row formatted: (manifest, stats part)."""
    rows, stats = cluster_manifest(cfg, table, pairs, rank, outlier, embeddings, threshold)
    return rows.to_table(), stats


@dataclass(frozen=True)
class WrittenManifest:
    """A manifest as written (with its metadata), and where it stands against the error budget."""

    table: pa.Table | None  # None when it was written chunk by chunk (from ManifestRows)
    partial: bool
    error_fraction: float  # share of rows whose status is not ok
    error_budget: float  # run.max_error_fraction

    def stats(self) -> dict:
        """The part of stats.json this decides."""
        return {"partial": self.partial, "error_fraction": round(self.error_fraction, 6), "error_budget": self.error_budget}


def write_manifest(run: RunDir, cfg: Config, manifest: pa.Table | ManifestRows, *, failed_shards: bool,
                   metadata: dict[bytes, bytes] | None = None) -> WrittenManifest:
    """The tail of every run (full or incremental): the error budget (partial when shards
    failed or more than ``run.max_error_fraction`` of the rows are not ok), the manifest's
    schema metadata (``config_hash``, ``partial``, then ``metadata``), and the write.
    :class:`ManifestRows` are formatted and written one row group at a time (the returned
    ``table`` is then None). One file, or a directory of parts above
    :data:`~dedup.io.manifests.MANIFEST_PART_ROWS` rows (:func:`~dedup.io.manifests.write_manifest_data`)."""
    total = manifest.num_rows
    if isinstance(manifest, ManifestRows):
        ok = manifest.ok_rows
        schema = MANIFEST_SCHEMA
    else:
        ok = int(pc.sum(pc.equal(manifest["status"], Status.OK.value)).as_py() or 0)
        schema = manifest.schema
    frac = (total - ok) / total if total else 0.0
    partial = failed_shards or frac > cfg.run.max_error_fraction
    md = {**(schema.metadata or {}), b"config_hash": cfg.config_hash().encode(),
          b"partial": str(partial).lower().encode(), **(metadata or {})}
    if isinstance(manifest, ManifestRows):
        write_manifest_data(run, run.manifest, schema.with_metadata(md), manifest.chunks(), total)
        return WrittenManifest(None, partial, frac, cfg.run.max_error_fraction)
    table = manifest.replace_schema_metadata(md)
    write_manifest_data(run, run.manifest, table.schema, table, total)
    return WrittenManifest(table, partial, frac, cfg.run.max_error_fraction)


def _bucket(s: int) -> str:
    if s <= 5:
        return str(s)
    for lo, hi in ((6, 10), (11, 100), (101, 1000)):
        if s <= hi:
            return f"{lo}-{hi}"
    return "1001+"


def size_bucket_order(bucket: str) -> int:
    """Numeric order of a cluster-size bucket label ("1", "2", "11-100", "1001+")."""
    try:
        return int(str(bucket).split("-")[0].rstrip("+"))
    except ValueError:
        return 1 << 62
