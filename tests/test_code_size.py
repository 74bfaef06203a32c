"""The library's size limits: no module in src/ over 400 lines, no function (or method) of 80
lines or more, decorators and docstring included. A module that outgrows the limit is split by
concern into siblings that the original re-exports (``chapters/hydra.py`` with ``hydra_claims.py``
and ``hydra_text.py``); a long function into helpers."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 79  # "under 80 lines"


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """``(lines, "path:line name")`` of every function and method in ``path``, from its first
    decorator to its last line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found.append((node.end_lineno - start + 1, f"{path.relative_to(SRC)}:{node.lineno} {node.name}"))
    return found


def test_the_source_tree_is_found():
    assert len(modules()) > 50 and (SRC / "selfrepair" / "__init__.py").is_file()


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {long}"


def test_no_function_is_80_lines_or_more():
    long = sorted((n, where) for p in modules() for n, where in function_lengths(p) if n > MAX_FUNCTION_LINES)
    assert not long, f"functions of {MAX_FUNCTION_LINES + 1} lines or more (break them into helpers): {long}"
