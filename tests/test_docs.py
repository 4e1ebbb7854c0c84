"""Docs that must match the code."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_cli_reference_matches_help():
    from gen_cli_docs import DOC, render

    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python scripts/gen_cli_docs.py`"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Run the tests\s+```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert block in [line.strip() for line in ci]


def test_ci_lints_and_type_checks_before_the_tests():
    """.ci/run installs, then runs README's lint commands, then the tests; the tools are in the
    `test` extra it installs, and pyproject.toml configures both."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    lint = re.search(r"Lint and type checks.+?```bash\n(.+?)\n```", readme, re.S).group(1).splitlines()
    assert lint == ["ruff check .", "mypy dedup"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = ci.index('python -m pip install -q -e ".[test]"')
    pos = [ci.index(cmd) for cmd in [*lint, "python -m pytest"]]
    assert install < pos[0] < pos[1] < pos[2], ci
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = " ".join(project["project"]["optional-dependencies"]["test"])
    assert "ruff>=" in extra and "mypy>=" in extra
    assert "ruff" in project["tool"] and "mypy" in project["tool"]
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    assert "entry: ruff check" in hooks and "entry: mypy dedup" in hooks


def test_every_manifest_column_is_documented():
    from dedup.schema import MANIFEST_SCHEMA

    doc = (ROOT / "docs" / "manifest.md").read_text()
    for name in MANIFEST_SCHEMA.names:
        assert f"`{name}`" in doc, name


def test_every_status_is_documented():
    from dedup.records import Status

    doc = (ROOT / "docs" / "manifest.md").read_text()
    for s in Status:
        assert f"`{s.value}`" in doc, s.value


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)\)", readme):
        assert (ROOT / target).exists(), target


def test_configuration_reference_matches_the_model():
    from gen_config_docs import DOC, render

    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `python scripts/gen_config_docs.py`"
