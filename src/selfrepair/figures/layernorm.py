"""Figures for chapter 02, "LayerNorm self-repair" (paper §3, App. A, B, D; Fig 4-6, 9, 10, 15).

Pure functions: tidy frame in (from :mod:`selfrepair.layernorm`), Altair chart out; they need only
``altair`` and ``pandas``. ``ratio = S/S'`` (clean over ablated final-norm scale; > 1: the norm
amplifies the existing logits), ``norm_ratio = S'/S`` (App. D), norm share = ``from_norm / DE``.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from . import VIEWS_AT_1024
from .existence import _diagonal, _head_order, _tips

ABLATIONS = ["resample", "mean", "zero"]
ABLATION_COLORS = ["#4c78a8", "#f58518", "#54a24b"]


def _ablation_color(title: str = "ablation", legend: alt.Legend | None = None) -> alt.Color:
    return alt.Color("ablation:N", scale=alt.Scale(domain=ABLATIONS, range=ABLATION_COLORS), title=title,
                     **({"legend": legend} if legend is not None else {}))


def fig_scale_ratio(tokens: pd.DataFrame, bins: int = 40) -> alt.FacetChart:
    """Fig 4 (and App. D Fig 16-17 for more heads): histograms of ``S/S'`` on each head's top-k%
    tokens, one row per head and one column per ablation, with the line at 1 and the share of
    tokens above it (computed by Vega-Lite from the same rows)."""
    t = tokens[tokens["tokens"] == "top-k%"][["label", "ablation", "ratio"]].copy()
    labels = list(t["label"].drop_duplicates())
    # one wrapped facet of "head · ablation" panels, three to a row (a row x column facet cannot
    # be re-wrapped into one column on a phone)
    t["panel"] = t["label"] + " · " + t["ablation"]
    panels = [f"{h} · {a}" for h in labels for a in ABLATIONS]
    base = alt.Chart()
    hist = base.mark_bar(opacity=0.85).encode(
        x=alt.X("ratio:Q", bin=alt.Bin(maxbins=bins), title="S / S′",
                axis=alt.Axis(format=".3f", labelOverlap="greedy", labelSeparation=6, labelAngle=-30)),
        y=alt.Y("count():Q", title="tokens"), color=_ablation_color(legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("label:N", title="head"), alt.Tooltip("ablation:N"),
                 alt.Tooltip("ratio:Q", bin=alt.Bin(maxbins=bins), title="S/S′ bin"),
                 alt.Tooltip("count():Q", title="tokens")])
    one = base.mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(1))
    share = (base.transform_calculate(above="datum.ratio > 1 ? 1 : 0")
             .transform_aggregate(share="mean(above)", n="count()")
             .mark_text(align="right", baseline="top", x="width", y=4, dx=-4, fontSize=12)
             .encode(text=alt.Text("share:Q", format=".1%"),
                     tooltip=[alt.Tooltip("share:Q", format=".2%", title="share S/S′ > 1"),
                              alt.Tooltip("n:Q", title="tokens")]))
    title = (f"{labels[0]}: S/S′ (clean / ablated final-norm scale) on its top-k% tokens (text: share > 1)"
             if len(labels) == 1 else
             "S/S′ (clean / ablated final-norm scale) on each head's top-k% tokens (text: share > 1)")
    # 150 px: three panels, each with its own axes (independent scales), fit a 743 px column
    return (alt.layer(hist, one, share, data=t).properties(width=150, height=110)
            .facet(facet=alt.Facet("panel:N", sort=panels, title=None), columns=len(ABLATIONS))
            .resolve_scale(x="independent", y="independent")
            .properties(title=title))


def fig_ablation_scatter(tokens: pd.DataFrame, max_per_panel: int = 700, seed: int = 0) -> alt.FacetChart:
    """Fig 5: per-token direct effect vs Δlogit of the head under each ablation (one panel each),
    top-k% tokens in colour over a random sample in grey; dashed y = -x, solid x-axis."""
    t = (tokens.sample(frac=1.0, random_state=seed).groupby(["ablation", "tokens"]).head(max_per_panel)
         .sort_values(["ablation", "tokens"], ascending=[True, False], kind="mergesort"))
    points = alt.Chart().mark_circle(size=18, opacity=0.7).encode(
        x=alt.X("direct_effect:Q", title="direct effect DE"),
        y=alt.Y("delta_logit:Q", title="Δlogit"),
        color=alt.Color("tokens:N", scale=alt.Scale(domain=["top-k%", "random sample"],
                                                    range=["#4c78a8", "#bab0ac"]), title="tokens",
                        legend=alt.Legend(orient="bottom")),  # three panels and a legend fit 1024 px
        tooltip=_tips(t, "ablation", "tokens", "row", "pos", "direct_effect", "delta_logit",
                      "self_repair", "from_norm", "ratio"))
    label = t["label"].iloc[0] if len(t) else ""
    return (alt.layer(*_diagonal("direct_effect", "delta_logit"), points, data=t)
            .properties(width=180, height=200)
            .facet(column=alt.Column("ablation:N", sort=ABLATIONS, title=None))
            .properties(title=f"{label}: DE vs Δlogit under three ablations"))


def fig_norm_share(shares: pd.DataFrame, paper: float = 0.30) -> alt.LayerChart:
    """Fig 6: per head, the clipped share of its direct effect given back by the norm(s) on its
    top-k% tokens (points), the layer means (lines), and the paper's ~30% (dotted)."""
    f = shares[(shares["tokens"] == "top-k%") & (shares["clipping"] == "clipped")]
    color = alt.Color("component:N", scale=alt.Scale(domain=["final norm", "block norms"],
                                                     range=["#4c78a8", "#e45756"]), title="norm")
    base = alt.Chart(f)
    points = base.mark_circle(size=40, opacity=0.6).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("share:Q", title="norm self-repair / DE (clipped, top-k%)", axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])),
        color=color, tooltip=_tips(f, "component", "share", "n"))
    line = base.mark_line(strokeWidth=2).encode(x="layer:Q", y="mean(share):Q", color=color,
                                                tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("component:N"),
                                                         alt.Tooltip("mean(share):Q", format=".1%",
                                                                     title="layer mean")])
    ref = base.mark_rule(color="#444", strokeDash=[2, 2]).encode(y=alt.datum(paper))
    return alt.layer(ref, points, line).properties(
        width="container", title="Share of each head's direct effect the norms give back (dotted: paper ≈ 30%)")


def fig_share_variants(layers: pd.DataFrame) -> alt.FacetChart:
    """Fig 9 vs Fig 10: layer means of the final-norm share, unclipped vs clipped (panels, own
    y-scales) on the top-k% tokens and on a random sample of all tokens (colour)."""
    f = layers[layers["component"] == "final norm"]
    return (alt.Chart(f).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("share:Q", title="mean from_norm / DE", axis=alt.Axis(format="%")),
        color=alt.Color("tokens:N", scale=alt.Scale(domain=["top-k%", "random sample"],
                                                    range=["#4c78a8", "#bab0ac"]), title="tokens",
                        legend=alt.Legend(orient="bottom")),  # two panels and a legend fit 1024 px
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("tokens:N"), alt.Tooltip("clipping:N"),
                 alt.Tooltip("share:Q", format=".1%", title="layer mean share"),
                 alt.Tooltip("n_heads:Q", title="heads")])
        .properties(width=260, height=220)
        .facet(column=alt.Column("clipping:N", sort=["unclipped", "clipped"], title=None))
        .resolve_scale(y="independent")
        .properties(title="Final-norm share of DE: unclipped (Fig 9) vs clipped to [0, 1] (Fig 10)"))


def histogram(values: pd.DataFrame, column: str, by: str, bins: int = 40) -> pd.DataFrame:
    """Counts of ``column`` in ``bins`` equal bins shared by every group of ``by`` (a chart of
    thousands of tokens then embeds only the bins): columns ``by, lo, hi, count``."""
    import numpy as np

    x = values[column].to_numpy(float)
    edges = np.histogram_bin_edges(x[np.isfinite(x)], bins=bins) if np.isfinite(x).any() else np.array([0.0, 1.0])
    rows = []
    for key, g in values.groupby(by, sort=False):
        counts, _ = np.histogram(g[column].to_numpy(float), bins=edges)
        rows += [{by: key, "lo": lo, "hi": hi, "count": int(c)} for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
    return pd.DataFrame(rows)


def fig_norm_ratio(tokens: pd.DataFrame, bins: int = 40) -> alt.Chart:
    """App. D / Fig 15: ``S'/S`` (= ||r'||/||r|| for RMSNorm; centred residual for LayerNorm) on the
    uniform sample of all tokens — no filtering by direct effect — per ablation (binned here, so
    the chart embeds counts, not tokens)."""
    t = tokens[tokens["tokens"] == "random sample"][["label", "ablation", "norm_ratio"]]
    label = t["label"].iloc[0] if len(t) else ""
    h = histogram(t, "norm_ratio", "ablation", bins)
    hist = alt.Chart(h).mark_bar(opacity=0.5, binSpacing=0).encode(
        x=alt.X("lo:Q", title="S′ / S (ablated / clean residual norm)",
                axis=alt.Axis(format=".3f", labelOverlap="greedy", labelSeparation=6)),
        x2="hi:Q", y=alt.Y("count:Q", stack=None, title="tokens"), color=_ablation_color(),
        tooltip=[alt.Tooltip("ablation:N"), alt.Tooltip("lo:Q", format=".4f", title="from"),
                 alt.Tooltip("hi:Q", format=".4f", title="to"), alt.Tooltip("count:Q", title="tokens")])
    one = alt.Chart(h).mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(1))
    return alt.layer(hist, one).properties(
        width="container", height=220, title=f"{label}: residual-norm ratio on a random sample of tokens")


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
    points = alt.Chart().mark_circle(size=18, opacity=0.7).encode(
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


FROZEN_MEASURES = ["live", "norms frozen", "norms only", "eq. 2 norm terms"]
FROZEN_COLORS = ["#4c78a8", "#e45756", "#54a24b", "#444444"]


def fig_frozen_norm(heads: pd.DataFrame) -> alt.VConcatChart:
    """§3 / §5.2: per head (rows of :func:`selfrepair.frozen_norm.per_head`), the mean top-k%
    self-repair of the live ablation, with the norms frozen and with only the norms live, beside
    eq. 2's norm terms of the live ablation (``from_norm + from_block_norms``; top). Below: what
    freezing removes (live − frozen) against those norm terms; on the dashed y = x line exactly
    when freezing the norms removes eq. 2's norm terms and nothing else."""
    from selfrepair.frozen_norm import long_frame

    long = long_frame(heads)
    color = alt.Color("measure:N", scale=alt.Scale(domain=FROZEN_MEASURES, range=FROZEN_COLORS),
                      title="self-repair", legend=alt.Legend(orient="bottom", columns=2))
    dots = alt.Chart(long).mark_point(filled=True, size=45, opacity=0.85).encode(
        x=alt.X("label:N", sort=_head_order(heads), title="head",
                axis=alt.Axis(labelAngle=-90, labelOverlap="greedy")),
        y=alt.Y("value:Q", title="mean over top-k% tokens (logits)"),
        color=color,
        shape=alt.Shape("measure:N", scale=alt.Scale(domain=FROZEN_MEASURES,
                                                     range=["circle", "triangle-down", "square", "diamond"]),
                        title="self-repair", legend=alt.Legend(orient="bottom", columns=2)),
        tooltip=_tips(long, "measure", "value", "direct_effect", "n"))
    zero = alt.Chart(long).mark_rule(color="#888", strokeWidth=1).encode(y=alt.datum(0))
    left = alt.layer(zero, dots).properties(width=min(VIEWS_AT_1024, max(240, 14 * len(heads))), height=240,
                                            title="Self-repair: live, norms frozen, norms only")
    diag = (alt.Chart(heads).transform_aggregate(lo="min(norm_terms)", hi="max(norm_terms)")
            .transform_fold(["lo", "hi"], as_=["end", "v"])
            .mark_line(color="#444", strokeDash=[4, 3]).encode(x="v:Q", y="v:Q"))
    points = alt.Chart(heads).mark_circle(size=45, opacity=0.8, color="#e45756").encode(
        x=alt.X("norm_terms:Q", title="eq. 2 norm terms (from_norm + from_block_norms)"),
        y=alt.Y("removed:Q", title="live − norms-frozen self-repair"),
        tooltip=_tips(heads, "norm_terms", "removed", "gap", "from_norm", "from_block_norms",
                      "self_repair", "self_repair_frozen"))
    right = alt.layer(diag, points).properties(width=240, height=240,
                                               title="What freezing removes vs eq. 2 (dashed: y = x)")
    return alt.vconcat(left, right).properties(  # stacked: the per-head panel is wide
        title="Ablating with the norms frozen (§3, §5.2), per head")


__all__ = ["fig_scale_ratio", "fig_ablation_scatter", "fig_norm_share", "fig_share_variants",
           "fig_norm_ratio", "fig_appendix_b", "fig_frozen_norm"]
