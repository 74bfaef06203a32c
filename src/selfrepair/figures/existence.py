"""Figures for chapter 01, "Self-repair exists, imperfect and noisy" (paper §2.2-2.3, Fig 1-3).

Pure functions: tidy frame in (from :mod:`selfrepair.existence`), Altair chart out; they need only
``altair`` and ``pandas``. Per-head frames have one row per head; per-token frames are cut to the
featured heads and sampled so that no chart embeds more than a few thousand rows. Signs follow
:mod:`selfrepair.existence`: ``delta_logit = ablated - clean``; heads between the line y = -x and
the x-axis of a DE-vs-Δlogit plot are self-repaired.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from . import head_slots, layer_axis, layer_x, series_color
from .legible import DARK, MARK_OPACITY

CATEGORY_ORDER = ["repaired", "overcorrected", "broken", "no direct effect"]
CATEGORY_COLORS = [DARK["blue"], DARK["dark orange"], DARK["red"], DARK["grey"]]  # 3:1 on white
HEAD_TIPS = [alt.Tooltip("label:N", title="head"), alt.Tooltip("layer:O"), alt.Tooltip("head:O")]
# the token sets of chapters 1 and 2: 3:1 on white, both, at MARK_OPACITY (the grey was #bab0ac: 2.1:1)
TOKEN_COLORS = {"top-k%": DARK["blue"], "random sample": DARK["grey"]}


def _tips(frame: pd.DataFrame, *fields: str) -> list[alt.Tooltip]:
    tips = list(HEAD_TIPS)
    for f in fields:
        if f in frame.columns:
            numeric = pd.api.types.is_numeric_dtype(frame[f])
            tips.append(alt.Tooltip(f"{f}:{'Q' if numeric else 'N'}", title=f.replace("_", " "),
                                    **({"format": ".3f"} if numeric else {})))
    return tips


def _head_order(frame: pd.DataFrame) -> list[str]:
    return frame.sort_values(["layer", "head"]).drop_duplicates("label")["label"].tolist()


def _category_color(frame: pd.DataFrame, legend: bool = True) -> alt.Color:
    """The regions of Fig 2, only those ``frame``'s heads fall in (the legend lists what is drawn;
    ``regions=`` of the figures below: a frame holding every head of the charts sharing the scale)."""
    return series_color("category", dict(zip(CATEGORY_ORDER, CATEGORY_COLORS)), frame["category"],
                        title="region", legend=alt.Legend(orient="bottom", columns=2) if legend else None)


def _diagonal(x: str, y: str) -> list[alt.Chart]:
    """The y = -x line (no repair) spanning the data's x range, and the x-axis (full repair),
    both computed by Vega-Lite from the chart's own data (no extra rows)."""
    line = (alt.Chart().transform_aggregate(lo=f"min({x})", hi=f"max({x})")
            .transform_calculate(lo="min(datum.lo, 0)", hi="max(datum.hi, 0)")
            .transform_fold(["lo", "hi"], as_=["end", "x"])
            .transform_calculate(y="-datum.x")
            .mark_line(color="#444", strokeDash=[4, 3], strokeWidth=1, clip=True)  # inside a fitted axis
            .encode(x=alt.X("x:Q"), y=alt.Y("y:Q")))
    axis = alt.Chart().mark_rule(color="#888", strokeWidth=1).encode(y=alt.datum(0))
    return [line, axis]


def fig_self_repair_by_layer(per_head: pd.DataFrame, column: str = "self_repair",
                             brush: alt.Parameter | None = None, *, regions=None) -> alt.LayerChart:
    """Fig 1: each head's mean ``column`` over its top-k% tokens (a per-head frame of top-k% means)
    against its layer, with the layer-mean line. With ``brush`` (an x-interval selection) dragging
    over layers selects them."""
    base = alt.Chart(per_head)
    points = base.mark_circle(size=45, opacity=MARK_OPACITY).encode(
        x=layer_axis(per_head),
        y=alt.Y(f"{column}:Q", title=f"{column.replace('_', '-')} on top-k% tokens (logits)"),
        color=_category_color(per_head if regions is None else regions),
        tooltip=_tips(per_head, "direct_effect", "delta_logit", "self_repair", "delta_direct_effect",
                      "category"))
    if brush is not None:
        points = points.add_params(brush)
    mean = base.mark_line(color="black", strokeWidth=2, point=alt.OverlayMarkDef(color="black")).encode(
        x="layer:Q", y=alt.Y(f"mean({column}):Q"),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip(f"mean({column}):Q", format=".3f",
                                                     title=f"layer mean {column.replace('_', ' ')}")])
    zero = base.mark_rule(color="#888").encode(y=alt.datum(0))
    return alt.layer(zero, points, mean).properties(
        width="container", title=f"Per-head {column.replace('_', '-')}, top-k% tokens")


def fig_de_vs_delta_logit(per_head: pd.DataFrame, brush: alt.Parameter | None = None,
                          boot: pd.DataFrame | None = None, *, regions=None) -> alt.LayerChart:
    """Fig 2: each head's mean direct effect (x) against mean Δlogit when ablated (y) over every
    token (a per-head frame of whole-set means), with y = -x (no repair) and the x-axis (perfect
    repair). Heads selected by ``brush`` keep their colour; ``boot`` (per head ``lo``/``hi``: the
    95% cluster-bootstrap interval of the plotted whole-set mean Δlogit,
    :func:`selfrepair.existence.head_intervals`) adds intervals. Scroll or drag to zoom and pan."""
    frame = per_head
    if boot is not None:
        frame = per_head.merge(boot[["layer", "head", "lo", "hi"]], on=["layer", "head"], how="left")
    x = alt.X("direct_effect:Q", title="direct effect DE (logits)")
    y = alt.Y("delta_logit:Q", title="Δlogit = ablated − clean (logits)")
    color = _category_color(per_head if regions is None else regions)
    if brush is not None:
        color = alt.condition(brush, color, alt.value("#dddddd"))
    points = alt.Chart().mark_circle(size=55, opacity=0.85).encode(
        x=x, y=y, color=color, tooltip=_tips(frame, "direct_effect", "delta_logit", "self_repair",
                                             "delta_direct_effect", "repair_fraction", "lo", "hi",
                                             "category")).add_params(
        alt.selection_interval(bind="scales", name="zoom"))  # scroll to zoom past outlier heads
    layers = _diagonal("direct_effect", "delta_logit")
    if boot is not None:
        layers.append(alt.Chart().mark_rule(opacity=MARK_OPACITY, strokeWidth=1).encode(
            x="direct_effect:Q", y="lo:Q", y2="hi:Q", color=color))
    return alt.layer(*layers, points, data=frame).properties(
        width="container", title="DE vs Δlogit per head, every token")


def fig_overview(top: pd.DataFrame, whole: pd.DataFrame | None = None,
                 boot: pd.DataFrame | None = None) -> alt.HConcatChart:
    """Fig 1 (``top``: per-head top-k% means) and Fig 2 (``whole``: per-head whole-set means; default
    ``top``) side by side, linked: drag across layers in the left chart to highlight those layers'
    heads on the right."""
    brush = alt.selection_interval(encodings=["x"], name="layers")
    whole = top if whole is None else whole
    regions = pd.concat([top, whole])  # one colour scale for both: the regions either panel draws
    left = fig_self_repair_by_layer(top, brush=brush, regions=regions).properties(width=280)
    right = fig_de_vs_delta_logit(whole, brush=brush, boot=boot, regions=regions).properties(width=280)
    return alt.hconcat(left, right).resolve_scale(color="shared")


def token_color() -> alt.Color:
    """Top-k% tokens in blue, the random sample in grey (:data:`TOKEN_COLORS`), the legend below
    the panels (they and a legend fit 1024 px)."""
    return alt.Color("tokens:N", scale=alt.Scale(domain=list(TOKEN_COLORS), range=list(TOKEN_COLORS.values())),
                     title="tokens", legend=alt.Legend(orient="bottom"))


def featured_tokens(top: pd.DataFrame, featured: pd.DataFrame, sample: pd.DataFrame | None = None,
                    max_per_head: int = 600, seed: int = 0) -> pd.DataFrame:
    """Per-token rows of the featured heads (top-k% tokens, plus the random sample if given),
    at most ``max_per_head`` of each kind per head (seeded sample), in the order of ``featured``
    (the table above Fig 3) — the data of Fig 3."""
    parts = []
    for kind, frame in (("random sample", sample), ("top-k%", top)):  # top tokens drawn last
        if frame is None:
            continue
        keep = frame.merge(featured[["layer", "head"]], on=["layer", "head"])
        keep = keep.sample(frac=1.0, random_state=seed).groupby(["layer", "head"]).head(max_per_head)
        rank = {(int(l), int(h)): i for i, (l, h) in enumerate(zip(featured["layer"], featured["head"]))}
        order = [rank[int(l), int(h)] for l, h in zip(keep["layer"], keep["head"])]
        keep = keep.assign(_order=order).sort_values("_order", kind="mergesort").drop(columns="_order")
        parts.append(keep.assign(tokens=kind))
    return pd.concat(parts, ignore_index=True)


def fig_featured_tokens(tokens: pd.DataFrame, columns: int = 2) -> alt.FacetChart:
    """Fig 3: per-token direct effect vs Δlogit for each featured head (one panel each), top-k%
    tokens in colour, the random sample in grey; dashed y = -x, solid x-axis."""
    points = alt.Chart().mark_circle(size=18, opacity=MARK_OPACITY).encode(
        x=alt.X("direct_effect:Q", title="direct effect DE"),
        y=alt.Y("delta_logit:Q", title="Δlogit"), color=token_color(),
        tooltip=_tips(tokens, "tokens", "row", "pos", "direct_effect", "delta_logit", "self_repair",
                      "delta_direct_effect"))
    return (alt.layer(*_diagonal("direct_effect", "delta_logit"), points, data=tokens)
            .properties(width=260, height=200)
            # panels in the order the rows come (featured_tokens: the featured table's order)
            .facet(facet=alt.Facet("label:N", title=None, sort=list(tokens["label"].drop_duplicates())),
                   columns=columns)
            .resolve_scale(x="independent", y="independent")
            .properties(title="Per-token DE vs Δlogit of the featured heads"))


def fig_regions_by_layer(per_head: pd.DataFrame) -> alt.Chart:
    """Imperfection: number of heads per layer in each region of Fig 2 (stacked)."""
    return alt.Chart(per_head).mark_bar().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("count():Q", title="heads", axis=alt.Axis(tickMinStep=1, format="d")),  # whole heads
        color=_category_color(per_head),
        order=alt.Order("category:N"),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("category:N", title="region"),
                 alt.Tooltip("count():Q", title="heads")],
    ).properties(width="container", title="Where each layer's heads fall in Fig 2")


MEAN_MARK = {"size": 70, "stroke": "#5c0f0f", "strokeWidth": 1}  # fig_token_spread's diamond (px², outline)


def fig_token_spread(spread: pd.DataFrame) -> alt.LayerChart:
    """Noise: per head, the 10-90% (thin) and 25-75% (thick) range of per-token self-repair on a
    uniform sample of tokens (or its top-k% tokens: whichever ``spread`` was computed on) with the
    median (tick) and mean DE (diamond). Heads sit side by side within their layer
    (:func:`selfrepair.figures.head_slots`: one label per layer; hover for the head). One view at
    the column's width (``width="container"``), so it fits a phone as drawn; the share of
    overcorrecting tokens is its own chart, :func:`fig_overcorrecting`."""
    spread = head_slots(spread)
    base = alt.Chart(spread).encode(tooltip=_spread_tips(spread))
    x, lo, hi = layer_x(spread), layer_x(spread, "slot_lo"), alt.X2("slot_hi:Q")
    return alt.layer(
        base.mark_rule(color="#888").encode(x=x, y=alt.Y("q10:Q", title="self-repair per token (logits)"),
                                            y2="q90:Q"),
        base.mark_bar(color="#4c78a8").encode(x=lo, x2=hi, y="q25:Q", y2="q75:Q"),
        base.mark_rule(color="black", strokeWidth=2).encode(x=lo, x2=hi, y="median:Q"),  # the median
        # the mean DE: a diamond large enough to find at a glance among 18 layers of boxes at 390 px
        # (25 px², unoutlined, was a speck), its dark outline setting it off from the blue boxes
        base.mark_point(shape="diamond", color=DARK["red"], size=MEAN_MARK["size"], filled=True, opacity=1,
                        stroke=MEAN_MARK["stroke"], strokeWidth=MEAN_MARK["strokeWidth"]).encode(x=x, y="mean_de:Q"),
        alt.Chart(spread).mark_rule(color="#444").encode(y=alt.datum(0)),  # no x: across the chart
    ).properties(width="container", height=220,
                 title="Per-token self-repair, sampled tokens (diamond: mean DE)")


def _spread_tips(spread: pd.DataFrame) -> list[alt.Tooltip]:
    return _tips(spread, "n", "mean_de", "mean", "median", "q10", "q25", "q75", "q90", "iqr_over_de",
                 "share_overcorrecting", "corr_de_delta_logit")


def fig_overcorrecting(spread: pd.DataFrame) -> alt.Chart:
    """Per head (side by side within its layer, as :func:`fig_token_spread`), the share of its
    sampled tokens where the ablation removes direct effect but the logit goes up
    (overcorrection); at the column's width."""
    spread = head_slots(spread)
    return alt.Chart(spread).mark_bar(color=DARK["dark orange"]).encode(
        x=layer_x(spread, "slot_lo"), x2=alt.X2("slot_hi:Q"),
        y=alt.Y("share_overcorrecting:Q", title="overcorrecting", axis=alt.Axis(format="%")),
        y2=alt.datum(0),  # from 0: x and x2 alone would make a horizontal range (a dash)
        tooltip=_spread_tips(spread),
    ).properties(width="container", height=90, title="Share of overcorrecting tokens per head")


def fig_bootstrap(boot: pd.DataFrame, per_head: pd.DataFrame | None = None) -> alt.LayerChart:
    """Imperfection with uncertainty: each head's whole-set mean Δlogit with its 95% cluster-bootstrap
    interval (:func:`selfrepair.existence.head_intervals`: documents resampled); an interval entirely
    below 0 means the head's repair is measurably incomplete. Descriptive: the chapter's verdict
    selects and tests heads on disjoint halves of the documents."""
    frame = boot.assign(interval=pd.cut(boot["hi"], [-float("inf"), 0, float("inf")],
                                        labels=["below 0", "contains or above 0"]).astype(str))
    if per_head is not None and "category" in per_head:
        frame = frame.merge(per_head[["layer", "head", "category"]], on=["layer", "head"], how="left")
    frame = head_slots(frame)
    base = alt.Chart(frame).encode(
        x=layer_x(frame),
        tooltip=_tips(frame, "mean", "lo", "hi", "n", "clusters", "category"))
    color = series_color("interval", {"below 0": "#4c78a8", "contains or above 0": "#8c8c8c"},  # dark on white
                         frame["interval"], title="95% interval",  # below: the plot keeps a phone's width
                         legend=alt.Legend(orient="bottom", columns=1))
    return alt.layer(
        alt.Chart(frame).mark_rule(color="#444").encode(y=alt.datum(0)),  # no x: across the chart
        base.mark_rule(strokeWidth=2).encode(y=alt.Y("lo:Q", title="mean Δlogit, 95% interval"),
                                             y2="hi:Q", color=color),
        base.mark_point(filled=True, size=25, opacity=1).encode(y="mean:Q", color=color),
    ).properties(width="container", height=220,
                 title="Mean Δlogit per head, every token (95% cluster-bootstrap interval)")
