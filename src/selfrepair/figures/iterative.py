"""Figures for chapter 04, "Iterative inference: self-reinforcing and self-repressing heads"
(paper §5.3, App. F, G: Fig 18, 19).

Pure functions: a tidy frame from :mod:`selfrepair.iterative` in, an Altair chart out; they need
only ``altair`` and ``pandas``. ``relative_change = (new DE - DE) / |DE|`` on the head's top-k%
tokens, after adding alpha x the head's own output to its layer's attention input.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from . import series_color
from .encodings import HUES, distinct_colors
from .encodings import HEAT_SIGNED
from .legible import DARK, DEPTH_SCHEME, MARK_OPACITY, SIGNED

HEAD_TIPS = [alt.Tooltip("label:N", title="head"), alt.Tooltip("layer:O"), alt.Tooltip("head:O")]
CLASS_ORDER = ["self-repressing", "neutral", "self-reinforcing", "weak"]
# 3:1 on white at MARK_OPACITY, each, and each its own hue: the head map's red and blue (SIGNED's
# ends), "weak" (unclassified) grey, "neutral" a dark gold (was a darker grey, #4d4d4d, that read as a
# second shade of the weak heads' grey; gold stays apart from red, blue and grey for red-green colour
# blindness too)
NEUTRAL = "#a07000"
CLASS_COLORS = [SIGNED[0], NEUTRAL, SIGNED[-1], DARK["grey"]]


def _class_color(frame: pd.DataFrame, title: str = "class") -> alt.Color:
    """The classes ``frame`` holds (the legend lists only those drawn)."""
    return series_color("class", dict(zip(CLASS_ORDER, CLASS_COLORS)), frame["class"], title=title)


def _alpha_color(alphas: list[float]) -> alt.Color:
    """One hue per alpha (:func:`~.encodings.distinct_colors`: three shades of one ramp, the α = 3
    and α = 5 teals, were hard to tell apart); more alphas than hues: the depth ramp's shades."""
    if len(alphas) > len(HUES):
        return alt.Color("alpha:O", title="α", scale=alt.Scale(scheme=DEPTH_SCHEME))
    return alt.Color("alpha:O", title="α", scale=alt.Scale(domain=alphas, range=distinct_colors(len(alphas))))


MAX_ALPHA_TICKS = 12  # alphas an axis labels one by one (more: Vega's own whole-number ticks)


def _alpha_axis(alphas: list[float]) -> alt.Axis:
    """Ticks at the alphas measured, or, for many, at most 10 (whole numbers where every alpha is one)."""
    if len(alphas) <= MAX_ALPHA_TICKS:
        return alt.Axis(values=alphas, format="~g", labelOverlap="greedy", labelSeparation=4)
    whole = {"tickMinStep": 1} if all(float(a).is_integer() for a in alphas) else {}
    return alt.Axis(tickCount=10, format="~g", labelSeparation=4, **whole)


def fig_amplified_tokens(tokens: pd.DataFrame) -> alt.FacetChart:
    """Fig 18/19: per top token of each featured head, its original DE (x) and its new DE (y) after
    adding alpha x its own output to its input, one colour per alpha; below the dashed y = x line
    the head represses itself."""
    base = alt.Chart()
    diagonal = base.mark_line(color="#444", strokeDash=[4, 3], strokeWidth=1).encode(
        x="direct_effect:Q", y="direct_effect:Q")
    zero = base.mark_rule(color="#888", strokeWidth=1).encode(y=alt.datum(0))
    points = base.mark_circle(size=30, opacity=MARK_OPACITY).encode(
        x=alt.X("direct_effect:Q", title="original direct effect (logits)"),
        y=alt.Y("new_direct_effect:Q", title="new direct effect (logits)"),
        color=_alpha_color(sorted(tokens["alpha"].unique()) if "alpha" in tokens else []),
        tooltip=HEAD_TIPS + [alt.Tooltip("alpha:Q"), alt.Tooltip("row:O"), alt.Tooltip("pos:O"),
                             alt.Tooltip("direct_effect:Q", format=".3f", title="direct effect"),
                             alt.Tooltip("new_direct_effect:Q", format=".3f", title="new direct effect")])
    return alt.layer(zero, diagonal, points, data=tokens).properties(width=240, height=220).facet(
        facet=alt.Facet("label:N", title=None), columns=2).resolve_scale(x="independent", y="independent").properties(
        title="A head's direct effect after its own output is added to its input")


def fig_response(response: pd.DataFrame) -> alt.LayerChart:
    """Every head's relative change of mean top-token DE against alpha (alpha = 0: no change),
    coloured by class (needs a ``class`` column: :func:`selfrepair.iterative.response` with
    ``classes``). The x-axis ticks the alphas measured (at most :data:`MAX_ALPHA_TICKS` of them;
    0.2 steps between 0 and 5 crowd it)."""
    alphas = sorted(float(a) for a in response["alpha"].unique()) or [0.0, 1.0]
    base = alt.Chart(response)
    lines = base.mark_line(point=True, opacity=MARK_OPACITY, strokeWidth=1.2).encode(
        x=alt.X("alpha:Q", title="α (scale of the head's own output added)",
                scale=alt.Scale(domain=[alphas[0], alphas[-1]], nice=False) if len(alphas) > 1 else alt.Scale(),
                axis=_alpha_axis(alphas)),
        y=alt.Y("relative_change:Q", axis=alt.Axis(format="%"),
                title="change of mean top-token DE (share of DE)"),
        detail="label:N", color=_class_color(response),
        tooltip=HEAD_TIPS + [alt.Tooltip("class:N"), alt.Tooltip("alpha:Q"),
                             alt.Tooltip("relative_change:Q", format=".1%", title="relative change"),
                             alt.Tooltip("direct_effect:Q", format=".3f", title="direct effect"),
                             alt.Tooltip("new_direct_effect:Q", format=".3f", title="new direct effect")])
    zero = base.mark_rule(color="#888").encode(y=alt.datum(0))
    return alt.layer(zero, lines).properties(width="container", height=280,
                                             title="How each head responds to its own output")


def fig_head_map(classes: pd.DataFrame) -> alt.Chart:
    """Layer x head map of the relative change at the largest alpha (red: self-repressing, blue:
    self-reinforcing); the tooltip adds the class, the all-token change and the random control."""
    return alt.Chart(classes).mark_rect(stroke="white").encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("relative_change:Q", title="relative change",
                        scale=alt.Scale(domain=[-1, 0, 1], range=list(HEAT_SIGNED), interpolate="lab", clamp=True),
                        legend=alt.Legend(format="%")),
        tooltip=HEAD_TIPS + [alt.Tooltip("class:N"), alt.Tooltip("alpha:Q")]
        + [alt.Tooltip(f"{f}:Q", format=".1%", title=f.replace("_", " "))
           for f in ("relative_change", "relative_change_all", "control_change")]
        + [alt.Tooltip("direct_effect:Q", format=".3f", title="direct effect"),
           alt.Tooltip("specific:N"), alt.Tooltip("monotone:N"), alt.Tooltip("flips:N")],
    ).properties(width=alt.Step(28), height=alt.Step(16),
                 title="Response to the head's own output at the largest α")
