"""Figures for chapter 02, "LayerNorm self-repair" (paper §3, App. A, B, D; Fig 4-6, 9, 10, 15).

Pure functions: tidy frame in (from :mod:`selfrepair.layernorm`), Altair chart out; they need only
``altair`` and ``pandas``. ``ratio = S/S'`` (clean over ablated final-norm scale; > 1: the norm
amplifies the existing logits), ``norm_ratio = S'/S`` (App. D), norm share = ``from_norm / DE``.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from . import VIEWS_AT_1024, labels_only, layer_axis, present, series_color
from .encodings import ABLATION_COLORS  # the same in chapter 5
from .existence import _diagonal, _head_order, _tips, token_color
from .legible import DARK, MARK_OPACITY, beyond, beyond_marks, beyond_note, central_range, clamped, data_domain

ABLATIONS = ["resample", "mean", "zero"]
SEP = " | "  # a panel title's line break (Fig 4: the head and ablation, then the share above 1)


def _ablation_scale() -> alt.Scale:
    return alt.Scale(domain=ABLATIONS, range=[ABLATION_COLORS[a] for a in ABLATIONS])


def _ablation_color(title: str = "ablation", legend: alt.Legend | None = None) -> alt.Color:
    return alt.Color("ablation:N", scale=_ablation_scale(), title=title,
                     **({"legend": legend} if legend is not None else {}))


def panel_bins(t: pd.DataFrame, bins: int) -> pd.DataFrame:
    """Fig 4's histogram rows: per panel, ``bins`` equal bins over one span shared by every panel
    (every panel's ratios and the line at 1: the panels share one S/S′ axis, so how much farther one
    ablation moves the scale than another is read off the bars' widths), with the panel's share of
    tokens with ``S/S' > 1`` and its token count on every row (``panel, label, ablation, lo, hi,
    count, share, n``)."""
    span = tuple(data_domain(t["ratio"], include=(1,), pad=0.0)) if len(t) else None
    parts = []
    for panel, g in t.groupby("panel", sort=False):
        r = g["ratio"]
        h = histogram(g, "ratio", "panel", bins, span=span)
        parts.append(h.assign(label=g["label"].iloc[0], ablation=g["ablation"].iloc[0],
                              share=float((r > 1).mean()), n=len(g)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["panel", "lo", "hi", "count", "label", "ablation", "share", "n"])


def fig_scale_ratio(tokens: pd.DataFrame, bins: int = 60) -> alt.FacetChart:
    """Fig 4 (and App. D Fig 16-17 for more heads): histograms of ``S/S'`` on each head's top-k%
    tokens, one row per head (in the order of ``tokens``: the table's) and one column per ablation,
    with the line at 1 and the share of tokens above it. One x-axis for every panel
    (:func:`panel_bins`): the text compares how far each ablation moves the scale across panels."""
    t = tokens[tokens["tokens"] == "top-k%"][["label", "ablation", "ratio"]].copy()
    labels = list(t["label"].drop_duplicates())
    # one wrapped facet of "head · ablation" panels, three to a row (a row x column facet cannot
    # be re-wrapped into one column on a phone)
    t["panel"] = t["label"] + " · " + t["ablation"]
    panels = [f"{h} · {a}" for h in labels for a in ABLATIONS]
    h = panel_bins(t, bins)
    # the share above 1 goes in the panel's title (a second line), not on the plot: a label in a
    # corner of the plot sat on the tallest bars and on the dashed line at 1
    shares = h.groupby("panel", sort=False)["share"].first()
    title_of = {p: f"{p}{SEP}{shares[p]:.1%} with S/S′ > 1" for p in panels if p in shares.index}
    h["panel"] = h["panel"].map(title_of)
    # the y domain is the panel's bin counts (and a tenth above the tallest, so it does not touch
    # the top edge): an invisible rule at that height per panel sets it (independent y per panel)
    h["headroom"] = h.groupby("panel", sort=False)["count"].transform("max").mul(1.1).clip(lower=1.0)
    base = alt.Chart()
    hist = base.mark_bar(opacity=0.85, binSpacing=0).encode(
        x=alt.X("lo:Q", title="S / S′", scale=alt.Scale(zero=False, nice=False),
                axis=alt.Axis(format=".3f", labelOverlap="greedy", labelSeparation=6, labelAngle=-30)),
        x2="hi:Q", y=alt.Y("count:Q", title="tokens", stack=None, axis=alt.Axis(tickMinStep=1, format="d")),
        y2=alt.datum(0),
        color=_ablation_color(legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("label:N", title="head"), alt.Tooltip("ablation:N"),
                 alt.Tooltip("lo:Q", format=".4f", title="from"), alt.Tooltip("hi:Q", format=".4f", title="to"),
                 alt.Tooltip("count:Q", title="tokens"),
                 alt.Tooltip("share:Q", format=".2%", title="panel's share S/S′ > 1")])
    one = base.mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(1))
    room = base.mark_rule(opacity=0).encode(y=alt.Y("max(headroom):Q"))
    title = (f"{labels[0]}: S/S′ (clean / ablated final-norm scale) on its top-k% tokens"
             if len(labels) == 1 else
             "S/S′ (clean / ablated final-norm scale) on each head's top-k% tokens")
    # 170 px: three panels fit a 743 px column; on a phone the renderer stacks them in one column and
    # widens each to fill it (no 150 px histogram). One x scale (the text compares the panels' widths),
    # each panel's own y (its tallest bin)
    return (alt.layer(hist, one, room, data=h).properties(width=170, height=110)
            .facet(facet=alt.Facet("panel:N", sort=[title_of[p] for p in panels if p in title_of], title=None,
                                   header=alt.Header(labelExpr=f"split(datum.value, {SEP!r})")),
                   columns=len(ABLATIONS))
            .resolve_scale(x="shared", y="independent")
            .properties(title=alt.Title(title, subtitle="one S/S′ axis for every panel: compare the widths")))


def fig_ablation_scatter(tokens: pd.DataFrame, max_per_panel: int = 700, seed: int = 0) -> alt.FacetChart:
    """Fig 5: per-token direct effect vs Δlogit of the head under each ablation (one panel each),
    top-k% tokens in colour over a random sample in grey; dashed y = -x, solid x-axis."""
    t = (tokens.sample(frac=1.0, random_state=seed).groupby(["ablation", "tokens"]).head(max_per_panel)
         .sort_values(["ablation", "tokens"], ascending=[True, False], kind="mergesort"))
    # the y-axis spans the tokens' Δlogit (and 0), not the y = -x line down to -max DE; the line is clipped
    y = alt.Y("delta_logit:Q", title="Δlogit", scale=alt.Scale(domain=data_domain(t["delta_logit"], include=(0,)),
                                                              nice=False))
    points = alt.Chart().mark_circle(size=18, opacity=MARK_OPACITY).encode(
        x=alt.X("direct_effect:Q", title="direct effect DE"), y=y, color=token_color(),  # chapter 1's colours, legend below
        tooltip=_tips(t, "ablation", "tokens", "row", "pos", "direct_effect", "delta_logit",
                      "self_repair", "from_norm", "ratio"))
    label = t["label"].iloc[0] if len(t) else ""
    return (alt.layer(*_diagonal("direct_effect", "delta_logit"), points, data=t)
            .properties(width=180, height=200)
            .facet(column=alt.Column("ablation:N", sort=ABLATIONS, title=None))
            .properties(title=f"{label}: DE vs Δlogit under three ablations"))


NORM_COLORS = {"final norm": "#4c78a8", "block norms": "#e45756"}


def _per_head_and_layer(frame: pd.DataFrame, y: alt.Y, value: str, fmt: str) -> tuple:
    """Points per head and a line of layer means of ``value``, coloured by norm component (only
    the components ``frame`` holds: no block norms, most models, no legend entry for them)."""
    color = series_color("component", NORM_COLORS, frame["component"], title="norm")
    base = alt.Chart(frame)
    points = base.mark_circle(size=40, opacity=MARK_OPACITY).encode(
        x=layer_axis(frame), y=y,
        color=color, tooltip=_tips(frame, "component", value, "n"))
    line = base.mark_line(strokeWidth=2).encode(
        x="layer:Q", y=f"mean({value}):Q", color=color,
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("component:N"),
                 alt.Tooltip(f"mean({value}):Q", format=fmt, title="layer mean")])
    return base, points, line


def fig_norm_repair(repair: pd.DataFrame) -> alt.LayerChart:
    """Fig 6 ("we measure the LayerNorm self-repair when resample ablating individual heads. We've
    plotted mean lines averaging the values across each model's layer"): per head, the norm's
    self-repair in logits averaged over its top-k% tokens (points; :func:`selfrepair.layernorm.norm_repair`),
    the layer means (lines) and zero (dotted)."""
    y = alt.Y("self_repair:Q", title="norm self-repair (logits, top-k% mean)")
    base, points, line = _per_head_and_layer(repair, y, "self_repair", ".3f")
    zero = base.mark_rule(color="#444", strokeDash=[2, 2]).encode(y=alt.datum(0))
    return alt.layer(zero, points, line).properties(
        width="container", title="Fig 6: the norms' self-repair per head, in logits (lines: layer means)")


def fig_norm_share(shares: pd.DataFrame, paper: float = 0.30) -> alt.LayerChart:
    """Fig 10 (App. A: "a full figure with these changes in effect", the source of "30% of direct
    effect is self-repaired by LayerNorm"): per head, the clipped share of its direct effect given
    back by the norm(s) on its top-k% tokens (points), the layer means (lines), and the paper's ~30%
    (dotted)."""
    f = shares[(shares["tokens"] == "top-k%") & (shares["clipping"] == "clipped")]
    y = alt.Y("share:Q", title="norm self-repair / DE (clipped, top-k%)", axis=alt.Axis(format="%"),
              scale=alt.Scale(domain=[0, 1]))
    base, points, line = _per_head_and_layer(f, y, "share", ".1%")
    ref = base.mark_rule(color="#444", strokeDash=[2, 2]).encode(y=alt.datum(paper))
    return alt.layer(ref, points, line).properties(
        width="container", title="Fig 10: share of each head's direct effect the norms give back, "
                                 "clipped per token (dotted: paper ≈ 30%)")


def fig_share_variants(layers: pd.DataFrame, width: int = 260) -> alt.Chart:
    """Fig 9 vs Fig 10: layer means of the final-norm share, unclipped vs clipped to [0, 1] on the
    top-k% tokens and on a random sample of all tokens (colour). Unclipped, a head whose direct
    effect is near 0 can put a layer's mean in the millions of percent. Where some means lie that
    far out (:func:`~selfrepair.figures.legible.central_range`), the unclipped means get two panels:
    the full range on a symmetric-log axis (every mean drawn where it is) and, beside it, a zoom on
    the means near their median, the ones beyond drawn as ▲/▼ at its edge (the subtitle counts
    them; hover for each value); the zoom and the clipped panel share one y-scale (they read against
    each other). Without such means, two panels on one y-scale."""
    f = layers[layers["component"] == "final norm"]
    span = central_range(f["share"], include=(0,))
    f = f.assign(beyond=beyond(f["share"], span))
    width = width if span is None else min(width, 190)  # three panels fit the 600 px a page allows
    x = layer_axis(f, width=width)
    color = token_color()  # chapter 1's colours, the legend below the panels
    tips = [alt.Tooltip("layer:O"), alt.Tooltip("tokens:N"), alt.Tooltip("clipping:N"),
            alt.Tooltip("share:Q", format=".1%", title="layer mean share"), alt.Tooltip("n_heads:Q", title="heads")]
    title = "Final-norm share of DE: unclipped (Fig 9) vs clipped to [0, 1] (Fig 10)"
    unclipped, clipped = f[f["clipping"] == "unclipped"], f[f["clipping"] == "clipped"]

    def panel(frame, name, scale, edge=False):
        y = alt.Y("share:Q", title="mean final-norm term / DE", axis=alt.Axis(format="%"), scale=scale)
        marks = [alt.Chart().mark_line(point=True).encode(x=x, y=y, color=color, tooltip=tips)]
        marks += [beyond_marks(alt.Chart(), x, y, color=color, tooltip=tips)] if edge else []
        return alt.layer(*marks, data=frame).properties(width=width, height=220, title=name)

    if span is None:
        same = alt.Scale(domain=list(data_domain(f["share"], include=(0,))), nice=False, zero=False)
        return alt.hconcat(panel(unclipped, "unclipped", same), panel(clipped, "clipped", same)).properties(title=title)
    full = alt.Scale(type="symlog", constant=0.1, domain=list(data_domain(unclipped["share"], include=(0,))), nice=False)
    note = beyond_note(f["beyond"], f["clipping"] + ", " + f["tokens"], what="layer means")
    note = note.replace("lie beyond the axis", "lie beyond the zoom's axis")
    return alt.hconcat(panel(unclipped, "unclipped: every mean (symmetric-log axis)", full),
                       panel(unclipped, "unclipped: zoom near the median", clamped(span), edge=True),
                       panel(clipped, "clipped", clamped(span), edge=True)).properties(
        title=alt.Title(title, subtitle=note) if note else title)


def histogram(values: pd.DataFrame, column: str, by: str, bins: int = 40,
              span: tuple[float, float] | None = None) -> pd.DataFrame:
    """Counts of ``column`` in ``bins`` equal bins shared by every group of ``by`` (a chart of
    thousands of tokens then embeds only the bins): columns ``by, lo, hi, count``. ``span``: bin
    only that range (values outside it are left out), default the values' whole range."""
    import numpy as np

    x = values[column].to_numpy(float)
    x = x[np.isfinite(x)]
    edges = (np.histogram_bin_edges(x, bins=bins, range=span) if len(x) else np.array([0.0, 1.0]))
    rows = []
    for key, g in values.groupby(by, sort=False):
        counts, _ = np.histogram(g[column].to_numpy(float), bins=edges)
        rows += [{by: key, "lo": lo, "hi": hi, "count": int(c)} for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
    return pd.DataFrame(rows)


ZOOM = (0.01, 0.99)  # quantiles of the zoomed panel of Fig 15 (the middle 98% of the tokens)


def _ratio_panel(h: pd.DataFrame, title: str, width) -> alt.LayerChart:
    """One histogram of ``S'/S`` per ablation (overlaid), its x-axis fitted to the bins (no zero
    baseline: the ratios sit near 1), and the dashed line at 1."""
    x = alt.X("lo:Q", title="S′ / S (ablated / clean residual norm)",
              scale=alt.Scale(zero=False, nice=False, domain=[float(h["lo"].min()), float(h["hi"].max())]),
              axis=alt.Axis(format=".3~f", labelOverlap="greedy", labelSeparation=6))
    # overlaid: a see-through fill, each ablation's outline in its full colour (3:1 on white)
    hist = alt.Chart(h).mark_bar(fillOpacity=0.3, strokeWidth=1.5, binSpacing=0).encode(
        # y2 at 0: a bar with x and x2 alone is a horizontal range, drawn as a thin dash at its count
        x=x, x2="hi:Q", y=alt.Y("count:Q", stack=None, title="tokens", axis=alt.Axis(tickMinStep=1, format="d")),
        y2=alt.datum(0),
        color=_ablation_color(legend=alt.Legend(orient="bottom")),
        stroke=alt.Stroke("ablation:N", scale=_ablation_scale(), legend=None),
        tooltip=[alt.Tooltip("ablation:N"), alt.Tooltip("lo:Q", format=".4f", title="from"),
                 alt.Tooltip("hi:Q", format=".4f", title="to"), alt.Tooltip("count:Q", title="tokens")])
    layers = [hist]
    if h["lo"].min() <= 1 <= h["hi"].max():  # the line at 1 only where the axis holds it
        layers.append(alt.Chart(h).mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(1)))
    return alt.layer(*layers).properties(width=width, height=200, title=title)


def fig_norm_ratio(tokens: pd.DataFrame, bins: int = 40) -> alt.Chart:
    """App. D / Fig 15: ``S'/S`` (= ||r'||/||r|| for RMSNorm; centred residual for LayerNorm) on the
    uniform sample of all tokens — no filtering by direct effect — per ablation (binned here, so
    the chart embeds counts, not tokens), the x-axis fitted to the ratios. Where a few tokens
    stretch the range so that most of them sit in one spike (the middle 98% span less than a
    quarter of it), a second panel beside the first zooms on that middle 98% (:data:`ZOOM`)."""
    import numpy as np

    t = tokens[tokens["tokens"] == "random sample"][["label", "ablation", "norm_ratio"]]
    label = t["label"].iloc[0] if len(t) else ""
    title = f"{label}: residual-norm ratio on a random sample of tokens"
    h = histogram(t, "norm_ratio", "ablation", bins)
    x = t["norm_ratio"].to_numpy(float)
    x = x[np.isfinite(x)]
    lo, hi = (np.quantile(x, ZOOM) if len(x) else (0.0, 1.0))
    if not len(x) or hi - lo >= 0.25 * (x.max() - x.min()) or hi <= lo:
        return _ratio_panel(h, title, "container")
    zoom = histogram(t, "norm_ratio", "ablation", bins, span=(float(lo), float(hi)))
    return alt.hconcat(_ratio_panel(h, "every token", 270),
                       _ratio_panel(zoom, f"zoom: the middle {ZOOM[1] - ZOOM[0]:.0%} of the tokens", 270)
                       ).properties(title=title)


def fig_appendix_b(check: pd.DataFrame, max_per_panel: int = 600, seed: int = 0,
                   columns: int = 2) -> alt.FacetChart:
    """App. B: the closed form ``(S/S'-1)·logit + (S/S')·ΔDE`` (y) against the real Δlogit (x),
    one panel per model (``columns`` to a row, so that any number of models fits the page); points
    on the dashed y = x line mean the formula is exact."""
    t = (check.sample(frac=1.0, random_state=seed).groupby(["model", "ablation"]).head(max_per_panel // 3)
         .sort_values(["model", "ablation"], kind="mergesort"))
    role = (t["role"] + ": ") if "role" in t else ""
    t = t.assign(panel=role + t["model"] + " " + t["label"] + (t["parallel_residual"].map(
        {True: " (parallel)", False: " (sequential)"})))
    points = alt.Chart().mark_circle(size=18, opacity=MARK_OPACITY).encode(
        x=alt.X("delta_logit:Q", title="Δlogit (real)"),
        y=alt.Y("closed_form:Q", title="App. B closed form"),
        color=_ablation_color(legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("panel:N", title="model, head"), alt.Tooltip("ablation:N"),
                 alt.Tooltip("row:Q"), alt.Tooltip("pos:Q")] +
                [alt.Tooltip(f"{c}:Q", format=".3g") for c in
                 ("delta_logit", "closed_form", "error", "ratio", "scaled_logit", "from_mlps",
                  "from_block_norms")])
    diag = (alt.Chart().transform_aggregate(lo="min(delta_logit)", hi="max(delta_logit)")
            .transform_fold(["lo", "hi"], as_=["end", "v"])
            .mark_line(color="#444", strokeDash=[4, 3]).encode(x="v:Q", y="v:Q"))
    return (alt.layer(diag, points, data=t).properties(width=280, height=240)
            .facet(facet=alt.Facet("panel:N", title=None), columns=columns)
            .resolve_scale(x="independent", y="independent")
            .properties(title="Appendix B closed form vs real Δlogit (dashed: y = x)"))


FROZEN_LABELS = 10  # head labels of the frozen-norm chart (36 heads' labels ran together on a phone)
FROZEN_MEASURES = ["live", "norms frozen", "norms only", "eq. 2 norm terms"]
FROZEN_COLORS = [DARK["blue"], DARK["red"], DARK["green"], "#444444"]


def fig_frozen_norm(heads: pd.DataFrame) -> alt.VConcatChart:
    """§3 / §5.2: per head (rows of :func:`selfrepair.frozen_norm.per_head`), the mean top-k%
    self-repair of the live ablation, with the norms frozen and with only the norms live, beside
    eq. 2's norm terms of the live ablation (``from_norm + from_block_norms``; top). Below: what
    freezing removes (live − frozen) against those norm terms; on the dashed y = x line exactly
    when freezing the norms removes eq. 2's norm terms and nothing else."""
    from selfrepair.frozen_norm import long_frame

    long = long_frame(heads)
    drawn = present(FROZEN_MEASURES, long.loc[long["value"].notna(), "measure"])  # the legend's series
    shapes = dict(zip(FROZEN_MEASURES, ["circle", "triangle-down", "square", "diamond"]))
    legend = alt.Legend(orient="top", columns=2)  # above the panel it names, not under the other one
    color = series_color("measure", dict(zip(FROZEN_MEASURES, FROZEN_COLORS)), drawn, title="self-repair",
                         legend=legend)
    # the heads that matter get a label (largest live self-repair first, at most FROZEN_LABELS;
    # labels that would still touch on a phone are dropped by Vega), the
    # others are named on hover; a head's four values sit side by side, so equal ones stay visible
    matter = heads.reindex(heads["self_repair"].abs().sort_values(ascending=False).index)["label"]
    dots = alt.Chart(long).mark_point(filled=True, size=45, opacity=0.85).encode(
        x=alt.X("label:N", sort=_head_order(heads), title="head (the largest self-repair labelled; hover for each)",
                axis=alt.Axis(labelAngle=-90, labelExpr=labels_only(matter, limit=FROZEN_LABELS),
                              labelOverlap="greedy", labelSeparation=2)),
        xOffset=alt.XOffset("measure:N", sort=drawn),
        y=alt.Y("value:Q", title="mean over top-k% tokens (logits)"),
        color=color,
        shape=alt.Shape("measure:N", scale=alt.Scale(domain=drawn, range=[shapes[m] for m in drawn]),
                        title="self-repair", legend=legend),
        tooltip=_tips(long, "measure", "value", "direct_effect", "n"))
    zero = alt.Chart(long).mark_rule(color="#888", strokeWidth=1).encode(y=alt.datum(0))
    left = alt.layer(zero, dots).properties(width=min(VIEWS_AT_1024, max(240, 14 * len(heads))), height=240,
                                            title="Self-repair: live, norms frozen, norms only")
    diag = (alt.Chart(heads).transform_aggregate(lo="min(norm_terms)", hi="max(norm_terms)")
            .transform_fold(["lo", "hi"], as_=["end", "v"])
            .mark_line(color="#444", strokeDash=[4, 3]).encode(x="v:Q", y="v:Q"))
    points = alt.Chart(heads).mark_circle(size=45, opacity=MARK_OPACITY, color=DARK["red"]).encode(
        x=alt.X("norm_terms:Q", title="eq. 2 norm terms (final + block norms)"),
        y=alt.Y("removed:Q", title="live − norms-frozen self-repair"),
        tooltip=_tips(heads, "norm_terms", "removed", "gap", "from_norm", "from_block_norms",
                      "self_repair", "self_repair_frozen"))
    right = alt.layer(diag, points).properties(width=240, height=240,
                                               title="What freezing removes vs eq. 2 (dashed: y = x)")
    return alt.vconcat(left, right).properties(  # stacked: the per-head panel is wide
        title="Ablating with the norms frozen (§3, §5.2), per head")


__all__ = ["fig_scale_ratio", "fig_ablation_scatter", "fig_norm_share", "fig_share_variants",
           "fig_norm_ratio", "fig_appendix_b", "fig_frozen_norm"]
