"""Figures for the across-models chapter (self-repair paper Fig 1 multi-model, Fig 2 and 20-22).

Pure functions: the tidy frames of :mod:`selfrepair.across` in, an Altair chart out. Runs of this
project and the paper's released values are told apart by ``source`` (filled vs hollow marks).
"""

from __future__ import annotations

import itertools

import altair as alt

from . import series_color
from .legible import DARK, DEPTH_SCHEME, MARK_OPACITY, label_limit

HEAD_TIPS = [alt.Tooltip("run:N", title="model"), alt.Tooltip("label:N", title="head"),
             alt.Tooltip("direct_effect:Q", format=".3f", title="direct effect"),
             alt.Tooltip("delta_logit:Q", format=".3f", title="Δlogit"),
             alt.Tooltip("self_repair:Q", format=".3f", title="self-repair")]
SOURCE_COLORS = {"paper": DARK["blue"], "this project": DARK["dark orange"]}  # 3:1 on white, both,
OTHER_OPACITY = 0.85  # even at the opacity of the runs not selected (legible.blend)
# depth as in every chapter (legible.DEPTH_SCHEME: dark purple to teal, 3:1 on white at MARK_OPACITY)
DEPTH = alt.Color("rel_layer:Q", scale=alt.Scale(scheme=DEPTH_SCHEME, domain=[0, 1]), title="relative depth",
                  legend=alt.Legend(orient="bottom"))  # below the panels: they fit a laptop page


# a phone narrows the explorer's views: few ticks, and labels that would touch dropped ("0.00.1")
FEW_TICKS = alt.Axis(tickCount=4, labelOverlap=True, labelSeparation=6, labelFlush=True)


def short_run(run: str) -> str:
    """A run's name for a narrow drop-down: "gemma-3-270m (ours)", "gpt2-small (paper)"."""
    import re

    return re.sub(r" \((ours|paper)\b[^)]*\)", r" (\1)", run)


def fig_layer_profiles(heads) -> alt.FacetChart:
    """Self-repair paper Fig 1, one panel per model: each head's self-repair (top-k% tokens) by
    layer, and the layer mean (line). Paper panels show the authors' released values."""
    points = alt.Chart().mark_point(size=18, filled=True, opacity=MARK_OPACITY).encode(
        x=alt.X("layer:Q", axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("self_repair:Q", title="self-repair"), color=DEPTH, tooltip=HEAD_TIPS)
    mean = alt.Chart().mark_line(color="black").encode(x="layer:Q", y="mean(self_repair):Q")
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[2, 2]).encode(y=alt.datum(0))
    return (alt.layer(points, mean, zero, data=heads).properties(width=160, height=160)  # 3 fit 1024 px
            .facet(facet=alt.Facet("run:N", title=None, sort=list(dict.fromkeys(heads["run"]))), columns=3)
            # one y axis for every panel: ours beside the paper's sizes reads at a glance (independent
            # axes drew ours on -2 to 6 and the paper's on -1 to 1.5, hiding the difference the text reports)
            .resolve_scale(x="independent", y="shared")
            .properties(title="Self-repair per head and layer mean, every model (paper Fig 1)"))


def fig_model_explorer(heads, layers, default: str | None = None) -> alt.HConcatChart:
    """A model selector (dropdown) driving two views: left, the selected run's heads, whole-set mean
    direct effect against Δlogit (``heads``: Fig 2 / 20-22's setup; dashed y = -DE: no
    self-repair; heads between it and y = 0 are self-repaired); right, mean top-k% self-repair by
    relative depth for every run (``layers``), the selected one drawn thick on top of the others
    (thin, every one dark enough on white). ``default``: the run (or the first run of the model)
    shown first."""
    runs = list(dict.fromkeys(heads["run"]))
    of_model = list(dict.fromkeys(heads.loc[heads["model"] == default, "run"]))
    first = default if default in runs else (of_model or runs)[0]
    # the drop-down names the model and whose numbers (a run's full name overflowed a phone's column)
    pick = alt.param(name="model", value=first,
                     bind=alt.binding_select(options=runs, labels=[short_run(r) for r in runs], name="model: "))
    chosen = alt.datum.run == pick
    base = alt.Chart(heads).transform_filter(chosen)
    scatter = base.mark_circle(size=30, opacity=MARK_OPACITY).encode(
        x=alt.X("direct_effect:Q", title="mean direct effect, every token", axis=FEW_TICKS),
        y=alt.Y("delta_logit:Q", title="mean Δlogit when ablated"), color=DEPTH, tooltip=HEAD_TIPS)
    no_repair = base.transform_calculate(neg="-datum.direct_effect").mark_line(
        color="gray", strokeDash=[4, 4]).encode(x="direct_effect:Q", y="neg:Q")
    zero = alt.Chart(heads).mark_rule(color="gray").encode(y=alt.datum(0))
    left = (scatter + no_repair + zero).properties(width=260, height=260,
                                                   title="Heads of the selected model")
    tips = [alt.Tooltip("run:N", title="model"), alt.Tooltip("layer:O"), alt.Tooltip("self_repair:Q", format=".3f"),
            alt.Tooltip("direct_effect:Q", format=".3f"), alt.Tooltip("delta_logit:Q", format=".3f")]
    profile = alt.Chart(layers).encode(
        x=alt.X("rel_layer:Q", title="relative depth (layer / last layer)", axis=FEW_TICKS),
        y=alt.Y("self_repair:Q", title="layer mean of top-k% self-repair"),
        detail="run:N", color=series_color("source", SOURCE_COLORS, layers["source"],
                                           legend=alt.Legend(orient="bottom")), tooltip=tips)
    # every run thin but dark enough to read (OTHER_OPACITY), the selected one drawn again on top, thick
    others = profile.mark_line(point=alt.OverlayMarkDef(size=20), strokeWidth=1, opacity=OTHER_OPACITY)
    picked = profile.transform_filter(chosen).mark_line(point=True, strokeWidth=3)
    right = alt.layer(others, picked).properties(width=260, height=260, title="Per-layer self-repair, all models")
    return alt.hconcat(left, right).add_params(pick).properties(
        title="Our measurements beside the paper's released values (Rushing & Nanda 2024)")


def fig_claims(table) -> alt.LayerChart:
    """The claims table as dots: one row per claim, its words whole above its dots (not an axis
    label cut at its limit, nor one that squeezes the plot on a phone), one dot per model run,
    coloured and shaped by run (square: this project's, circle: the paper's). One legend, one run
    a line, every name whole: it fits a phone."""
    cols = {"frac_self_repaired_late": "late heads self-repaired (top-k%)",
            "norm_share_late": "final-norm share of DE (top-k%, clipped)",
            "frac_between_all": "heads between y = −x and 0 (every token)"}
    long = table.melt(id_vars=["run", "source"], value_vars=list(cols), var_name="claim", value_name="value")
    long["claim"] = long["claim"].map(cols)
    runs = list(dict.fromkeys(table["run"]))
    source = dict(zip(table["run"], table["source"]))
    colors = [c for _, c in zip(runs, itertools.cycle(DARK.values()))]
    legend = alt.Legend(orient="bottom", columns=1, labelLimit=label_limit(runs))
    y = alt.Y("claim:N", title=None, sort=list(cols.values()), axis=None)
    # opaque (every colour of DARK reads on white only at full strength), outlined in white where dots meet
    dots = alt.Chart(long).mark_point(size=90, filled=True, opacity=1, stroke="white", strokeWidth=1).encode(
        x=alt.X("value:Q", title="fraction", axis=alt.Axis(format="%")), y=y,
        color=alt.Color("run:N", title="model", scale=alt.Scale(domain=runs, range=colors), legend=legend),
        shape=alt.Shape("run:N", title="model", legend=legend, scale=alt.Scale(
            domain=runs, range=["square" if source[r] == "this project" else "circle" for r in runs])),
        tooltip=[alt.Tooltip("run:N", title="model"), alt.Tooltip("source:N"), alt.Tooltip("claim:N"),
                 alt.Tooltip("value:Q", format=".1%")])
    words = (alt.Chart(long).transform_aggregate(runs="count()", groupby=["claim"])
             .mark_text(align="left", baseline="bottom", dy=-9, fontSize=12, color="#222")
             .encode(x=alt.value(0), y=y, text="claim:N"))
    return alt.layer(dots, words).properties(width="container", height=alt.Step(44),
                                             title="The paper's claims, model by model")
