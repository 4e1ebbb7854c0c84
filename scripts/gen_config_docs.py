"""Regenerate docs/configuration.md from the config model: `python scripts/gen_config_docs.py`.

tests/test_docs.py fails when the page is out of date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> str:
    import yaml

    from dedup.config import Config

    lines = [
        "# Configuration reference",
        "",
        "Generated from `dedup/config.py` by `python scripts/gen_config_docs.py`; do not edit by hand.",
        "",
        "Settings come from defaults, then `--config FILE` (YAML or JSON), then each `--set section.key=value`",
        "(values parsed as YAML: `--set hashes.phash_radius=6`, `--set clusters.keeper_policy=[sample_id]`),",
        "then the dedicated options (`--methods`, `--embedder`, `--workers`, `--executor`, `--ray-address`).",
        "Unknown keys and invalid values are refused with the offending key named (exit 2).",
        "`dedup config` prints the resolved configuration.",
        "",
    ]
    cfg = Config()
    top = []
    for name, field in Config.model_fields.items():
        value = getattr(cfg, name)
        if hasattr(type(value), "model_fields"):
            lines += [f"## `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
            for sub, f in type(value).model_fields.items():
                default = json.dumps(json.loads(value.model_dump_json())[sub])
                lines.append(f"| `{name}.{sub}` | `{default}` | {f.description} |")
            lines.append("")
        else:
            top.append((name, field, value))
    for name, field, value in top:
        lines[10:10] = ["| key | default | meaning |", "|---|---|---|", f"| `{name}` | `{json.dumps(list(value))}` | {field.description} |", ""]
    lines += ["## Defaults as YAML", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
