"""Typography the reader sees (read3 #33/#34, issue 25): a range of figures, equations, sections or
layers takes an en dash ("Fig 20–22", "layers 9–17"), never a hyphen; one scientific style
(3.6×10⁻⁶, never 3.6e-06) in prose and tables."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "selfrepair"
RANGE = re.compile(r"\b(?:Figs?\.?|eq\.|§|layers?|App\. [A-Z] Fig) ?\d+(?:\.\d+)?-\d+")


def prose_strings(path: Path):
    """The string literals of a module that can reach a page: every one but the docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(getattr(n.body[0], "value", None), ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_generated_ranges_take_an_en_dash(path):
    """The old text: "App. I Fig 20-22" (chapter 6's claim, on the scorecard), "Fig 16-17"."""
    bad = [(line, m.group()) for line, text in prose_strings(path) for m in RANGE.finditer(text)]
    assert not bad, bad


TEX = re.compile(r"\$\\|\$[A-Za-z]\$|\\text\{")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_generated_prose_has_no_tex(path):
    """A chapter's computed Markdown (a notebook output) is not parsed for math: "$\\Delta_{\\text{ablate}}$"
    and "$\\sigma(z_t^L)$" printed raw on chapter 5's page (read4 #4; the tiny build's browser check found
    one of three). Computed prose writes Δ<sub>ablate</sub>, σ(z<sub>t</sub><sup>L</sup>); math belongs
    in the notebooks' Markdown cells."""
    bad = [(line, text[:60]) for line, text in prose_strings(path) if TEX.search(text)]
    assert not bad, bad


@pytest.mark.parametrize("path", sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_written_ranges_take_an_en_dash(path):
    """Notebook cells (Markdown, and code comments, which a reader sees): "App. D Fig 16-17: …"."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    bad = [m.group() for c in cells for m in RANGE.finditer("".join(c["source"]))]
    assert not bad, bad


def test_the_late_layers_range_takes_an_en_dash():
    """Chapter 1's "Of the 30 late-layer heads (layers 9-17)": the group table's layer range."""
    import numpy as np
    import pandas as pd

    from selfrepair.existence import imperfection_summary

    n = 36
    per_head = pd.DataFrame({"layer": np.repeat(np.arange(18), 2), "head": np.tile([0, 1], 18),
                             "direct_effect": np.ones(n), "delta_logit": -0.5 * np.ones(n),
                             "delta_direct_effect": -np.ones(n), "self_repair": 0.5 * np.ones(n)})
    layers = imperfection_summary(per_head)["layers"].tolist()
    assert all("-" not in x and "–" in x for x in layers), layers


def test_a_tiny_gap_prints_in_the_tables_scientific_style():
    """The introduction said "3.6e-06 logits" beside its table's "3.58×10⁻⁶" (read3 #34)."""
    import pandas as pd

    from selfrepair.chapters.intro import closure_markdown
    from selfrepair.tables import format_number

    text = closure_markdown(pd.DataFrame({"label": ["L8H0"], "eq2_gap": [3.58e-6]}))
    assert "e-0" not in text and f"**{format_number(3.58e-6)}**" in text and "3.58×10⁻⁶" in text


def test_a_size_said_in_words_of_its_sign_has_no_plus():
    """Chapter 2's frozen-norm paragraph: "Freezing removes +0.224 logits", "the norms give back
    +0.108 logits" (read3 #33): the verb says the sign, the number is a size."""
    from selfrepair.chapters.layernorm_text import said

    assert said(0.224, "removes", "adds") == "removes 0.224" and said(-0.1, "removes", "adds") == "adds 0.1"
    for path in sorted((SRC / "chapters").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(removes|give back|gives back|takes away) \{logits\(", text), path.name
