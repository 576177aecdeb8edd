"""docs/reliability.md's table lists exactly the tests of this folder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "reliability.md"


def _tests_in_folder() -> set[str]:
    names = set()
    for path in HERE.glob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(f"{path.name}::{node.name}")
    return names


def test_docs_table_lists_every_test():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and "::" in line]
    named = {m.group(1) for row in rows for m in re.finditer(r"`(test_\w+\.py::test_\w+)(?:\[[^\]]*\])?`", row)}
    tests = _tests_in_folder()
    assert tests - named == set(), f"tests missing from {DOC.name}: {sorted(tests - named)}"
    assert named - tests == set(), f"{DOC.name} names tests that do not exist: {sorted(named - tests)}"
    for row in rows:
        assert "| pass" in row or "| xfail" in row, f"row without an outcome: {row}"
