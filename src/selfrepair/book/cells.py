"""How the book's HTML shows each chapter's code cells: the build's rule, applied to the executed
notebooks staged for Sphinx (:func:`selfrepair.book.runner.stage_source`). The notebooks in
``book/`` are not changed, so Jupyter, Colab and Binder show every cell as written.

A reader of the HTML meets the chapter's opening, then what ran (``run_summary``), then the
argument; the code is one click away:

- papermill's injected-parameters cell (tag ``injected-parameters``) is removed (``remove-cell``):
  the provenance table at the end of the page lists the parameters that were used;
- the parameters cell (tag ``parameters``) is folded (``hide-input``, its prompt
  :data:`PARAMETERS_PROMPT`): runnable and visible in Jupyter, one click away in the book;
- the set-up cell, which the notebook itself folds (``hide-input``), keeps its fold with the prompt
  :data:`SETUP_PROMPT`;
- a **display-only** cell (:func:`display_only`: it imports and displays, and assigns, defines
  or loops over nothing — ``display(Markdown(chapter.verdict(ch, "unembed")))``, a chart call
  such as ``figs.fig_impact(ch.impact)``, a ``reveal`` answer) shows its output with its input
  folded (``hide-input``; tagged :data:`DISPLAY_ONLY` too, which book/_static/selfrepair.css sets
  as a small grey "show the code" at the right, not a full-width bar). A chart call is folded
  too: its name says no more than the chart's title, and how the chart's numbers are computed is
  in the chapter's module, not in the call.

Kept open, because a reader learns from them: the cells that compute (``ch =
chapter.measure(cfg)``, the introduction's worked example), an exercise's solution (a ``def``)
and its ``exercises.check(...)`` cell (:data:`LEARNER_CALLS`).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

HIDE_INPUT, REMOVE_CELL = "hide-input", "remove-cell"
FOLDING = {HIDE_INPUT, "hide-cell", "remove-input", REMOVE_CELL}  # Jupyter Book 1.x: a tag that folds or removes
PARAMETERS_PROMPT = "Show this chapter's parameters"  # myst-nb's per-cell code_prompt_show
SETUP_PROMPT = "Show the set-up code"  # a cell the notebook itself folds that is not display-only
DISPLAY_ONLY, CODE_PROMPT = "display-only", "show the code"  # the tag (a class the CSS sets small) and its prompt
LEARNER_CALLS = ("exercises.check",)  # calls a reader runs to learn: their cells stay open


def _called(node: ast.AST) -> str:
    """``exercises.check`` for a call of ``exercises.check(...)``; "" for anything else."""
    f = node.func if isinstance(node, ast.Call) else None
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    return ".".join([f.id, *reversed(parts)]) if isinstance(f, ast.Name) else ""


def display_only(source: str) -> bool:
    """Whether a code cell only imports and displays: every statement an import or an expression
    (a call, a name), at least one expression, none of them a :data:`LEARNER_CALLS` call. A cell
    that assigns, defines, loops, or is not plain Python (a magic) is not."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    exprs = [s for s in body if isinstance(s, ast.Expr)]
    if not exprs or any(not isinstance(s, (ast.Expr, ast.Import, ast.ImportFrom)) for s in body):
        return False
    return not any(_called(n) in LEARNER_CALLS for s in exprs for n in ast.walk(s))


def _tagged(cell: dict, tag: str, prompt: str | None = None) -> bool:
    """Add ``tag`` (and a myst-nb prompt) to ``cell``'s metadata; whether it changed."""
    meta = cell.setdefault("metadata", {})
    tags = meta.setdefault("tags", [])
    changed = tag not in tags
    if changed:
        tags.append(tag)
    if prompt and meta.get("mystnb", {}).get("code_prompt_show") != prompt:
        meta.setdefault("mystnb", {})["code_prompt_show"] = prompt
        changed = True
    return changed


def book_cells(nb: dict) -> bool:
    """Tag ``nb``'s code cells for the book's HTML as the module docstring says; whether any
    changed (a second call changes nothing)."""
    changed = False
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        tags = set(cell.get("metadata", {}).get("tags", []))
        source = "".join(cell.get("source", ""))
        if "injected-parameters" in tags:
            changed |= _tagged(cell, REMOVE_CELL)
        elif "parameters" in tags:
            changed |= _tagged(cell, HIDE_INPUT, PARAMETERS_PROMPT)
        elif not tags & (FOLDING - {HIDE_INPUT}) and display_only(source):  # provenance(...) too
            changed |= _tagged(cell, HIDE_INPUT, CODE_PROMPT)
            changed |= _tagged(cell, DISPLAY_ONLY)
        elif HIDE_INPUT in tags:  # the notebook folds it: the set-up cell (imports, cfg)
            changed |= _tagged(cell, HIDE_INPUT, SETUP_PROMPT)
    return changed


def stage_cells(path: Path) -> bool:
    """:func:`book_cells` on the notebook at ``path``, rewritten only when it changed."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    if not book_cells(nb):
        return False
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True
