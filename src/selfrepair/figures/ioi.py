"""Figures for chapter 08, "Backup name movers in IOI".

Pure functions: a frame of :mod:`selfrepair.name_movers` (per head: :func:`~selfrepair.name_movers.head_frame`;
per prompt: :func:`~selfrepair.name_movers.repair_frame`) or chapter 8's long ``moving`` frame in,
Altair chart out. Every direct effect is on the logit difference ``IO − S`` at the end position,
read at the clean scales; ``delta = ablated − clean``.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from . import diverging_color, head_tooltip
from .legible import DARK, data_domain, signed_color, wrap

HEAD_FIELDS = ("direct_effect", "attn_io", "attn_s", "ablated_direct_effect", "delta_direct_effect",
               "moved_direct_effect")
RUNS = ["clean", "name movers ablated", "residual moved"]
RUN_COLORS = [DARK["blue"], DARK["red"], DARK["green"]]
TITLE_CHARS = 48  # a title's line at a phone's width
PAD = 0.05  # a scatter's axis: the data's range and this share of it on each side


def _heatmap(heads: pd.DataFrame, field: str, title: str, legend: str) -> alt.LayerChart:
    """Layer (y, top to bottom) by head (x) cells coloured by ``field`` (centred at 0); name
    movers outlined in black."""
    base = alt.Chart(heads).encode(
        x=alt.X("head:O", title="head"), y=alt.Y("layer:O", title="layer", sort="ascending"))
    cells = base.mark_rect().encode(
        color=diverging_color(field, title=legend),
        tooltip=head_tooltip(*HEAD_FIELDS, "name_mover:N"))
    movers = base.transform_filter("datum.name_mover").mark_rect(
        fill=None, stroke="black", strokeWidth=2).encode(tooltip=head_tooltip(*HEAD_FIELDS))
    return alt.layer(cells, movers).properties(  # the name movers' outline named on its own line: a phone's width
        title=alt.Title(wrap(title, TITLE_CHARS), subtitle="outlined: the name movers"), width="container", height=260)


def fig_head_de(heads: pd.DataFrame) -> alt.LayerChart:
    """Every head's mean direct effect on the logit difference (clean run); name movers outlined."""
    return _heatmap(heads, "direct_effect", "Direct effect on logit(IO) − logit(S), per head", "DE (logits)")


def fig_backup_change(heads: pd.DataFrame) -> alt.LayerChart:
    """Every head's change of direct effect when the name movers are ablated (blue: grows)."""
    return _heatmap(heads, "delta_direct_effect", "Change of each head's direct effect when the name "
                    "movers are ablated", "ΔDE (logits)")


PREFERS = {"IO": DARK["blue"], "S": DARK["red"]}  # which name a prompt's clean logit difference prefers


def fig_logit_diff(repair: pd.DataFrame) -> alt.LayerChart:
    """The task (chapter 8's "does IOI" claim): a histogram of the prompts' clean logit differences
    ``logit(IO) − logit(S)`` at the end, coloured by the name each prefers (blue: IO, right of the
    dashed line at 0; red: S), the axis spanning the data and 0."""
    data = repair[["prompt", "logit_diff"]].assign(prefers=(repair["logit_diff"] > 0).map({True: "IO", False: "S"}))
    span = data_domain(data["logit_diff"], include=(0,), pad=PAD)
    drawn = [k for k in PREFERS if (data["prefers"] == k).any()]  # the legend lists what is drawn
    bars = alt.Chart(data).mark_bar(binSpacing=1).encode(
        x=alt.X("logit_diff:Q", bin=alt.Bin(maxbins=30, extent=span), scale=alt.Scale(domain=span, nice=False),
                title="logit(IO) − logit(S) at the end (logits)", axis=alt.Axis(labelOverlap="greedy")),
        y=alt.Y("count():Q", title="prompts", axis=alt.Axis(tickMinStep=1, format="d")),
        color=alt.Color("prefers:N", title="prefers", scale=alt.Scale(domain=drawn, range=[PREFERS[k] for k in drawn]),
                        legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("prefers:N"), alt.Tooltip("count():Q", title="prompts")])
    zero = alt.Chart(data).mark_rule(color="#444", strokeDash=[4, 3], strokeWidth=1.5).encode(x=alt.datum(0))
    return alt.layer(bars, zero).properties(
        title=alt.Title(wrap("Each prompt's clean logit difference IO − S", TITLE_CHARS),
                        subtitle="right of the dashed line: IO preferred"), width="container", height=200)


def fig_self_repair(repair: pd.DataFrame) -> alt.LayerChart:
    """Per prompt: the name movers' direct effect lost (x, ``−ΔDE``) against the drop of the logit
    difference (y, ``−Δ logit diff``); on the dashed line ``y = x`` nothing repairs, below it the
    rest of the network gives some back (eq. 1's self-repair is the vertical distance, and the
    colour: red below 0, grey at 0, blue above, no shade near-white)."""
    data = repair.assign(lost=-repair["nm_delta_de"], drop=-repair["delta_logit"])
    tips = [alt.Tooltip("prompt:O"), alt.Tooltip("lost:Q", format=".3g", title="DE lost"),
            alt.Tooltip("drop:Q", format=".3g", title="logit diff drop (−Δ)"),
            alt.Tooltip("self_repair:Q", format=".3g", title="self-repair"),
            alt.Tooltip("from_heads:Q", format=".3g", title="other heads"),
            alt.Tooltip("from_mlps:Q", format=".3g", title="MLP layers"),
            alt.Tooltip("from_norm:Q", format=".3g", title="final norm"),
            alt.Tooltip("logit_diff:Q", format=".3g", title="clean logit diff")]
    xs, ys = data_domain(data["lost"], pad=PAD), data_domain(data["drop"], pad=PAD)
    # a handful of ticks whose labels never touch (25 labels, -2.5 to 9.5 by 0.5, ran together at
    # 1440 px), and a y title that says what a value below 0 is (a model whose logit difference
    # rose on every prompt drew only negative "drops" under a title that said "drop")
    axis = dict(tickCount=8, labelOverlap="greedy", labelSeparation=8)
    # (short: a rotated title longer than the 300 px plot is cut)
    y_title = ("−Δ logit diff. (logits; below 0: it rose)" if (data["drop"] < 0).any()
               else "drop of the logit difference (logits)")
    points = alt.Chart(data).mark_circle(size=50, opacity=0.85).encode(
        x=alt.X("lost:Q", scale=alt.Scale(domain=list(xs), nice=False, zero=False),
                title="name movers' direct effect lost, −ΔDE (logits)", axis=alt.Axis(**axis)),
        y=alt.Y("drop:Q", scale=alt.Scale(domain=list(ys), nice=False, zero=False),
                title=y_title, axis=alt.Axis(**axis)),
        color=signed_color("self_repair", data["self_repair"], title="self-repair"),
        tooltip=tips).add_params(alt.selection_interval(bind="scales", name="zoom"))
    lo, hi = max(xs[0], ys[0]), min(xs[1], ys[1])  # y = x where both axes show it
    layers = ([alt.Chart(data).transform_aggregate(n="count()").transform_calculate(lo=repr(lo), hi=repr(hi))
               .transform_fold(["lo", "hi"], as_=["end", "v"])  # the two ends, from the same data
               .mark_line(color="#444", strokeDash=[4, 3], strokeWidth=1.5).encode(x="v:Q", y="v:Q")]
              if lo < hi else [])
    return alt.layer(*layers, points).properties(
        title="Per prompt: logit-difference drop vs the direct effect lost (dashed: no repair)",
        width="container", height=300)


def fig_moving(moving: pd.DataFrame) -> alt.Chart:
    """Per shown head (name movers, then backups): its mean direct effect on the logit difference
    in the clean run, with the name movers ablated, and reading the residual that entered the
    first name mover's layer (grouped bars)."""
    order = list(dict.fromkeys(moving.sort_values(["role", "layer", "head"], ascending=[False, True, True])["label"]))
    return alt.Chart(moving).mark_bar().encode(
        x=alt.X("label:N", sort=order, title="head (name movers first)"),
        xOffset=alt.XOffset("run:N", sort=RUNS),
        y=alt.Y("direct_effect:Q", title="DE on logit diff (logits)"),
        color=alt.Color("run:N", sort=RUNS, scale=alt.Scale(domain=RUNS, range=RUN_COLORS), title="run",
                        legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("label:N", title="head"), alt.Tooltip("role:N"), alt.Tooltip("run:N"),
                 alt.Tooltip("direct_effect:Q", format=".3g", title="DE"),
                 alt.Tooltip("later:N", title="after the first name mover's layer")],
    ).properties(title="Name movers and backups: clean, name movers ablated, residual moved",
                 width="container", height=260)


__all__ = ["fig_backup_change", "fig_head_de", "fig_logit_diff", "fig_moving", "fig_self_repair"]
