"""Encodings every chapter's figures share, so that a chart reads at a glance:

- :func:`head_slots` / :func:`layer_x` — one mark per head on a layer axis: a layer's heads side by
  side, a gap between layers, one label per layer (72 heads need 18 labels, not 72 unreadable ones;
  at most :data:`MAX_LABELS`);
- :func:`labels_only` — an axis that labels only the heads that matter (the rest on hover);
- :func:`present` / :func:`series_color` — a legend that lists only the series the chart draws,
  each series keeping its colour in every chart;
- :func:`layer_color` — depth, the same colour in every chapter (:data:`~.legible.DEPTH_SCHEME`);
  :data:`ABLATION_COLORS` — each ablation's colour, the same in chapters 2 and 5;
- :func:`distinct_colors` — a few series (thresholds, alphas) each in its own hue, never shades
  of one ramp that look alike;
- :data:`EDGE` — a scatter's scale with room at its ends (no point cut in half by the plot's edge).
"""

from __future__ import annotations

import json

import altair as alt

from .legible import DARK, DEPTH_SCHEME

# each ablation's colour in every chapter, 3:1 on white (the mean's orange was #f58518, 2.6:1; every
# source's light blue #6baed6, 2.4:1: now a dark blue beside resample's, its variant)
ABLATION_COLORS = {"resample": DARK["blue"], "mean": DARK["dark orange"], "zero": DARK["green"],
                   "noise": DARK["purple"], "resample (every source)": "#08519c"}
# hues for a few series that must tell apart, in the order they are handed out: the first three
# (blue, orange, green) stay apart for red-green colour blindness too; red and purple, which a
# deuteranope confuses with green and blue, come later
HUES = ("blue", "dark orange", "green", "purple", "red", "brown", "grey")
MAX_LABELS = 25  # labels an axis may print (more are too small or too dense to read)
LABEL_PX = 24  # px of axis a layer's label needs ("17" and the space that sets it apart)
# a scatter's scale with room at its ends: a point at the largest value is drawn whole, not cut in
# half by the plot's edge (zoomable charts clip their marks to the plot)
EDGE = alt.Scale(padding=10, nice=False, zero=False)
# a heat map's diverging colours (negative, 0, positive): near-white at 0, so a cell near zero fades
# into the page and a cell of any size reads as coloured (a grey middle made a grey wall of most cells)
HEAT_SIGNED = ("#b2182b", "#f7f7f7", "#2166ac")


def heat_scale(values=None, **kw) -> alt.Scale:
    """The diverging scale of a heat map's cells (:data:`HEAT_SIGNED`): symmetric about 0 over
    ``values`` (the same shade for the same size either way; one scale for panels that compare
    the same quantity), else centred at 0 on the data."""
    import numpy as np

    x = np.asarray([] if values is None else values, dtype=float)
    x = np.abs(x[np.isfinite(x)])
    top = float(x.max()) if len(x) and x.max() > 0 else None
    where = {"domain": [-top, 0, top]} if top else {"domainMid": 0}
    return alt.Scale(range=list(HEAT_SIGNED), interpolate="lab", **where, **kw)


def head_slots(frame, *, fill: float = 0.7):
    """``frame`` (one row per head and whatever else) with each head's slot on a layer axis:
    ``slot`` = layer + the head's place within it (a layer's heads side by side, a gap between
    layers), ``slot_lo`` / ``slot_hi`` the edges of a bar ``fill`` of its slot wide. Plot marks at
    ``slot`` on :func:`layer_x`: 72 heads need 18 axis labels, not 72 unreadable ones."""
    n_heads = int(frame["head"].max()) + 1 if len(frame) else 1
    inner = 0.8 / n_heads  # 10% of a layer's width on either side separates it from the next
    slot = frame["layer"] + 0.1 + inner * (frame["head"] + 0.5)
    return frame.assign(slot=slot, slot_lo=slot - fill * inner / 2, slot_hi=slot + fill * inner / 2)


def layer_x(frame, field: str = "slot", title: str = "layer (its heads side by side)") -> alt.X:
    """The x-axis of :func:`head_slots`: from layer 0 to the last, one label per layer at its
    middle (every k-th when there are more than :data:`MAX_LABELS` layers; every other one where
    they would touch, on a phone). Its title is short: a longer one than a phone's plot widens the
    chart past its column (the head is named on hover)."""
    n_layers = int(frame["layer"].max()) + 1 if len(frame) else 1
    every = -(-n_layers // MAX_LABELS)
    return alt.X(f"{field}:Q", title=title, scale=alt.Scale(domain=[0, n_layers], nice=False, zero=False),
                 axis=alt.Axis(values=[l + 0.5 for l in range(0, n_layers, every)], labelExpr="floor(datum.value)",
                               labelAngle=0, grid=False, labelOverlap="parity", labelSeparation=4))


def layer_axis(frame, field: str = "layer", title: str = "layer", *, width: int | None = None) -> alt.X:
    """An x-axis of whole layers: one tick per layer the frame holds (every k-th past
    :data:`MAX_LABELS`, or past one label per :data:`LABEL_PX` of a view ``width`` px wide),
    never a tick between two layers (a 2-layer model's 0.5 would print as a second "1") nor one
    past the last layer. Labels that would still touch (a narrower view: a phone) are thinned to
    every other one by Vega."""
    last = int(frame[field].max()) if len(frame) else 0
    limit = MAX_LABELS if width is None else max(2, min(MAX_LABELS, width // LABEL_PX))
    every = -(-(last + 1) // limit)
    return alt.X(f"{field}:Q", title=title, scale=alt.Scale(domain=[-0.5, last + 0.5], nice=False, zero=False),
                 axis=alt.Axis(values=list(range(0, last + 1, every)), format="d", grid=False,
                               labelOverlap="parity", labelSeparation=4))


def labels_only(labels, *, limit: int = MAX_LABELS) -> str:
    """An axis ``labelExpr`` printing only ``labels`` (the first ``limit`` of them: the heads that
    matter, chosen by the caller), the others blank (they stay on hover)."""
    keep = json.dumps([str(x) for x in list(labels)[:limit]])
    return f"indexof({keep}, datum.value) >= 0 ? datum.label : ''"


def present(domain, values) -> list:
    """The entries of ``domain`` (a legend's series, in its order) that occur in ``values``: a
    legend lists only what the chart draws."""
    seen = set(values.dropna() if hasattr(values, "dropna") else values)
    return [d for d in domain if d in seen]


def series_color(field: str, palette: dict, values, *, title: str | None = None,
                 legend: alt.Legend | None | bool = True) -> alt.Color:
    """A categorical colour for ``field`` whose series and colours are ``palette`` (series ->
    colour, in legend order), restricted to the series ``values`` holds (:func:`present`): the
    legend lists only what the chart draws, each series keeps its colour in every chart."""
    shown = present(list(palette), values)
    kw = {} if legend is True else {"legend": legend or None}
    return alt.Color(f"{field}:N", scale=alt.Scale(domain=shown, range=[palette[k] for k in shown]),
                     title=title or field.replace("_", " "), **kw)


def distinct_colors(n: int) -> list[str]:
    """``n`` colours of distinct hues (:data:`HUES` from :data:`~.legible.DARK`, each 3:1 on white),
    repeating past :data:`HUES`' length."""
    return [DARK[HUES[i % len(HUES)]] for i in range(n)]


def layer_color(field: str = "layer", *, title: str = "layer", legend: bool = True,
                continuous: bool = False) -> alt.Color:
    """An ordinal colour for layers, the same in every chapter (:data:`~.legible.DEPTH_SCHEME`:
    early dark purple, late teal, each shade 3:1 on white on marks at least
    :data:`~.legible.MARK_OPACITY` opaque). ``continuous``: depth as a quantity, with a gradient
    legend (where many layers share a chart, one swatch per layer is a column of shades nobody
    can match to a point: read the depth from the gradient, the layer on hover)."""
    if continuous:
        return alt.Color(f"{field}:Q", scale=alt.Scale(scheme=DEPTH_SCHEME, zero=False, nice=False), title=title,
                         legend=alt.Legend(type="gradient", format="d", tickMinStep=1) if legend else None)
    return alt.Color(f"{field}:O", scale=alt.Scale(scheme=DEPTH_SCHEME), title=title,
                     legend=alt.Legend() if legend else None)


__all__ = ["ABLATION_COLORS", "EDGE", "HEAT_SIGNED", "HUES", "heat_scale", "LABEL_PX", "distinct_colors", "MAX_LABELS", "head_slots", "labels_only", "layer_color", "layer_x",
           "present", "series_color"]
