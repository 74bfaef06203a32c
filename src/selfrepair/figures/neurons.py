"""Figures for chapter 03, "Anti-erasure neurons" (paper §4, App. C: Fig 7, 8, 11-14; §4.2.2).

Pure functions: a tidy frame from :mod:`selfrepair.neurons` in, an Altair chart out; they need only
``altair`` and ``pandas``. Signs: ``delta = ablated - clean`` direct effect at the clean scales; a
neuron repairs when its delta is positive; an erasure neuron has a negative clean DE.
"""

from __future__ import annotations

import json

import altair as alt
import pandas as pd

from . import series_color
from .encodings import distinct_colors
from .legible import DARK, signed_color

# label only 1, 2, 5 x 10^n on log axes (the default labels every tick and they collide)
LOG_LABELS = ("indexof([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000], "
              "datum.value) >= 0 ? datum.label : ''")
HEAD_TIPS = [alt.Tooltip("label:N", title="head"), alt.Tooltip("layer:O"), alt.Tooltip("head:O")]


def _q(*fields: str) -> list[alt.Tooltip]:
    return [alt.Tooltip(f"{f}:Q", format=".3f", title=f.replace("_", " ")) for f in fields]


def fig_top_neuron(instances: pd.DataFrame) -> alt.FacetChart:
    """Fig 7: per token (one panel per head), the clean (x) and ablated (y) DE of the neuron that
    repairs most on that token, coloured by the whole MLP layer's clean DE (red below 0, grey at 0,
    blue above: :func:`~selfrepair.figures.legible.signed_color`, no shade near-white). Points
    above the dashed y = x line repaired; left of 0 they are erasure neurons doing anti-erasure.
    The colour bar sits under the panels: beside them it took 100 px of a phone's column, and the
    renderer narrowed the one panel to 155 px to fit."""
    base = alt.Chart()
    diagonal = base.mark_line(color="#444", strokeDash=[4, 3], strokeWidth=1).encode(
        x="neuron_clean_de:Q", y="neuron_clean_de:Q")
    points = base.mark_circle(size=40, opacity=0.85).encode(
        x=alt.X("neuron_clean_de:Q", title="top neuron's clean DE (logits)"),
        y=alt.Y("neuron_ablated_de:Q", title="top neuron's ablated DE (logits)"),
        color=signed_color("layer_clean", instances["layer_clean"], title="MLP layer clean DE",
                           legend=alt.Legend(orient="bottom", direction="horizontal", gradientLength=160)),
        tooltip=HEAD_TIPS + [alt.Tooltip("neuron:O"), alt.Tooltip("row:O"), alt.Tooltip("pos:O")]
        + _q("neuron_clean_de", "neuron_ablated_de", "layer_clean", "layer_delta", "self_repair",
             "direct_effect"))
    zero = base.mark_rule(color="#888", strokeWidth=1).encode(x=alt.datum(0))
    return alt.layer(zero, diagonal, points, data=instances).properties(width=260, height=240).facet(
        facet=alt.Facet("label:N", title=None), columns=2).resolve_scale(x="independent", y="independent").properties(
        title="Top self-repairing neuron per token: clean vs ablated direct effect")


KINDS = {"nth": "N-th neuron alone", "top_n": "top N together"}


def threshold_colors(n: int) -> list[str]:
    """``n`` distinct hues (:func:`~.encodings.distinct_colors`, each 3:1 on white), one per
    threshold of Fig 8."""
    return distinct_colors(n)


def fig_sparsity(sparsity: pd.DataFrame) -> alt.FacetChart:
    """Fig 8: share of tokens on which the rank-N repairing neuron (``nth``; the paper's figure) or
    the top N together (``top_n``) repair at least X% of the head's clean DE. One wrapped facet of
    "head · kind" panels, two to a row (a head's two panels side by side; one column on a phone),
    each wide enough to read."""
    data = sparsity.assign(panel=sparsity["label"] + " · " + sparsity["kind"].map(KINDS))
    heads = list(dict.fromkeys(sparsity.sort_values(["layer", "head"])["label"]))
    panels = [f"{h} · {k}" for h in heads for k in KINDS.values()]
    percents = sorted({float(p) if not float(p).is_integer() else int(p) for p in sparsity["percent"]}, reverse=True)
    chart = alt.Chart().mark_line(point=True).encode(
        x=alt.X("rank:Q", scale=alt.Scale(type="log"), title="N (neuron rank by repair)",
                axis=alt.Axis(labelExpr=LOG_LABELS)),
        y=alt.Y("share:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"),
                title="share of tokens"),
        # one distinct hue per threshold (five shades of one purple-to-teal ramp were hard to tell
        # apart), every one 3:1 on white
        color=alt.Color("percent:O", title="repairs ≥ X% of DE", sort=percents,
                        scale=alt.Scale(domain=percents, range=threshold_colors(len(percents))),
                        legend=alt.Legend(orient="bottom")),
        tooltip=HEAD_TIPS + [alt.Tooltip("kind:N"), alt.Tooltip("rank:Q"), alt.Tooltip("percent:Q"),
                             alt.Tooltip("share:Q", format=".1%"), alt.Tooltip("n_instances:Q")])
    return alt.layer(chart, data=data).properties(width=280, height=180).facet(
        facet=alt.Facet("panel:N", sort=panels, title=None), columns=2).properties(
        title="How often a few neurons repair a given share of the head's direct effect")


SIGNS = {"negative (erasure)": "#d62728", "positive": "#1f77b4"}  # dark enough on white, both


def fig_cumulative(cumulative: pd.DataFrame) -> alt.FacetChart:
    """App. C Fig 11-14: cumulative share of the layer's total absolute change in neuron DE against
    neuron rank (log scale, from 1 to the layer's last neuron), each neuron coloured by the sign
    of its median clean DE (red: an erasure neuron on a typical token; the value on hover). Every
    panel draws its own x-axis, so an odd number of heads leaves no axis under an empty slot."""
    cumulative = _signs(cumulative)
    base = alt.Chart()
    # the axis ends at the layer's last neuron (a log scale's "nice" end, 10,000, is empty)
    last = max(2, int(cumulative["rank"].max())) if len(cumulative) else 2
    x = alt.X("rank:Q", scale=alt.Scale(type="log", domain=[1, last], nice=False),
              title="neuron rank by |ΔDE| (log)", axis=alt.Axis(labelExpr=LOG_LABELS))
    y = alt.Y("cumulative_share:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"),
              title="cumulative share of |ΔDE|")
    line = base.mark_line(color=DARK["grey"]).encode(x=x, y=y)
    points = base.mark_circle(size=28, opacity=0.9).encode(
        x=x, y=y, color=_sign_color(cumulative),
        tooltip=HEAD_TIPS + [alt.Tooltip("rank:Q"), alt.Tooltip("neuron:O"),
                             alt.Tooltip("cumulative_share:Q", format=".1%"),
                             alt.Tooltip("share:Q", format=".2%")]
        + _q("mean_delta_de", "median_clean_de"))
    return alt.layer(line, points, data=cumulative).properties(width=260, height=200).facet(
        facet=alt.Facet("label:N", title=None), columns=2).resolve_axis(x="independent").properties(
        title="Cumulative share of the absolute change in neuron direct effects")


def _signs(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``sign``: the name of its neuron's kind by the sign of its median clean DE."""
    return frame.assign(sign=frame["median_clean_de"].map(lambda v: "negative (erasure)" if v < 0 else "positive"))


def _sign_color(frame: pd.DataFrame) -> alt.Color:
    return series_color("sign", SIGNS, frame["sign"], title="neuron's median clean DE",
                        legend=alt.Legend(orient="bottom", titleLimit=400, labelLimit=300))


def fig_top_frequency(frequency: pd.DataFrame) -> alt.FacetChart:
    """§4.2.2: the neurons most often among the top-10 repairing neurons of a token, and on what
    share of the most self-repaired tokens they are there (paper: at most 16% for Pythia L10H11);
    coloured as in Fig 11-14 by the sign of the neuron's median clean DE (red: an erasure neuron;
    the value on hover)."""
    frequency = _signs(frequency)
    chart = alt.Chart().mark_bar().encode(
        x=alt.X("neuron:N", sort=alt.EncodingSortField("frequency", order="descending"),
                title="neuron"),
        y=alt.Y("frequency:Q", axis=alt.Axis(format="%"), title="share of tokens in the top 10"),
        color=_sign_color(frequency),
        tooltip=HEAD_TIPS + [alt.Tooltip("neuron:O"), alt.Tooltip("rank:Q"),
                             alt.Tooltip("frequency:Q", format=".1%"), alt.Tooltip("n_instances:Q")]
        + _q("median_clean_de"))
    return alt.layer(chart, data=frequency).properties(width=260, height=200).facet(
        facet=alt.Facet("label:N", title=None), columns=2).resolve_scale(x="independent").properties(
        title="Do the same neurons repair on every token?")


ERASURE_MEASURES = {
    "negative_baseline": "all neurons: negative clean DE",
    "erasure_top": "top-10 repairing: negative clean DE",
    "erasure_repair_share": "share of repair from erasure neurons",
    "fig7_anti_erasure": "top neuron does anti-erasure (Fig 7 tokens)",
    "layer_positive": "whole layer's clean DE > 0",
}


def fig_erasure(summary: pd.DataFrame) -> alt.Chart:
    """Erasure view (Hydra §2.5.2; paper App. C): per head, how much of the repair comes from
    erasure neurons, against the share of all neurons with a negative clean DE."""
    names = list(ERASURE_MEASURES)
    return alt.Chart(summary).transform_fold(names, as_=["measure", "value"]).transform_calculate(
        what=" + ".join(f"(datum.measure == {json.dumps(k)} ? {json.dumps(v)} : '')"
                        for k, v in ERASURE_MEASURES.items())
    ).mark_bar().encode(
        x=alt.X("label:N", title="head", sort=alt.EncodingSortField("layer")),
        xOffset=alt.XOffset("what:N", sort=[ERASURE_MEASURES[k] for k in names]),
        y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="share"),
        color=alt.Color("what:N", sort=[ERASURE_MEASURES[k] for k in names], title=None,
                        legend=alt.Legend(orient="bottom", columns=2, labelLimit=320)),
        tooltip=HEAD_TIPS + [alt.Tooltip("what:N", title="measure"),
                             alt.Tooltip("value:Q", format=".1%")]
    ).properties(width="container", height=220, title="Erasure neurons among the repairing neurons")
