"""Figures of the attribution-patching chapter, built from small synthetic frames: each spec
validates against the Vega-Lite schema, uses the intended marks and fields, has tooltips naming
the head ``L{l}H{h}`` and embeds the expected number of rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from selfrepair.atp import layer_errors
from selfrepair.figures import atp as fa
from selfrepair.figures import check_width, data_rows, validate_spec

from test_figures_hydra_across import _fields, _marks

L, H = 3, 4


@pytest.fixture
def heads():
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(L):
        for head in range(H):
            exact = rng.normal()
            norm, down = rng.normal(scale=0.1), rng.normal(scale=0.2)
            rows.append({"layer": layer, "head": head, "label": f"L{layer}H{head}", "exact": exact,
                         "atp": exact - norm - down, "error": norm + down, "error_norm": norm,
                         "error_downstream": down, "delta_direct_effect": -abs(exact),
                         "self_repair": exact + abs(exact), "atp_self_repair": exact + abs(exact) - norm - down})
    return pd.DataFrame(rows)


def _check(chart, rows):
    spec = chart.to_dict()
    validate_spec(spec)
    check_width(spec)  # fits the book's column at 1024 px
    assert data_rows(spec) == rows
    return spec


def test_fig_atp_vs_exact(heads):
    spec = _check(fa.fig_atp_vs_exact(heads), L * H)
    assert {"circle", "line"} <= _marks(spec)
    assert {"exact", "atp"} <= _fields(spec, "x") | _fields(spec, "y")
    assert {"label", "error", "error_norm", "error_downstream"} <= _fields(spec, "tooltip")


def test_fig_layer_error(heads):
    layers = layer_errors(heads)
    assert len(layers) == L and (layers["n_heads"] == H).all()
    spec = _check(fa.fig_layer_error(layers), L)
    assert {"bar", "tick"} <= _marks(spec)
    assert {"abs_error", "abs_exact"} <= _fields(spec, "y") and "layer" in _fields(spec, "tooltip")


def test_fig_error_decomposition(heads):
    long = fa.decomposition_frame(heads)
    assert len(long) == 2 * L * H and set(long["term"]) == set(fa.TERMS.values())
    spec = _check(fa.fig_error_decomposition(heads), 2 * L * H + L * H)
    assert {"bar", "tick", "rule"} <= _marks(spec)
    assert {"value", "error"} <= _fields(spec, "y") and "label" in _fields(spec, "tooltip")
    # the stacked parts add up to the total error, head by head
    total = long.groupby("label")["value"].sum()
    np.testing.assert_allclose(total.loc[heads["label"]].to_numpy(), heads["error"].to_numpy())


def test_error_decomposition_labels_at_most_25_heads():
    """72 heads: the axis labels one head in three (the rest on hover), so 390 px is not a smear;
    a dozen heads keep every label."""
    rows = [{"layer": l, "head": h, "label": f"L{l}H{h}", "error": 0.1, "error_norm": 0.05,
             "error_downstream": 0.05} for l in range(6) for h in range(12)]
    many = pd.DataFrame(rows).sample(frac=1, random_state=0)  # the order comes from layer, head
    spec = fa.fig_error_decomposition(many).to_dict()
    validate_spec(spec)
    check_width(spec)
    axes = [layer["encoding"]["x"]["axis"] for layer in spec["layer"] if "x" in layer.get("encoding", {})]
    assert axes and all(len(a["values"]) <= 25 for a in axes)
    assert axes[0]["values"][:2] == ["L0H0", "L0H3"] and "hover" in axes[0]["title"]
    few = fa.fig_error_decomposition(pd.DataFrame(rows[:12])).to_dict()
    assert all("values" not in layer["encoding"]["x"]["axis"] for layer in few["layer"]
               if "x" in layer.get("encoding", {}))


def test_chapter7_layer_table_shows_one_signed_error_and_its_parts():
    """Issue 25: the table showed mean |exact − AtP| (a size, positive) beside signed parts that sum
    to the negative signed mean: one quantity with two signs. Now the signed mean is shown, its parts
    sum to it, and the caption says the sign."""
    import pandas as pd

    from selfrepair.atp import layer_errors
    from selfrepair.chapters.atp import LAYERS_TABLE, SIGNS
    from selfrepair.tables import parse_number

    heads = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "exact": [-0.5, 0.1, -0.2],
                          "error_norm": [-0.2, 0.05, 0.1], "error_downstream": [-0.1, 0.0, 0.05]})
    heads["error"] = heads["error_norm"] + heads["error_downstream"]
    t = LAYERS_TABLE(layer_errors(heads))
    shown = t.shown()
    assert "mean exact − AtP" in shown.columns and "mean |exact − AtP|" not in shown.columns
    for _, row in shown.iterrows():
        parts = parse_number(row["final norm's part"]) + parse_number(row["downstream part"])
        assert parse_number(row["mean exact − AtP"]) == pytest.approx(parts, abs=1e-3)
    assert SIGNS in t.caption and "exact − AtP" in SIGNS
    assert "mean |exact − AtP|" in t._repr_html_()  # the size, in the fold under its name
