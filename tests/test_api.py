"""The Python API, through exactly the example the README shows."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = [b for b in blocks if "dedup.run(" in b]
    assert example, "README has no Python API example"
    return example[0]


def test_readme_python_example_runs(synth_shards, tmp_path, monkeypatch, capsys):
    shards, truth = synth_shards
    shutil.copytree(shards, tmp_path / "shards")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    run = scope["run"]
    assert run.exit_code == 0
    assert f"{run.stats['duplicates']} duplicates among {len(truth.samples)} samples" in capsys.readouterr().out
    kept = scope["kept"]
    assert kept.num_rows == run.stats["kept"] and all(kept["is_keeper"].to_pylist())
    assert sorted((tmp_path / "clean").glob("*.tar")) and len(run.kept_ids()) == kept.num_rows


def test_api_errors_are_config_errors(tmp_path):
    import dedup
    from dedup.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        dedup.open_run(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no such shard"):
        dedup.run(str(tmp_path / "missing.tar"), str(tmp_path / "r"), methods="exact")


def test_api_run_refuses_contradictory_arguments(tmp_path):
    import dedup
    from dedup.config import load_config
    from dedup.errors import ConfigError

    with pytest.raises(ConfigError, match="the Config holds them all"):
        dedup.run(str(tmp_path / "x.tar"), str(tmp_path / "r"), config=load_config(None, None), methods="exact")
    with pytest.raises(ConfigError, match="merge needs against"):
        dedup.run(str(tmp_path / "x.tar"), str(tmp_path / "r"), methods="exact", merge=True)
    assert not (tmp_path / "r").exists()


def test_api_check_guards_its_out_dir_as_the_cli_does(tmp_path):
    """dedup.check writes nowhere the CLI would refuse: not into a directory of other files,
    not inside the queries; --max-regions below 1 is refused; nothing is written."""
    import dedup
    from dedup.errors import ConfigError

    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "a.jpg").write_bytes(b"not read")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no `dedup check` wrote"):
        dedup.check(str(queries), str(tmp_path / "run"), str(busy))
    with pytest.raises(ConfigError, match="choose a location outside the inputs"):
        dedup.check(str(queries), str(tmp_path / "run"), str(queries / "out"))
    with pytest.raises(ConfigError, match="--max-regions 0: must be at least 1"):
        dedup.check_result(str(queries), str(tmp_path / "run"), str(tmp_path / "out"), max_regions=0)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"] and not (queries / "out").exists()
    assert not (tmp_path / "out").exists()
