"""The run-directory layout documented in docs/manifest.md is the one RunDir names."""

from __future__ import annotations

import re
from pathlib import Path

from dedup.io.rundir import RunDir

DOC = Path(__file__).resolve().parent.parent / "docs" / "manifest.md"


def _documented() -> list[str]:
    block = re.search(r"RUN_DIR/\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/manifest.md has no RUN_DIR/ layout block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def test_every_documented_run_file_is_a_rundir_path(tmp_path):
    run = RunDir(str(tmp_path))
    named = {
        getattr(run, name)[len(run.path) + 1:]
        for name in dir(RunDir)
        if isinstance(getattr(RunDir, name), property)
    }
    named |= {run.features("<shard_id>")[len(run.path) + 1:], run.done("<shard_id>")[len(run.path) + 1:]}
    missing = []
    for entry in _documented():
        entry = entry.rstrip(",")
        if entry in ("index/keepers/", "eval.json"):  # the keepers' cache (incremental.py); eval's prefix
            continue
        if entry not in named:
            missing.append(entry)
    assert not missing, f"documented in docs/manifest.md but not named by RunDir: {missing}"
    assert run.eval_prefix + ".json" == str(tmp_path / "eval.json")
    assert run.index_dir + "/keepers" == str(tmp_path / "index" / "keepers")


def test_rundir_paths_are_inside_the_run_directory(tmp_path):
    run = RunDir(str(tmp_path) + "/")
    assert run.manifest == str(tmp_path / "manifest.parquet")
    assert run.pairs == str(tmp_path / "pairs" / "pairs.parquet")
    assert run.run_json == str(tmp_path / "run.json") and run.stats == str(tmp_path / "stats.json")
    assert run.lock == str(tmp_path / ".lock") and run.done_dir == str(tmp_path / "done")
