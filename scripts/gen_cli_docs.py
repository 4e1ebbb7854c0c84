"""Regenerate docs/cli.md from the CLI's own --help output: `python scripts/gen_cli_docs.py`.

tests/test_docs.py fails when docs/cli.md is out of date, so the reference cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    from typer.testing import CliRunner

    from dedup.cli import app

    runner = CliRunner()
    env = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    parts = [
        "# CLI reference\n",
        "Generated from `dedup --help` by `python scripts/gen_cli_docs.py`; do not edit by hand.\n",
    ]
    commands = [[]] + [[c.name or c.callback.__name__] for c in app.registered_commands]
    for cmd in commands:
        res = runner.invoke(app, [*cmd, "--help"], env=env, prog_name="dedup")
        title = "dedup " + " ".join(cmd) if cmd else "dedup"
        text = "\n".join(line.rstrip() for line in res.output.splitlines())
        parts.append(f"## `{title}`\n\n```text\n{text.strip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
