"""The build's rule for how the book's HTML shows code cells (selfrepair.book.cells, applied by
``stage_source``): papermill's injected parameters removed, the parameters cell folded, every
display-only cell's input folded (read3 #8, #17: "What ran here" sat ~1,500 px down every chapter,
and a code cell before every verdict); the cells a reader learns from kept open. The committed
notebooks are not changed (Jupyter and Colab show every cell)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from selfrepair.book.cells import (CODE_PROMPT, DISPLAY_ONLY, HIDE_INPUT, PARAMETERS_PROMPT, REMOVE_CELL,
                                   SETUP_PROMPT, book_cells, display_only)
from selfrepair.book.runner import stage_source
from verdict_cells import is_verdict_cell

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _executed(path: Path) -> dict:
    """The notebook as papermill leaves it: its injected-parameters cell after the parameters."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    i = next(i for i, c in enumerate(nb["cells"]) if "parameters" in _tags(c))
    nb["cells"].insert(i + 1, {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
                               "source": '# Parameters\ncache_dir = "results"\n', "outputs": [],
                               "execution_count": None})
    return nb


@pytest.mark.parametrize("source, shown", [
    ('display(Markdown(chapter.verdict(ch, "unembed")))', False),
    ("figs.fig_impact(ch.impact)", False),
    ("from selfrepair.setting import run_summary\n\ndisplay(Markdown(run_summary(cfg)))", False),
    ("from selfrepair.exercises import reveal\n\ndisplay(Markdown(reveal.noise(ex)))", False),
    ("ch = chapter.measure(cfg)\ndisplay(Markdown(chapter.on_this_model(ch)))", True),
    ("from selfrepair import exercises\n\nexercises.check('self_repair', self_repair)", True),
    ("def f(x):\n    return x", True),
    ("from selfrepair import exercises", True),  # imports only: nothing displayed
    ("%time figs.fig_impact(ch.impact)", True),  # not plain Python
])
def test_display_only_is_a_cell_that_only_imports_and_displays(source, shown):
    assert display_only(source) is not shown


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_book_folds_display_code_and_parameters_and_keeps_what_a_reader_learns_from(path):
    nb = _executed(path)
    before = copy.deepcopy(nb)
    assert book_cells(nb) and not book_cells(nb)  # changes once, then nothing
    code = [(a, b) for a, b in zip(before["cells"], nb["cells"]) if b["cell_type"] == "code"]
    for old, cell in code:
        src, tags = _source(cell), _tags(cell)
        if "injected-parameters" in tags:
            assert REMOVE_CELL in tags
        elif "parameters" in tags:
            assert HIDE_INPUT in tags and cell["metadata"]["mystnb"]["code_prompt_show"] == PARAMETERS_PROMPT
        elif is_verdict_cell(cell) or "run_summary(cfg)" in src or src.startswith(("figs.fig_", "display(figs.")):
            assert {HIDE_INPUT, DISPLAY_ONLY} <= tags, (path.stem, src[:60])
            assert cell["metadata"]["mystnb"]["code_prompt_show"] == CODE_PROMPT
        elif "cfg = chapter.Config.from_params(" in src:  # the set-up cell, folded by the notebook
            assert cell["metadata"]["mystnb"]["code_prompt_show"] == SETUP_PROMPT and HIDE_INPUT in tags
        elif "exercises.check(" in src or src.lstrip().startswith("def ") or ".measure(cfg)" in src:
            assert _tags(old) == tags and not tags & {HIDE_INPUT, REMOVE_CELL}, (path.stem, src[:60])
        assert _source(old) == src and cell.get("outputs") == old.get("outputs")  # only tags change


def test_stage_source_applies_the_rule_to_the_executed_notebooks(tmp_path):
    """The staged (executed) notebook gets the tags; the committed one is untouched."""
    root, src = tmp_path / "root", tmp_path / "out" / "src"
    (root / "book" / "_static").mkdir(parents=True)
    shutil.copy2(ROOT / "_config.yml", root / "_config.yml")
    (root / "book" / "references.bib").write_text("")
    (root / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "book/05_hydra"}))
    committed = (ROOT / "book" / "05_hydra.ipynb").read_text(encoding="utf-8")
    (root / "book" / "05_hydra.ipynb").write_text(committed, encoding="utf-8")
    (src / "book").mkdir(parents=True)
    (src / "book" / "05_hydra.ipynb").write_text(json.dumps(_executed(ROOT / "book" / "05_hydra.ipynb")))
    stage_source(root, src, charts=tmp_path / "charts")
    cells = json.loads((src / "book" / "05_hydra.ipynb").read_text(encoding="utf-8"))["cells"]
    assert [REMOVE_CELL in _tags(c) for c in cells if "injected-parameters" in _tags(c)] == [True]
    verdicts = [c for c in cells if is_verdict_cell(c)]
    assert verdicts and all(HIDE_INPUT in _tags(c) for c in verdicts)
    assert (root / "book" / "05_hydra.ipynb").read_text(encoding="utf-8") == committed


def test_display_math_that_scrolls_gets_a_cue_in_words():
    """read3 #20: display math wider than a phone's column scrolled in its box with only a shadow at
    the screen's edge, which read as the equation cut off. Every page loads the book's script
    (the Sphinx extension), which marks a box that scrolls; the CSS writes a cue under it. The
    browser test (tests/test_book_browser.py, display_math_cut) checks it on the built pages."""
    from selfrepair.book import sphinx

    added = []
    sphinx.setup(type("App", (), {"connect": lambda *a, **k: None,
                                  "add_js_file": lambda self, name: added.append(name)})())
    static = ROOT / "book" / "_static"
    assert added == [sphinx.BOOK_JS] and (static / sphinx.BOOK_JS).is_file()
    js, css = (static / sphinx.BOOK_JS).read_text(), (static / "selfrepair.css").read_text()
    assert "data-scrolls" in js and "scrollWidth > m.clientWidth" in js
    rule = css[css.index("div.math[data-scrolls]::after"):]
    assert "the equation continues" in rule[:rule.index("}")]
    assert "div.cell.tag_display-only details.hide.above-input" in css  # the folded code set small
