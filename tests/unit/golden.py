"""Golden files: text an output is compared with byte for byte (tests/data/golden/).

RSTTRACE_UPDATE_GOLDEN=1 rewrites them from what the code writes now, instead of comparing: for a
change of output that is meant, reviewed in the diff of tests/data/golden/ like any other change.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from tests_paths import DATA

GOLDEN = DATA / "golden"
UPDATE = os.environ.get("RSTTRACE_UPDATE_GOLDEN") == "1"
SHOWN_DIFF_LINES = 80


def assert_golden(path: Path, text: str) -> None:
    """`text` is what `path` (under tests/data/golden/) holds, byte for byte; rewritten when updating."""
    data = text.encode()
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    if not path.exists():
        raise AssertionError(f"{path} is missing: RSTTRACE_UPDATE_GOLDEN=1 writes it")
    want = path.read_bytes()
    if data == want:
        return
    diff = list(difflib.unified_diff(want.decode(errors="replace").splitlines(), text.splitlines(),
                                     f"{path.relative_to(GOLDEN)} (golden)", "now", lineterm="", n=1))
    shown = "\n".join(diff[:SHOWN_DIFF_LINES]) + ("\n..." if len(diff) > SHOWN_DIFF_LINES else "")
    raise AssertionError(f"output differs from {path} (RSTTRACE_UPDATE_GOLDEN=1 rewrites it if the change "
                         f"is meant):\n{shown}")


def stale(directory: Path, expected: set[str]) -> list[str]:
    """Golden files in `directory` that no case writes any more (a removed subcommand, a renamed sink)."""
    return sorted(p.name for p in directory.glob("*") if p.is_file() and p.name not in expected)
