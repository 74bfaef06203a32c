"""Figures for chapter 07, "Attribution patching against exact ablation".

Pure functions: a per-head frame of :func:`selfrepair.atp.compare` (or the per-layer frame of
:func:`selfrepair.atp.layer_errors`) in, Altair chart out. Signs: ``error = exact - atp``, with
``exact`` the whole-set mean Δlogit (ablated − clean) of the sweep; ``error = error_norm +
error_downstream`` (+ ``error_direct``, 0 to rounding).
"""

from __future__ import annotations

import math

import altair as alt
import pandas as pd

from . import EDGE, head_tooltip, layer_color
from .legible import DARK, label_limit

TERMS = {"error_norm": "final norm", "error_downstream": "downstream heads, MLPs, block norms"}
TERM_COLORS = ["#e45756", "#4c78a8"]
MAX_LABELS = 24  # head labels on an axis at most (72 at 390 px are a smear)


def _order(frame: pd.DataFrame) -> list[str]:
    return frame.sort_values(["layer", "head"])["label"].tolist()


def fig_atp_vs_exact(heads: pd.DataFrame) -> alt.LayerChart:
    """Each head's AtP estimate (y) against its exact Δlogit (x), whole-set means, with the line
    y = x (AtP exact) spanning both axes' range; colour: layer. Scroll or drag to zoom."""
    line = (alt.Chart().transform_aggregate(a="min(exact)", b="max(exact)", c="min(atp)", d="max(atp)")
            .transform_calculate(lo="min(datum.a, datum.c)", hi="max(datum.b, datum.d)")
            .transform_fold(["lo", "hi"], as_=["end", "v"])
            .mark_line(color="#444", strokeDash=[4, 3], strokeWidth=1)
            .encode(x=alt.X("v:Q"), y=alt.Y("v:Q")))
    points = alt.Chart().mark_circle(size=60, opacity=0.85).encode(
        x=alt.X("exact:Q", scale=EDGE, title="exact Δlogit = ablated − clean (logits, mean over every token)"),
        y=alt.Y("atp:Q", scale=EDGE, title="AtP estimate of Δlogit (logits)"),
        color=layer_color(),
        tooltip=head_tooltip("exact", "atp", "error", "error_norm", "error_downstream",
                             "delta_direct_effect", "self_repair", "atp_self_repair"),
    ).add_params(alt.selection_interval(bind="scales", name="zoom"))
    return alt.layer(line, points, data=heads).properties(
        title="AtP vs the exact ablation, per head (dashed: y = x)", width="container", height=300)


def fig_layer_error(layers: pd.DataFrame) -> alt.LayerChart:
    """Per layer: mean |exact − AtP| over its heads (bars) and, for scale, mean |exact Δlogit|
    (black ticks)."""
    base = alt.Chart(layers)
    tips = [alt.Tooltip("layer:O"), alt.Tooltip("n_heads:Q", title="heads"),
            alt.Tooltip("abs_error:Q", format=".3g", title="mean |exact − AtP|"),
            alt.Tooltip("abs_exact:Q", format=".3g", title="mean |exact Δlogit|"),
            alt.Tooltip("error:Q", format=".3g", title="mean exact − AtP")]
    # the palette's grey (was light blue #9ecae9, 1.7:1 on white): neutral beside the parts' red and
    # blue (fig_error_decomposition), the black ticks still read on it (4.5:1)
    bars = base.mark_bar(color=DARK["grey"]).encode(
        x=alt.X("layer:O", title="layer"), y=alt.Y("abs_error:Q", title="logits"), tooltip=tips)
    ticks = base.mark_tick(color="black", thickness=2, size=18).encode(
        x="layer:O", y="abs_exact:Q", tooltip=tips)
    return alt.layer(bars, ticks).properties(
        title="Per layer: mean |exact − AtP| (bars) and mean |exact Δlogit| (ticks)", width="container",
        height=220)


def decomposition_frame(heads: pd.DataFrame) -> pd.DataFrame:
    """Long form of the error's two parts per head: ``layer, head, label, term, value, error``."""
    long = heads.melt(id_vars=["layer", "head", "label", "error"], value_vars=list(TERMS),
                      var_name="term", value_name="value")
    return long.assign(term=long["term"].map(TERMS))


def head_axis(order: list, most: int = MAX_LABELS) -> alt.Axis:
    """The head axis: every head labelled where they are at most ``most``, else every k-th (the
    first of each run of k), titled so that a reader hovers for the rest — 72 labels at 390 px
    are a smear."""
    step = max(1, math.ceil(len(order) / most))
    if step == 1:
        return alt.Axis(labelAngle=-90, title="head")
    return alt.Axis(labelAngle=-90, values=list(order[::step]),
                    title=f"head (one in {step} labelled; hover a bar for its head)")


def fig_error_decomposition(heads: pd.DataFrame) -> alt.LayerChart:
    """Per head (x, in layer order): exact − AtP split into the final norm's part and the
    downstream components' part (stacked signed bars); the black tick is the total."""
    long = decomposition_frame(heads)
    order = _order(heads)
    axis = head_axis(order)
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("label:N", sort=order, title=axis.title, axis=axis),
        y=alt.Y("sum(value):Q", title="exact − AtP (logits)"),
        color=alt.Color("term:N", scale=alt.Scale(domain=list(TERMS.values()), range=TERM_COLORS),
                        title="part",  # one part a line, each name whole (it fits a phone)
                        legend=alt.Legend(orient="bottom", columns=1, labelLimit=label_limit(TERMS.values()))),
        tooltip=[alt.Tooltip("label:N", title="head"), alt.Tooltip("term:N", title="part"),
                 alt.Tooltip("sum(value):Q", format=".3g", title="logits"),
                 alt.Tooltip("mean(error):Q", format=".3g", title="total exact − AtP")])
    total = alt.Chart(heads).mark_tick(color="black", thickness=2).encode(
        x=alt.X("label:N", sort=order, title=axis.title, axis=axis), y="error:Q",
        tooltip=head_tooltip("error", "error_norm", "error_downstream"))
    zero = alt.Chart(heads).mark_rule(color="#888").encode(y=alt.datum(0))
    return alt.layer(zero, bars, total).properties(
        title="Where AtP's error comes from: exact − AtP per head (tick: total)", width="container",
        height=240)
