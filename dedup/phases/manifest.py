"""Phase 3: clusters around keepers, then the manifest (one row per sample read) and stats."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup.compute.clusters import Edges, TouchedClusters, group_clusters, keeper_clusters, rank_order
from dedup.compute.search.hamming import popcount64
from dedup.compute.search.kernels import rows_f32
from dedup.config import Config
from dedup.io.manifests import write_manifest_data
from dedup.io.rundir import RunDir
from dedup.phases.digests import Digests, copy_counts, sha_rows
from dedup.records import METHODS, Status, sample_keys, status_mask
from dedup.schema import MANIFEST_SCHEMA

if TYPE_CHECKING:
    from dedup.compute.search.driver import TaskMap
    from dedup.compute.search.ivf import NearestLists, PlanSource


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
    """Hamming distance of column ``name`` between rows i and j; -1 where either is null (the
    rows' values taken: no n-sized copy of the column)."""
    if name not in table.column_names:
        return np.full(len(i), -1, np.int64)
    col = table[name]

    def values(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = col.take(pa.array(np.asarray(rows, np.int64)))
        return v.fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64), v.is_valid().to_numpy(zero_copy_only=False)

    hi, ki = values(i)
    hj, kj = values(j)
    return np.where(ki & kj, popcount64(hi ^ hj), -1)


def _edges(cfg: Config, table: pa.Table, pairs: pa.Table, rows: tuple[np.ndarray, np.ndarray] | None = None) -> Edges:
    """The pairs as edges between table rows; ``rows``: the pairs' (a, b) rows if known
    (:class:`~dedup.phases.candidates.CandidateResult`), else looked up by sample_id."""
    if pairs.num_rows == 0:
        return Edges.empty()
    if rows is not None:
        i, j = (np.asarray(r, np.int64) for r in rows)
    else:
        ids = table["sample_id"]
        i = pc.index_in(pairs["a"], value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
        j = pc.index_in(pairs["b"], value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    lookup = {m: k for k, m in enumerate(METHODS)}
    mcol = pairs["method"].combine_chunks().dictionary_encode()
    codes = np.array([lookup[x] for x in mcol.dictionary.to_pylist()], np.int8)
    m = codes[mcol.indices.to_numpy(zero_copy_only=False)] if len(codes) else np.empty(0, np.int8)
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


def keeper_rank(cfg: Config, table: pa.Table, rows: np.ndarray | None = None,
                digests: Digests | None = None) -> np.ndarray:
    """Each row's place in the keeper policy's order (``clusters.keeper_policy``; 0 = the best
    keeper), ties broken by sample_id. ``table`` is sorted by sample_id. ``rows`` (increasing):
    rank these rows only, among themselves (the same order as theirs among all rows), their
    columns taken (no n-sized sort keys)."""
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        need = {s.lstrip("-+") for s in cfg.clusters.keeper_policy}
        # (sample_id is the row order: the table is sorted by it; its strings are not read)
        cols_needed = [c for c in table.column_names if c in (need - {"sample_id"}) | {"width", "height", "content_fraction"}]
        sub = table.select(cols_needed).take(pa.array(rows))
        if "copies" in need:
            sub = sub.append_column("__copies", pa.array(copy_counts(table, digests, rows)))
        return _rank(cfg, sub)
    if "copies" in {s.lstrip("-+") for s in cfg.clusters.keeper_policy} and digests is not None:
        table = table.append_column("__copies", pa.array(copy_counts(table, digests)))
    return _rank(cfg, table)


def _rank(cfg: Config, table: pa.Table) -> np.ndarray:
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
            values = table["__copies"].to_numpy() if "__copies" in table.column_names else copy_counts(table)
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


def _grouping_checks(cfg: Config, table: pa.Table, emb: np.ndarray | None, threshold: float | None,
                     emb_rows: np.ndarray | None = None):
    """(centrality, joins) for :func:`~dedup.compute.clusters.group_clusters`: from the
    embeddings when the run has them, else from the hashes. ``table``: the clustered rows'
    ``phash`` / ``dhash`` / ``sha256`` (``cluster_manifest`` passes the linked rows only);
    ``emb_rows``: each of its rows' row in ``emb`` (default: the same row)."""
    ph = table["phash"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64) if "phash" in table.column_names else None
    dh = table["dhash"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64) if "dhash" in table.column_names else None
    if "sha256" in table.column_names:
        sha, sha_known = sha_rows(table, np.arange(table.num_rows)), table["sha256"].is_valid().to_numpy(zero_copy_only=False)
    else:
        sha, sha_known = np.zeros((table.num_rows, 1), np.uint8), np.zeros(table.num_rows, bool)

    def same_bytes(members: np.ndarray, k: int) -> np.ndarray:
        return sha_known[members] & sha_known[k] & (sha[members] == sha[k]).all(axis=1)
    use_emb = emb is not None and threshold is not None and "embedding" in cfg.methods
    use_p, use_d = "phash" in cfg.methods and ph is not None, "dhash" in cfg.methods and dh is not None
    i_emb, i_p, i_x = METHODS.index("embedding"), METHODS.index("phash"), METHODS.index("exact")

    def vectors(members: np.ndarray) -> np.ndarray:
        assert emb is not None  # called only when use_emb
        x = rows_f32(emb, members if emb_rows is None else emb_rows[members])  # float32 (exact); a memmap's pages are released as it reads
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
        ok = same_bytes(members, k)
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
                   progress: Callable[[int, int], None] | None = None, lists: NearestLists | PlanSource | dict | None = None,
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
    clusters: TouchedClusters
    ok: np.ndarray
    outlier: np.ndarray | None
    release: Callable[[], None] | None = None  # called after each chunk (the table's pages read for it)

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
            if self.release is not None:
                self.release()

    def to_table(self) -> pa.Table:
        return pa.concat_tables(list(self.chunks()))

    def _rows(self, s: int, e: int) -> pa.Table:
        cl, m = self.clusters.slice(s, e), e - s
        t = self.table.slice(s, m)
        keeper = cl.keeper
        has = keeper >= 0
        cluster_id = pc.take(self.table["sample_id"], pa.array(np.maximum(keeper, 0), pa.int64(), mask=~has))
        cid = cluster_id.to_pylist()
        primary = has & (keeper == np.arange(s, e))
        dup_method = [METHODS[x] if x >= 0 else None for x in cl.method]
        status = t["status"].to_pylist()
        ok, size, is_keeper, score = self.ok[s:e], cl.size, cl.is_keeper, cl.score
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
    rows: tuple[np.ndarray, np.ndarray] | None = None, digests: Digests | None = None,
    release: Callable[[], None] | None = None,
) -> tuple[ManifestRows, dict]:
    """``table``: features' scalar columns sorted by sample_id. Returns (the manifest's rows,
    not yet formatted, and the stats part); :func:`build_manifest` formats them all.

    ``rank`` overrides the keeper policy's order (incremental runs rank earlier keepers first).
    ``embeddings`` (row-aligned with ``table``) and the run's embedding ``threshold`` let the
    clusters measure centrality and closeness to the keeper by cosine (else by the hashes).
    ``rows``: the pairs' (a, b) table rows, if known (else looked up by sample_id).
    ``digests``: the whole sha256 digests of rows (the run's table holds prefixes only:
    :meth:`~dedup.phases.candidates.FeatureSet.digests`); default: the table's ``sha256``.
    ``release()``, if given, is called after each step that reads the table (its links, the
    keeper ranks, the linked rows' hashes), and by the returned rows after each chunk they
    format (e.g. :meth:`~dedup.phases.candidates.FeatureSet.drop_pages`).

    Only the rows some link between two ok rows touches are clustered, renumbered 0…t-1 in
    row order (the same clusters, keepers and order as over all n rows: every step compares
    ranks, row order or links, which the renumbering keeps); every other ok row is its own
    keeper. The clusters' arrays and the keeper ranks are t-sized
    (:class:`~dedup.compute.clusters.TouchedClusters`), not n-sized."""
    n = table.num_rows
    drop = release if release is not None else (lambda: None)  # after each read of the table
    ok = status_mask(table["status"], Status.OK)
    edges = _edges(cfg, table, pairs, rows)
    drop()
    live = (edges.i != edges.j) & ok[edges.i] & ok[edges.j] if len(edges.i) else np.zeros(0, bool)
    touched = np.unique(np.concatenate([edges.i[live], edges.j[live]])).astype(np.int64)
    local = Edges(np.searchsorted(touched, edges.i[live]), np.searchsorted(touched, edges.j[live]),
                  edges.method[live], edges.score[live])
    del edges, live
    t = len(touched)
    sub_rank = keeper_rank(cfg, table, touched, digests) if rank is None else np.asarray(rank)[touched]
    drop()
    every = np.ones(t, bool)
    checks = None
    # the linked rows' hashes and digests, taken now: nothing below reads the table again
    linked = _linked_columns(table, touched, digests) if cfg.clusters.grouping != "keeper" else None
    drop()

    def clusters(edges: Edges):
        nonlocal checks, linked
        if cfg.clusters.grouping == "keeper":
            return keeper_clusters(t, edges, sub_rank, valid=every, keep_per_cluster=cfg.clusters.keep_per_cluster)
        if checks is None:  # on the linked rows' hashes and digests (t rows), their embeddings by row
            assert linked is not None  # taken above for this grouping
            checks = _grouping_checks(cfg, linked, embeddings, threshold, emb_rows=touched)
            linked = None  # the checks hold their own arrays of its columns
        centrality, joins = checks
        tol = cfg.clusters.central_tolerance
        return group_clusters(t, edges, sub_rank, valid=every, keep_per_cluster=cfg.clusters.keep_per_cluster,
                              centrality=centrality if tol is not None else None, joins=joins, tolerance=tol or 0.0)

    cl = clusters(local)
    if cfg.clusters.verify_min_size and (cl.size >= cfg.clusters.verify_min_size).any():
        local = _verified(local, cl.size >= cfg.clusters.verify_min_size)
        cl = clusters(local)
    del local, checks
    linked = None
    alone = int(ok.sum()) - t  # ok rows no link touches: keepers of clusters of one
    primary = cl.keeper == np.arange(t)
    hist: dict[str, int] = {}
    for sz in cl.size[primary]:
        bk = _bucket(int(sz))
        hist[bk] = hist.get(bk, 0) + 1
    if alone:
        hist[_bucket(1)] = hist.get(_bucket(1), 0) + alone
    dup = ~primary & (cl.method >= 0)
    per_method = np.bincount(cl.method[dup].astype(np.int64), minlength=len(METHODS))
    by_method: dict[str, int] = {}  # methods in order of first occurrence (the rows' order)
    firsts = np.unique(cl.method[dup], return_index=True) if dup.any() else (np.zeros(0, np.int8), np.zeros(0, np.int64))
    for mi in firsts[0][np.argsort(firsts[1], kind="stable")]:
        by_method[METHODS[int(mi)]] = int(per_method[int(mi)])
    largest = np.argsort(-cl.size * primary, kind="stable")[:10]
    stats = {
        "samples": n,
        "ok": int(ok.sum()),
        "kept": int(cl.is_keeper.sum()) + alone,
        "duplicates": int((~cl.is_keeper).sum()),
        "clusters": int(primary.sum()) + alone,
        "clusters_with_duplicates": int((primary & (cl.size > 1)).sum()),
        "cluster_size_histogram": dict(sorted(hist.items(), key=lambda kv: size_bucket_order(kv[0]))),
        "duplicates_by_method": by_method,
        "largest_clusters": [
            {"keeper": table["sample_id"][int(touched[k])].as_py(), "size": int(cl.size[k])}
            for k in largest if primary[k] and cl.size[k] > 1
        ],
    }
    return ManifestRows(cfg, table, TouchedClusters(touched, cl, ok), ok, outlier, release), stats


def _linked_columns(table: pa.Table, rows: np.ndarray, digests: Digests | None) -> pa.Table:
    """``phash`` / ``dhash`` / ``sha256`` of ``rows`` (the grouping checks' inputs), the digests
    from ``digests`` where the table holds prefixes only."""
    sub = table.select([c for c in ("phash", "dhash", "sha256") if c in table.column_names]).take(pa.array(rows))
    if "sha256" not in table.column_names and "sha256_prefix" in table.column_names and digests is not None \
            and len(rows):
        d, known = digests(rows)
        d = np.ascontiguousarray(d, np.uint8).reshape(len(rows), -1)
        width = d.shape[1] if d.ndim == 2 and d.shape[1] else 32
        col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows),
                                                   [pa.py_buffer(np.packbits(known, bitorder="little")), pa.py_buffer(d.tobytes())])
        sub = sub.append_column("sha256", col)
    return sub


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
