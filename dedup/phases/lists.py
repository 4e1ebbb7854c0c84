"""The embedding search out of core: a shuffle by IVF list through the run directory.

The driver trains the coarse quantizer on a sample of rows read from the features files, then
hands the executor (:class:`dedup.compute.search.driver.TaskMap`) two kinds of tasks:

1. *assignment* (:func:`assign_task`), one per group of feature shards: reads the shards'
   rows, assigns each valid row to its list and the lists it visits, and writes one partition
   per bucket of consecutive lists, ``index/lists/b<bucket>/t<task>.parquet`` (row id, list,
   member or visitor), plus ``index/lists/t<task>.parquet`` (each row's list and nearest lists,
   for the outlier score) and its marker ``index/lists/done/t<task>.json`` last;
2. *unit* (:func:`unit_task`), one per bucket: reads only that bucket's partitions and its rows'
   vectors (from the staged file a group of lists of ~``unit_rows`` entries at a time),
   finds its pairs (:func:`dedup.compute.search.cosine.unit_pairs`) and writes them to
   ``pairs/embedding/b<bucket>.parquet`` (i, j, score), then its marker.

Where the vectors come from: if every task can open the staged embeddings by name
(:class:`dedup.phases.manifest.StagedFile`: a local run directory), both kinds of task read
their rows from that file and the partitions hold row ids only (~13 B a copy); otherwise (an
``s3://`` run directory, whose staged copy is an unlinked scratch file) the assignment tasks
read ``features/<shard>.parquet`` and each partition row carries its float16 vector (2·d raw
bytes) to the units.

Nothing the driver holds grows with n except what must: the quantizer, per-list counts, each
row's list and nearest lists (24 bytes a row, for the outlier score) and the pairs. A rerun with
the same search (``index/lists/key.json``) skips finished tasks and units: a killed run resumes
from its finished partitions. Same pairs as :func:`dedup.compute.search.driver.search_embeddings`
on the staged matrix: the same quantizer (same sample), the same assignment of every row, and
units whose pairs do not depend on how the lists are grouped.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dedup.compute.search.coarse import (
    ASSIGN_BLOCK,
    IVFCoarse,
    assign_coordinates,
    sample_rows,
    train_ivf,
)
from dedup.compute.search.cosine import unit_pairs
from dedup.compute.search.driver import (
    SearchResult,
    SearchStats,
    SearchTaskError,
    TaskMap,
)
from dedup.compute.search.ivf import IVFParams, IVFPlan, NearestLists, WorkUnit
from dedup.compute.search.kernels import rows_f32
from dedup.compute.search.knn import OUTLIER_NPROBE
from dedup.compute.search.pairs import Pairs, merge_pairs
from dedup.compute.search.threads import single_threaded_libs
from dedup.io.rundir import RunDir
from dedup.phases.manifest import StagedFile

__all__ = ["PARTITION_ROWS", "ShardRows", "assign_task", "read_embeddings", "search_run_lists", "unit_task", "use_partitions"]

TASK_ROWS = 1 << 16  # rows per assignment task (whole shards: at least one shard a task)
# Rows from which a local run shuffles by list too (a Ray run always does: its tasks then read
# the features files instead of a matrix in the object store). Below, the staged float16 matrix
# fits a machine and the in-memory driver skips writing ~nprobe vector copies per row; at 10⁶
# it also peaked lower (807 vs 874 MB) and ran faster, but it holds ~560 B a row of bound rows
# and plan that the partitioned driver does not (docs/scale.md). benchmarks/scale.py --search
# sets it to compare both.
PARTITION_ROWS = 2_000_000


def use_partitions(n_valid: int, on_cluster: bool) -> bool:
    """Whether the embedding search shuffles rows through ``index/lists/`` (see PARTITION_ROWS)."""
    return on_cluster or n_valid >= PARTITION_ROWS

_I64 = np.int64
# The partitions' layout (how lists are grouped into buckets); part of the search's key, so
# that a rerun never reads partitions (or markers: 3 = sparse per-list counts) another
# version of this module wrote differently.
LAYOUT = 3


@dataclass(frozen=True)
class ShardRows:
    """One features file and the search's row id of each of its rows (file order; -1: a row
    the search skips)."""

    shard_id: str
    rows: np.ndarray  # int64


@dataclass(frozen=True)
class ListsInput:
    """What every task of one search shares (small: the quantizer, ~20 MB at most)."""

    run_url: str
    coarse: IVFCoarse
    lists_per_bucket: int
    keep: int  # nearest lists kept per row (0: none)
    threshold: float
    params: IVFParams
    # the staged embeddings by name, where every task can open them: the partitions then hold
    # row ids only and tasks read the vectors from this file (None: the vectors travel in them)
    staged: StagedFile | None = None


def _staged_rows(shared: ListsInput, rows: np.ndarray) -> np.ndarray:
    """The float16 vectors of search rows ``rows`` (increasing) read from the staged file."""
    from dedup.compute.search.kernels import take_rows

    assert shared.staged is not None
    return np.asarray(take_rows(shared.staged.open(), rows))


def read_embeddings(run: RunDir, sid: str) -> np.ndarray:
    """A shard's embeddings, (rows, d) float16, nulls as zero rows (as the staging does)."""
    col = run.read_parquet(run.features(sid), columns=["embedding"])["embedding"].combine_chunks()
    d = col.type.list_size
    out = np.zeros((len(col), d), np.float16)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    vals = col.flatten().to_numpy(zero_copy_only=False)
    if valid.all():
        out[:] = vals.reshape(-1, d)
    elif valid.any():
        out[valid] = vals.reshape(-1, d)
    return out


def _vectors_to_arrow(x: np.ndarray) -> pa.Array:
    """float16 rows as fixed-size binary values: Parquet reads and writes those ~20× faster
    than a fixed-size list of float16 (measured: 0.06 vs 1.2 s per 10 000 × 512 read)."""
    x = np.ascontiguousarray(x, np.float16)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * x.shape[1]), len(x), [None, pa.py_buffer(x.reshape(-1).view(np.uint8))])


def _vectors_from_arrow(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    width = arr.type.byte_width
    raw = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return raw.view(np.float16).reshape(len(arr), width // 2)


def _write_uncompressed(run: RunDir, path: str, table: pa.Table) -> None:
    """Partitions are transient and float16 barely compresses: no codec (half the write time)."""
    import pyarrow.parquet as pq

    with run.open_atomic(path) as f:  # streamed: no copy of the file in memory
        pq.write_table(table, f, compression="none")


def _bucket_path(run: RunDir, bucket: int, task: int) -> str:
    return posixpath.join(run.lists_dir, f"b{bucket:05d}", f"t{task:06d}.parquet")


def _task_rows(shared: ListsInput, run: RunDir, shards: list[ShardRows]) -> tuple[np.ndarray, np.ndarray | None]:
    """An assignment task's search rows and their float16 vectors (None: no valid row): read
    from the staged file (raw rows, no Parquet decode), else shard by shard from the features
    files straight into the task's matrix."""
    rid = np.concatenate([sr.rows[sr.rows >= 0] for sr in shards])
    if len(rid) == 0:
        return rid, None
    if shared.staged is not None:
        rid.sort()
        return rid, _staged_rows(shared, rid)
    x: np.ndarray | None = None
    at = 0
    for sr in shards:
        keep_rows = sr.rows >= 0
        k = int(keep_rows.sum())
        if k:
            got = read_embeddings(run, sr.shard_id)
            if x is None:
                x = np.empty((len(rid), got.shape[1]), np.float16)
            x[at : at + k] = got[keep_rows]
            at += k
            del got
    return rid, x


def assign_task(shared: ListsInput, item: tuple[int, list[ShardRows]]) -> dict:
    """Assign the rows of a group of shards to lists; write their bucket partitions, their
    rows' lists, and the marker last. Returns the marker (buckets written, per-list counts)."""
    task, shards = item
    run = RunDir(shared.run_url)
    marker_path = posixpath.join(run.lists_dir, "done", f"t{task:06d}.json")
    if run.exists(marker_path):
        return dict(run.read_json(marker_path))
    coarse, lpb = shared.coarse, shared.lists_per_bucket
    rid, x = _task_rows(shared, run, shards)
    nlist = coarse.params.nlist
    members = np.zeros(nlist, _I64)
    visitors = np.zeros(nlist, _I64)
    buckets: list[int] = []
    if x is not None:
        if len(rid) > 1 and not (np.diff(rid) > 0).all():  # rows increasing, as in the in-memory driver
            order = np.argsort(rid, kind="stable")
            rid, x = rid[order], x[order]
        near = np.empty((len(rid), shared.keep), np.int32) if shared.keep else None
        prim = np.empty(len(rid), np.int32)
        vrs, vls = [], []
        with single_threaded_libs():
            for s in range(0, len(rid), ASSIGN_BLOCK):  # float32 rows one block at a time
                e = min(len(rid), s + ASSIGN_BLOCK)
                pz, _ = coarse.coordinates(rows_f32(x, slice(s, e)))
                prim[s:e], vr_b, vl_b = assign_coordinates(coarse, pz, np.arange(s, e, dtype=_I64),
                                                           None if near is None else near[s:e])
                vrs.append(vr_b)
                vls.append(vl_b)
        vr, vl = np.concatenate(vrs), np.concatenate(vls)
        del pz, vrs, vls
        members += np.bincount(prim, minlength=nlist)
        visitors += np.bincount(vl, minlength=nlist)
        # every (row, list) entry: members first, then visits
        pos = np.concatenate([np.arange(len(rid), dtype=_I64), vr])
        lst = np.concatenate([prim, vl]).astype(np.int32)
        mem = np.concatenate([np.ones(len(rid), bool), np.zeros(len(vr), bool)])
        bkt = lst // lpb
        by = np.argsort(bkt, kind="stable")
        cuts = np.flatnonzero(np.diff(bkt[by])) + 1
        for part in np.split(by, cuts):
            if len(part) == 0:
                continue
            b = int(bkt[part[0]])
            p = pos[part]
            cols = {"row": pa.array(rid[p]), "list": pa.array(lst[part]), "member": pa.array(mem[part])}
            if shared.staged is None:
                cols["vector"] = _vectors_to_arrow(x[p])
            table = pa.table(cols)
            _write_uncompressed(run, _bucket_path(run, b, task), table)
            buckets.append(b)
        cols = {"row": pa.array(rid), "list": pa.array(prim.astype(np.int32))}
        if near is not None:
            cols["nearest"] = pa.FixedSizeListArray.from_arrays(pa.array(near.reshape(-1)), shared.keep)
        run.write_parquet(posixpath.join(run.lists_dir, f"t{task:06d}.parquet"), pa.table(cols))
    # the per-list counts of the lists this task's rows touched only (a task's rows touch at most
    # rows × (1 + visits) of the nlist lists: all markers together grow as n, not as tasks × nlist)
    hit = np.flatnonzero(members | visitors)
    marker = {"task": task, "buckets": sorted(buckets), "lists": hit.tolist(),
              "members": members[hit].tolist(), "visitors": visitors[hit].tolist()}
    run.write_json(marker_path, marker)
    return marker


def _partition_vectors(run: RunDir, paths: list[str], sizes: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The vectors of a unit's unique rows (``first``: each one's first copy among the
    partitions' rows, concatenated), read one partition at a time into the unit's matrix (one
    copy of each row, never the concatenated partitions as well)."""
    x: np.ndarray | None = None
    starts = np.concatenate([[0], np.cumsum(sizes)])
    by_pos = np.argsort(first, kind="stable")  # unique rows in the order of their first copy
    first_sorted = first[by_pos]
    for path, a, b in zip(paths, starts[:-1], starts[1:]):
        lo_f, hi_f = np.searchsorted(first_sorted, [a, b])
        if lo_f == hi_f:
            continue
        vec = _vectors_from_arrow(run.read_parquet(path, columns=["vector"])["vector"])
        if x is None:
            x = np.empty((len(first), vec.shape[1]), np.float16)
        x[by_pos[lo_f:hi_f]] = vec[first_sorted[lo_f:hi_f] - a]
        del vec
    assert x is not None
    return x


def _group_pairs(shared: ListsInput, row: np.ndarray, rel: np.ndarray, mem: np.ndarray, lo: int, g0: int, g1: int,
                 *, paths: list[str] | None = None, sizes: np.ndarray | None = None) -> Pairs:
    """The pairs of a bucket's lists ``lo + g0 … lo + g1 - 1`` (``rel``: each partition entry's
    list less ``lo``), in search row ids; the vectors from the staged file, or from the
    partitions (``paths``, ``sizes``: then every entry is in the group)."""
    if g0 == 0 and g1 > int(rel.max(initial=-1)):
        sel = None
    else:
        sel = np.flatnonzero((rel >= g0) & (rel < g1))
    r = row if sel is None else row[sel]
    uniq, first = np.unique(r, return_index=True)  # a row may be in several of its lists
    if paths is not None:
        assert sel is None and sizes is not None
        x = _partition_vectors(RunDir(shared.run_url), paths, sizes, first)
    else:
        x = _staged_rows(shared, uniq)
    local = np.searchsorted(uniq, r)
    gr = (rel if sel is None else rel[sel]) - g0
    gm = mem if sel is None else mem[sel]
    nl = g1 - g0

    def grouped(pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o = np.lexsort((local[pick], gr[pick]))  # by list, rows increasing
        offsets = np.zeros(nl + 1, _I64)
        np.cumsum(np.bincount(gr[pick], minlength=nl), out=offsets[1:])
        return local[pick][o], offsets

    mr, mo = grouped(np.flatnonzero(gm))
    vr, vo = grouped(np.flatnonzero(~gm))
    unit = WorkUnit(lists=np.arange(lo + g0, lo + g1, dtype=_I64), member_rows=mr, member_offsets=mo,
                    visitor_rows=vr, visitor_offsets=vo)
    with single_threaded_libs():
        p = unit_pairs(x, unit, shared.threshold, shared.params, use_gpu=False, bound=shared.coarse.bound)
    return Pairs(uniq[p.i], uniq[p.j], p.score)  # uniq increases: order and i < j kept


def unit_task(shared: ListsInput, item: tuple[int, list[int]]) -> Pairs:
    """One bucket's pairs from its partitions only (written to ``pairs/embedding/``)."""
    bucket, tasks = item
    run = RunDir(shared.run_url)
    out_path = posixpath.join(run.embedding_pairs_dir, f"b{bucket:05d}.parquet")
    if run.exists(out_path + ".done"):
        t = run.read_parquet(out_path)
        return Pairs(t["i"].to_numpy(), t["j"].to_numpy(), t["score"].to_numpy())
    pairs = Pairs.empty()
    if tasks:
        # the partitions' ids first, then the unique rows' vectors: from the staged file, or from
        # the partitions one at a time (_partition_vectors)
        paths = [_bucket_path(run, bucket, k) for k in tasks]
        cols = [run.read_parquet(path, columns=["row", "list", "member"]) for path in paths]
        row = np.concatenate([c["row"].to_numpy() for c in cols])
        lst = np.concatenate([c["list"].to_numpy() for c in cols])
        mem = np.concatenate([c["member"].to_numpy(zero_copy_only=False) for c in cols])
        sizes = np.array([c.num_rows for c in cols], _I64)
        del cols
        lo = bucket * shared.lists_per_bucket
        nl = min(shared.lists_per_bucket, shared.coarse.params.nlist - lo)
        rel = lst.astype(_I64) - lo
        del lst
        if shared.staged is None:  # the vectors are in the partitions: one read of each, one group
            pairs = _group_pairs(shared, row, rel, mem, lo, 0, nl, paths=paths, sizes=sizes)
        else:
            # the lists a group at a time, ~unit_rows entries each, vectors read from the staged
            # file per group: the buckets are sized from the visits of the quantizer's training
            # rows, which visit fewer lists than the rest (docs/scale.md), so a bucket can hold
            # several times unit_rows entries; a list's pairs do not depend on its group
            cum = np.cumsum(np.bincount(rel, minlength=nl))
            parts, g0 = [], 0
            while g0 < nl:
                base = int(cum[g0 - 1]) if g0 else 0
                g1 = max(g0 + 1, int(np.searchsorted(cum, base + int(shared.params.unit_rows), side="right")))
                g1 = min(g1, nl)
                if cum[g1 - 1] > base:  # (trailing lists without rows: nothing to read)
                    parts.append(_group_pairs(shared, row, rel, mem, lo, g0, g1))
                g0 = g1
            pairs = merge_pairs(parts)  # groups in list order: a pair two lists find keeps the first's score
    run.write_parquet(out_path, pa.table({"i": pa.array(pairs.i, pa.int64()), "j": pa.array(pairs.j, pa.int64()),
                                          "score": pa.array(pairs.score, pa.float32())}))
    run.write_bytes(out_path + ".done", b"")
    return pairs


def _key(shards: list[ShardRows], params: IVFParams, threshold: float, features_hash: str | None,
         m: int, ids_only: bool) -> str:
    h = hashlib.sha256(json.dumps({"layout": LAYOUT, "ids_only": ids_only, "params": vars(params), "threshold": threshold,
                                   "features": features_hash, "shards": [s.shard_id for s in shards], "valid": m},
                                  sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _read_sample(run: RunDir, shards: list[ShardRows], want: np.ndarray) -> np.ndarray:
    """The float16 vectors of the search rows ``want`` (increasing), read shard by shard."""
    out: np.ndarray | None = None
    for sr in shards:
        hit = np.isin(sr.rows, want)
        if not hit.any():
            continue
        x = read_embeddings(run, sr.shard_id)
        if out is None:
            out = np.zeros((len(want), x.shape[1]), np.float16)
        out[np.searchsorted(want, sr.rows[hit])] = x[hit]
    assert out is not None
    return out


def search_run_lists(
    run: RunDir, shards: list[ShardRows], n: int, m: int, threshold: float, params: IVFParams, executor: TaskMap,
    *, features_hash: str | None = None, keep_nearest: bool = False, staged: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None, plan_progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """The IVF search over a run's features files, shuffled by list through ``index/lists/``
    (see the module's docstring). ``shards``: every features file with its rows' search row
    ids (increasing ids over ``m`` valid rows of ``n``); ``m ≥ params.exact_below``.
    ``staged``: the (n, d) embeddings if the driver has them anyway (a memmap): the training
    sample is then read from there instead of from every features file."""
    t0 = time.perf_counter()
    handle = StagedFile.of(staged) if staged is not None else None
    key = _key(shards, params, threshold, features_hash, m, handle is not None)
    key_path = posixpath.join(run.lists_dir, "key.json")
    if not (run.exists(key_path) and run.read_json(key_path).get("key") == key):
        for sub in (run.lists_dir, run.embedding_pairs_dir):  # another search's partitions: start over
            if run.exists(sub):
                run.fs.rm(sub, recursive=True)
        run.write_json(key_path, {"key": key})
    # the quantizer, on the same sample of valid rows as the in-memory driver
    idx = np.concatenate([s.rows[s.rows >= 0] for s in shards])
    idx.sort()
    k = max(int(params.train_size), min(int(params.nlist), m))
    want = sample_rows(idx, k, params.seed)
    del idx
    if staged is not None:
        from dedup.compute.search.kernels import take_rows

        sample = np.asarray(take_rows(staged, want))  # read from the file, not mapped (see take_rows)
    else:
        sample = _read_sample(run, shards, want)
    coarse = train_ivf(sample, params, threshold=threshold)
    coarse = _clamped(coarse, params, m)
    visits = _sample_visits(coarse, sample)
    del sample
    t1 = time.perf_counter()
    nlist = coarse.params.nlist
    # a bucket: consecutive lists with about unit_rows members + visitors (a unit task holds
    # them, 2·d bytes each), the visits per row estimated on the training sample
    per_list = max(1.0, (1.0 + visits) * m / nlist)
    lpb = max(1, min(nlist, int(params.unit_rows // per_list)))
    keep = min(OUTLIER_NPROBE, coarse.params.nprobe) if keep_nearest else 0
    shared = executor.put(ListsInput(run.url, coarse, lpb, keep, threshold, params, handle))
    groups: list[list[ShardRows]] = [[]]
    rows_in = 0
    for s in shards:
        if groups[-1] and rows_in >= TASK_ROWS:
            groups.append([])
            rows_in = 0
        groups[-1].append(s)
        rows_in += len(s.rows)
    # summed as the markers come (a marker's counts cover the lists its task touched)
    members = np.zeros(nlist, _I64)
    visitors = np.zeros(nlist, _I64)
    nbuckets = -(-nlist // lpb)
    tasks_of: list[list[int]] = [[] for _ in range(nbuckets)]
    finished = 0
    if plan_progress:
        plan_progress(0, len(groups))
    for _item, res, err in executor.map_units(assign_task, list(enumerate(groups)), shared=shared):
        if err:
            raise SearchTaskError(f"candidate search coarse stage failed after retries: {err}")
        hit = np.asarray(res["lists"], _I64)
        members[hit] += np.asarray(res["members"], _I64)
        visitors[hit] += np.asarray(res["visitors"], _I64)
        for b in res["buckets"]:
            tasks_of[b].append(int(res["task"]))
        finished += 1
        if plan_progress:
            plan_progress(finished, len(groups))
    t2 = time.perf_counter()
    cost = [float((members[b * lpb:(b + 1) * lpb] * (members[b * lpb:(b + 1) * lpb]
                                                     + visitors[b * lpb:(b + 1) * lpb])).sum()) for b in range(nbuckets)]
    items = sorted([(b, sorted(tasks_of[b])) for b in range(nbuckets) if tasks_of[b]], key=lambda it: -cost[it[0]])
    parts = []
    done = 0
    for item, res, err in executor.map_units(unit_task, items, shared=shared):
        if err:
            raise SearchTaskError(f"candidate search unit failed after retries: {err}")
        parts.append(res)
        done += min(lpb, nlist - item[0] * lpb)
        if progress:
            progress(done, nlist)
    if progress and done < nlist:
        progress(nlist, nlist)
    out = merge_pairs(parts)
    # every unit is done (its pairs are in pairs/embedding/): the partitions are not needed
    # again, and they hold (1 + visits per row) copies of the vectors
    for b in range(nbuckets):
        if tasks_of[b] and run.exists(posixpath.join(run.lists_dir, f"b{b:05d}")):
            run.fs.rm(posixpath.join(run.lists_dir, f"b{b:05d}"), recursive=True)
    lists = NearestFiles(run.url, coarse, n, len(groups), keep) if keep else None
    t3 = time.perf_counter()
    sizes = members
    stats = SearchStats(
        "ivf", n, m, False, nlist=nlist, nprobe=coarse.params.nprobe, units=len(items),
        bound_width=0 if coarse.bound is None else coarse.bound.width,
        mean_probes=1.0 + float(visitors.sum()) / max(1, m), list_size_max=int(sizes.max()),
        list_size_mean=float(sizes.mean()), dot_products=int(sum(cost)), train_seconds=t1 - t0,
        assign_seconds=t2 - t1, pairs_seconds=t3 - t2, seconds=t3 - t0, pairs=len(out))
    return SearchResult(out, stats, lists)


def _sample_visits(coarse: IVFCoarse, sample: np.ndarray) -> float:
    """Mean lists a row visits besides its own, measured on (every k-th row of, ~16 384) the
    training sample: sizes the buckets (deterministic: same sample, same quantizer)."""
    x = sample[:: max(1, len(sample) >> 14)]  # spread over the sample (its rows are in id order)
    if len(x) == 0 or coarse.params.nprobe <= 1:
        return 0.0
    visits = 0
    with single_threaded_libs():
        for s in range(0, len(x), ASSIGN_BLOCK):
            e = min(len(x), s + ASSIGN_BLOCK)
            pz, _ = coarse.coordinates(rows_f32(x, slice(s, e)))
            visits += len(assign_coordinates(coarse, pz, np.arange(s, e, dtype=_I64))[1])
    return visits / len(x)


def _clamped(coarse: IVFCoarse, params: IVFParams, m: int) -> IVFCoarse:
    """The quantizer trained on the sample has nlist / nprobe clamped to the sample; they are
    the same as clamped to all m rows because the sample holds at least nlist rows."""
    assert coarse.params.nlist == max(1, min(int(params.nlist), m)), (coarse.params.nlist, params.nlist, m)
    return coarse


def _nearest_lists(run: RunDir, coarse: IVFCoarse, n: int, tasks: int, keep: int) -> NearestLists:
    """The rows' lists and nearest lists as arrays (n × keep int32): what
    :class:`NearestFiles` reads (tests compare it with the in-memory search's)."""
    assign = np.full(n, -1, np.int32)
    nearest = np.full((n, keep), -1, np.int32)
    for t in _task_lists(run, tasks):
        r = t["row"].to_numpy()
        assign[r] = t["list"].to_numpy()
        nearest[r] = t["nearest"].combine_chunks().flatten().to_numpy().reshape(-1, keep)
    return NearestLists(coarse, assign, nearest)


def _task_lists(run: RunDir, tasks: int, columns: list[str] | None = None):
    """Each assignment task's rows with their list and nearest lists (``t*.parquet``)."""
    for k in range(tasks):
        path = posixpath.join(run.lists_dir, f"t{k:06d}.parquet")
        if run.exists(path):  # (a task without valid rows wrote none)
            yield run.read_parquet(path, columns=columns)


@dataclass(frozen=True)
class NearestFiles:
    """The partitioned search's nearest lists, left in its assignment tasks' files
    (``index/lists/t*.parquet``: row, list, nearest) instead of n × keep arrays on the driver
    (28 bytes a row at keep 5, held from the search to the outlier score). The outlier score's
    plan (:func:`dedup.compute.search.knn.kth_neighbour_similarity`) is built from them one
    file at a time (:meth:`outlier_plan`); :meth:`load` gives the arrays."""

    run_url: str
    coarse: IVFCoarse
    n: int
    tasks: int
    keep: int

    def load(self) -> NearestLists:
        return _nearest_lists(RunDir(self.run_url), self.coarse, self.n, self.tasks, self.keep)

    def outlier_plan(self, idx: np.ndarray, n: int, nprobe: int) -> IVFPlan | None:
        """The plan whose rows ``idx`` visit their ``nprobe - 1`` next-nearest lists (None if
        the files do not cover them): the same plan as from :meth:`load`'s arrays, built by
        :func:`dedup.compute.search.ivf.plan_from_visits` from the files read twice (once to
        count each list's visitors, once to place them), one file at a time."""
        from dedup.compute.search.ivf import plan_from_visits

        if n != self.n or self.keep < nprobe:
            return None
        run = RunDir(self.run_url)
        assign = np.full(n, -1, np.int32)
        for t in _task_lists(run, self.tasks, columns=["row", "list"]):
            assign[t["row"].to_numpy()] = t["list"].to_numpy()
        prim = assign[idx]
        del assign
        if (prim < 0).any():
            return None

        def visits():  # each file's visits, read once to count them and once to place them
            for t in _task_lists(run, self.tasks):
                r = t["row"].to_numpy()
                near = t["nearest"].combine_chunks().flatten().to_numpy().reshape(-1, self.keep)[:, 1:nprobe]
                ok = near >= 0
                yield np.broadcast_to(r[:, None], near.shape)[ok], near[ok]  # rows increasing, as in the file

        return plan_from_visits(n, self.coarse, idx, prim, visits)
