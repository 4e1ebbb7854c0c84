"""The executor contract of the distributed work (dedup.compute.search.driver.TaskMap): the local
executor and the in-process ThreadMap run the same tasks as Ray; the search has one driver."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dedup.compute.search.driver import SearchTaskError, ThreadMap, search_embeddings
from dedup.compute.search.ivf import IVFParams, NearestLists
from dedup.executors.local import LocalExecutor

ROOT = Path(__file__).resolve().parent.parent


def _half_or_fail(shared, item):
    if item == 3:
        raise ValueError("three is bad")
    return shared[item] / 2


@pytest.mark.parametrize("executor", [ThreadMap(2), ThreadMap(1), LocalExecutor(1, threads=2)], ids=["threads", "serial", "local"])
def test_map_units_yields_every_item_once_with_its_error(executor):
    shared = executor.put(np.arange(10, dtype=np.float64))
    got = {item: (res, err) for item, res, err in executor.map_units(_half_or_fail, range(6), shared=shared)}
    assert sorted(got) == list(range(6))
    assert got[3] == (None, "ValueError: three is bad")
    assert all(got[k] == (k / 2, None) for k in (0, 1, 2, 4, 5))


def _data(n=6000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[1::50] = x[0::50][: len(x[1::50])] + 0.05 * rng.normal(size=(len(x[1::50]), d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


class _Backwards(ThreadMap):
    """Runs the tasks in reverse order (as a remote executor may finish them)."""

    def map_units(self, fn, items, *, shared=None):
        yield from reversed(list(super().map_units(fn, items, shared=shared)))


def test_one_driver_same_pairs_whatever_the_executor_and_task_order():
    x = _data()
    ok = np.ones(len(x), bool)
    ok[7] = False
    params = IVFParams.auto(int(ok.sum()), x.shape[1], threshold=0.9)
    a = search_embeddings(x, 0.9, params, valid=ok, executor=ThreadMap(1), keep_nearest=True)
    b = search_embeddings(x, 0.9, params, valid=ok, executor=_Backwards(2), keep_nearest=True)
    c = search_embeddings(x, 0.9, params, valid=ok, executor=LocalExecutor(1, threads=2))
    assert a.stats.method == "ivf" and a.stats.valid == len(x) - 1 and len(a.pairs) > 50
    assert a.pairs == b.pairs == c.pairs
    assert a.lists is not None and b.lists is not None and c.lists is None
    assert np.array_equal(a.lists.nearest, b.lists.nearest) and (a.lists.nearest[7] == -1).all()


class _Failing(ThreadMap):
    def map_units(self, fn, items, *, shared=None):
        for item, _res, _err in super().map_units(fn, items, shared=shared):
            yield item, None, "OSError: worker lost"


def test_a_failed_task_is_one_clear_error():
    x = _data()
    with pytest.raises(SearchTaskError, match="coarse stage failed after retries: OSError: worker lost"):
        search_embeddings(x, 0.9, IVFParams.auto(len(x), x.shape[1], threshold=0.9), executor=_Failing(1))


def test_ray_is_imported_only_under_executors():
    pattern = re.compile(r"^\s*(import ray|from ray[ .])", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "dedup").rglob("*.py")
                 if "executors" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []


def _run_with_features(tmp_path, n=6000, shards=3, d=32):
    """A run directory holding only features files (the real schema and writer)."""
    import pyarrow as pa

    from dedup.io.rundir import RunDir
    from dedup.schema import features_schema

    x = _data(n, d, seed=2)
    run = RunDir(str(tmp_path / "run"))
    schema = features_schema(d, {"config_hash": "h", "model_tag": "m"})
    per = n // shards
    ids = []
    for k in range(shards):
        sid = f"shard-{k}"
        rows = range(k * per, (k + 1) * per)
        # keys out of order inside the file: the search's row ids are the sorted sample ids
        keys = [f"{(r * 7919) % n:06d}" for r in rows]
        m = len(keys)
        cols = {f.name: pa.nulls(m, f.type) for f in schema}
        cols.update(sample_id=pa.array([f"{sid}/{key}" for key in keys]), shard_id=pa.array([sid] * m),
                    key=pa.array(keys), status=pa.array(["ok" if r % 97 else "decode_error" for r in rows]),
                    embedding=pa.FixedSizeListArray.from_arrays(pa.array(x[k * per : (k + 1) * per].reshape(-1)), d))
        run.write_parquet(run.features(sid), pa.Table.from_pydict(cols, schema=schema))
        ids.append(sid)
    return run, ids


@pytest.mark.parametrize("by_name", [True, False], ids=["staged-file", "vectors-in-partitions"])
def test_list_partitioned_search_equals_the_in_memory_driver_and_resumes(tmp_path, by_name):
    """find_pairs on a run directory shuffles the rows by list through index/lists/: the same
    pairs and nearest lists as search_embeddings on the staged matrix; a run killed during the
    pair stage resumes from its finished partitions. Where the tasks can open the staged file
    by name (a local run directory) the partitions hold row ids only and the tasks read the
    vectors from it; otherwise (a remote run directory: an unlinked scratch copy, here an
    in-memory matrix) the tasks read the features files and the vectors travel in the partitions."""
    import pyarrow.parquet as pq

    from dedup.config import Config
    from dedup.phases.candidates import find_pairs, load_features

    run, ids = _run_with_features(tmp_path)
    cfg = Config.model_validate({"methods": ["embedding"], "embedding": {"threshold": 0.9}})
    fs = load_features(run, ids, True)
    ok = fs.ok()
    assert fs.embeddings is not None and not ok.all()
    if not by_name:
        fs.embeddings = np.array(fs.embeddings)
    params = IVFParams.auto(int(ok.sum()), 32, threshold=0.9)
    ref = search_embeddings(fs.embeddings, 0.9, params, valid=ok, keep_nearest=True)

    class _DiesInPairStage(ThreadMap):
        def map_units(self, fn, items, *, shared=None):
            if fn.__name__ == "unit_task":
                items = list(items)
                yield from super().map_units(fn, items[:1], shared=shared)  # one unit finishes
                raise KeyboardInterrupt  # then the run is killed
            yield from super().map_units(fn, items, shared=shared)

    with pytest.raises(KeyboardInterrupt):
        find_pairs(cfg, fs, executor=_DiesInPairStage(1), keep_lists=True, partitioned=True)
    root = Path(run.lists_dir)
    markers = sorted((root / "done").glob("*.json"))
    assert markers and (root / "key.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in markers}
    finished_units = sorted(Path(run.embedding_pairs_dir).glob("*.done"))
    assert len(finished_units) == 1
    left = sorted(root.glob("b*/t*.parquet"))  # the partitions of the units not yet run
    assert left and all(("vector" in pq.read_schema(p).names) != by_name for p in left)

    got = find_pairs(cfg, fs, keep_lists=True, partitioned=True)
    assert {p: p.stat().st_mtime_ns for p in markers} == stamps  # assignment not redone
    assert got.info["ivf_search"]["method"] == "ivf" and got.info["ivf_search"]["units"] >= 1
    sid = fs.table["sample_id"].to_numpy(zero_copy_only=False)
    emb = got.table.to_pydict()
    assert set(zip(emb["a"], emb["b"])) == set(zip(sid[ref.pairs.i], sid[ref.pairs.j])) and len(ref.pairs) > 20
    assert got.lists is not None and ref.lists is not None
    from dedup.phases.lists import NearestFiles

    # the partitioned search leaves its nearest lists in its task files: the same lists, and the
    # outlier score's plan built from the files equals the plan from the in-memory lists
    assert isinstance(got.lists, NearestFiles) and isinstance(ref.lists, NearestLists)
    loaded = got.lists.load()
    assert np.array_equal(loaded.assign, ref.lists.assign) and np.array_equal(loaded.nearest, ref.lists.nearest)
    from dedup.compute.search.knn import OUTLIER_NPROBE, _plan_from_lists

    idx = np.flatnonzero(ok)
    a, b = _plan_from_lists(got.lists, idx, fs.n, OUTLIER_NPROBE), _plan_from_lists(ref.lists, idx, fs.n, OUTLIER_NPROBE)
    assert a is not None and b is not None
    for name in ("assign", "member_rows", "member_offsets", "visitor_rows", "visitor_offsets"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert len(a.visitor_rows) > fs.n  # rows visit lists


def test_a_bucket_larger_than_unit_rows_is_searched_a_group_of_lists_at_a_time(tmp_path, monkeypatch):
    """The buckets are sized before the rows are assigned, from the visits of the quantizer's
    training rows (fewer than the other rows make), so a bucket can hold several times
    unit_rows entries: its unit then reads and searches its lists a group of ~unit_rows
    entries at a time (vectors from the staged file), with the same pairs as one group."""
    import dataclasses

    from dedup.config import Config
    from dedup.phases import lists
    from dedup.phases.candidates import find_pairs, load_features

    run, ids = _run_with_features(tmp_path)
    cfg = Config.model_validate({"methods": ["embedding"], "embedding": {"threshold": 0.9}})
    fs = load_features(run, ids, True)
    ok = fs.ok()
    ref = search_embeddings(fs.embeddings, 0.9, IVFParams.auto(int(ok.sum()), 32, threshold=0.9), valid=ok)
    groups: list[tuple[int, int, int]] = []
    real = lists._group_pairs

    def counting(shared, row, rel, mem, lo, g0, g1, **kw):
        groups.append((lo, g0, g1))
        return real(shared, row, rel, mem, lo, g0, g1, **kw)

    monkeypatch.setattr(lists, "_group_pairs", counting)

    class _SmallGroups(ThreadMap):  # the units see unit_rows a tenth of the one the buckets were sized by
        def map_units(self, fn, items, *, shared=None):
            if fn.__name__ == "unit_task":
                shared = dataclasses.replace(shared, params=dataclasses.replace(shared.params, unit_rows=300))
            yield from super().map_units(fn, items, shared=shared)

    got = find_pairs(cfg, fs, executor=_SmallGroups(2), partitioned=True)
    units = {lo for lo, _, _ in groups}
    assert len(groups) > 2 * len(units)  # the buckets were searched in several groups each
    for lo in units:  # each bucket's groups cover its lists once, in order
        spans = sorted((g0, g1) for b, g0, g1 in groups if b == lo)
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sid = fs.table["sample_id"].to_numpy(zero_copy_only=False)
    emb = got.table.to_pydict()
    assert set(zip(emb["a"], emb["b"])) == set(zip(sid[ref.pairs.i], sid[ref.pairs.j])) and len(ref.pairs) > 20
    import shutil

    shutil.rmtree(run.lists_dir)  # not a resume: the same search again, one group a bucket
    shutil.rmtree(run.embedding_pairs_dir)
    groups.clear()
    whole = find_pairs(cfg, fs, executor=ThreadMap(2), partitioned=True)
    assert len(groups) == len({lo for lo, _, _ in groups})
    assert whole.table.equals(got.table)


def test_small_local_runs_search_in_memory_and_ray_or_large_ones_partition(tmp_path):
    """The gate between the two drivers: a local run below PARTITION_ROWS writes no list
    partitions (and finds the same pairs); a cluster executor or a large run partitions."""
    from dedup.config import Config
    from dedup.phases import lists
    from dedup.phases.candidates import find_pairs, load_features

    run, ids = _run_with_features(tmp_path)
    cfg = Config.model_validate({"methods": ["embedding"], "embedding": {"threshold": 0.9}})
    fs = load_features(run, ids, True)
    n_valid = int(fs.ok().sum())
    assert not lists.use_partitions(n_valid, on_cluster=False) and lists.use_partitions(n_valid, on_cluster=True)
    assert lists.use_partitions(lists.PARTITION_ROWS, on_cluster=False)
    mem = find_pairs(cfg, fs)
    assert not Path(run.lists_dir).exists() and not Path(run.embedding_pairs_dir).exists()
    part = find_pairs(cfg, fs, partitioned=True)
    assert Path(run.embedding_pairs_dir).exists()
    assert mem.table.equals(part.table) and mem.table.num_rows > 20


def test_staged_file_handle_pins_the_file_and_says_what_a_worker_needs(tmp_path):
    """The outlier score hands out-of-process tasks the staged embeddings by name: a worker
    that cannot open the file, or finds another file there, gets one clear error."""
    from dedup.errors import DedupError
    from dedup.phases.manifest import StagedFile

    x = _data(100, 8)
    np.save(tmp_path / "e.npy", x)
    m = np.load(tmp_path / "e.npy", mmap_mode="r")
    h = StagedFile.of(m)
    assert h is not None and StagedFile.of(np.asarray(x)) is None  # in memory: nothing to name
    assert np.array_equal(h.open(), x)
    with pytest.raises(DedupError, match="filesystem every node sees"):
        StagedFile(str(tmp_path / "gone.npy"), h.size, h.mtime_ns).open()
    with pytest.raises(DedupError, match="changed"):
        StagedFile(h.path, h.size, h.mtime_ns + 1).open()
