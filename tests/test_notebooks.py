"""Every chapter notebook (``book/*.ipynb``, picked up automatically) follows the notebook rules of
docs/DEVELOPING.md and runs under papermill on the ``tiny`` profile.

Structure: the first code cell, right after the title, is the install cell of
:func:`selfrepair.book.launch.install_cell` (the same in every notebook, hidden in the book); exactly
one ``parameters`` cell of literal assignments with a trailing comment each,
naming exactly the fields of the chapter's config (``selfrepair.chapters.<chapter>.Config``: what
that chapter uses, nothing "unused here"); the next code cell builds
``cfg = chapter.Config.from_params(...)`` passing every parameter by name; ``started =
time.time()`` early; no ``def``/``class``/loops (comprehensions included) in code cells but
exercise solutions; committed without outputs; the last code cell calls ``provenance``; the config
cell and the provenance cell are folded (``hide-input``), the parameters cell is not (the book's
build folds it, and every display-only cell's input, in the HTML: selfrepair.book.cells,
tests/test_book_cells.py).

Execution (the session fixture ``book`` in conftest.py: the book built once, as the Pages
workflow builds it, on the ``tiny`` profile): no error,
at least one chart per chapter, every chart spec valid against
the Vega-Lite schema and small, and the injected parameters visible in the provenance table.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import nbformat
import pytest

from selfrepair.book.launch import INSTALL_TAGS, install_cell
from selfrepair.claims import anchor
from selfrepair.chapters import CHAPTERS, chapter_module
from selfrepair.figures import MAX_ROWS, charts_in_notebook, data_rows, validate_spec
from selfrepair.figures.legible import pale_marks
from verdict_cells import is_verdict_cell, placement, verdict_source

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
NO_CHART_OK: set[str] = set()  # every chapter draws at least one chart
LOOPS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.AsyncFor, ast.While,
         ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _code(path: Path) -> list[dict]:
    return [c for c in _cells(path) if c["cell_type"] == "code"]


def _python(source: str) -> str:
    """The cell without IPython magics/shell lines (which are not Python)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def test_there_are_notebooks():
    assert (ROOT / "book" / "00_introduction.ipynb") in NOTEBOOKS
    assert sorted(nb.stem[:2] for nb in NOTEBOOKS) == sorted(CHAPTERS), "a notebook without a chapter module"


def _parameter_names(path: Path) -> list[str]:
    cell = next(c for c in _cells(path) if "parameters" in c.get("metadata", {}).get("tags", []))
    return [stmt.targets[0].id for stmt in ast.parse(_source(cell)).body]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_commented_literals(path):
    tagged = [c for c in _cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', want exactly 1"
    assert tagged[0]["cell_type"] == "code"
    source = _source(tagged[0])
    tree = ast.parse(source)
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    names = set()
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 \
            and isinstance(stmt.targets[0], ast.Name), \
            f"{path.name} line {stmt.lineno}: the parameters cell holds only `name = literal`"
        name = stmt.targets[0].id
        try:
            ast.literal_eval(stmt.value)
        except ValueError:
            pytest.fail(f"{path.name}: parameter {name} is not a literal")
        assert stmt.end_lineno in comments, f"{path.name}: parameter {name} needs a trailing comment"
        names.add(name)
    want = set(chapter_module(path.stem).Config.field_names())
    assert names == want, (f"{path.name}: the parameters cell must list exactly the chapter config's "
                           f"fields; missing {sorted(want - names)}, not in the config {sorted(names - want)}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_config_cell_and_start_time(path):
    code = _code(path)
    i = next(i for i, c in enumerate(code) if "parameters" in c.get("metadata", {}).get("tags", []))
    assert i + 1 < len(code), f"{path.name}: no code cell after the parameters cell"
    nxt = _python(_source(code[i + 1]))
    assert re.search(r"^cfg\s*=\s*chapter\.Config\.from_params\(", nxt, re.M), \
        f"{path.name}: the cell after the parameters builds `cfg = chapter.Config.from_params(...)`"
    assert re.search(rf"^from selfrepair\.chapters import {CHAPTERS[path.stem[:2]]} as chapter$", nxt, re.M), \
        f"{path.name}: import the chapter module as `chapter`"
    call = next(n for n in ast.walk(ast.parse(nxt)) if isinstance(n, ast.Call)
                and getattr(n.func, "attr", "") == "from_params")
    passed = {k.arg for k in call.keywords}
    assert passed == set(_parameter_names(path)), \
        f"{path.name}: from_params must receive every parameter; missing {set(_parameter_names(path)) - passed}"
    early = "\n".join(_source(c) for c in code[: i + 2])
    assert re.search(r"^started\s*=\s*time\.time\(\)", early, re.M), \
        f"{path.name}: set `started = time.time()` in or before the cfg cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_says_what_ran_right_after_the_config(path):
    """The cell after the config cell says what ran, on what (``selfrepair.setting.run_summary``),
    shown: a reader meets the model and the data before the first result — at the top, right
    after the install cell, before the method (issue: say what ran at the top of every chapter)."""
    code = _code(path)
    i = next(i for i, c in enumerate(code) if "parameters" in c.get("metadata", {}).get("tags", []))
    assert re.search(r"^display\(Markdown\(run_summary\(cfg\)\)\)$", _source(code[i + 2]), re.M), \
        f"{path.name}: the cell after the config cell is `display(Markdown(run_summary(cfg)))`"
    assert not set(code[i + 2].get("metadata", {}).get("tags", [])) & FOLDED
    if path.stem.startswith("00"):
        return  # the introduction's run is its live check of eq. 2, a section of its own further down
    cells = nbformat.read(path, as_version=4).cells
    first = next(j for j, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    above = [c for c in cells[1:first] if not c.source.startswith("The parameters of this chapter")]
    assert all(c.cell_type == "code" for c in above), \
        f"{path.name}: only the title and the install cell come before the parameters (what ran is at the top)"


FOLDED = {"hide-input", "hide-cell", "remove-input", "remove-cell"}  # Jupyter Book 1.x cell tags


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_installs_the_library(path):
    """Colab, Binder or a Jupyter without the library run this cell first; it is the same cell in
    every notebook (``python -m selfrepair.book.launch`` writes it), right after the title."""
    cells = _cells(path)
    first = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    assert first == 1 and cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# "), \
        f"{path.name}: the install cell comes right after the title cell"
    assert _source(cells[first]) == install_cell(), \
        f"{path.name}: the first code cell is not the install cell: run `python -m selfrepair.book.launch`"
    assert cells[first]["metadata"].get("tags") == INSTALL_TAGS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_boilerplate_folded_parameters_visible(path):
    """The imports/timing/config cell and the provenance cell's input are folded (``hide-input``:
    one click shows them); the parameters cell is not: a reader sees what the page was run with."""
    code = _code(path)
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in code]
    i = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert not tags[i] & FOLDED, f"{path.name}: the parameters cell is hidden by {tags[i] & FOLDED}"
    assert "hide-input" in tags[i + 1], f"{path.name}: tag the config cell after the parameters 'hide-input'"
    assert "hide-input" in tags[-1], f"{path.name}: tag the provenance cell 'hide-input'"
    shown = [n for n, t in enumerate(tags) if t & FOLDED and n not in (0, i + 1, len(code) - 1)]
    assert not shown, f"{path.name}: code cells {shown} are folded too; only the boilerplate is"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_def_class_or_loops(path):
    """Exercise solutions (cells tagged ``solution``, folded in the book and stubbed in student
    notebooks; see tests/test_exercises.py) are the one place a reader's function is written."""
    for n, cell in enumerate(_code(path)):
        if "solution" in cell.get("metadata", {}).get("tags", []):
            continue
        for node in ast.walk(ast.parse(_python(_source(cell)))):
            assert not isinstance(node, LOOPS), (
                f"{path.name} code cell {n}: {type(node).__name__} at line {node.lineno} — "
                "notebooks call the library; move functions, classes and loops into src/selfrepair")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for n, cell in enumerate(_code(path)):
        assert not cell.get("outputs") and cell.get("execution_count") is None, \
            f"{path.name} code cell {n} has outputs: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_cell_has_an_id(path):
    """nbformat 4.5 cells carry an id (nbformat warns of a future error without one; a cell added by
    hand to 09_scorecard lacked it)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    missing = [n for n, c in enumerate(cells) if not c.get("id")]
    assert not missing, f"{path.name}: cells {missing} have no id (nbformat.validator.normalize adds them)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ends_with_provenance(path):
    assert re.search(r"\bprovenance\(", _source(_code(path)[-1])), \
        f"{path.name}: the last code cell must be `provenance(cfg, started)`"


# -- execution on the tiny profile ----------------------------------------------------------------
def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def _provenance(nb: dict) -> dict[str, str]:
    last = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]
    text = "".join("".join(o.get("data", {}).get("text/plain", "")) for o in last.get("outputs", []))
    return dict(re.findall(r"^\s*\d+\s+(\S+)\s+(.*?)\s*$", text, re.M))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_on_tiny_profile(path, book):
    run = book.runs[path.stem]
    assert run.ok, f"{path.name} failed on the tiny profile: {run.error}\n(executed: {run.executed})"
    nb = json.loads(run.executed.read_text(encoding="utf-8"))
    errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"

    charts = charts_in_notebook(nb)
    if path.stem not in NO_CHART_OK:
        assert charts, f"{path.name} displayed no chart (use selfrepair.figures' renderer)"
    pale = []
    for spec in charts:
        validate_spec(spec)
        assert data_rows(spec) <= MAX_ROWS
        pale += pale_marks(spec, f"chart {str(spec.get('title', ''))[:40]!r}")
    assert not pale, f"{path.name}: marks below 3:1 on white:\n" + "\n".join(pale)

    prov = _provenance(nb)
    tiny = book.params
    assert prov.get("param:model") == tiny["model"], f"provenance says {prov.get('param:model')!r}"
    if "n_tokens" in chapter_module(path.stem).Config.field_names():
        assert prov.get("param:n_tokens") == str(tiny["n_tokens"])
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    # the build removes it from the page (selfrepair.book.cells); the provenance table lists the parameters
    assert len(injected) == 1 and "remove-cell" in injected[0]["metadata"]["tags"]
    if "cache_dir" in chapter_module(path.stem).Config.field_names():  # no path of this machine
        assert re.search(r'^cache_dir = "results"$', _source(injected[0]), re.M), _source(injected[0])
        assert prov.get("param:cache_dir") == "results"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if "rules_table(" in p.read_text(encoding="utf-8")],
                         ids=lambda p: p.stem)
def test_the_rules_table_renders_as_a_table(path, book):
    """The chapter's "How each claim is decided" section, as the built page shows it: an HTML table
    with one row per claim, not the Markdown source printed as text."""
    page = (book.html / "book" / f"{path.stem}.html").read_text(encoding="utf-8")
    section = page[page.index('id="how-each-claim-is-decided"'):]
    section = section[:section.find("</section>")]
    assert "<table" in section and "| claim |" not in section, f"{path.stem}: the rules table is raw text"
    rows = re.findall(r"<tr", section[section.index("<tbody"):]) if "<tbody" in section else []
    assert len(rows) == len(chapter_module(path.stem).CLAIMS), path.stem


# -- claim by claim: the figure, then its verdict ----------------------------------------------------
def _shows_verdicts(path: Path) -> bool:
    return hasattr(chapter_module(path.stem), "verdict")


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _shows_verdicts(p)], ids=lambda p: p.stem)
def test_each_claims_verdict_cell_comes_right_after_its_figure(path):
    """Each claim with a figure (the chapter's ``FIGURES``) has one verdict cell,
    ``display(Markdown(chapter.verdict(<chapter>, "<key>")))``, right after the cell drawing that
    figure (tests/verdict_cells.py); claims sharing a figure follow it in the claims' order, and
    the early overview (``on_this_model``) is still there."""
    module, cells = chapter_module(path.stem), _cells(path)
    where = placement(cells, module.FIGURES, module.CLAIMS)
    assert set(where) == set(module.FIGURES) <= {c.key for c in module.CLAIMS}, path.stem
    keys = [re.search(r'chapter\.verdict\(\w+, "(\w+)"\)', _source(c))[1] for c in cells if is_verdict_cell(c)]
    assert sorted(keys) == sorted(where), f"{path.stem}: one verdict cell per claim with a figure"
    for i in sorted(set(where.values())):
        after = [k for k, j in where.items() if j == i]  # in the claims' order
        got = cells[i + 1:i + 1 + len(after)]
        assert [_source(c) for c in got] == [verdict_source(_var(cells), k) for k in after], \
            f"{path.stem}: the verdicts of {after} go right after cell {i}, which draws their figure"
    overview = [c for c in cells if re.search(r"chapter\.on_this_model\(|below=chapter\.FIGURES", _source(c))]
    assert len(overview) == 1 and cells.index(overview[0]) <= min(where.values()), f"{path.stem}: the overview first"


def _var(cells: list[dict]) -> str:
    return next(m[1] for c in cells if c["cell_type"] == "code"
                for m in [re.search(r"^(\w+) = chapter\.measure\(", _source(c), re.M)] if m)


def _shown(cell: dict) -> str:
    """What a cell shows: a markdown cell's source, a code cell's Markdown / HTML outputs."""
    if cell["cell_type"] != "code":
        return _source(cell)
    return "".join("".join(o.get("data", {}).get(kind, "")) for o in cell.get("outputs", [])
                   for kind in ("text/markdown", "text/html"))


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _shows_verdicts(p)], ids=lambda p: p.stem)
def test_each_verdict_is_shown_once_after_its_figure(path, book):
    """In the executed notebook (the tiny book) and on its built page each claim's anchor
    (``claims.anchor``, which the scorecard links to) is there exactly once; a claim with a figure
    carries it in the cell right after its figure's (or after the verdicts of earlier claims of the
    same figure), with its verdict word, and the overview above links down to it (its statement)."""
    module = chapter_module(path.stem)
    nb = json.loads(book.runs[path.stem].executed.read_text(encoding="utf-8"))
    cells, shown = nb["cells"], [_shown(c) for c in nb["cells"]]
    page = (book.html / "book" / f"{path.stem}.html").read_text(encoding="utf-8")
    where = placement(cells, module.FIGURES, module.CLAIMS)
    for claim in module.CLAIMS:
        mark = f'id="{anchor(claim)}"'
        carry = [i for i, text in enumerate(shown) if mark in text]
        assert sum(text.count(mark) for text in shown) == 1 and page.count(mark) == 1, (path.stem, claim.key)
        if claim.key not in where:
            continue
        i, fig = carry[0], where[claim.key]
        assert i > fig and all(is_verdict_cell(c) for c in cells[fig + 1:i + 1]), \
            f"{path.stem}: {claim.key}'s verdict (cell {i}) is not right after its figure (cell {fig})"
        assert "chapter.verdict(" in _source(cells[i]) and f'"{claim.key}"' in _source(cells[i])
        overview = next(j for j, text in enumerate(shown) if f'href="#{anchor(claim)}">' in text)
        assert overview < i, f"{path.stem}: the overview of {claim.key} comes after its verdict"
