"""Student notebooks: the chapters with their exercise solutions stripped, for a course to hand out.

``selfrepair student --out DIR`` writes every chapter notebook to ``DIR`` with
- each "implement it" solution (a code cell tagged ``solution`` defining a function) replaced by a
  stub: the same signature and docstring, body ``raise NotImplementedError`` — the check cell
  under it then says "not written yet" until the student fills it in;
- each "predict" answer cell (tagged ``solution`` and ``reveal``) kept, outputs cleared, with a
  first line asking to predict before running it;
- the book's directive markup (``:::{exercise}``, ``:::{solution-start}`` ...) turned into plain
  Markdown that reads well in Jupyter, and every output cleared.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat

GATE = re.compile(r"^:::\{solution-(start|end)\}")
EXERCISE = re.compile(r":::\{exercise\}[ \t]*(?P<title>[^\n]*)\n(?::label:[^\n]*\n)?(?::class:[^\n]*\n)?"
                      r"(?P<body>.*?)\n:::", re.S)
REVEAL_NOTE = "# Write your prediction down first, then run this cell.\n"


def _source(cell) -> str:
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


def stub(source: str) -> str:
    """The first function of ``source`` with its body replaced by ``raise NotImplementedError``."""
    tree = ast.parse(source)
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fn is None:
        raise ValueError("a solution cell defines no function")
    lines = source.splitlines()
    body = fn.body[0]
    has_doc = isinstance(body, ast.Expr) and isinstance(getattr(body, "value", None), ast.Constant) \
        and isinstance(body.value.value, str)
    head_end = body.end_lineno if has_doc else fn.body[0].lineno - 1
    head = lines[fn.lineno - 1 - len(fn.decorator_list): head_end]
    indent = " " * (fn.body[0].col_offset)
    return "\n".join(head + [f"{indent}raise NotImplementedError  # your code here"])


def _plain(markdown: str) -> str:
    return EXERCISE.sub(lambda m: f"**Exercise — {m['title'].strip()}.** {m['body'].strip()}", markdown)


def student_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of chapter notebook ``nb`` with the solutions stripped (see the module docstring)."""
    out = nbformat.from_dict(nb)
    cells = []
    for cell in out.cells:
        src, tags = _source(cell), cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "markdown":
            if GATE.match(src.strip()):
                continue
            cell.source = _plain(src)
        elif cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if "solution" in tags:
                cell.source = REVEAL_NOTE + src if "reveal" in tags else stub(src)
                cell.metadata["tags"] = [t for t in tags if t != "solution"] + ["exercise"]
        cells.append(cell)
    out.cells = cells
    return out


def export(notebooks: list[Path], out: Path) -> list[Path]:
    """Write the student version of each notebook to ``out`` (created); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        target = out / path.name
        tmp = target.with_suffix(".ipynb.tmp")
        nbformat.write(student_notebook(nbformat.read(path, as_version=4)), tmp)
        tmp.replace(target)  # never a half-written notebook where a student would open it
        written.append(target)
    return written


__all__ = ["export", "student_notebook", "stub"]
