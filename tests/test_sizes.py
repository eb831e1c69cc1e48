"""Small modules with one job each: a ratchet on the sizes issue 14 brought the code to."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300  # in agent/ (the core and the shipped uplinks)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def oversized(paths: list[Path], root: Path, max_module: int, max_class: int) -> list[str]:
    """Every module over ``max_module`` lines and class over ``max_class``, as readable lines."""
    found = []
    for path in paths:
        text = path.read_text()
        lines = text.count("\n") + 1
        if lines > max_module:
            found.append(f"{path.relative_to(root)}: {lines} lines (at most {max_module}): split it by job")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > max_class:
                    found.append(f"{path.relative_to(root)}: class {node.name} is {size} lines (at most {max_class})")
    return found


def test_no_module_over_600_lines_and_no_core_class_over_300() -> None:
    assert oversized(_sources("agent"), ROOT, MAX_MODULE_LINES, MAX_CLASS_LINES) == []
    assert oversized(_sources("drivers"), ROOT, MAX_MODULE_LINES, 10**6) == []


def test_the_check_sees_a_big_class(tmp_path: Path) -> None:
    big = tmp_path / "probe.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(310))
    big.write_text(f"class Big:\n{body}\n")
    assert oversized([big], tmp_path, MAX_MODULE_LINES, MAX_CLASS_LINES) == [
        "probe.py: class Big is 311 lines (at most 300)"
    ]
    long_module = tmp_path / "long.py"
    long_module.write_text("x = 1\n" * 700)
    assert oversized([long_module], tmp_path, MAX_MODULE_LINES, MAX_CLASS_LINES) == [
        "long.py: 701 lines (at most 600): split it by job"
    ]
