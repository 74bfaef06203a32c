"""Figures for the Hydra-effect chapter (McGrath et al. 2023, Fig 1, 2, 3, 7, 8).

Pure functions: a tidy frame from :mod:`selfrepair.hydra` in, an Altair chart out.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from . import MAX_ROWS, layer_color, series_color
from ..structure import span
from .encodings import ABLATION_COLORS, distinct_colors, heat_scale, present  # the same in chapter 2
from .legible import DARK, MARK_OPACITY, beyond, beyond_marks, beyond_note, central_range, clamped, data_domain

KIND_HEADER = alt.Header(labelExpr="datum.value == 'attn' ? 'attention layers' : 'MLP layers'")
LAYER_AXIS = alt.Axis(format="d", tickMinStep=1)
LINE_WIDTH = 2  # px of a chart's data lines (at least 1.5: each line must read)
EVERY = "resample (every source)"
GAP, CLEAN = " ", "clean DE"  # fig_erasure's blank slot and its clean-DE column
ERASURE_STEP = 18  # px per column: 18 layers and the clean column ~360 px (a phone narrows the steps)
ERASURE_WIDTH = 240  # px: the narrowest erasure map (wider steps for a model of few layers)
ERASURE_SYMLOG = 0.05  # logits: the erasure map's colour is linear within this of 0, logarithmic beyond
# a legend of lines: each swatch a stroke in the line's colour (and dash) at full strength
KIND_WORDS = {"attn": "attention", "mlp": "MLP"}
MEAN_RUN = "ablated (average over resample sources)"  # Fig 1/3's mean line: not "mean ablation"
DEPTH_GROUPS = ("early", "middle", "late")  # Fig 7a/c: before, in and after the verdicts' middle half
LINE_LEGEND = alt.Legend(orient="bottom", columns=2, symbolType="stroke", symbolOpacity=1,
                         symbolStrokeWidth=LINE_WIDTH)


def _by_kind(title: str | None = None) -> alt.Column:
    return alt.Column("kind:N", title=title, sort=["attn", "mlp"], header=KIND_HEADER)


def fig_impact(summary) -> alt.FacetChart:
    """Hydra Fig 2a/b: per layer, the mean unembedding impact (direct effect) and ablation impact
    (logit drop) with their 10-90% range over prompts; one panel per kind of layer."""
    base = alt.Chart(summary).encode(
        x=alt.X("layer:Q", title="layer", axis=LAYER_AXIS),
        color=alt.Color("measure:N", title="impact", sort=["unembed", "ablate"],
                        scale=alt.Scale(domain=["unembed", "ablate"], range=[DARK["blue"], DARK["red"]]),
                        # the swatches show the lines' colours at full strength, not the pale bands'
                        legend=alt.Legend(orient="bottom", columns=1,  # fits 1024 px and a phone
                                          symbolOpacity=1, symbolType="stroke", symbolStrokeWidth=LINE_WIDTH,
                                          labelExpr="datum.label == 'unembed' ? 'Δ unembed (direct effect)'"
                                                    " : 'Δ ablate (logit drop)'")))
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("lo:Q", title="effect on the max-likelihood logit"),
                                              y2="hi:Q")
    line = base.mark_line(point=True, strokeWidth=LINE_WIDTH).encode(
        y="mean:Q",
        tooltip=[alt.Tooltip("kind:N"), alt.Tooltip("layer:O"), alt.Tooltip("measure:N"),
                 alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("lo:Q", format=".3f", title="10%"),
                 alt.Tooltip("hi:Q", format=".3f", title="90%"),
                 alt.Tooltip("corr:Q", format=".2f", title="corr(DE, drop)"),
                 alt.Tooltip("frac_de_gt_drop:Q", format=".0%", title="DE > drop")])
    return (alt.layer(band, line, data=summary).properties(width=260, height=220)
            .facet(column=_by_kind())
            .properties(title="Unembedding vs ablation impact per layer (Hydra Fig 2)"))


def fig_unembed_vs_ablate(effects) -> alt.Chart:
    """Hydra Fig 2c: per (prompt, layer) direct effect against the logit drop; the dashed line is
    drop = DE (no downstream response). Points below it are (partly) compensated."""
    data = effects[["prompt", "layer", "kind", "label", "direct_effect", "ablation_drop", "compensatory_effect"]]
    if len(data) > MAX_ROWS - 10:
        data = data.sample(MAX_ROWS - 10, random_state=0)
    points = alt.Chart(data).mark_circle(size=18, opacity=MARK_OPACITY).encode(
        x=alt.X("direct_effect:Q", title="Δ unembed (direct effect)"),
        y=alt.Y("ablation_drop:Q", title="Δ ablate (logit drop)"),
        color=layer_color(), shape=alt.Shape("kind:N", title="layer kind"),
        tooltip=[alt.Tooltip("label:N", title="layer"), alt.Tooltip("prompt:O"),
                 alt.Tooltip("direct_effect:Q", format=".3f"), alt.Tooltip("ablation_drop:Q", format=".3f"),
                 alt.Tooltip("compensatory_effect:Q", format=".3f")])
    diag = alt.Chart(data).mark_line(strokeDash=[4, 4], color="gray").encode(
        x="direct_effect:Q", y="direct_effect:Q")
    return (points + diag).properties(width="container",
                                      title="Direct effect vs logit drop, every prompt and layer (Fig 2c)")


def fig_before_after(frame) -> alt.Chart:
    """Hydra Fig 1/3: each layer's direct effect on one prompt before (black) and after ablating
    one layer (red: mean over patches; thin blue: single patches, another hue than the mean's red,
    not a second red; dashed rule: the ablated layer);
    one panel per kind of layer."""
    ablated = frame["ablated"].iloc[0]
    kind = frame["ablated_kind"].iloc[0] if "ablated_kind" in frame else ""
    if kind in KIND_WORDS and "ablated_layer" in frame:  # "attention layer 12", not the tables' "A12"
        ablated = f"{KIND_WORDS[kind]} layer {int(frame['ablated_layer'].iloc[0])}"
    prompt = frame["prompt"].iloc[0] if "prompt" in frame else ""
    frame = frame.assign(group=frame["run"].map({"clean": "clean", "ablated (mean)": MEAN_RUN}).fillna("single patch"))
    # the thin single patches first, so the clean line and the mean are drawn over them
    frame = frame.sort_values("group", key=lambda g: g.map({"single patch": 0, "clean": 1, MEAN_RUN: 2}),
                              kind="mergesort")
    base = alt.Chart().encode(
        x=alt.X("layer:Q", axis=LAYER_AXIS),
        y=alt.Y("direct_effect:Q", title="direct effect on the max-likelihood logit"),
        detail="run:N",
        color=alt.Color("group:N", title=None, sort=["clean", MEAN_RUN, "single patch"],
                        scale=alt.Scale(domain=["clean", MEAN_RUN, "single patch"],
                                        range=["black", DARK["red"], DARK["blue"]]),
                        legend=alt.Legend(orient="bottom", columns=1, labelLimit=0)),
        strokeWidth=alt.condition(alt.datum.group == "single patch", alt.value(1), alt.value(2.5)),
        tooltip=[alt.Tooltip("label:N", title="layer"), alt.Tooltip("run:N"),
                 alt.Tooltip("direct_effect:Q", format=".3f")])
    mark = alt.Chart().mark_rule(color="#444", strokeDash=[3, 3]).encode(x="layer:Q").transform_filter(
        "datum.run == 'clean' && datum.kind == datum.ablated_kind && datum.layer == datum.ablated_layer")
    chart = alt.layer(base.mark_line(point=True), mark, data=frame).properties(width=280, height=220)
    return (chart.facet(column=_by_kind())
            .properties(title=alt.Title(f"Direct effects before and after ablating {ablated} (Hydra Fig 1, 3)",
                                        subtitle=f"prompt: {prompt!r}" if prompt else "")))


def fig_compensation(effects) -> alt.Chart:
    """Hydra Fig 7a/c: per (prompt, ablated layer) the ablated layer's direct effect against the
    compensatory effect (eq. 33), coloured by depth; dashed: CE = DE (full compensation)."""
    data = effects[["prompt", "layer", "kind", "label", "direct_effect", "compensatory_effect",
                    "ce_attn", "ce_mlp", "total_effect"]]
    if len(data) > MAX_ROWS - 10:
        data = data.sample(MAX_ROWS - 10, random_state=0)
    data = data.assign(depth=depth_group(data["layer"], int(effects["layer"].max()) + 1))
    points = alt.Chart().mark_circle(size=18, opacity=MARK_OPACITY).encode(
        x=alt.X("direct_effect:Q", title="direct effect of the ablated layer"),
        y=alt.Y("compensatory_effect:Q", title="compensatory effect (eq. 33)"),
        color=depth_groups(data),  # depth in three parts, three hues: 18 shades of one ramp could not be told apart
        tooltip=[alt.Tooltip("label:N", title="ablated"), alt.Tooltip("layer:O", title="ablated layer"),
                 alt.Tooltip("prompt:O")]
        + [alt.Tooltip(f"{c}:Q", format=".3f") for c in
           ("direct_effect", "compensatory_effect", "ce_attn", "ce_mlp", "total_effect")])
    diag = alt.Chart().mark_line(strokeDash=[4, 4], color="gray").encode(x="direct_effect:Q", y="direct_effect:Q")
    return (alt.layer(points, diag, data=data).properties(width=300, height=240)
            .facet(column=_by_kind("ablated"))
            .properties(title="Compensation against direct effect (Hydra Fig 7a, c)"))


def depth_group(layers, n_layers: int):
    """Each layer's part of the depth, in words with its layers: the middle half the verdicts read
    (:func:`selfrepair.structure.span`, "middle (4–13)" on 18 layers), and the layers before and
    after it ("early (0–3)", "late (14–17)"), so the legend's "middle" is the verdicts' middle."""
    mid = span(n_layers, "middle")
    edges = [(0, mid.start - 1), (mid.start, mid.stop - 1), (mid.stop, n_layers - 1)]
    names = [f"{DEPTH_GROUPS[g]} ({a}–{b})" if a != b else f"{DEPTH_GROUPS[g]} ({a})" for g, (a, b) in enumerate(edges)]
    return [names[0 if l < mid.start else 1 if l < mid.stop else 2] for l in layers]


def depth_groups(data) -> alt.Color:
    """Fig 7a/c's colour: the depth parts of :func:`depth_group` in three distinct hues
    (blue, orange, green: apart for red-green colour blindness too), each ablated layer on hover."""
    shown = sorted(set(data["depth"]), key=lambda g: DEPTH_GROUPS.index(g.split(" ")[0]))
    return alt.Color("depth:N", title="ablated layer", sort=shown,
                     scale=alt.Scale(domain=shown, range=distinct_colors(3)[:len(shown)]),
                     legend=alt.Legend(orient="bottom"))


SLOPES = {"slope": "all downstream", "slope_attn": "attention part", "slope_mlp": "MLP part"}
# the parts in Fig 8's colours (attention blue, MLP red), the total in black, drawn solid over them
R2_BAR = 8  # px: a bar per layer, narrower than a layer's step on a phone
REGRESSION_WIDTH = 520  # px: a compound chart has no container width; the renderer narrows it on a phone
SLOPE_COLORS = {"all downstream": "black", "attention part": DARK["blue"], "MLP part": DARK["red"]}


def fig_regression(reg) -> alt.VConcatChart:
    """Hydra Fig 7d / 8: per ablated attention layer, the regression slope of the compensatory
    effect on the direct effect (all downstream, attention part, MLP part; rule: 1, full
    compensation) above, and the variance explained (R²) below, in a panel of its own: grey bars on
    their own 0-1 axis, so they neither overlap the slopes' lines nor share a colour with them."""
    data = reg[reg["kind"] == "attn"]
    long = data.melt(id_vars=["layer", "label", "r2", "restored", "n"], value_vars=list(SLOPES),
                     var_name="fit", value_name="value")
    long["fit"] = long["fit"].map(SLOPES)
    r2 = data.assign(fit="variance explained (R²)", value=data["r2"])[long.columns]
    both = __import__("pandas").concat([long, r2], ignore_index=True)
    tips = [alt.Tooltip("label:N", title="ablated"), alt.Tooltip("fit:N"),
            alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("r2:Q", format=".2f", title="R²"),
            alt.Tooltip("restored:Q", format=".0%"), alt.Tooltip("n:Q", title="prompts")]
    # one x scale for both panels, from the layers drawn, so each bar sits under its layer's points
    x = alt.X("layer:Q", title="ablated attention layer", axis=LAYER_AXIS,
              scale=alt.Scale(domain=data_domain(data["layer"], pad=0.03), nice=False))
    base = alt.Chart(both)
    lines = base.transform_filter("datum.fit != 'variance explained (R²)'").mark_line(
        point=True, strokeWidth=LINE_WIDTH).encode(
        x=x, y=alt.Y("value:Q", title="slope of compensation"),
        color=series_color("fit", SLOPE_COLORS, long["fit"], title="slope",
                           legend=alt.Legend(orient="top", columns=3, symbolType="stroke", symbolOpacity=1,
                                             symbolStrokeWidth=LINE_WIDTH)),
        strokeDash=alt.condition(alt.datum.fit == SLOPES["slope"], alt.value([1, 0]), alt.value([4, 3])),
        tooltip=tips)
    one = base.mark_rule(color="gray").encode(y=alt.datum(1))
    bars = base.transform_filter("datum.fit == 'variance explained (R²)'").mark_bar(
        color=DARK["grey"], size=R2_BAR).encode(x=x, y=alt.Y("value:Q", title="R²"), tooltip=tips)
    return alt.vconcat(
        (lines + one).properties(width=REGRESSION_WIDTH, height=220, title="Slope of compensation on direct effect"),
        bars.properties(width=REGRESSION_WIDTH, height=90, title="Variance explained by the fit (R²)"),
    ).properties(title="Compensation regression per attention layer (Hydra Fig 7d, 8)")


def fig_erasure(frame) -> alt.LayerChart:
    """Hydra §2.5.2: mean change of each MLP layer's direct effect after ablating each attention
    layer (blue: the MLP's DE rises, e.g. erasure relaxes); the column at the right is the MLP's
    clean DE. Both on one colour scale (the same quantity, a direct effect in logits; near-white at
    0, symmetric about it), so a cell and the clean column compare at a glance; a symmetric log
    scale, so the changes, far smaller than the clean effects, still show. One view (the clean
    column an extra slot of its x scale, after a blank one) with its colour bar under it: on a
    phone the renderer narrows its steps and the chart stays one piece."""
    layers = sorted(frame["ablated_layer"].unique().tolist())
    slots = [*layers, GAP, CLEAN]  # the blank slot keeps the clean column apart from the heatmap
    x_scale = alt.Scale(domain=slots, paddingInner=0)
    x_axis = alt.Axis(labelExpr=f"datum.value === '{GAP}' ? '' : datum.label", ticks=False,
                      labelAngle=0, labelOverlap="parity", labelSeparation=3)
    y = alt.Y("mlp_layer:O", title="MLP layer", sort="descending")
    values = [*frame["delta_direct_effect"], *frame["clean_direct_effect"]]
    color = dict(scale=heat_scale(values, type="symlog", constant=ERASURE_SYMLOG),
                 title="direct effect of the MLP (logits)",
                 legend=alt.Legend(orient="bottom", direction="horizontal", gradientLength=200, titleLimit=260,
                                   labelOverlap="greedy"))  # "−2−1" ran together
    long = pd.concat([frame.assign(slot=frame["ablated_layer"], de=frame["delta_direct_effect"], what="change"),
                      frame[frame["ablated_layer"] == frame["ablated_layer"].min()]
                      .assign(slot=CLEAN, de=frame["clean_direct_effect"], what="clean")])
    heat = alt.Chart(long).mark_rect().encode(
        x=alt.X("slot:O", title="ablated attention layer (left); clean (right column)", scale=x_scale, axis=x_axis),
        y=y, color=alt.Color("de:Q", **color),
        tooltip=[alt.Tooltip("what:N", title="shown"), alt.Tooltip("ablated_layer:O", title="ablated attention layer"),
                 alt.Tooltip("label:N", title="MLP"), alt.Tooltip("delta_direct_effect:Q", format=".3f", title="ΔDE"),
                 alt.Tooltip("clean_direct_effect:Q", format=".3f", title="clean DE"), alt.Tooltip("late:N")])
    return heat.properties(width=alt.Step(max(ERASURE_STEP, -(-ERASURE_WIDTH // len(slots)))), height=260,
                           title="How late MLPs respond to attention ablations (erasure? Hydra §2.5.2)")


def _ablation_dash(frame) -> alt.StrokeDash:
    """Solid lines but the every-source average, dashed (it runs on top of the mean line), in the
    same legend as :func:`_ablation_color`."""
    shown = present(list(ABLATION_COLORS), frame["ablation"])
    return alt.StrokeDash("ablation:N", title="ablation", legend=LINE_LEGEND,
                          scale=alt.Scale(domain=shown, range=[[5, 3] if a == EVERY else [1, 0] for a in shown]))


def _ablation_color(frame, lines: bool = False) -> alt.Color:
    """The ablations ``frame`` holds (only those: the legend lists what is drawn), in two columns
    below the chart, so the legend fits a phone."""
    return series_color("ablation", ABLATION_COLORS, frame["ablation"], title="ablation",
                        legend=LINE_LEGEND if lines else alt.Legend(orient="bottom", columns=2))


def fig_own_effect(own) -> alt.FacetChart:
    """§2.5.2: per ablated layer, the size of its own direct effect in the ablated run (averaged
    over patches) relative to its clean size, one line per ablation; 0 = the ablation removes the
    layer's direct effect, 1 = as large as it was. Noise ablation moves it by many times its clean
    size: the axis spans the ratios near their median, and 0 and 1
    (:func:`~selfrepair.figures.legible.central_range`); those beyond are drawn as ▲ at its edge
    and counted per ablation in the subtitle (hover for each value)."""
    data = own[["ablation", "layer", "kind", "label", "n_patches", "ratio", "patch_ratio", "abs_clean",
                "mean_ablated", "mean_clean"]]
    span = central_range(data["ratio"], include=(0, 1))
    data = data.assign(beyond=beyond(data["ratio"], span))
    tips = [alt.Tooltip("label:N", title="ablated"), alt.Tooltip("ablation:N"), alt.Tooltip("n_patches:Q", title="patches"),
            alt.Tooltip("ratio:Q", format=".0%", title="patch mean / clean"),
            alt.Tooltip("patch_ratio:Q", format=".0%", title="one patch / clean"),
            alt.Tooltip("mean_ablated:Q", format=".3f", title="mean own DE"),
            alt.Tooltip("mean_clean:Q", format=".3f", title="mean clean DE")]
    x = alt.X("layer:Q", title="ablated layer", axis=LAYER_AXIS)
    y = alt.Y("ratio:Q", title="mean |own DE| / mean |clean DE|", axis=alt.Axis(format="%"), scale=clamped(span))
    color, dash = _ablation_color(data, lines=True), _ablation_dash(data)
    lines = alt.Chart().mark_line(point=True, strokeWidth=LINE_WIDTH).encode(x=x, y=y, color=color,
                                                                             strokeDash=dash, tooltip=tips)
    # the every-source average lies on the mean line (they differ by one prompt's write in n):
    # drawn again on top, dashed, so it shows
    every = (alt.Chart().transform_filter(f"datum.ablation == '{EVERY}'")
             .mark_line(strokeWidth=LINE_WIDTH).encode(x=x, y=y, color=color, strokeDash=dash, tooltip=tips))
    one = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(y=alt.datum(1))
    edge = [beyond_marks(alt.Chart(), x, y, color=color, tooltip=tips)] if span else []
    title = "The ablated layer's own direct effect in the ablated run (Hydra §2.5.2)"
    note = beyond_note(data["beyond"], data["ablation"], what="(layer, ablation) means")
    return (alt.layer(lines, one, every, *edge, data=data).properties(width=280, height=220).facet(column=_by_kind("ablated"))
            .properties(title=alt.Title(title, subtitle=note) if note else title))


def fig_noise_vs_resample(comparison) -> alt.FacetChart:
    """App. A: per ablated layer and ablation, the mean |total effect| per patch (top) and the
    per-patch slope of compensation on the direct effect removed (bottom)."""
    long = comparison.melt(id_vars=["ablation", "layer", "kind", "label", "lost", "compensation", "r2"],
                           value_vars=["abs_total_effect", "slope"], var_name="measure", value_name="value")
    tips = [alt.Tooltip("label:N", title="ablated"), alt.Tooltip("ablation:N"), alt.Tooltip("measure:N"),
            alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("lost:Q", format=".3f", title="DE removed"),
            alt.Tooltip("compensation:Q", format=".3f"), alt.Tooltip("r2:Q", format=".2f", title="R² of the slope")]
    lines = alt.Chart().mark_line(point=True).encode(
        x=alt.X("layer:Q", title="ablated layer", axis=LAYER_AXIS), y=alt.Y("value:Q", title=None),
        color=_ablation_color(long), tooltip=tips)
    # one wrapped facet of "kind: measure" panels, two to a row (a row x column facet cannot be
    # re-wrapped into one column on a phone)
    kinds = {"attn": "attention layers", "mlp": "MLP layers"}
    measures = {"abs_total_effect": "mean |Δ ablate| per patch", "slope": "compensation per logit removed"}
    long["panel"] = long["kind"].map(kinds) + ": " + long["measure"].map(measures)
    panels = [f"{kinds[k]}: {measures[m]}" for m in measures for k in kinds]
    return (alt.layer(lines, data=long).properties(width=280, height=160)
            .facet(facet=alt.Facet("panel:N", sort=panels, title=None), columns=2)
            .resolve_scale(y="independent")
            .properties(title="Noise beside resample ablation, per layer (Hydra App. A)"))


def fig_localisation(loc) -> alt.FacetChart:
    """§2.5.2: mean |ΔDE| of every readout layer (rows) after ablating each layer (columns), one
    panel per (ablated kind, readout kind); cells not downstream of the ablated layer are 0. One
    wrapped facet of four panels, two to a row, so a phone stacks them in one column and widens
    each to fill it (a row x column grid cannot be re-wrapped: its panels were narrowed to 100 px),
    each with its own layer axis."""
    data = loc[loc["position"] != "self"]
    kinds = {"attn": "attention", "mlp": "MLP"}
    later = {"attn": "later attention", "mlp": "later MLPs"}
    data = data.assign(panel=data["ablated_kind"].map(kinds) + " ablated → " + data["readout_kind"].map(later))
    panels = [f"{kinds[a]} ablated → {later[r]}" for r in later for a in kinds]
    tips = [alt.Tooltip("ablated:N"), alt.Tooltip("readout:N"), alt.Tooltip("position:N"),
            alt.Tooltip("abs_delta_de:Q", format=".4f", title="mean |ΔDE|"),
            alt.Tooltip("mean_delta_de:Q", format=".4f", title="mean ΔDE")]
    heat = alt.Chart().mark_rect().encode(
        # every other label where they would touch (a phone's 300 px panel: 18 labels ran together)
        x=alt.X("ablated_layer:O", title="ablated layer",
                axis=alt.Axis(labelAngle=0, labelOverlap="parity", labelSeparation=3)),
        y=alt.Y("readout_layer:O", title="readout layer", sort="descending"),
        color=alt.Color("abs_delta_de:Q", scale=alt.Scale(scheme="greys"), title="mean |ΔDE|",
                        legend=alt.Legend(orient="bottom")), tooltip=tips)
    return (alt.layer(heat, data=data).properties(width=260, height=200)
            .facet(facet=alt.Facet("panel:N", sort=panels, title=None), columns=2)
            .resolve_axis(x="independent")  # every panel its own layer axis (stacked on a phone, too)
            .properties(title="Which later layers change after an ablation (Hydra §2.5.2)"))


def fig_best_layer(points) -> alt.Chart:
    """Hydra Fig 7b: compensation against direct effect at the attention layer with the highest
    R², with its least-squares line (solid) and CE = DE (dashed)."""
    label = points["label"].iloc[0] if len(points) else ""
    r2 = float(points["r2"].iloc[0]) if len(points) else float("nan")
    tips = [alt.Tooltip("prompt:O"), alt.Tooltip("direct_effect:Q", format=".3f"),
            alt.Tooltip("compensatory_effect:Q", format=".3f"), alt.Tooltip("ce_attn:Q", format=".3f"),
            alt.Tooltip("ce_mlp:Q", format=".3f")]
    x = alt.X("direct_effect:Q", title=f"direct effect of {label}")
    pts = alt.Chart().mark_circle(size=30, opacity=MARK_OPACITY, color=DARK["blue"]).encode(
        x=x, y=alt.Y("compensatory_effect:Q", title="compensatory effect (eq. 33)"), tooltip=tips)
    fit = alt.Chart().mark_line(color="#d62728").encode(x=x, y="fit:Q")
    diag = alt.Chart().mark_line(strokeDash=[4, 4], color="gray").encode(x=x, y="direct_effect:Q")
    return alt.layer(pts, fit, diag, data=points).properties(
        width="container", title=f"{label}: compensation vs direct effect, R² = {r2:.2f} (Hydra Fig 7b)")


def fig_layer_panels(panels) -> alt.FacetChart:
    """Hydra Fig 8: per selected ablated attention layer, ΔDE of the downstream attention layers
    and of the downstream MLP layers against the ablated layer's direct effect, with their fits."""
    tips = [alt.Tooltip("label:N", title="ablated"), alt.Tooltip("prompt:O"), alt.Tooltip("part:N"),
            alt.Tooltip("direct_effect:Q", format=".3f"), alt.Tooltip("delta_de:Q", format=".3f", title="ΔDE"),
            alt.Tooltip("slope:Q", format=".2f"), alt.Tooltip("r2:Q", format=".2f", title="R²")]
    color = alt.Color("part:N", title="downstream", scale=alt.Scale(domain=["attention", "MLP"],
                                                                     range=[DARK["blue"], DARK["red"]]),
                      legend=alt.Legend(orient="bottom"))
    x = alt.X("direct_effect:Q", title="direct effect of the ablated layer")
    pts = alt.Chart().mark_circle(size=16, opacity=MARK_OPACITY).encode(x=x, y=alt.Y("delta_de:Q", title="ΔDE downstream"),
                                                               color=color, tooltip=tips)
    fit = alt.Chart().mark_line().encode(x=x, y="fit:Q", color=color, detail="part:N")
    # a 2×2 grid (four panels, hydra_controls.panel_layers): four in a row, each with its own y axis,
    # were wider than a 1024 px page's column on an 18-layer model
    return (alt.layer(pts, fit, data=panels).properties(width=200, height=150)
            .facet(facet=alt.Facet("label:N", title=None, sort=alt.EncodingSortField(field="layer", op="min")), columns=2)
            .resolve_scale(x="independent", y="independent")
            .properties(title="Attention and MLP parts of compensation at a selection of layers (Hydra Fig 8)"))
