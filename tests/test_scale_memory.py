"""The driver's memory at scale (issue #18): the staged embeddings' pages released as they are
read, the sha256 column compared without a Python object a row, the manifest formatted and
written a row group at a time — each giving the same values as before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.compute.search import kernels
from dedup.config import load_config
from dedup.io.rundir import RunDir


def _mapping_rss_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not line.startswith(("Rss", "Size")) and ":" not in head[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise")
def test_rows_f32_reads_a_large_memmap_without_keeping_its_pages(tmp_path, monkeypatch):
    path = str(tmp_path / "x.npy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 512)).astype(np.float16)
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    monkeypatch.setattr(kernels, "RELEASE_BYTES", 1 << 20)
    monkeypatch.setattr(kernels, "MAPPED_MAX", 0)
    rows = rng.permutation(4096)
    got = np.concatenate([kernels.rows_f32(mm, np.sort(rows[s:s + 256])) for s in range(0, 4096, 256)])
    want = np.concatenate([x[np.sort(rows[s:s + 256])].astype(np.float32) for s in range(0, 4096, 256)])
    assert np.array_equal(got, want)  # the same values, read from the file
    assert _mapping_rss_kb(path) == 0  # index arrays: nothing mapped
    # any order, repeats, negative indices, runs of consecutive rows; a view of the memmap
    idx = np.array([5, 6, 7, 3, 3, -1, 4095, 0, 1, 2])
    assert np.array_equal(kernels.take_rows(mm, idx), x[idx])
    assert np.array_equal(kernels.take_rows(mm[100:300], np.array([0, 7, 199])), x[100:300][[0, 7, 199]])
    assert np.array_equal(kernels.take_rows(mm, np.array([], np.int64)), x[:0])
    # a plain ndarray on the memmap (the in-memory search gets np.asarray of it): read from the file too
    assert np.array_equal(kernels.rows_f32(np.asarray(mm), rows[:300]), x[rows[:300]].astype(np.float32))
    assert _mapping_rss_kb(path) == 0
    with pytest.raises(IndexError):
        kernels.take_rows(mm, np.array([4096]))
    got = np.concatenate([kernels.rows_f32(mm, slice(s, s + 512)) for s in range(0, 4096, 512)])
    assert np.array_equal(got, x.astype(np.float32))
    # slices through the mapping: 4 MB were read; at most ~RELEASE_BYTES (+ one read) stay mapped
    assert _mapping_rss_kb(path) <= 2 * 1024 + 512
    kernels.drop_pages(mm)
    assert _mapping_rss_kb(path) == 0
    assert np.array_equal(kernels.rows_f32(mm, slice(0, 4096)), x.astype(np.float32))
    kernels.drop_pages(x)  # not a mapping: nothing happens


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n // 3 + 1, 32), dtype=np.uint8)
    sha = [bytes(base[k]) for k in rng.integers(0, len(base), n)]
    for k in rng.choice(n, n // 10, replace=False):
        sha[k] = None
    status = np.where(rng.random(n) < 0.15, "decode_error", "ok")
    return pa.table({
        "sample_id": [f"s/{k:05d}" for k in range(n)], "shard_id": ["s"] * n, "key": [f"{k:05d}" for k in range(n)],
        "status": status.tolist(), "error": [None] * n,
        "width": pa.array(rng.integers(50, 60, n), pa.int32()), "height": pa.array(np.full(n, 100), pa.int32()),
        "file_size": pa.array(rng.integers(1, 5, n), pa.int64()), "sha256": pa.array(sha, pa.binary(32)),
        "phash": pa.array(rng.integers(0, 1 << 62, n), pa.uint64()), "dhash": pa.array(rng.integers(0, 1 << 62, n), pa.uint64()),
        "content_fraction": pa.array(rng.random(n).astype(np.float32)),
    })


def test_copy_counts_and_sha_digests_match_the_row_by_row_count(monkeypatch):
    from dedup.phases import digests
    from dedup.phases.digests import copy_counts, sha_prefixes, sha_rows
    from dedup.phases.manifest import keeper_rank

    t = _table(500)
    sha, ok = t["sha256"].to_pylist(), [s == "ok" for s in t["status"].to_pylist()]
    count: dict = {}
    for h, good in zip(sha, ok):
        if good and h is not None:
            count[h] = count.get(h, 0) + 1
    want = [count.get(h, 1) if h is not None else 1 for h in sha]
    assert copy_counts(t).tolist() == want
    # some rows' counts alone, the table scanned a few rows at a time: the same values
    monkeypatch.setattr(digests, "COPY_SCAN_ROWS", 64)
    for rows in (np.arange(t.num_rows)[::3], np.flatnonzero([h is not None for h in sha])[:40], np.array([3]),
                 np.zeros(0, np.int64)):
        assert copy_counts(t, rows=rows).tolist() == [want[r] for r in rows]
    prefix, known = sha_prefixes(t)
    assert known.tolist() == [h is not None for h in sha]
    assert prefix.tolist() == [int.from_bytes(h[:8], "little") if h is not None else 0 for h in sha]
    rows = np.arange(t.num_rows)[::3]
    assert [bytes(d) if sha[r] is not None else None for r, d in zip(rows, sha_rows(t, rows))] == [sha[r] for r in rows]
    # another binary type (a hand-made table): the same keys
    t2 = t.set_column(t.schema.get_field_index("sha256"), "sha256", t["sha256"].cast(pa.binary()))
    assert copy_counts(t2).tolist() == want
    assert copy_counts(t2, rows=np.arange(0, t.num_rows, 5)).tolist() == want[::5]
    cfg = load_config(None, None, **{"clusters.keeper_policy": ["-copies", "sample_id"]})
    assert keeper_rank(cfg, t).tolist() == keeper_rank(cfg, t2).tolist()


def _pairs(t: pa.Table, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = t.num_rows
    ids = t["sample_id"].to_pylist()
    rows = []
    for _ in range(n):
        a, b = sorted(rng.choice(n, 2, replace=False))
        m = ["exact", "phash", "dhash", "embedding"][int(rng.integers(0, 4))]
        rows.append((ids[a], ids[b], m, float(rng.random())))
    return pa.table({"a": [r[0] for r in rows], "b": [r[1] for r in rows], "method": [r[2] for r in rows],
                     "score": pa.array([r[3] for r in rows], pa.float32())})


@pytest.mark.parametrize("grouping", ["components", "keeper"])
def test_manifest_written_in_chunks_is_the_same_manifest(tmp_path, grouping):
    from dedup.phases.manifest import build_manifest, cluster_manifest, write_manifest

    t = _table(700)
    pairs = _pairs(t)
    emb = np.random.default_rng(2).standard_normal((t.num_rows, 16)).astype(np.float16)
    outlier = np.random.default_rng(3).random(t.num_rows).astype(np.float32)
    outlier[::7] = np.nan
    cfg = load_config(None, None, **{"clusters.grouping": grouping})
    whole, stats = build_manifest(cfg, t, pairs, outlier=outlier, embeddings=emb, threshold=0.5)
    rows, stats2 = cluster_manifest(cfg, t, pairs, outlier=outlier, embeddings=emb, threshold=0.5)
    assert stats == stats2
    assert pa.concat_tables(list(rows.chunks(rows=64))).equals(whole)
    assert whole.num_rows == t.num_rows and set(whole["dup_method"].to_pylist()) - {None} <= {"exact", "phash", "dhash", "embedding"}
    a, b = RunDir(str(tmp_path / "a")), RunDir(str(tmp_path / "b"))
    wa = write_manifest(a, cfg, whole, failed_shards=False)
    wb = write_manifest(b, cfg, rows, failed_shards=False)
    assert wa.stats() == wb.stats() and wb.table is None
    ta, tb = pq.read_table(a.manifest), pq.read_table(b.manifest)
    assert ta.equals(tb) and ta.schema.metadata == tb.schema.metadata
    assert pq.ParquetFile(b.manifest).metadata.num_row_groups == 1  # 700 rows < CHUNK_ROWS


def test_manifest_of_no_rows(tmp_path):
    from dedup.phases.manifest import build_manifest, cluster_manifest, write_manifest

    t = _table(10).slice(0, 0)
    cfg = load_config(None, None)
    whole, stats = build_manifest(cfg, t, _pairs(_table(10)).slice(0, 0))
    rows, _ = cluster_manifest(cfg, t, _pairs(_table(10)).slice(0, 0))
    run = RunDir(str(tmp_path / "r"))
    write_manifest(run, cfg, rows, failed_shards=False)
    assert pq.read_table(run.manifest).num_rows == 0 == whole.num_rows and stats["samples"] == 0


@pytest.mark.parametrize("grouping,keep", [("components", 1), ("keeper", 1), ("components", 2)])
def test_clusters_of_the_touched_rows_equal_clusters_over_every_row(grouping, keep):
    """cluster_manifest clusters only the rows some link between ok rows touches, renumbered
    in row order (t-sized arrays), and the rank of those rows only: every row's keeper, method,
    score, size and keeper flag must equal clustering over all n rows with every row's rank,
    and the pairs' rows given directly must equal looking them up by sample_id."""
    from dedup.compute.clusters import group_clusters, keeper_clusters
    from dedup.phases import manifest as M

    t = _table(900, seed=4)
    pairs = _pairs(t.slice(0, 600), seed=5)  # rows 600.. untouched by any link
    emb = np.random.default_rng(6).standard_normal((t.num_rows, 16)).astype(np.float16)
    cfg = load_config(None, None, **{"clusters.grouping": grouping, "clusters.keep_per_cluster": keep,
                                     "clusters.verify_min_size": 4,
                                     "clusters.keeper_policy": ["-copies", "-pixels", "sample_id"]})
    ok = M.status_mask(t["status"], M.Status.OK)
    edges = M._edges(cfg, t, pairs)
    rank = M.keeper_rank(cfg, t)

    def dense(e):
        if grouping == "keeper":
            return keeper_clusters(t.num_rows, e, rank, valid=ok, keep_per_cluster=keep)
        centrality, joins = M._grouping_checks(cfg, t, emb, 0.5)
        return group_clusters(t.num_rows, e, rank, valid=ok, keep_per_cluster=keep, centrality=centrality,
                              joins=joins, tolerance=cfg.clusters.central_tolerance or 0.0)

    want = dense(edges)
    if (want.size >= 4).any():
        want = dense(M._verified(edges, want.size >= 4))
    ids = {s: k for k, s in enumerate(t["sample_id"].to_pylist())}
    given = (np.array([ids[a] for a in pairs["a"].to_pylist()]), np.array([ids[b] for b in pairs["b"].to_pylist()]))
    for rows in (None, given):
        got, _ = M.cluster_manifest(cfg, t, pairs, embeddings=emb, threshold=0.5, rows=rows)
        touched = got.clusters.rows
        assert 0 < len(touched) < ok[:600].sum() + 1 and touched.max() < 600
        d = got.clusters.dense()
        for name in ("keeper", "is_keeper", "method", "size"):
            assert np.array_equal(getattr(d, name), getattr(want, name)), name
        assert np.array_equal(d.score, want.score, equal_nan=True)
        assert (want.size > 1).sum() > 50  # clusters were formed


def _ids_table(n: int) -> pa.Table:
    return pa.table({"sample_id": [f"s{i // 1000:04d}/{i:010d}" for i in range(n)],
                     "status": pa.array(["ok", "ok", "decode_error"] * (n // 3) + ["ok"] * (n % 3)).dictionary_encode(),
                     "phash": np.arange(n, dtype=np.uint64) * np.uint64(2654435761)})


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise")
def test_mapped_table_holds_the_same_rows_leaves_no_file_and_drops_its_pages(tmp_path):
    from dedup.memory import MappedTable

    n = 300_000
    table = _ids_table(n)
    m = MappedTable.of(table, str(tmp_path))
    assert m is not None
    assert list(tmp_path.iterdir()) == []  # the name is gone once mapped
    mapping = m.path + " (deleted)"
    assert _mapping_rss_kb(mapping) < m.nbytes // 1024 // 4  # nothing read yet but its layout
    assert m.table.equals(table)  # reads every page
    assert _mapping_rss_kb(mapping) >= m.nbytes // 1024 // 2
    m.drop_pages()
    assert _mapping_rss_kb(mapping) <= 64
    h = m.table["phash"].to_numpy()  # zero-copy: maps back the column's pages only
    assert (h == table["phash"].to_numpy()).all()
    assert n * 8 // 1024 // 2 <= _mapping_rss_kb(mapping) < m.nbytes // 1024 // 2
    assert m.table["sample_id"][n - 1].as_py() == f"s{(n - 1) // 1000:04d}/{n - 1:010d}"


def test_mapped_table_is_none_where_it_cannot_be_written(tmp_path, caplog):
    from dedup.memory import MappedTable

    with caplog.at_level("WARNING", logger="dedup.memory"):
        assert MappedTable.of(_ids_table(10), str(tmp_path / "no-such-dir")) is None
    assert "it stays in memory" in caplog.text and "no-such-dir" in caplog.text


def test_a_run_maps_its_table_and_leaves_no_scratch_file(tmp_path, monkeypatch):
    """finish_run moves the features table into a file mapping in the run's index/ (every run
    does: the other tests' manifests come from the mapped table); no file of it is left."""
    from dedup import memory
    from tests.tinyrun import tiny_run

    made: list = []
    init = memory.MappedTable.__init__

    def record(self, table, directory=None):
        init(self, table, directory)
        made.append((self, table.num_rows))

    monkeypatch.setattr(memory.MappedTable, "__init__", record)
    drops: list = []
    drop = memory.MappedTable.drop_pages
    monkeypatch.setattr(memory.MappedTable, "drop_pages", lambda self: (drops.append(1), drop(self))[1])
    _, run, ids = tiny_run(tmp_path)
    assert [rows for _, rows in made] == [len(ids)] == [7]
    assert len(drops) >= 3  # between the phases and after each of the clusters' reads
    assert made[0][0].path.startswith(str(run / "index") + "/")
    assert not [p for p in (run / "index").iterdir() if p.name.startswith("dedup-table-")]
    m = pq.read_table(run / "manifest.parquet").to_pylist()
    by_key = {r["sample_id"].rsplit("/", 1)[-1]: r for r in m}
    assert by_key["0004"]["is_keeper"] is False and by_key["0000"]["is_keeper"] is True  # the exact copy found
