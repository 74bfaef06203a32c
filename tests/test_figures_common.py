"""The shared figure machinery: the offline renderer, the theme and the helpers in
``selfrepair.figures``."""

from __future__ import annotations

import json

import altair as alt
import jsonschema
import nbformat
import pandas as pd
import pytest

from selfrepair import figures
from selfrepair.figures import (CHART_CLASS, MAX_ROWS, VEGALITE_MIME, ChartTooLargeError,
                                charts_in_notebook, data_rows, ensure_small, head_tooltip,
                                layer_color, validate_spec)


@pytest.fixture
def heads() -> pd.DataFrame:
    return pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                         "label": ["L0H0", "L0H1", "L1H0", "L1H1"],
                         "self_repair": [0.1, -0.2, 0.3, 0.05],
                         "direct_effect": [0.5, 0.1, 0.9, 0.2]})


def _chart(frame: pd.DataFrame) -> alt.Chart:
    return alt.Chart(frame).mark_point().encode(
        x="direct_effect:Q", y="self_repair:Q", color=layer_color(),
        tooltip=head_tooltip("self_repair", "direct_effect"))


def _bundle(chart) -> dict:
    bundle = chart._repr_mimebundle_()
    return bundle[0] if isinstance(bundle, tuple) else bundle


def test_use_book_renderer_enables_renderer_and_theme():
    figures.use_book_renderer()
    assert alt.renderers.active == figures.RENDERER
    assert alt.theme.active == figures.THEME
    assert VEGALITE_MIME == f"application/vnd.vegalite.v{alt.SCHEMA_VERSION[1]}+json"


def test_renderer_output_has_spec_and_offline_html(heads):
    bundle = _bundle(_chart(heads))
    assert {VEGALITE_MIME, "text/html"} <= set(bundle)
    spec, html = bundle[VEGALITE_MIME], bundle["text/html"]
    validate_spec(spec)
    assert data_rows(spec) == len(heads)
    assert "http" not in html  # no CDN, no $schema URL: nothing to fetch
    assert "require" not in html and "<script src" not in html
    assert f'class="{CHART_CLASS}"' in html and "vegaEmbed(" in html
    assert spec["config"]["view"]["continuousWidth"] == 400  # the theme is applied


def test_layered_and_faceted_charts_render(heads):
    layered = _chart(heads) + alt.Chart(heads).mark_rule().encode(y="mean(self_repair):Q")
    faceted = _chart(heads).facet(column="layer:O")
    for chart in (layered, faceted):
        validate_spec(_bundle(chart)[VEGALITE_MIME])


def test_script_cannot_be_closed_by_data():
    frame = pd.DataFrame({"label": ["</script><script>alert(1)</script>"], "x": [1]})
    html = _bundle(alt.Chart(frame).mark_bar().encode(x="x:Q", y="label:N"))["text/html"]
    assert html.count("</script>") == 1  # only the renderer's own closing tag


def test_head_tooltip_fields():
    tips = [t.to_dict() for t in head_tooltip("self_repair", "ablation:N")]
    assert [t["field"] for t in tips] == ["label", "layer", "head", "self_repair", "ablation"]
    assert tips[3]["format"] == ".3f" and tips[3]["type"] == "quantitative"
    assert tips[4]["type"] == "nominal"


def test_too_many_rows_raise():
    big = pd.DataFrame({"x": range(MAX_ROWS + 1)})
    chart = alt.Chart(big).mark_tick().encode(x="x:Q")
    with pytest.raises(ChartTooLargeError, match="aggregate"):
        ensure_small(chart)
    with alt.data_transformers.disable_max_rows():
        with pytest.raises(ChartTooLargeError):
            _bundle(chart)
    assert ensure_small(chart, max_rows=MAX_ROWS + 1) is chart


def test_invalid_spec_is_rejected():
    with pytest.raises(jsonschema.ValidationError):
        validate_spec({"mark": "not-a-mark", "data": {"values": []}})


def test_charts_in_notebook_reads_specs_back(heads, tmp_path):
    bundle = _bundle(_chart(heads))
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# t"),
        nbformat.v4.new_code_cell("chart", outputs=[
            nbformat.v4.new_output("display_data", data=bundle),
            nbformat.v4.new_output("stream", text="progress")]),
    ])
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    for source in (path, str(path), json.loads(path.read_text()), nbformat.read(path, as_version=4)):
        specs = charts_in_notebook(source)
        assert specs == [bundle[VEGALITE_MIME]]


def test_check_width_rejects_charts_too_wide_for_1024_px(heads):
    from selfrepair.figures import check_width

    check_width(_chart(heads).properties(width="container").to_dict())
    with pytest.raises(ValueError, match="width 'container'"):
        check_width(_chart(heads).properties(width=500).to_dict())
    check_width(alt.hconcat(_chart(heads).properties(width=280), _chart(heads).properties(width=280)).to_dict())
    with pytest.raises(ValueError, match="hconcat chart: its views side by side are 800 px"):
        check_width(alt.hconcat(_chart(heads).properties(width=400), _chart(heads).properties(width=400)).to_dict())
    with pytest.raises(ValueError, match="facet chart: .* 750 px"):  # three layers, three panels
        check_width(_chart(pd.concat([heads, heads.assign(layer=2)])).properties(width=250)
                    .facet(column="layer:O").to_dict())
    check_width(_chart(heads).properties(width=250).facet(facet="label:N", columns=2).to_dict())
    with pytest.raises(ValueError, match="container"):
        check_width(alt.hconcat(_chart(heads).properties(width="container"), _chart(heads)).to_dict())


def test_present_keeps_the_legend_order_of_what_is_drawn():
    assert figures.present(["a", "b", "c"], pd.Series(["c", "a", None])) == ["a", "c"]
    assert figures.present(["a", "b"], []) == []


def test_labels_only_prints_at_most_max_labels():
    expr = figures.labels_only([f"L{i}H0" for i in range(40)])
    shown = json.loads(expr.split("indexof(")[1].split(", datum.value")[0])
    assert shown == [f"L{i}H0" for i in range(figures.MAX_LABELS)]
    assert expr.endswith("? datum.label : ''")


def test_fit_script_wraps_long_titles_before_the_first_drawing():
    """A container-width view shrinks to make room for a title wider than the column (to zero
    width on a phone): the renderer's script wraps titles to the column before drawing."""
    html = figures.chart_html({"mark": "point", "title": "x" * 10})
    assert "titles(spec, Math.max(20, Math.floor(el.clientWidth / 8)))" in html
    assert "function titles(spec, chars)" in html


def test_data_rows_counts_data_not_axis_values():
    spec = {"data": {"values": [{"a": 1}, {"a": 2}]}, "mark": "point",
            "encoding": {"x": {"field": "a", "type": "quantitative", "axis": {"values": [0.5, 1.5, 2.5]}}},
            "layer": [{"data": {"values": [{"a": 3}]}, "mark": "rule"}]}
    assert data_rows(spec) == 3


@pytest.mark.parametrize("n_layers", [1, 2, 18, 60])
def test_layer_axis_ticks_whole_layers_only(n_layers):
    """Fig 6 / 10 on a 2-layer model printed "0, 1, 1": a tick at 0.5 formatted as an integer."""
    x = figures.layer_axis(pd.DataFrame({"layer": range(n_layers)})).to_dict()
    values = x["axis"]["values"]
    assert all(isinstance(v, int) for v in values) and values[0] == 0 and values[-1] <= n_layers - 1
    assert len(values) <= figures.MAX_LABELS and x["axis"]["format"] == "d"
    assert x["scale"]["domain"] == [-0.5, n_layers - 0.5]
