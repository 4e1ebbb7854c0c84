"""Structure rules from docs/architecture.md, checked on the source (issue #20's must-show)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dedup"
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_no_private_name_imported_across_modules():
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dedup"):
                bad += [f"{path.relative_to(PKG.parent)}: from {node.module} import {a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                # `module._name` on an imported dedup module (e.g. `C._plan`) is the same reach-in
                if isinstance(node.value, ast.Name) and node.value.id in {"C", "candidates", "search"}:
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(PKG.parent)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"

