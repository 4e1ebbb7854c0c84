"""The manifest as a directory of part files when large (issue #18 item 5): the same rows as
the one-file manifest, read the same by report / apply / check / --against, the README's
``pq.read_table(..., filters=...)`` on both forms, and a half-written directory never read as
finished."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.config import load_config
from dedup.errors import ConfigError
from dedup.io import manifests
from dedup.io.manifests import PARTS_MARKER, iter_manifest, manifest_files, read_manifest, write_manifest_data
from dedup.io.rundir import RunDir, finished_run
from dedup.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
HASHES = {"methods": ["exact", "phash", "dhash"], "run.workers": 1}


def _run(shards, out, monkeypatch=None, part_rows=None, **kw):
    if part_rows is not None:
        monkeypatch.setattr(manifests, "MANIFEST_PART_ROWS", part_rows)
    cfg = load_config(None, None, **{**HASHES, **kw})
    res = run_pipeline([str(shards)] if not isinstance(shards, list) else shards, str(out), cfg, progress=False)
    if part_rows is not None:
        monkeypatch.setattr(manifests, "MANIFEST_PART_ROWS", 1 << 21)
    return res


def _as_parts(run_dir: Path, copy: Path, part_rows: int) -> Path:
    """A copy of a finished run whose manifest is rewritten as parts of ``part_rows`` rows."""
    shutil.copytree(run_dir, copy)
    rd = RunDir(str(copy))
    t = read_manifest(rd)
    assert write_manifest_data(rd, rd.manifest, t.schema, t, t.num_rows, part_rows=part_rows) > 1
    assert (copy / "manifest.parquet").is_dir()
    return copy


@pytest.fixture(scope="module")
def two_forms(synth_shards, tmp_path_factory):
    """One hash-only run over the synthetic shards; its manifest as one file and as parts."""
    shards, _ = synth_shards
    base = tmp_path_factory.mktemp("parts")
    cfg = load_config(None, None, **HASHES)
    assert run_pipeline([str(shards)], str(base / "file"), cfg, progress=False).exit_code == 0
    return shards, base / "file", _as_parts(base / "file", base / "parts", part_rows=7)


def test_pipeline_writes_parts_equal_to_the_one_file_manifest(synth_shards, tmp_path, monkeypatch):
    shards, _ = synth_shards
    assert _run(shards, tmp_path / "file").exit_code == 0
    assert _run(shards, tmp_path / "dir", monkeypatch, part_rows=5).exit_code == 0
    f, d = tmp_path / "file" / "manifest.parquet", tmp_path / "dir" / "manifest.parquet"
    assert f.is_file() and d.is_dir()
    one = pq.ParquetFile(f).read()
    marker = json.loads((d / PARTS_MARKER).read_text())
    assert marker["rows"] == one.num_rows and all(p["rows"] == 5 for p in marker["parts"][:-1])
    assert sorted(os.listdir(d)) == sorted([PARTS_MARKER, *(p["file"] for p in marker["parts"])])
    parts = [pq.ParquetFile(d / p["file"]).read() for p in marker["parts"]]
    assert len(parts) == -(-one.num_rows // 5) > 2
    for p in parts:  # every part: the manifest schema and the run's metadata
        assert p.schema.equals(one.schema, check_metadata=True)
    # row by row, in order, with the metadata
    both = pa.concat_tables(parts)
    assert both.equals(one) and read_manifest(RunDir(str(tmp_path / "dir"))).equals(one)
    assert read_manifest(RunDir(str(tmp_path / "dir"))).schema.metadata == one.schema.metadata
    assert pq.read_table(d).sort_by("sample_id").equals(one.sort_by("sample_id"))
    # nothing left behind, and the stats say the same
    assert not [n for n in os.listdir(tmp_path / "dir") if n.startswith(".tmp-")]
    sf, sd = (json.loads((tmp_path / x / "stats.json").read_text()) for x in ("file", "dir"))
    assert {k: v for k, v in sf.items() if k not in ("timings", "finished_at", "candidate_timings")} == \
        {k: v for k, v in sd.items() if k not in ("timings", "finished_at", "candidate_timings")}


def test_readme_snippet_reads_both_forms(two_forms):
    _, file_run, parts_run = two_forms
    kept = {}
    for run in (file_run, parts_run):
        # README.md, literally
        m = pq.read_table(f"{run}/manifest.parquet", filters=[("is_keeper", "=", True)])
        kept[run] = m.sort_by("sample_id")
        assert m.num_rows and all(m["is_keeper"].to_pylist())
    assert kept[file_run].equals(kept[parts_run])
    assert (parts_run / "manifest.parquet").is_dir()
    # the API's filter and the reader's filter give the same rows
    from dedup.api import Run

    a = Run(str(file_run)).manifest(["sample_id"], filters=[("is_keeper", "=", True)])
    b = Run(str(parts_run)).manifest(["sample_id"], filters=[("is_keeper", "=", True)])
    assert a.equals(b) and a.num_rows == kept[file_run].num_rows


def test_report_apply_and_check_agree_on_both_forms(two_forms, tmp_path):
    from dedup.phases.apply import keep_set, write_keep_list
    from dedup.phases.check import check
    from dedup.report import build_report

    shards, file_run, parts_run = two_forms
    html = {r: build_report(str(r)).replace(str(r), "RUN") for r in (file_run, parts_run)}
    assert html[file_run] == html[parts_run]
    assert 'class="cluster"' in html[file_run]  # there are clusters to show
    assert keep_set(RunDir(str(file_run))) == keep_set(RunDir(str(parts_run)))
    lists = [tmp_path / "file.txt", tmp_path / "parts.txt"]
    for run, out in zip((file_run, parts_run), lists):
        write_keep_list(str(run), str(out))
    assert lists[0].read_text() == lists[1].read_text() and lists[0].read_text().count("\n") > 5
    queries = sorted(str(p) for p in shards.glob("*.tar"))[:1]
    got = []
    for run in (file_run, parts_run):
        res = check(queries, str(run), str(tmp_path / ("check-" + run.name)), regions=False, record=False)
        t = pq.read_table(tmp_path / ("check-" + run.name) / "check.parquet")
        got.append((res["flagged"], t.drop_columns([c for c in t.column_names if "seconds" in c])))
    assert got[0][0] == got[1][0] > 0 and got[0][1].equals(got[1][1])


def test_against_and_merge_on_both_forms(synth_shards, tmp_path, monkeypatch):
    shards, _ = synth_shards
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    kw = {"clusters.keeper_policy": ["sample_id"], "clusters.grouping": "keeper"}
    assert _run(tars[:2], tmp_path / "day1", **kw).exit_code == 0
    _as_parts(tmp_path / "day1", tmp_path / "day1p", part_rows=4)
    cfg = load_config(None, None, **{**HASHES, **kw})
    a = run_pipeline(tars[2:], str(tmp_path / "a"), cfg, progress=False, against=str(tmp_path / "day1"), merge=True)
    monkeypatch.setattr(manifests, "MANIFEST_PART_ROWS", 6)  # the merged manifest is written in parts too
    b = run_pipeline(tars[2:], str(tmp_path / "b"), cfg, progress=False, against=str(tmp_path / "day1p"), merge=True)
    assert a.exit_code == b.exit_code == 0
    drop = ("timings", "finished_at", "against")
    assert {k: v for k, v in a.stats.items() if k not in drop} == {k: v for k, v in b.stats.items() if k not in drop}
    assert a.stats["duplicates_of_previous"] > 0
    ra, rb = RunDir(str(tmp_path / "a")), RunDir(str(tmp_path / "b"))
    da, db = read_manifest(ra), read_manifest(rb)
    assert da.equals(db) and da.num_rows
    ma, mb = read_manifest(ra, path=ra.merged_manifest), read_manifest(rb, path=rb.merged_manifest)
    assert (tmp_path / "a" / "merged_manifest.parquet").is_file()
    assert (tmp_path / "b" / "merged_manifest.parquet" / PARTS_MARKER).is_file()
    assert len(manifest_files(rb, rb.merged_manifest)) == -(-mb.num_rows // 6)
    assert ma.num_rows == mb.num_rows > da.num_rows
    assert ma.equals(mb)
    assert ma.schema.metadata[b"against"] != mb.schema.metadata[b"against"]  # each names its previous run
    assert ma.column("cluster_size").equals(mb.column("cluster_size"))


def test_unfinished_directory_is_refused(two_forms, tmp_path):
    from dedup.phases.apply import keep_set
    from dedup.report import build_report

    _, _, parts_run = two_forms
    broken = tmp_path / "broken"
    shutil.copytree(parts_run, broken)
    (broken / "manifest.parquet" / PARTS_MARKER).unlink()
    rd = RunDir(str(broken))
    for read in (lambda: finished_run(str(broken)), lambda: list(iter_manifest(rd)), lambda: keep_set(rd),
                 lambda: build_report(str(broken))):
        with pytest.raises(ConfigError, match="unfinished manifest directory"):
            read()
    r = subprocess.run([sys.executable, "-m", "dedup.cli", "report", str(broken)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "unfinished manifest directory" in r.stderr
    assert not (broken / "report.html").exists()


_KILLED = """
import sys
from dedup.io import manifests
manifests.MANIFEST_PART_ROWS = 5
from dedup.config import load_config
from dedup.runner import run_pipeline
cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
run_pipeline([sys.argv[1]], sys.argv[2], cfg, progress=False)
"""


@pytest.mark.parametrize("point", ["write:manifest.parquet/part-00001.parquet", "write:manifest.parquet"])
def test_killed_part_write_leaves_no_manifest_and_reruns_cleanly(synth_shards, tmp_path, monkeypatch, point):
    shards, _ = synth_shards
    out = tmp_path / "run"
    assert _run(shards, out).exit_code == 0  # an earlier manifest (one file), to be replaced
    before = pq.ParquetFile(out / "manifest.parquet").read()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEDUP_CRASH_AT": point}
    r = subprocess.run([sys.executable, "-c", _KILLED, str(shards), str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    # killed before the directory was published: the old file is still the manifest, the parts
    # lie under a temp name that the next run removes; never a half-written manifest.parquet/
    assert (out / "manifest.parquet").is_file()
    assert pq.ParquetFile(out / "manifest.parquet").read().equals(before)
    tmp = [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert len(tmp) == 1 and (out / tmp[0]).is_dir()
    assert _run(shards, out, monkeypatch, part_rows=5).exit_code == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert (out / "manifest.parquet" / PARTS_MARKER).exists()
    assert read_manifest(RunDir(str(out))).equals(before)
    # and back to one file: the directory is replaced cleanly
    assert _run(shards, out).exit_code == 0
    assert (out / "manifest.parquet").is_file() and pq.ParquetFile(out / "manifest.parquet").read().equals(before)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_object_store_form_marker_last_and_replaced(tmp_path):
    """On an object store (fsspec memory://): parts written in place, the marker last; a
    directory without it is refused; file and directory replace each other."""
    import fsspec

    from dedup.schema import MANIFEST_SCHEMA

    fs = fsspec.filesystem("memory")
    rd = RunDir("memory://parts-test/run")
    rows = [{"sample_id": f"s/{k:03d}", "shard_id": "s", "key": f"{k:03d}", "status": "ok", "cluster_id": f"s/{k - k % 3:03d}",
             "cluster_size": 3, "is_keeper": k % 3 == 0, "reason": "r"} for k in range(20)]
    t = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    assert write_manifest_data(rd, rd.manifest, t.schema, t, t.num_rows) == 0
    assert fs.isfile("/parts-test/run/manifest.parquet")
    assert write_manifest_data(rd, rd.manifest, t.schema, t, t.num_rows, part_rows=6) == 4
    assert fs.isdir("/parts-test/run/manifest.parquet")
    assert read_manifest(rd).equals(t)
    kept = read_manifest(rd, ["sample_id"], [("is_keeper", "=", True)])
    assert kept["sample_id"].to_pylist() == [f"s/{k:03d}" for k in range(0, 20, 3)]
    assert manifests.manifest_rows(rd) == 20 and manifests.manifest_complete(rd)
    ds = manifests.manifest_dataset(rd)
    assert ds.to_table(filter=pa.compute.field("is_keeper")).num_rows == 7
    fs.rm("/parts-test/run/manifest.parquet/" + PARTS_MARKER)
    assert not manifests.manifest_complete(rd)
    with pytest.raises(ConfigError, match="unfinished"):
        read_manifest(rd)
    assert write_manifest_data(rd, rd.manifest, t.schema, t, t.num_rows) == 0
    assert fs.isfile("/parts-test/run/manifest.parquet") and read_manifest(rd).equals(t)
    fs.rm("/parts-test", recursive=True)


def test_streamed_merge_equals_the_whole_table_merge(tmp_path, monkeypatch):
    """--merge above the threshold (previous manifest streamed a few rows at a time, delta
    rows interleaved between its batches) writes the same rows as the whole-table merge."""
    from dedup.phases.incremental import write_merged
    from dedup.schema import MANIFEST_SCHEMA

    def table(ks, md):
        rows = [{"sample_id": f"s/{k:03d}", "shard_id": "s", "key": f"{k:03d}", "status": "ok",
                 "cluster_id": None if k % 7 == 0 else f"s/{k - k % 5:03d}", "cluster_size": 1, "is_keeper": k % 5 == 0,
                 "reason": "r"} for k in ks]
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA.with_metadata(md))

    prev = RunDir(str(tmp_path / "prev"))
    p = table(range(0, 60, 2), {b"config_hash": b"p"})
    write_manifest_data(prev, prev.manifest, p.schema, p, p.num_rows, part_rows=8)
    delta = table([*range(1, 40, 2), 71, 73], {b"config_hash": b"d", b"against": b"prev"})
    whole, streamed = RunDir(str(tmp_path / "whole")), RunDir(str(tmp_path / "streamed"))
    write_merged(whole, prev, delta)
    monkeypatch.setattr(manifests, "MANIFEST_PART_ROWS", 9)
    monkeypatch.setattr(manifests, "BATCH_ROWS", 4)  # several previous batches, delta rows between them
    write_merged(streamed, prev, delta)
    a, b = pq.ParquetFile(whole.merged_manifest).read(), read_manifest(streamed, path=streamed.merged_manifest)
    assert (tmp_path / "streamed" / "merged_manifest.parquet" / PARTS_MARKER).exists()
    assert a.num_rows == 52 and a["sample_id"].to_pylist() == sorted(a["sample_id"].to_pylist())
    assert b.equals(a) and b.schema.metadata == a.schema.metadata == delta.schema.metadata
    assert a["cluster_size"].to_pylist() != [1] * 52  # sizes were counted again over both
