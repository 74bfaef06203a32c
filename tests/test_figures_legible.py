"""Charts that read at a glance, on the specs the figure functions build (``chart.to_dict()``):
axes fitted to the data's central range with the outliers drawn at the edge and counted, marks
dark enough on the white page (3:1), no label cut at its limit, ticks that do not crowd, and
legends and axis titles that fit a phone's column. Each test fails on the chart as the rebuilt
book's newcomer read it (axes to 1.5M% and 8000%, a log axis to 10,000, near-white marks, labels
cut at ~28 characters, 0.2-step alpha ticks, a legend showing 3 of 5 models)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from selfrepair import existence
from selfrepair.figures import check_width, data_rows, validate_spec
from selfrepair.figures.legible import pale_marks
from selfrepair.figures import across as fa
from selfrepair.figures import atp as ft
from selfrepair.figures import existence as fe
from selfrepair.figures import hydra as fh
from selfrepair.figures import ioi as fi
from selfrepair.figures import iterative as fit
from selfrepair.figures import layernorm as fl
from selfrepair.figures import neurons as fn
from selfrepair.figures import scorecard as fs
from selfrepair.figures.encodings import LABEL_PX
from selfrepair.figures.legible import (DEPTH_SCHEME, MARK_OPACITY, MIN_CONTRAST, blend, central_range, contrast,
                                        label_limit, scheme_color, text_px, wrap)

PHONE_PLOT = 260  # px: the plot a phone's column (358 px) leaves beside a y-axis
TITLE_PX = 12  # the theme's axis title size
RNG = np.random.default_rng(0)


def spec_of(chart) -> dict:
    spec = chart.to_dict()
    validate_spec(spec)
    check_width(spec)
    return spec


def nodes(node):
    """Every dict in a spec (layers, concats, facets)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from nodes(v)


def mark(node) -> str | None:
    m = node.get("mark")
    return m["type"] if isinstance(m, dict) else m


def rows(spec) -> list[dict]:
    return [r for values in spec.get("datasets", {}).values() for r in values]


def scheme_shades(scale: dict) -> list[str]:
    """The shades a scale's scheme draws: Vega's viridis over its extent (every other scheme, and
    viridis whole, reaches near-white)."""
    scheme = scale["scheme"]
    assert isinstance(scheme, dict) and scheme["name"] == "viridis", f"a scheme ({scheme}) draws near-white shades"
    return [scheme_color(t) for t in np.linspace(*scheme.get("extent", [0, 1]), 201)]


def drawn_colors(node) -> list[str]:
    """The colours a mark shows on the page: its colour scale's range or scheme (or its fixed
    colour) after its opacity. A continuous range must interpolate in Lab or HCL: the lightness of
    every shade then lies between its range's, so the range's contrast bounds every shade's."""
    m = node["mark"] if isinstance(node["mark"], dict) else {"type": node["mark"]}
    opacity = m.get("opacity", 0.7 if m["type"] == "point" and m.get("filled") else 1.0)
    color = node.get("encoding", {}).get("color")
    if color is None:
        return [blend(m.get("color", "#4c78a8"), opacity)]
    scale = color.get("scale", {})
    if "scheme" in scale:
        return [blend(c, opacity) for c in scheme_shades(scale)]
    if color["type"] == "quantitative":
        assert scale.get("interpolate") in ("lab", "hcl")
    return [blend(c, opacity) for c in scale["range"]]


def assert_dark(spec, *types):
    marks = [n for n in nodes(spec) if mark(n) in types]
    assert marks
    for n in marks:
        for c in drawn_colors(n):
            assert contrast(c) >= MIN_CONTRAST, f"{mark(n)} drawn in {c}: {contrast(c):.2f}:1 on white"


# -- the helpers ------------------------------------------------------------------------------------
def test_contrast_blend_and_label_widths():
    assert contrast("#000000") == pytest.approx(21) and contrast("#ffffff") == pytest.approx(1)
    assert contrast("#767676") >= 4.5 and contrast("#f7f7f7") < 1.1  # redblue's middle: near-white
    assert blend("#000000", 0.5) == "#808080" and blend("#4c78a8", 1.0) == "#4c78a8"
    assert wrap("a b c d", 3) == ["a b", "c d"] and wrap("", 5) == [""]
    assert label_limit(["x" * 60]) >= text_px("x" * 60) and label_limit([["ab", "x" * 40]]) >= text_px("x" * 40)


def test_central_range_leaves_out_outliers_only():
    x = np.r_[np.linspace(0.1, 0.6, 35), 16000.0]
    lo, hi = central_range(x)
    assert lo < 0.1 and 0.6 < hi < 1 and central_range(x, include=(0, 1))[1] > 1
    assert central_range(np.linspace(0.1, 0.6, 36)) is None  # nothing to clip: Vega-Lite's own axis
    assert central_range(RNG.normal(size=500)) is None  # nor in a normal sample's tails
    assert central_range([1.0, 2.0]) is None
    # a whole series far away (noise ablation: a quarter of the values) is still left out
    lo, hi = central_range(np.r_[np.zeros(10), np.linspace(0.3, 0.9, 20), np.linspace(30, 80, 10)], include=(0, 1))
    assert lo < 0 and 1 < hi < 1.2


# -- 1. axes blown out by outliers ----------------------------------------------------------------------
def share_layers(outlier: float) -> pd.DataFrame:
    rows = [{"component": "final norm", "clipping": c, "tokens": t, "layer": l, "n_heads": 4,
             "share": RNG.uniform(0.1, 0.6)} for c in ("unclipped", "clipped") for t in ("top-k%", "random sample")
            for l in range(18)]
    frame = pd.DataFrame(rows)
    frame.loc[(frame["clipping"] == "unclipped") & (frame["layer"] == 2) & (frame["tokens"] == "random sample"),
              "share"] = outlier
    return frame


def y_scales(spec) -> list[dict]:
    return [n["encoding"]["y"].get("scale", {}) for n in nodes(spec) if "y" in n.get("encoding", {})
            and isinstance(n["encoding"]["y"], dict) and "field" in n["encoding"]["y"]]


def test_fig9_axis_spans_the_central_range_and_counts_the_outlier():
    """Chapter 2's Fig 9 panel went to 1,500,000% for one layer's mean: a zoom spans the other
    means, the outlier drawn at its edge (a ▲ of its own), kept in the data and counted; and
    (read3 #25: 20 of 72 points were triangles at the edge) a full-range panel beside the zoom
    draws every unclipped mean where it is, on a symmetric-log axis."""
    layers = share_layers(16000.0)
    spec = spec_of(fl.fig_share_variants(layers))
    full, zoom, clipped = spec["hconcat"]
    assert "every mean" in json.dumps(full["title"]) and "zoom" in json.dumps(zoom["title"])
    (fs,) = y_scales(full)
    assert fs["type"] == "symlog" and not fs.get("clamp") and fs["domain"][1] >= 16000.0
    zs = y_scales(zoom) + y_scales(clipped)
    assert zs and all(s.get("clamp") and s["domain"][1] < 1 and s["domain"][0] <= 0 for s in zs)
    assert 16000.0 in {r["share"] for r in rows(spec)}
    assert {"above"} == {r["beyond"] for r in rows(spec)} - {""}
    assert any(n.get("transform") == [{"filter": "datum.beyond != ''"}] for n in nodes(spec))
    assert "1 of 72 layer means" in spec["title"]["subtitle"] and "beyond the zoom's axis" in spec["title"]["subtitle"]
    plain = spec_of(fl.fig_share_variants(share_layers(0.5)))  # no outlier: nothing clipped, nothing said
    assert len(plain["hconcat"]) == 2 and not any(s.get("clamp") for s in y_scales(plain))
    assert isinstance(plain["title"], str)


def own_frame(ablations=("resample", "mean", "zero", "noise")) -> pd.DataFrame:
    def ratio(a):
        return 0.0 if a == "zero" else (30 + RNG.uniform(0, 50) if a == "noise" else RNG.uniform(0.3, 0.9))

    return pd.DataFrame([{"ablation": a, "layer": l, "kind": k, "label": f"{k}{l}", "n_patches": 3, "ratio": ratio(a),
                          "patch_ratio": 0.5, "abs_clean": 1.0, "mean_ablated": 0.3, "mean_clean": 0.7}
                         for a in ablations for k in ("attn", "mlp") for l in range(6)])


def test_own_effect_axis_is_not_blown_out_by_noise():
    """§5.6: noise ablation's ratios (~30, 3000%) set the axis to 8000%; the other ablations' 0-100%
    were a flat line at its foot."""
    own = own_frame()
    spec = spec_of(fh.fig_own_effect(own))
    scales = [s for s in y_scales(spec) if s]
    assert scales and all(s["clamp"] and s["domain"][0] <= 0 and 1 <= s["domain"][1] < 1.5 for s in scales)
    assert "12 of 48 (layer, ablation) means (noise: 12)" in spec["title"]["subtitle"]
    assert data_rows(spec) == len(own)


def test_cumulative_log_axis_ends_at_the_last_neuron():
    """Chapter 3's App. C chart: a log axis to 10,000 for a layer of 2,048 neurons."""
    ranks = np.union1d(np.arange(1, 51), np.geomspace(50, 2048, 100).round().astype(int))
    frame = pd.DataFrame({"label": "L3H1", "layer": 3, "head": 1, "rank": ranks, "neuron": ranks,
                          "cumulative_share": np.linspace(0.05, 1, len(ranks)), "share": 0.01,
                          "mean_delta_de": 0.1, "median_clean_de": RNG.normal(size=len(ranks))})
    spec = spec_of(fn.fig_cumulative(frame))
    xs = [n["encoding"]["x"]["scale"] for n in nodes(spec) if "scale" in n.get("encoding", {}).get("x", {})]
    assert xs and all(s == {"type": "log", "domain": [1, 2048], "nice": False} for s in xs)


# -- 2. pale marks on white ---------------------------------------------------------------------------
def neuron_frame(n: int, **cols) -> pd.DataFrame:
    frame = pd.DataFrame({"label": "L3H1", "layer": 3, "head": 1, "neuron": np.arange(n), "rank": np.arange(1, n + 1),
                          "row": np.arange(n), "pos": 1})
    return frame.assign(**{k: f(n) for k, f in cols.items()})


def test_chapter3_marks_are_dark_on_white():
    """The top-10 bars and Fig 7's points were coloured by Vega's redblue: white at 0."""
    freq = neuron_frame(10, frequency=lambda n: RNG.uniform(size=n), median_clean_de=lambda n: RNG.normal(0, 0.01, n),
                        n_instances=lambda n: np.full(n, 30))
    assert_dark(spec_of(fn.fig_top_frequency(freq)), "bar")
    inst = neuron_frame(40, **{k: (lambda n: RNG.normal(size=n)) for k in (
        "neuron_clean_de", "neuron_ablated_de", "layer_clean", "layer_delta", "self_repair", "direct_effect")})
    spec = spec_of(fn.fig_top_neuron(inst))
    assert_dark(spec, "circle")
    (color,) = [n["encoding"]["color"] for n in nodes(spec) if mark(n) == "circle"]
    assert color["scale"]["domain"][1] == 0 and color["scale"]["domain"][0] == -color["scale"]["domain"][2]


def test_chapter8_scatter_is_dark_on_white():
    n = 30
    delta = RNG.normal(size=n)
    repair = pd.DataFrame({"prompt": range(n), "logit_diff": 3.0, "nm_direct_effect": 2.0, "nm_delta_de": -2.0,
                           "delta_logit": delta, "self_repair": delta + 2.0, "from_heads": 0.1, "from_mlps": 0.1,
                           "from_norm": 0.1, "from_block_norms": 0.0})
    assert_dark(spec_of(fi.fig_self_repair(repair)), "circle")


def explorer_frames():
    runs = [("toy (ours, resample, 512 tok)", "this project"), ("gpt2-small (paper)", "paper"),
            ("pythia-160m (paper)", "paper")]
    layers = pd.DataFrame([{"run": r, "source": s, "layer": l, "rel_layer": l / 5, "self_repair": RNG.normal(),
                            "direct_effect": 0.1, "delta_logit": -0.1} for r, s in runs for l in range(6)])
    heads = pd.DataFrame([{"run": runs[0][0], "model": "toy", "label": f"L{l}H0", "rel_layer": l / 5,
                           "direct_effect": RNG.normal(), "delta_logit": RNG.normal(), "self_repair": 0.1}
                          for l in range(6)])
    table = pd.DataFrame([{"run": r, "source": s, "frac_self_repaired_late": RNG.uniform(), "norm_share_late": 0.3,
                           "frac_between_all": RNG.uniform()} for r, s in runs])
    return heads, layers, table


def test_chapter6_paper_lines_and_claims_are_dark_on_white():
    """The runs not selected were drawn at opacity 0.15 (near-white); the claims' dots in tableau
    colours some of which (orange, teal) are pale."""
    heads, layers, table = explorer_frames()
    spec = spec_of(fa.fig_model_explorer(heads, layers, default="toy"))
    lines = [n for n in nodes(spec) if mark(n) == "line" and n.get("encoding", {}).get("color")]
    assert len(lines) == 2 and not any("condition" in json.dumps(n["encoding"]) for n in lines)
    assert_dark({"layer": lines}, "line")
    assert_dark(spec_of(fa.fig_claims(table)), "point")


def colored_by(spec, *fields) -> list[dict]:
    """The marks of ``spec`` whose colour encodes one of ``fields``."""
    return [n for n in nodes(spec) if "mark" in n and n.get("encoding", {}).get("color", {}).get("field") in fields]


def test_depth_reads_on_white_in_every_chapter():
    """Layers (chapter 5's Hydra scatters, chapter 7's AtP scatter) and relative depth (chapter 6)
    were viridis to its yellow end (1.2:1 on white, less at opacity 0.5-0.7): now one scheme, viridis
    cut where its shade still reaches 3:1 on the marks' opacity, early dark and late light as before."""
    assert scheme_color(0) == "#440154" and scheme_color(0.5) == "#21918d" and scheme_color(1) == "#fde725"
    assert contrast(scheme_color(1)) < 1.3 and contrast(blend(scheme_color(0.5), MARK_OPACITY)) >= MIN_CONTRAST
    cols = ("direct_effect", "ablation_drop", "compensatory_effect", "ce_attn", "ce_mlp", "total_effect")
    effects = pd.DataFrame([{"prompt": p, "layer": l, "kind": k, "label": f"{k}{l}",
                             **dict(zip(cols, RNG.normal(size=6)))}
                            for p in range(5) for l in range(12) for k in ("attn", "mlp")])
    cols = ("exact", "atp", "error", "error_norm", "error_downstream", "delta_direct_effect", "self_repair",
            "atp_self_repair")
    atp = pd.DataFrame([{"layer": l, "head": h, "label": f"L{l}H{h}", **dict(zip(cols, RNG.normal(size=8)))}
                        for l in range(12) for h in range(2)])
    heads, layers, _ = explorer_frames()
    profiles = heads.assign(layer=(heads["rel_layer"] * 5).round().astype(int))
    for chart in (fh.fig_unembed_vs_ablate(effects), ft.fig_atp_vs_exact(atp),  # Fig 7a/c: depth thirds in hues
                  fa.fig_layer_profiles(profiles), fa.fig_model_explorer(heads, layers, default="toy")):
        drawn = colored_by(spec_of(chart), "layer", "rel_layer")
        assert drawn and all(n["encoding"]["color"]["scale"]["scheme"] == DEPTH_SCHEME for n in drawn)  # one scheme
        assert_dark({"layer": drawn}, "circle", "point")


def test_token_sets_read_on_white_alike_in_chapters_1_and_2():
    """The random sample was grey #bab0ac (2.1:1, 1.7:1 at opacity 0.7) in chapter 1's Fig 3 and
    chapter 2's Fig 5 and Fig 9/10, the top-k% blue 2.7:1 at 0.7: now a grey and a blue that
    reach 3:1 as drawn, the same in both chapters."""
    from test_figures_existence_layernorm import featured, head_frame, per_head, tokens

    ph = per_head()
    t = fe.featured_tokens(tokens(ph, n=30), featured(ph, n=4), tokens(ph, n=100, seed=2), max_per_head=50)
    scales = []
    for chart in (fe.fig_featured_tokens(t), fl.fig_ablation_scatter(head_frame(), max_per_panel=50),
                  fl.fig_share_variants(share_layers(16000.0))):
        drawn = colored_by(spec_of(chart), "tokens")
        assert_dark({"layer": drawn}, "circle", "line", "point")
        scales += [n["encoding"]["color"]["scale"] for n in drawn]
    assert len(scales) >= 4 and all(sc == scales[0] for sc in scales)  # one colour per token set, both chapters
    assert scales[0]["domain"] == ["top-k%", "random sample"] and "#bab0ac" not in scales[0]["range"]


def test_ablations_read_on_white_alike_in_chapters_2_and_5():
    """Chapter 5's mean ablation was orange #f58518 (2.6:1 on white) and resample from every source
    light blue #6baed6 (2.4:1): now the palette's dark orange and a dark blue beside resample's;
    chapter 2 draws its ablations in the same colours."""
    from test_figures_existence_layernorm import head_frame

    ablations = ["resample", "mean", "zero", "noise", "resample (every source)"]
    comparison = pd.DataFrame([{"ablation": a, "layer": l, "kind": k, "label": f"{k}{l}", "lost": 1.0,
                                "compensation": 0.5, "r2": 0.3, "abs_total_effect": RNG.uniform(), "slope": RNG.normal()}
                               for a in ablations for k in ("attn", "mlp") for l in range(6)])
    colors = {}
    for chart in (fh.fig_own_effect(own_frame(ablations)), fh.fig_noise_vs_resample(comparison)):
        drawn = colored_by(spec_of(chart), "ablation")
        assert_dark({"layer": drawn}, "line", "point")
        for n in drawn:
            scale = n["encoding"]["color"]["scale"]
            assert scale["domain"] == ablations and len(set(scale["range"])) == len(ablations)
            colors.update(zip(scale["domain"], scale["range"]))
    assert not {"#f58518", "#6baed6"} & set(colors.values())
    chapter2 = [n["encoding"]["color"]["scale"] for n in colored_by(spec_of(fl.fig_scale_ratio(head_frame())),
                                                                    "ablation")]
    assert chapter2 and all(dict(zip(sc["domain"], sc["range"])).items() <= colors.items() for sc in chapter2)


def test_chapter7_layer_bars_are_dark_on_white():
    """The per-layer bars of |exact − AtP| were light blue #9ecae9 (1.7:1 on white)."""
    layers = pd.DataFrame({"layer": range(4), "n_heads": 2, "abs_error": RNG.uniform(size=4),
                           "abs_exact": RNG.uniform(size=4), "error": RNG.normal(size=4)})
    spec = spec_of(ft.fig_layer_error(layers))
    assert_dark(spec, "bar")
    (bar,) = [n for n in nodes(spec) if mark(n) == "bar"]
    (tick,) = [n for n in nodes(spec) if mark(n) == "tick"]  # drawn over the bars, still read on them
    assert tick["mark"]["color"] == "black" and contrast("#000000", bar["mark"]["color"]) >= MIN_CONTRAST


def assert_apart(colors, least: float = 80) -> None:
    """Every pair of ``colors`` far apart (RGB distance, as Fig 8's thresholds are checked)."""
    rgb = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colors]
    for i, a in enumerate(rgb):
        for b in rgb[i + 1:]:
            assert sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 >= least, (a, b)


def test_chapter4_classes_are_dark_on_white():
    """Chapter 4's response lines: "weak" in light grey #b5b5b5 (2.1:1 on white), every class at
    opacity 0.7 (the red 2.5:1); now each reaches 3:1 as drawn, each in its own hue."""
    frame = pd.DataFrame([{"label": f"L{i}H0", "layer": i, "head": 0, "alpha": a, "relative_change": -0.1 * a,
                           "direct_effect": 0.5, "new_direct_effect": 0.4, "class": c}
                          for i, c in enumerate(fit.CLASS_ORDER) for a in (0.0, 1.0, 3.0, 5.0)])
    spec = spec_of(fit.fig_response(frame))
    assert_dark(spec, "line")
    (line,) = [n for n in nodes(spec) if mark(n) == "line"]
    scale = line["encoding"]["color"]["scale"]
    colors = dict(zip(scale["domain"], scale["range"]))
    assert list(colors) == fit.CLASS_ORDER and len(set(colors.values())) == 4
    assert_apart(colors.values())  # "neutral" was a second grey beside the weak heads' (issue 25)


# -- 3. labels cut at their limit ---------------------------------------------------------------------
def scorecard_frame() -> pd.DataFrame:
    statements = ["Many heads in later layers are self-repaired",
                  "Downstream effects of an attention ablation are localised: apart from the attention layer "
                  "involved in the Hydra effect, later attention layers have Δ_unembed almost entirely unchanged",
                  "AtP, a fast gradient-based approximation to Activation Patching, ranks components as the "
                  "exact ablation does"]
    out = [{"chapter": f"0{i + 1}", "claim": f"c{i}", "statement": s, "model": m, "verdict": v, "estimate": "0.3",
            "n": 10, "unit": "heads"} for i, s in enumerate(statements) for m, v in (("tiny", "holds"), ("toy", "differs"))]
    out.append({**out[0], "verdict": "cannot tell"})  # a second run of the first claim on "tiny"
    return pd.DataFrame(out)


def test_scorecard_grid_is_short_and_says_each_verdict_and_estimate_without_colour():
    """read3 #24: with one model the grid was a column of solid red and green bars ~2,400 px tall,
    carrying no number. Now each row is the claim's short label on at most two lines, each cell
    prints a mark for its verdict and the estimate, and the colours are not red against green."""
    from selfrepair.reading import short_label

    frame = scorecard_frame()
    spec = spec_of(fs.fig_verdicts(frame))
    rects, texts = (n for n in spec["layer"])
    y = rects["encoding"]["y"]["axis"]
    labels = list(dict.fromkeys(frame["chapter"] + " · " + frame["statement"].map(short_label)))
    printed = json.loads(y["labelExpr"].split("[indexof(")[0])
    assert all(len(lines) <= fs.MAX_LINES for lines in printed)
    for lines, label in zip(printed, labels):  # the short label, whole or cut with "…"
        said = " ".join(lines)
        assert said == label or (said.endswith(" …") and label.startswith(said[:-2]))
    assert labels[1] == "02 · Downstream effects of an attention ablation are localised"
    widest = max(text_px(line) for lines in printed for line in lines)
    assert y["labelLimit"] >= widest and y["values"] == sorted(y["values"])
    assert spec["height"] == sum(len(lines) * fs.LINE_PX + fs.GAP_PX for lines in printed)
    assert texts["encoding"]["text"]["field"] == "cell_text" and texts["encoding"]["y"]["axis"] is None
    cells = pd.DataFrame(rows(spec))
    assert set(cells["cell_text"]) >= {"● 0.3", "× 0.3", "? 0.3"}
    scale = rects["encoding"]["color"]["scale"]
    colors = dict(zip(scale["domain"], scale["range"]))
    assert colors["holds"] != "#2e7d32" and colors["differs"] != "#c62828"  # not green against red
    assert_apart([colors["holds"], colors["differs"], colors["cannot tell"]])
    assert not pale_marks(spec)  # every verdict's fill reaches 3:1 on white (the book's check)
    assert not re.search("[\u2600-\u27bf]", "".join(cells["cell_text"]))  # no dingbat marks (✓ ✗): emoji on many systems
    two = cells[(cells["claim_label"] == labels[0]) & (cells["model"] == "tiny")].sort_values("entry")
    assert len(two) == 2 and two["y_bottom"].iloc[0] == pytest.approx(two["y_top"].iloc[1])
    assert data_rows(spec) == len(frame)


def test_chapter6_claims_and_models_are_printed_whole():
    _, _, table = explorer_frames()
    spec = spec_of(fa.fig_claims(table))
    legends = [n["encoding"][ch]["legend"] for n in nodes(spec) if mark(n) == "point" for ch in ("color", "shape")]
    assert legends and all(lg["labelLimit"] >= max(text_px(r) for r in table["run"]) for lg in legends)
    words = [n for n in nodes(spec) if mark(n) == "text"]
    assert len(words) == 1 and words[0]["encoding"]["text"]["field"] == "claim"
    assert not words[0]["mark"].get("limit")  # a text mark is cut only at a limit it is given


def test_chapter7_legend_is_printed_whole():
    heads = pd.DataFrame([{"layer": l, "head": 0, "label": f"L{l}H0", "error": 0.1, "error_norm": 0.05,
                           "error_downstream": 0.05} for l in range(3)])
    spec = spec_of(ft.fig_error_decomposition(heads))
    (legend,) = [n["encoding"]["color"]["legend"] for n in nodes(spec) if "legend" in n.get("encoding", {}).get("color", {})]
    assert legend["labelLimit"] >= max(text_px(t) for t in ft.TERMS.values())


# -- 4. crowded ticks ---------------------------------------------------------------------------------
def test_alpha_axis_ticks_the_alphas_measured():
    """Chapter 4's response chart ticked every 0.2 from 0 to 5 (26 labels)."""
    frame = pd.DataFrame([{"label": "L1H0", "layer": 1, "head": 0, "alpha": a, "relative_change": -0.1 * a,
                           "direct_effect": 0.5, "new_direct_effect": 0.4, "class": "self-repressing"}
                          for a in (0.0, 1.0, 3.0, 5.0)])
    x = [n["encoding"]["x"] for n in nodes(spec_of(fit.fig_response(frame))) if mark(n) == "line"][0]
    assert x["axis"]["values"] == [0.0, 1.0, 3.0, 5.0] and x["scale"]["domain"] == [0.0, 5.0]
    many = frame.iloc[[0] * 20].assign(alpha=np.arange(20.0))
    x = [n["encoding"]["x"] for n in nodes(spec_of(fit.fig_response(many))) if mark(n) == "line"][0]
    assert "values" not in x["axis"] and x["axis"]["tickMinStep"] == 1 and x["axis"]["tickCount"] <= 10


def test_layer_axis_of_a_narrow_panel_is_not_crowded():
    """Chapter 2's Fig 9 panels (260 px) printed all 18 layers, their labels touching."""
    spec = spec_of(fl.fig_share_variants(share_layers(0.5)))
    axes = [n["encoding"]["x"]["axis"] for n in nodes(spec) if "axis" in n.get("encoding", {}).get("x", {})]
    assert axes and all(len(a["values"]) * LABEL_PX <= panel["width"] for a in axes for panel in spec["hconcat"])
    assert all(a["values"] == list(range(0, 18, 2)) and a["labelOverlap"] == "parity" for a in axes)


# -- 5. a phone's width -------------------------------------------------------------------------------
def test_chapter1_interval_charts_fit_a_phone():
    """The per-head interval charts overflowed a phone's column: an x-axis title wider than the
    plot a phone leaves, and a legend beside the plot."""
    from test_figures_existence_layernorm import intervals, per_head, tokens

    ph = per_head(n_layers=18, n_heads=4)
    for chart in (fe.fig_token_spread(existence.token_spread(tokens(ph, n=12))), fe.fig_bootstrap(intervals(ph, n=12), ph)):
        spec = spec_of(chart)
        titles = [n["encoding"]["x"]["title"] for n in nodes(spec) if "title" in n.get("encoding", {}).get("x", {})]
        assert titles and all(text_px(t, TITLE_PX) <= PHONE_PLOT for t in titles)
        legends = [n["encoding"]["color"]["legend"] for n in nodes(spec) if "legend" in n.get("encoding", {}).get("color", {})]
        assert all(lg and lg["orient"] == "bottom" for lg in legends)


def test_chapter6_legend_lists_every_model_on_a_phone():
    """Two columns of long model names: a phone showed 3 of 5."""
    _, _, table = explorer_frames()
    spec = spec_of(fa.fig_claims(table))
    encs = [n["encoding"] for n in nodes(spec) if mark(n) == "point"]
    for enc in encs:  # one legend (colour and shape of the same field, the same title), one run a line
        assert enc["color"]["field"] == enc["shape"]["field"] == "run" and enc["color"]["title"] == enc["shape"]["title"]
        assert enc["color"]["legend"] == enc["shape"]["legend"]
        assert enc["color"]["legend"]["columns"] == 1 and enc["color"]["legend"]["orient"] == "bottom"
        assert enc["color"]["scale"]["domain"] == list(table["run"])
        assert label_limit(table["run"]) + 30 <= 358  # symbol and name fit a phone's column
    assert spec["width"] == "container"


def test_pale_marks_finds_each_kind_of_pale_mark_and_passes_dark_ones():
    import altair as alt

    from selfrepair.figures.legible import DARK, DEPTH_SCHEME, MARK_OPACITY, pale_marks

    data = pd.DataFrame({"x": [0.0, 1.0], "y": [1.0, 2.0], "c": ["a", "b"]})
    base = alt.Chart(data).encode(x="x:Q", y="y:Q")
    ok = alt.layer(base.mark_circle(color=DARK["blue"], opacity=MARK_OPACITY),
                   base.mark_area(opacity=0.2),  # a band behind other marks: exempt
                   base.mark_rect(stroke="#888").encode(color=alt.Color("c:N", scale=alt.Scale(range=["#eee", "#fff"]))),
                   base.mark_line().encode(color=alt.Color("y:Q", scale=alt.Scale(scheme=DEPTH_SCHEME))),
                   base.mark_rect(stroke="white").encode(color=alt.Color("y:Q", scale=alt.Scale(scheme="greys"))),  # a heat map
                   base.mark_point(filled=True, stroke="white", color=DARK["red"], opacity=1))  # a white halo: a gap
    assert pale_marks(ok.to_dict()) == []
    bad = {"light colour": base.mark_line(color="#bbb"),
           "see-through": base.mark_circle(color=DARK["blue"], opacity=0.35),
           "pale range": base.mark_point(opacity=1).encode(color=alt.Color("c:N", scale=alt.Scale(range=["#4c78a8", "#f58518"]))),
           "white-centred scheme": base.mark_bar().encode(color=alt.Color("y:Q", scale=alt.Scale(scheme="redblue"))),
           "default ramp": base.mark_bar().encode(color="y:Q"),
           "unnamed colour": base.mark_line(color="papayawhip"),
           "Vega-Lite's 0.7 on points": base.mark_point(filled=True, color=DARK["red"]),
           "pale fill in an outline": base.mark_rect(stroke="#888").encode(
               color=alt.Color("c:N", scale=alt.Scale(range=["#eeeeee", "#f9a825"])))}
    for what, chart in bad.items():
        found = pale_marks(chart.to_dict())
        assert len(found) == 1, (what, found)


def test_chapter4_alphas_are_distinct_hues():
    """Fig 18's α = 1, 3, 5 were three shades of the depth ramp, α = 3 and α = 5 two near-identical
    teals (issue 25): each α now has its own hue, 3:1 on white as drawn; more alphas than hues fall
    back to the ramp."""
    from selfrepair.figures.encodings import HUES

    frame = pd.DataFrame([{"label": "L1H0", "layer": 1, "head": 0, "alpha": a, "row": 0, "pos": p,
                           "direct_effect": 0.5, "new_direct_effect": 0.5 - 0.1 * a} for a in (1.0, 3.0, 5.0)
                          for p in range(3)])
    spec = spec_of(fit.fig_amplified_tokens(frame))
    assert_dark(spec, "circle")
    (points,) = [n for n in nodes(spec) if mark(n) == "circle"]
    scale = points["encoding"]["color"]["scale"]
    assert "scheme" not in scale and scale["domain"] == [1.0, 3.0, 5.0]
    assert_apart(scale["range"])
    assert all(contrast(blend(c, MARK_OPACITY)) >= MIN_CONTRAST for c in scale["range"])
    many = pd.concat([frame.assign(alpha=float(a)) for a in range(len(HUES) + 1)])
    (points,) = [n for n in nodes(spec_of(fit.fig_amplified_tokens(many))) if mark(n) == "circle"]
    assert points["encoding"]["color"]["scale"]["scheme"] == DEPTH_SCHEME


def test_chapter6_panels_share_a_y_axis_and_the_explorer_fits_a_phone():
    """read3 #23: ch 6 Fig 1's panels had independent y axes (ours -2 to 6, the paper's -1 to 1.5),
    hiding the difference the text reports: one y axis. read3 #21: the explorer's x labels ran
    together on a phone ("0.00.1") and its drop-down, a run's full name, overflowed the column."""
    heads, layers, _ = explorer_frames()
    profiles = heads.assign(layer=(heads["rel_layer"] * 5).round().astype(int))
    assert spec_of(fa.fig_layer_profiles(profiles))["resolve"]["scale"]["y"] == "shared"
    spec = spec_of(fa.fig_model_explorer(heads, layers, default="toy"))
    bind = [p for p in spec["params"] if p["name"] == "model"][0]["bind"]
    assert bind["labels"] == ["toy (ours)"]  # the heads frame holds our run only
    for view in spec["hconcat"]:
        axes = [n["encoding"]["x"]["axis"] for n in view.get("layer", [view]) if "axis" in n.get("encoding", {}).get("x", {})]
        assert axes and all(a["labelOverlap"] and a["tickCount"] <= 4 for a in axes)
