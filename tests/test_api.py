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
