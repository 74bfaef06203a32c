"""Chapter 5's page as a newcomer reads it (issue 25): the figure, then the verdict; the noise
ablation called a control; parameter names only in the parameters cell. Read from the committed
notebook and from the chapter's text functions on a synthetic result."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfrepair.chapters import hydra as chapter
from selfrepair.chapters import hydra_claims as hcl
from selfrepair.chapters.hydra_answer import other_readings, seen

from test_hydra import synthetic_result
from test_hydra_claims import chapter_of

NOTEBOOK = Path(__file__).resolve().parents[1] / "book" / "05_hydra.ipynb"


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _index(cells: list[dict], needle: str) -> int:
    (i,) = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and needle in _source(c)]
    return i


@pytest.fixture(scope="module")
def deep():
    res = synthetic_result(n=30, L=8, P=2, seed=4)
    res.target = res.ml_token.clone()
    return chapter_of(res)


def test_the_answer_comes_after_the_figures_that_show_it(deep):
    """'Is the Hydra effect seen?' was printed in §5.3, before any figure; it is now shown after
    Fig 7 and 8 (whose charts show the compensation), with the fold of other readings after it,
    and the overview at the top only points down to it."""
    cells = _cells()
    answer = _index(cells, "chapter.seen(ch)")
    assert answer > max(_index(cells, "fig_regression"), _index(cells, "fig_layer_panels"))
    assert answer < _index(cells, "chapter.scale_markdown(ch)")  # still inside §5.9, before Which σ?
    assert "chapter.other_readings(ch)" in _source(cells[answer])
    assert "(ch05-seen)=" in _source(cells[answer - 1])
    overview = chapter.on_this_model(deep)
    assert "**Is the Hydra effect seen on" not in overview and seen(deep) not in overview
    assert 'href="#ch05-seen"' in overview


def test_every_cell_draws_its_chart_before_the_text_that_reads_it():
    """A cell that shows a chart and a computed paragraph (the own direct effect, noise, localisation,
    Fig 7b / 8 panels) shows the chart first."""
    both = [c for c in _cells() if c["cell_type"] == "code" and "figs." in _source(c) and "Markdown(" in _source(c)]
    assert len(both) >= 4
    for c in both:
        text = _source(c)
        assert text.index("figs.") < text.index("Markdown("), text


def _section(cells: list[dict], heading: str) -> str:
    return next(_source(c) for c in cells if c["cell_type"] == "markdown" and heading in _source(c))


def test_the_noise_ablation_is_called_a_control_off_the_activations_the_model_sees():
    """App. A's reason to prefer resample ablation, quoted, and what it means for noise: it moves the
    residual stream off the activations the model sees, so it is a control, not a second estimate."""
    cells = _cells()
    noise = re.sub(r"\s+", " ", _section(cells, "## Noise ablation beside resample ablation"))
    assert ("probably the most principled, as every ablation is a naturally-occurring set of activations, "
            "and so is more likely to respect properties of network activations such as emergent outliers") in noise
    assert "**off the activations the model sees**" in noise and "**not a second estimate**" in noise
    assert "## Noise ablation beside resample ablation: a control" in noise
    caveat = re.sub(r"\s+", " ", _section(cells, "## Caveats"))
    assert "off the activations the model sees" in caveat and "not a second estimate" in caveat


PARAMETERS = ("n_patches", "noise_scale", "n_noise", "n_prompts", "cache_dir", "prompts", "n_boot", "seed",
              "featured_layer", "ablation", "device", "dtype", "remote", "model")


def test_parameter_names_are_words_outside_the_parameters_cell(deep):
    """The running prose (Method and later) and the chapter's computed text name no parameter as
    code: only the parameters cell does ("set in the parameters cell" is the pointer)."""
    cells = _cells()
    start = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    prose = "\n".join(re.sub(r":::\{exercise\}.*?:::", "", _source(c), flags=re.S)
                      for c in cells[start:] if c["cell_type"] == "markdown")
    for name in PARAMETERS:
        assert f"`{name}" not in prose, name
        if "_" in name:
            assert name not in prose, name
    computed = "\n".join([chapter.on_this_model(deep), seen(deep), repr(other_readings(deep)),
                          chapter.scale_markdown(deep), *(chapter.verdict(deep, c.key) for c in hcl.CLAIMS)])
    for name in PARAMETERS:
        if "_" in name:
            assert name not in computed, name


def test_chapter5_notation_and_localisation_read3():
    """read3 #15: the layer labels A12/M17 were never defined, σ(z_t^L) and Δ_ablate were raw text,
    Counterfact never described; #39: the localisation table's ~40-word title with its own glossary."""
    import inspect
    import json
    from pathlib import Path

    from selfrepair.chapters import hydra_text

    md = "".join("".join(c["source"]) for c in json.loads(
        (Path(__file__).resolve().parents[1] / "book/05_hydra.ipynb").read_text())["cells"] if c["cell_type"] == "markdown")
    assert "A*l* (the attention of layer *l*" in md and "M*l* (the MLP of layer *l*)" in md
    assert "Counterfact dataset (a public set of one-line factual statements" in md
    src = inspect.getsource(hydra_text)
    assert "σ(z_t^L)" not in src and "Δ_ablate" not in src and "Δ_unembed" not in src
    assert "kind of later \"\n" not in src and "Every row, with every column, in the fold" not in src
