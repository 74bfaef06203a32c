"""Figures of the IOI chapter (chapter 8), built from small synthetic frames: each spec validates
against the Vega-Lite schema, fits the book's column, uses the intended marks and fields, names the
head ``L{l}H{h}`` in its tooltips and embeds the expected number of rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from selfrepair.chapters.ioi import moving_frame
from selfrepair.figures import check_width, data_rows, validate_spec
from selfrepair.figures import ioi as fi

from test_figures_hydra_across import _fields, _marks

L, H, N = 3, 4, 10


@pytest.fixture
def heads():
    rng = np.random.default_rng(0)
    rows = [{"layer": l, "head": h, "label": f"L{l}H{h}", "direct_effect": rng.normal(),
             "attn_io": rng.uniform(), "attn_s": rng.uniform(), "attn_s2": rng.uniform(),
             "ablated_direct_effect": rng.normal(), "moved_direct_effect": rng.normal(),
             "name_mover": (l, h) in {(1, 0), (1, 2)}} for l in range(L) for h in range(H)]
    df = pd.DataFrame(rows)
    df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
    return df


@pytest.fixture
def repair():
    rng = np.random.default_rng(1)
    parts = {k: rng.normal(size=N) for k in ("from_heads", "from_mlps", "from_norm", "from_block_norms")}
    nm_dde = -np.abs(rng.normal(size=N))
    delta = nm_dde + sum(parts.values())
    return pd.DataFrame({"prompt": range(N), "logit_diff": rng.normal(size=N), "nm_direct_effect": -nm_dde,
                         "nm_delta_de": nm_dde, "delta_logit": delta, "self_repair": delta - nm_dde, **parts})


def _check(chart, rows):
    spec = chart.to_dict()
    validate_spec(spec)
    check_width(spec)
    assert data_rows(spec) == rows
    return spec



@pytest.mark.parametrize("fig,field", [(fi.fig_head_de, "direct_effect"),
                                       (fi.fig_backup_change, "delta_direct_effect")])
def test_heatmaps(heads, fig, field):
    spec = _check(fig(heads), L * H)
    assert _marks(spec) == {"rect"}
    assert {"head"} <= _fields(spec, "x") and {"layer"} <= _fields(spec, "y")
    assert field in _fields(spec, "color")
    assert {"label", "attn_io", "attn_s", "delta_direct_effect", "moved_direct_effect"} <= _fields(spec, "tooltip")
    assert "datum.name_mover" in str(spec)  # the name movers are outlined


def test_fig_self_repair(repair):
    spec = _check(fi.fig_self_repair(repair), N)
    assert {"circle", "line"} <= _marks(spec)
    assert {"lost"} <= _fields(spec, "x") and {"drop"} <= _fields(spec, "y")
    assert {"self_repair", "from_heads", "from_norm"} <= _fields(spec, "tooltip")


def _domains(spec) -> dict[str, list[float]]:
    """The explicit domains of a layered chart's x and y scales."""
    out = {}
    for layer in spec["layer"]:
        for ch in ("x", "y"):
            domain = layer.get("encoding", {}).get(ch, {}).get("scale", {}).get("domain")
            if domain is not None:
                out[ch] = domain
    return out


def test_fig_self_repair_axes_fit_the_data(repair):
    """Each axis spans its own values with a little room, not the other axis's range too: one prompt
    far out on x leaves y's domain at y's values (and the dashed y = x only where both show it)."""
    far = repair.assign(nm_delta_de=repair["nm_delta_de"].where(repair.index > 0, -50.0))
    spec = fi.fig_self_repair(far).to_dict()
    d = _domains(spec)
    for ch, values in (("x", -far["nm_delta_de"]), ("y", -far["delta_logit"])):
        lo, hi = d[ch]
        width = values.max() - values.min()
        assert lo < values.min() and hi > values.max(), (ch, d[ch])  # every point inside
        assert values.min() - lo <= 0.1 * width and hi - values.max() <= 0.1 * width, (ch, d[ch])
    assert d["y"][1] < 45  # the far x value does not stretch y
    line = [l for l in spec["layer"] if l["mark"]["type"] == "line"]
    assert line and fi.data_domain([3.0]) == [2.5, 3.5] and fi.data_domain([]) == [0.0, 1.0]


def test_fig_self_repair_ticks_and_y_title_follow_the_data(repair):
    """At 1440 px the x-axis drew 25 labels (-2.5 to 9.5 by 0.5) running into each other, and the
    y-axis said "drop" over values that were all negative (the logit difference rose): few ticks,
    labels that may not overlap, and a y title that says what its sign means."""
    def axes(r):
        spec = fi.fig_self_repair(r).to_dict()
        (enc,) = [l["encoding"] for l in spec["layer"] if l["mark"]["type"] == "circle"]
        return enc["x"], enc["y"]
    for ch in axes(repair):
        assert ch["axis"]["tickCount"] <= 10 and ch["axis"]["labelOverlap"] == "greedy"
    rose = repair.assign(delta_logit=repair["delta_logit"].abs() + 0.1)  # every drop negative
    y = axes(rose)[1]
    assert "−Δ" in y["title"] and "below 0: it rose" in y["title"] and len(y["title"]) <= 45  # fits 300 px
    fell = repair.assign(delta_logit=-repair["delta_logit"].abs() - 0.1)  # every drop positive
    assert "rose" not in axes(fell)[1]["title"] and "drop" in axes(fell)[1]["title"]


def test_fig_moving(heads):
    shown = pd.concat([heads[heads["name_mover"]], heads[~heads["name_mover"]].head(3)])
    moving = moving_frame(heads, shown, source=1)
    assert len(moving) == 3 * len(shown) and set(moving["run"]) == set(fi.RUNS)
    assert set(moving.loc[moving["role"] == "name mover", "label"]) == {"L1H0", "L1H2"}
    assert (moving["later"] == (moving["layer"] > 1)).all()
    spec = _check(fi.fig_moving(moving), len(moving))
    assert _marks(spec) == {"bar"} and "label" in _fields(spec, "x") and "direct_effect" in _fields(spec, "y")
    assert {"label", "run", "role"} <= _fields(spec, "tooltip")


def test_the_task_chart_shows_each_prompts_logit_difference(repair):
    """Issue 25: chapter 8's "does IOI" verdict came with no chart above it (§8.3); its chart is a
    histogram of the prompts' clean logit differences, IO's side of the dashed 0 in blue."""
    spec = _check(fi.fig_logit_diff(repair), N)
    assert {"bar", "rule"} <= _marks(spec)
    assert "logit_diff" in _fields(spec, "x") and "prefers" in _fields(spec, "color")
    bars = next(n for n in spec["layer"] if (n["mark"]["type"] if isinstance(n["mark"], dict) else n["mark"]) == "bar")
    assert bars["encoding"]["x"]["bin"] and bars["encoding"]["y"]["aggregate"] == "count"
    lo, hi = bars["encoding"]["x"]["scale"]["domain"]
    assert lo <= min(0, repair["logit_diff"].min()) and hi >= max(0, repair["logit_diff"].max())  # 0 shown
    one_side = repair.assign(logit_diff=repair["logit_diff"].abs() + 0.1)  # every prompt prefers IO
    legend = fi.fig_logit_diff(one_side).to_dict()["layer"][0]["encoding"]["color"]["scale"]["domain"]
    assert legend == ["IO"]  # the legend lists only what is drawn
