"""Prose that follows the run: on a model without sandwich norms no chapter's text — its Markdown
cells and the Markdown it computes — mentions sandwich norms, block norms or Gemma; on models that
have them, the computed notes do. Checked on the prose the chapters actually produce, for two
families (tiny GPT-NeoX: parallel residual, LayerNorm; tiny Llama: sequential, RMSNorm)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfrepair import load_model
from selfrepair.book import chapter_notebooks
from selfrepair.chapters import CHAPTERS, chapter_module
from selfrepair.structure import architecture_markdown

ROOT = Path(__file__).resolve().parents[1]
ABSENT = re.compile(r"sandwich|gemma|post-attention|post-feedforward|block.norm|from_block_norms", re.I)


def prose(executed: Path) -> str:
    """The Markdown a reader of an executed chapter sees: its Markdown cells and Markdown outputs."""
    nb = json.loads(executed.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            md = out.get("data", {}).get("text/markdown")
            if md:
                parts.append("".join(md))
    return "\n".join(parts)


def notebook_prose(run) -> str:
    """The Markdown a reader of a chapter run in this process sees (tests/chapter_runs.py): its
    Markdown cells and the Markdown it displayed."""
    import nbformat

    cells = [c.source for c in nbformat.read(run.notebook, as_version=4).cells if c.cell_type == "markdown"]
    return "\n".join(cells + run.markdown)


def _check(texts: dict[str, str], family: str):
    for name, text in texts.items():
        found = sorted({m.group(0) for m in ABSENT.finditer(text)})
        assert not found, f"{name} on tiny-{family} mentions {found}, which this model does not have"
        assert ("On the model that ran" in text or "On the current model" in text
                or name[:2] in ("00", "09")), name  # the introduction; the scorecard is about every model


def test_gpt_neox_prose_names_no_feature_it_lacks(book):
    """The book's own build (tiny GPT-NeoX, papermill)."""
    failed = {name: run.error for name, run in book.runs.items() if not run.ok}
    assert not failed, failed
    assert len(book.runs) == len(chapter_notebooks(ROOT))
    _check({name: prose(run.executed) for name, run in book.runs.items()}, "gpt_neox")
    intro = prose(book.runs["00_introduction"].executed)
    assert "**parallel-residual**" in intro and "LayerNorm (it subtracts the mean" in intro


NOTEBOOKS = {CHAPTERS[nb.stem[:2]]: nb.stem for nb in chapter_notebooks(ROOT)}


@pytest.mark.parametrize("chapter", sorted(NOTEBOOKS))  # every chapter (its own xdist group: conftest)
def test_llama_prose_names_no_feature_it_lacks(chapter, chapter_runs):
    """Tiny Llama: each chapter's notebook as tests/test_remote_chapters.py runs it (remote)."""
    run = chapter_runs.notebook(chapter)
    assert run.error is None, repr(run.error)
    _check({NOTEBOOKS[chapter]: notebook_prose(run)}, "llama")
    if chapter == "intro":
        intro = notebook_prose(run)
        assert "**sequential**" in intro and "RMSNorm" in intro and "share one key/value head" in intro


@pytest.mark.parametrize("family, present", [("gemma3", True), ("gpt2", False), ("gpt_neox", False)])
def test_notes_speak_of_sandwich_norms_exactly_when_the_model_has_them(family, present):
    model = load_model("tiny-" + family)
    texts = [architecture_markdown(model)]
    for prefix in ("01", "02", "03", "04", "05", "06"):
        module = chapter_module(prefix)
        texts.append(module.model_notes(module.Config.from_params(model="tiny-" + family)))
    if present:  # the introduction and the chapters whose numbers the block norms change say so
        assert all(re.search(r"post-attention|post-feedforward|normalizes", t) for t in texts[:6]), family
    else:
        assert not any(ABSENT.search(t) for t in texts), family


def test_the_worked_example_is_computed_and_consistent():
    from selfrepair.chapters.intro import TOY_COMPONENTS, worked_example

    w = worked_example()
    n = w.numbers
    assert w.table["direct_effect"].sum() == pytest.approx(n["logit"])  # DEs add up to the logit
    assert n["self_repair"] == pytest.approx(n["norm_term"])  # nothing downstream but the norm
    assert n["closed_form"] == pytest.approx(n["delta_logit"])  # App. B holds on the toy
    assert f"**{n['logit']:.3f}**" in w.text and f"{n['self_repair']:+.3f}" in w.text
    # other numbers, other paragraph: nothing in it is typed in
    bigger = {**TOY_COMPONENTS, "head B": (3.0, -1.0, 2.0)}
    v = worked_example(bigger)
    assert v.numbers["logit"] != pytest.approx(n["logit"]) and v.text != w.text
    assert f"**{v.numbers['logit_ablated']:.3f}**" in v.text
    assert v.numbers["self_repair"] == pytest.approx(v.numbers["norm_term"])


def _markdown_cells(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                     if c["cell_type"] == "markdown")


def test_the_introductions_chapter_map_says_what_each_cited_figure_shows():
    """A newcomer without the papers open: every parenthesis of the chapter map that cites a paper's
    figure says in words what the figure shows (a colon after each figure or range)."""
    rows = [line for line in _markdown_cells(ROOT / "book" / "00_introduction.ipynb").splitlines()
            if line.startswith("| <a href=")]
    cited = [p for row in rows for p in re.findall(r"\(([^()]*\bFig \d[^()]*)\)", row)]
    assert len(cited) >= 6  # chapters 1-6 cite the papers' figures
    for p in cited:
        for fig in re.finditer(r"Fig \d+(?:–\d+)?(?: and \d+)?", p):
            tail = p[fig.end():]
            assert tail.startswith(":") or tail.startswith(" and Fig"), (fig.group(0), p)


CODE_NOUN = re.compile(r"`[a-z_]+\.[a-z_.]+`|`[a-z]+_[a-z_0-9]+`")


@pytest.mark.parametrize("page", ["00_introduction", "05_hydra", "08_backup_name_movers"])
def test_prose_names_no_code_as_a_noun_but_the_parameters(page):
    """Module paths and function or variable names are not nouns of the prose; a parameter the reader
    sets (the notebook's parameters cell) may appear as code."""
    settable = {"worked_example"}  # the introduction's cell calls it: the reader passes it other numbers
    for path in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"):  # every chapter's parameters (the intro names them)
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        params = "".join(next((c["source"] for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), []))
        settable |= set(re.findall(r"^(\w+) =", params, re.M))
    text = re.sub(r"```.*?```", "", _markdown_cells(ROOT / "book" / f"{page}.ipynb"), flags=re.S)
    text = re.sub(r":::\{exercise\}.*?:::", "", text, flags=re.S)  # an exercise names the function to write
    found = {m.group(0) for m in CODE_NOUN.finditer(text)} - {f"`{p}`" for p in settable}
    assert not found, f"{page} names code in its prose: {sorted(found)}"
