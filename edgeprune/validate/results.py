"""Results files of the scripts in scripts/: a JSON with the command that produced it, and a Markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def command_line() -> str:
    return "python " + " ".join(sys.argv)


def write_results(out: str | Path, payload: dict, markdown_lines: list[str]) -> None:
    """Write ``<out>.json`` (payload plus the command) and ``<out>.md``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command_line(), **payload}, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(markdown_lines) + "\n")
