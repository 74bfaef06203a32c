"""Prose that follows the run: on a model without sandwich norms no chapter's text — its Markdown
cells and the Markdown it computes — mentions sandwich norms, block norms or Gemma; on models that
have them, the computed notes do. Checked on the prose the chapters actually produce, for two
families (tiny GPT-NeoX: parallel residual, LayerNorm; tiny Llama: sequential, RMSNorm)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
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


# -- issue 25: parameter names appear as code only where the reader sets them ------------------------
OWNED = [nb.stem for nb in chapter_notebooks(ROOT) if nb.stem[:2] not in ("05", "09")]  # 05: its own test


def parameter_names() -> set[str]:
    """Every name a chapter's parameters cell sets (the one place a reader sets them)."""
    names: set[str] = set()
    for path in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        params = "".join(next((c["source"] for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), []))
        names |= set(re.findall(r"^(\w+) =", params, re.M))
    return names


def named_parameters(text: str, names: set[str]) -> set[str]:
    """The parameter names ``text`` (prose: Markdown, code blocks and exercises left out) shows as
    code (`n_tokens`, `ablation="zero"`) or bare in snake_case (n_tokens tokens)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r":::\{exercise\}.*?:::", "", text, flags=re.S)  # an exercise names the function to write
    text = re.sub(r"\$[^$]*\$", "", text)  # mathematics
    found = {m.group(1) or m.group(2) for m in re.finditer(r"`(\w+)\s*(?:`|=)|(?<![\w`/.#-])([a-z0-9]+_\w+)", text)}
    return found & names


def test_the_parameter_scan_finds_what_issue_25_found():
    names = parameter_names()
    assert named_parameters("The tokens of a corpus (how many: `n_tokens`)", names) == {"n_tokens"}
    assert named_parameters("raise n_tokens tokens; under `ablation=\"zero\"`", names) == {"n_tokens", "ablation"}
    assert named_parameters("set it in the parameters cell; the seed and the `paper` profile", names) == set()
    assert named_parameters("```bash\nselfrepair book -p ratio_head=L11H2\n```", names) == set()


@pytest.mark.parametrize("page", OWNED)
def test_markdown_names_no_parameter_outside_the_parameters_cell(page):
    """A chapter's Markdown cells say a parameter in words ("the token count", "set in the
    parameters cell"); only the parameters cell names it."""
    found = named_parameters(_markdown_cells(ROOT / "book" / f"{page}.ipynb"), parameter_names())
    assert not found, f"{page} names parameters in its prose: {sorted(found)}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # value biases / none
def test_computed_notes_name_no_parameter(family):
    """The notes each chapter computes under its caveats (the value-bias line included)."""
    from selfrepair.chapters import intro

    texts = [intro.value_bias_markdown(intro.Config.from_params(model="tiny-" + family))]
    for prefix in ("01", "02", "03", "04", "06", "07", "08"):
        module = chapter_module(prefix)
        texts.append(module.model_notes(module.Config.from_params(model="tiny-" + family)))
    found = {n for t in texts for n in named_parameters(t, parameter_names())}
    assert not found, found
    assert all("value bias" in t for t in texts)  # each says in one line what its run used ...
    assert all("00_introduction.html#value-biases" in t for t in texts[1:])  # ... and links to the one explanation


def test_the_value_bias_explanation_is_said_once():
    """Issue 25: the same paragraph was in every chapter's Method; the introduction says it."""
    pages = {p.stem: _markdown_cells(p) for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb")}
    said = [name for name, text in pages.items() if "value bias $b_V W_O[h]$ (Hugging Face's view)" in " ".join(text.split())]
    assert said == ["00_introduction"], said
    assert "(value-biases)=" in pages["00_introduction"]


def executed_prose(executed: Path) -> str:
    """An executed chapter's Markdown cells and Markdown outputs, less what an exercise check prints
    (it names the function the reader wrote)."""
    nb = json.loads(executed.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        elif "exercises.check(" not in "".join(cell["source"]):
            parts += ["".join(o["data"]["text/markdown"]) for o in cell.get("outputs", [])
                      if "text/markdown" in o.get("data", {})]
    return "\n".join(parts)


HYPHEN_MINUS = re.compile(r"(?<![\w\-−.,/:])-\d+(?:[.,]\d+)*(?:×10[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)?%?(?![\w.,]?\w)")


def hyphen_minus_numbers(text: str) -> list[str]:
    """Negative numbers printed with the hyphen (``-0.24``) instead of the tables' minus sign
    (``−0.24``), outside mathematics, code and links."""
    text = re.sub(r"```.*?```|`[^`]*`|\$[^$]*\$|<[^>]*>", "", text, flags=re.S)
    return HYPHEN_MINUS.findall(text)


def test_the_minus_scan():
    assert hyphen_minus_numbers("ΔDE = -0.656, the MLPs' (-0.157 logits) and -3.6×10⁻⁶") == ["-0.656", "-0.157", "-3.6×10⁻⁶"]
    assert hyphen_minus_numbers("Pythia-160M and -410M, layers 0-8, 2026-12-07, $-x$, `-1`, −0.3") == []


def test_the_introductions_generated_prose_prints_the_tables_minus_sign():
    """Issue 25: the worked example printed "ΔDE = -0.656" where its table prints "−0.656"."""
    from selfrepair.chapters.intro import reading_markdown, worked_example

    w = worked_example()
    assert not hyphen_minus_numbers(w.text) and "ΔDE = −0.656" in w.text
    assert all("-" not in v for v in w.table["vector"])  # the table's vectors: (1.5, −0.5, 1)
    assert not hyphen_minus_numbers(reading_markdown(LIVE))


def test_built_chapters_print_the_tables_minus_sign_and_no_parameter(book):
    """Every generated sentence of every chapter, as the book's build shows it, prints the tables'
    minus sign (chapter 5 and the scorecard included: issue 25); chapters 0-4 and 6-8 name no
    parameter (chapter 5's own test: tests/test_hydra_page.py)."""
    names = parameter_names()
    assert {"05_hydra", "09_scorecard"} <= set(book.runs)
    for name, run in book.runs.items():
        text = executed_prose(run.executed)
        assert not hyphen_minus_numbers(text), (name, hyphen_minus_numbers(text))
        if name in OWNED:
            assert not named_parameters(text, names), (name, named_parameters(text, names))


# -- issue 25: the live check's first real example, and a row whose self-repair is negative ----------
LIVE = pd.DataFrame({"label": ["L8H0", "L17H0", "L17H1"], "delta_logit": [-0.270, -0.0406, -0.0287],
                     "delta_direct_effect": [0.0485, -0.0562, -0.112], "self_repair": [-0.318, 0.0156, 0.0833],
                     "from_heads": [-0.202, 0.0, 0.0], "from_mlps": [-0.552, 0.00387, 0.0770],
                     "from_norm": [0.341, 0.0247, -0.0290], "from_block_norms": [0.0952, -0.0130, 0.0353],
                     "eq2_gap": [3.6e-6, 2.5e-6, 2.2e-6]})  # the introduction's live check on gemma-3-270m


def test_the_live_check_leads_with_a_clear_example_and_explains_a_negative_row():
    """The table's first row (L8H0: ΔDE +0.05, self-repair −0.32) was the reader's first real
    example, with no comment; the text now reads the clearest row first, by a computed rule, and
    says what a negative self-repair means."""
    from selfrepair.chapters.intro import example_rows, reading_markdown
    from selfrepair.exercises import reveal

    first, odd = example_rows(LIVE)
    assert first["label"] == "L17H1" and [r["label"] for r in odd] == ["L8H0"]
    text = reading_markdown(LIVE)
    assert text.index("Take L17H1") < text.index("L8H0's self-repair is **negative** (−0.318)")
    assert "makes the loss worse rather than making up for it" in text and "the later MLPs (−0.552 logits)" in text and "the later MLPs (0.077 logits)" in text and "(+" not in text
    assert "give back 0.0833 logits" in text
    every_positive = LIVE.assign(self_repair=LIVE["self_repair"].abs())
    assert "negative" not in reading_markdown(every_positive)  # said only where a row is
    said = reveal.no_reaction(type("Live", (), {"table": LIVE}))
    assert "for L17H1" in said and "gave back 0.0833" in said and "closer to zero" in said
