"""Where a chapter notebook shows each claim's full verdict: right after the cell that draws the
figure the chapter's ``FIGURES`` names for the claim (chart first, then the verdict).

The figure's cell is found from its label: the markdown cell holding ``(anchor)=`` opens the
figure's section (which runs to the next labelled or ``##`` heading cell); the cell drawing it is
the section's first code cell calling ``figs.``: a section that holds a verdict draws its chart
(issue 25: the figure, then the verdict; chapter 8's task once showed its verdict with no chart
above it, the overview's "the figure, then the verdict" notwithstanding). Shared by tests/test_notebooks.py (the committed notebooks
and the executed ones of the tiny book)."""

from __future__ import annotations

import re


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _opens_section(cell: dict) -> bool:
    text = _source(cell)
    return cell["cell_type"] == "markdown" and bool(re.search(r"^(\([\w-]+\)=|#{1,2} )", text, re.M))


def figure_cell(cells: list[dict], anchor: str) -> int:
    """The index of the code cell drawing the figure labelled ``anchor``."""
    start = next(i for i, c in enumerate(cells)
                 if c["cell_type"] == "markdown" and re.search(rf"^\({re.escape(anchor)}\)=", _source(c), re.M))
    section = []
    for i in range(start + 1, len(cells)):
        if _opens_section(cells[i]):
            break
        if cells[i]["cell_type"] == "code":
            section.append(i)
    drawn = [i for i in section if "figs." in _source(cells[i])]
    assert drawn, f"the section of ({anchor})= draws no chart (figs.) above its verdict"
    return drawn[0]


def verdict_source(var: str, key: str) -> str:
    """The one line of a claim's verdict cell."""
    return f'display(Markdown(chapter.verdict({var}, "{key}")))'


def is_verdict_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "chapter.verdict(" in _source(cell)


def placement(cells: list[dict], figures: dict, claims) -> dict[str, int]:
    """Where each claim with a figure goes: the index of its figure's cell, keyed by claim, in
    claim order (claims sharing a figure keep the claims' order after it)."""
    return {c.key: figure_cell(cells, figures[c.key].anchor) for c in claims if c.key in figures}
