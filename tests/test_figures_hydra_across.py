"""Figures of the Hydra and across-models chapters, built from small synthetic frames: each spec
validates against the Vega-Lite schema, uses the intended marks and fields, has tooltips and
embeds the expected number of rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from selfrepair.figures import MAX_ROWS, VIEWS_AT_1024, check_width, data_rows, validate_spec
from selfrepair.figures import across as fa
from selfrepair.figures import hydra as fh
from selfrepair.structure import span

L, N = 4, 5  # layers, prompts


def _marks(spec) -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            mark = node.get("mark")
            if mark is not None:
                found.add(mark if isinstance(mark, str) else mark["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


def _fields(spec, channel=None) -> set[str]:
    out = set()

    def walk(node):
        if isinstance(node, dict):
            enc = node.get("encoding")
            if isinstance(enc, dict):
                for ch, e in enc.items():
                    if channel in (None, ch):
                        for item in e if isinstance(e, list) else [e]:
                            if isinstance(item, dict) and "field" in item:
                                out.add(item["field"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return out


def _check(chart, rows):
    spec = chart.to_dict()
    validate_spec(spec)
    check_width(spec)  # fits the book's column from 1440 px down to 1024 px
    assert data_rows(spec) == rows
    assert _fields(spec, "tooltip"), "every chart has tooltips"
    return spec


@pytest.fixture
def effects():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(N):
        for layer in range(L):
            for kind in ("attn", "mlp"):
                de = rng.normal()
                ce = 0.6 * de + rng.normal(scale=0.1)
                rows.append({"prompt": p, "layer": layer, "kind": kind,
                             "label": f"{'A' if kind == 'attn' else 'M'}{layer}", "direct_effect": de,
                             "ablated_direct_effect": 0.0, "total_effect": ce - de,
                             "compensatory_effect": ce, "ce_attn": ce / 3, "ce_mlp": 2 * ce / 3,
                             "from_norm": 0.0, "from_block_norms": 0.0, "delta_direct_effect": -de,
                             "ablation_drop": de - ce,
                             "correct": True})
    return pd.DataFrame(rows)


def test_fig_impact(effects):
    from selfrepair.hydra import impact_summary
    spec = _check(fh.fig_impact(impact_summary(effects)), 2 * 2 * L)
    assert {"area", "line"} <= _marks(spec) and spec["facet"]["column"]["field"] == "kind"
    assert {"mean", "lo", "hi", "corr", "frac_de_gt_drop"} <= _fields(spec)


def _lines(spec) -> list[dict]:
    """Every line layer of a (faceted) layered spec."""
    layers = (spec.get("spec") or spec)["layer"]
    return [l for l in layers if (l["mark"] if isinstance(l["mark"], str) else l["mark"]["type"]) == "line"]


def test_fig_impact_legend_shows_the_lines_at_full_strength(effects):
    """The legend's swatches are the lines' colours, opaque (not the pale 10-90% bands'), and every
    line is at least 1.5 px wide in a colour of at least 3:1 on white."""
    from selfrepair.figures.legible import contrast
    from selfrepair.hydra import impact_summary
    spec = fh.fig_impact(impact_summary(effects)).to_dict()
    (line,) = _lines(spec)
    assert line["mark"]["strokeWidth"] >= 1.5
    color = line["encoding"]["color"]
    assert color["legend"]["symbolOpacity"] == 1 and color["legend"]["symbolType"] == "stroke"
    assert all(contrast(c) >= 3 for c in color["scale"]["range"])


def test_fig_own_effect_every_source_line_shows_over_the_mean(synthetic):
    """The every-source average lies on the mean line: it is dashed and drawn again on top of it,
    every line at least 1.5 px wide in a colour of at least 3:1, the legend's swatches opaque strokes."""
    from selfrepair.figures.legible import contrast
    from selfrepair.hydra_controls import own_effects
    spec = fh.fig_own_effect(own_effects({"resample": synthetic})).to_dict()
    lines = _lines(spec)
    assert len(lines) == 2 and all(l["mark"]["strokeWidth"] >= 1.5 for l in lines)
    layers = spec["spec"]["layer"]
    assert layers.index(lines[1]) > layers.index(lines[0])  # the every-source line on top
    assert "resample (every source)" in json.dumps(lines[1]["transform"])
    dash = lines[0]["encoding"]["strokeDash"]["scale"]
    dashed = dict(zip(dash["domain"], dash["range"]))
    assert dashed.pop("resample (every source)") != [1, 0] and all(d == [1, 0] for d in dashed.values())
    color = lines[0]["encoding"]["color"]
    assert all(contrast(c) >= 3 for c in color["scale"]["range"])
    assert color["legend"]["symbolOpacity"] == 1 and color["legend"]["symbolType"] == "stroke"


def test_fig_unembed_vs_ablate(effects):
    spec = _check(fh.fig_unembed_vs_ablate(effects), len(effects))
    assert "circle" in _marks(spec) and {"direct_effect", "ablation_drop"} <= _fields(spec)


def test_fig_unembed_vs_ablate_samples_large_frames(effects):
    big = pd.concat([effects] * 150, ignore_index=True)
    spec = fh.fig_unembed_vs_ablate(big).to_dict()
    assert data_rows(spec) <= MAX_ROWS


def test_fig_before_after():
    P = 3
    runs = ["clean", "ablated (mean)"] + [f"patch {k}" for k in range(P)]
    frame = pd.DataFrame([{"layer": c // 2, "kind": ("attn", "mlp")[c % 2], "label": f"X{c}", "run": r,
                           "direct_effect": float(c), "ablated": "A1", "ablated_layer": 1,
                           "ablated_kind": "attn", "prompt": "The capital of France is"}
                          for r in runs for c in range(2 * L)])
    spec = _check(fh.fig_before_after(frame), len(frame))
    assert {"line", "rule"} <= _marks(spec) and "ablating attention layer 1" in str(spec["title"]) and "A1" not in str(spec["title"])
    assert {"direct_effect", "run", "group"} <= _fields(spec)


def _hue(color: str) -> float:
    import colorsys
    r, g, b = (int(color.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4))
    return 360 * colorsys.rgb_to_hsv(r, g, b)[0]


def test_fig_before_after_mean_and_single_patches_differ_in_hue():
    """Hydra Fig 1/3 drew "ablated (mean)" (#8b1a1a) and "single patch" (#e45756) in two reds: the
    single patches now have another hue. Issue 25 (read3 #26): its legend said "ablated (mean)",
    which reads as mean ablation: it says the average over resample sources."""
    frame = pd.DataFrame([{"layer": c, "kind": "attn", "label": f"X{c}", "run": r, "direct_effect": float(c),
                           "ablated": "A1", "ablated_layer": 1, "ablated_kind": "attn", "prompt": "p"}
                          for r in ("clean", "ablated (mean)", "patch 0") for c in range(L)])
    spec = fh.fig_before_after(frame).to_dict()
    (scale,) = [n["encoding"]["color"]["scale"] for n in [spec["spec"]] + spec["spec"].get("layer", [])
                if "color" in n.get("encoding", {})]
    colors = dict(zip(scale["domain"], scale["range"]))
    assert "ablated (mean)" not in colors and "ablated (average over resample sources)" in colors
    d = abs(_hue(colors["ablated (average over resample sources)"]) - _hue(colors["single patch"]))
    assert min(d, 360 - d) >= 90, colors


def test_fig_compensation_depth_in_hues_a_reader_tells_apart():
    """Hydra Fig 7a/c coloured 18 layers on a continuous ramp (read3 #29: layers 10 to 17 could not
    be told apart): before, in and after the middle half the verdicts read (read4: the legend's "middle
    (6–11)" was not the verdicts' "middle layers 4–13"), each its own hue, with the layer on hover."""
    effects = pd.DataFrame([{"prompt": p, "layer": l, "kind": k, "label": f"{k}{l}", "direct_effect": 0.1 * l,
                             "compensatory_effect": 0.05 * l, "ce_attn": 0.0, "ce_mlp": 0.0, "total_effect": 0.0}
                            for p in range(2) for l in range(18) for k in ("attn", "mlp")])
    spec = fh.fig_compensation(effects).to_dict()
    (color,) = [n["encoding"]["color"] for n in spec["spec"]["layer"] if "color" in n.get("encoding", {})]
    assert color["type"] == "nominal"
    assert color["scale"]["domain"] == ["early (0–3)", "middle (4–13)", "late (14–17)"]
    assert list(span(18, "middle")) == list(range(4, 14))  # the verdicts' middle layers
    assert len(set(_hue(c) // 30 for c in color["scale"]["range"])) == 3  # three hues, not shades of one
    assert fh.depth_group([0, 3, 4, 13, 14, 17], 18) == ["early (0–3)", "early (0–3)", "middle (4–13)",
                                                         "middle (4–13)", "late (14–17)", "late (14–17)"]


def test_fig_compensation_and_regression(effects):
    from selfrepair.hydra_regression import regression
    spec = _check(fh.fig_compensation(effects), len(effects))
    assert {"circle", "line"} <= _marks(spec) and "compensatory_effect" in _fields(spec, "y")
    reg = regression(effects)
    spec = _check(fh.fig_regression(reg), 4 * L)  # three slopes and R² per attention layer
    assert {"line", "rule"} <= _marks(spec) and {"value", "fit", "r2"} <= _fields(spec)


def test_fig_regression_draws_r2_apart_from_the_slopes(effects):
    """Issue 25: R² was a purple dashed line on the slopes' axis beside the MLP part's red one, the
    two hard to tell apart and overlapping near 0. Now R² is grey bars in a panel of its own under
    the slopes, on the same x scale; the slopes keep Fig 8's colours (attention blue, MLP red)."""
    from selfrepair.figures.legible import DARK
    from selfrepair.hydra_regression import regression
    spec = fh.fig_regression(regression(effects)).to_dict()
    top, bottom = spec["vconcat"]
    lines = next(v for v in top["layer"] if v["mark"]["type"] == "line")
    scale = lines["encoding"]["color"]["scale"]
    colors = dict(zip(scale["domain"], scale["range"]))
    assert colors == {"all downstream": "black", "attention part": DARK["blue"], "MLP part": DARK["red"]}
    assert "R²" not in json.dumps(lines["encoding"]["color"]) and "R²" in str(lines["transform"])  # filtered out
    assert bottom["mark"]["type"] == "bar" and bottom["mark"]["color"] not in colors.values()
    assert bottom["encoding"]["y"]["title"] == "R²" and "color" not in bottom["encoding"]
    assert bottom["encoding"]["x"]["scale"] == lines["encoding"]["x"]["scale"]  # each bar under its layer


def test_fig_erasure():
    frame = pd.DataFrame([{"ablated_layer": a, "mlp_layer": l, "label": f"M{l}",
                           "clean_direct_effect": -0.1 * l, "delta_direct_effect": 0.05 * (l > a),
                           "late": l >= 3} for a in range(L) for l in range(L)])
    spec = _check(fh.fig_erasure(frame), L * L + L)
    assert _marks(spec) == {"rect"}
    # read3 #22: the change and the clean column were on two colour scales side by side (red-blue
    # and purple-orange), grey at 0: one scale, near-white at 0, symmetric about it
    scale = spec["encoding"]["color"]["scale"]
    assert "resolve" not in spec and "layer" not in spec
    assert scale["range"][1] == "#f7f7f7" and scale["domain"] == [-0.1 * (L - 1), 0, 0.1 * (L - 1)]


def test_heat_maps_are_white_at_zero():
    """read3 #22: the shared diverging scale of heat maps had mid-grey at 0 (a grey wall on white):
    its middle is near-white, in every chapter's heat map (chapters 4, 5, 8)."""
    from selfrepair.figures import diverging_color
    from selfrepair.figures.encodings import HEAT_SIGNED, heat_scale
    from selfrepair.figures.legible import luminance

    assert luminance(HEAT_SIGNED[1]) > 0.9
    assert diverging_color("x").to_dict()["scale"]["range"][1] == HEAT_SIGNED[1]
    assert heat_scale([-0.5, 2.0]).to_dict()["domain"] == [-2.0, 0, 2.0]
    from selfrepair.figures.legible import pale_marks  # a heat map's near-white 0 is not a pale mark
    frame = pd.DataFrame([{"ablated_layer": a, "mlp_layer": l, "label": f"M{l}", "clean_direct_effect": -0.1 * l,
                           "delta_direct_effect": 0.05 * (l > a), "late": l >= 3} for a in range(L) for l in range(L)])
    assert not pale_marks(fh.fig_erasure(frame).to_dict())
    import inspect
    from selfrepair.figures import iterative
    assert "HEAT_SIGNED" in inspect.getsource(iterative.fig_head_map)


# -- the controls and panels (selfrepair.hydra_controls), built from a synthetic result -------------
@pytest.fixture
def synthetic():
    from test_hydra import synthetic_result
    return synthetic_result(n=N, L=L, P=2)


def test_fig_own_effect(synthetic):
    from selfrepair.hydra_controls import own_effects
    own = own_effects({"resample": synthetic})
    spec = _check(fh.fig_own_effect(own), len(own))
    assert {"line", "rule"} <= _marks(spec) and "ratio" in _fields(spec, "y")
    assert set(own["ablation"]) == {"resample", "resample (every source)", "mean", "zero"}


def test_fig_noise_vs_resample(synthetic):
    from selfrepair.hydra_controls import ablation_comparison
    comp = ablation_comparison({"resample": synthetic, "noise": synthetic})
    spec = _check(fh.fig_noise_vs_resample(comp), 2 * len(comp))  # two measures per row
    assert spec["facet"]["field"] == "panel" and spec["columns"] == 2 and "ablation" in _fields(spec, "color")
    assert len(spec["facet"]["sort"]) == 4  # two kinds of layer x two measures


def test_fig_localisation(synthetic):
    from selfrepair.hydra_controls import localisation
    loc = localisation(synthetic)
    spec = _check(fh.fig_localisation(loc), (2 * L) ** 2 - 2 * L)  # every pair but the ablated itself
    assert _marks(spec) == {"rect"} and "abs_delta_de" in _fields(spec, "color")
    # issue 25: a row x column grid cannot be re-wrapped on a phone (its panels were narrowed to
    # 100 px): one wrapped facet of the four (ablated kind, later kind) panels, two to a row,
    # attention's later layers above, and the legend under the panels
    assert "row" not in spec and "column" not in spec and spec["facet"]["field"] == "panel"
    assert spec["columns"] == 2 and spec["facet"]["sort"] == [
        "attention ablated → later attention", "MLP ablated → later attention",
        "attention ablated → later MLPs", "MLP ablated → later MLPs"]
    assert set(spec["facet"]["sort"]) == {r["panel"] for rows in spec["datasets"].values() for r in rows}
    assert 200 <= spec["spec"]["width"] and 2 * spec["spec"]["width"] <= VIEWS_AT_1024
    assert spec["spec"]["layer"][0]["encoding"]["color"]["legend"]["orient"] == "bottom"
    assert spec["resolve"]["axis"]["x"] == "independent"  # a layer axis under every panel, stacked too
    # read3 #21: on a phone the 18 labels ran together ("0123456789111111"): every other one there
    axis = spec["spec"]["layer"][0]["encoding"]["x"]["axis"]
    assert axis["labelOverlap"] == "parity" and axis["labelAngle"] == 0


def test_fig_best_layer_and_panels(synthetic):
    from selfrepair.hydra import effects_frame
    from selfrepair.hydra_controls import best_layer_points, layer_panels, panel_layers
    from selfrepair.hydra_regression import regression
    eff = effects_frame(synthetic)
    best = best_layer_points(eff, regression(eff))
    spec = _check(fh.fig_best_layer(best), N)
    assert {"circle", "line"} <= _marks(spec) and "R²" in str(spec["title"]) and "fit" in _fields(spec, "y")
    panels = layer_panels(eff, panel_layers(L))
    spec = _check(fh.fig_layer_panels(panels), len(panels))
    assert len(panels) == 2 * N * len(panel_layers(L)) and "part" in _fields(spec, "color")
    assert spec["columns"] == 2  # a 2×2 grid: four in a row were wider than a 1024 px column


def _datasets(spec) -> list[dict]:
    return [row for rows in spec.get("datasets", {}).values() for row in rows]


@pytest.fixture
def chapter():
    """An across-models chapter from a synthetic per-head frame: one run of ours (3 layers, both
    token sets, "all" values different from the top-k% ones), one paper run (4 layers, top-k% only)."""
    from selfrepair.chapters.across import AcrossChapter, compare_models, per_layer

    rows = []
    for run, source, n_layers, sets in (("toy (ours, resample, 512 tok)", "this project", 3, ("top-k%", "all")),
                                        ("gpt2-small (paper)", "paper", 4, ("top-k%",))):
        for tokens in sets:
            scale = 1.0 if tokens == "top-k%" else 0.1
            for layer in range(n_layers):
                for head in range(2):
                    de = scale * 0.1 * (layer + 1) * (1 if head == 0 else -1)
                    rows.append({"source": source, "run": run, "model": run.split()[0],
                                     "fold_value_biases": source == "paper", "ablation": "resample",
                                 "tokens": tokens, "n_layers": n_layers, "layer": layer, "head": head,
                                 "label": f"L{layer}H{head}", "rel_layer": layer / (n_layers - 1),
                                 "direct_effect": de, "ablated_direct_effect": 0.0, "delta_logit": -0.5 * de,
                                 "self_repair": 0.5 * de, "from_heads": 0.1, "from_mlps": 0.1,
                                 "from_norm": 0.3 * de, "from_block_norms": 0.0,
                                 "norm_share": 0.3 if tokens == "top-k%" else np.nan})
    heads = pd.DataFrame(rows)
    return AcrossChapter(heads, compare_models(heads), per_layer(heads), "toy")


def test_fig_layer_profiles(chapter):
    heads = chapter.top_heads
    assert set(heads["tokens"]) == {"top-k%"} and heads["run"].nunique() == 2
    spec = _check(fa.fig_layer_profiles(heads), len(heads))
    assert {"point", "line", "rule"} <= _marks(spec) and spec["facet"]["field"] == "run"
    assert {"self_repair", "label", "run"} <= _fields(spec)
    assert spec["facet"]["sort"] == list(dict.fromkeys(heads["run"]))


def test_fig_model_explorer_has_a_dropdown(chapter):
    heads, layers = chapter.whole_heads, chapter.top_layers
    assert set(heads["source"]) == {"this project"} and set(layers["run"]) == set(chapter.heads["run"])
    spec = _check(fa.fig_model_explorer(heads, layers, default="toy"), len(heads) + len(layers))
    (param,) = spec["params"]
    assert param["bind"]["input"] == "select"
    assert param["bind"]["options"] == list(dict.fromkeys(heads["run"]))
    assert param["value"] == "toy (ours, resample, 512 tok)"  # a model name picks its run
    assert {"circle", "line", "rule"} <= _marks(spec)
    assert {"direct_effect", "delta_logit", "rel_layer", "self_repair"} <= _fields(spec)
    assert "(datum.run === model)" in json.dumps(spec)  # both views follow the drop-down
    # the scatter embeds the whole-set means, the profiles the top-k% layer means
    embedded = {(r["run"], r["label"]): r["direct_effect"] for r in _datasets(spec) if "label" in r}
    for _, r in heads.iterrows():
        assert embedded[r["run"], r["label"]] == pytest.approx(r["direct_effect"])


def test_fig_claims(chapter):
    table = chapter.table
    cols = ["frac_self_repaired_late", "norm_share_late", "frac_between_all"]
    assert set(cols) <= set(table.columns)
    spec = _check(fa.fig_claims(table), 3 * len(table))
    # the dots, and each claim's words above its row (a text mark, not an axis label cut short)
    assert _marks(spec) == {"point", "text"} and {"value", "claim", "run", "source"} <= _fields(spec)
    # every run's dots are the table's values (NaN for the paper's whole-set claim)
    by_run = table.set_index("run")
    for run in table["run"]:
        got = [np.nan if r["value"] is None else r["value"] for r in _datasets(spec) if r["run"] == run]
        np.testing.assert_allclose(np.sort(got), np.sort(by_run.loc[run, cols].to_numpy(float)))
    ours = table.set_index("run").loc["toy (ours, resample, 512 tok)"]
    assert ours["frac_self_repaired_late"] == pytest.approx(0.5)  # late layers 1, 2: head 0 of each
    assert ours["norm_share_late"] == pytest.approx(0.3)
    assert ours["frac_between_all"] == pytest.approx(1.0)  # DE > 0 heads: Δlogit = -DE/2


def test_chapter6_says_how_many_models_are_ours_and_no_template(chapter):
    """read3 #35/#36: "holds on 1 of our 1 run" (a template), and a chapter titled "Across models"
    with one model of ours that never said so: its opening says, computed, how many models of its
    own the build has, that the rest are the paper's released values, and how to add one."""
    from selfrepair.chapters.across_text import scope_markdown
    from selfrepair.exercises.reveal import holds
    from selfrepair.uncertainty import Estimate

    text = scope_markdown(chapter)
    assert "**1 model of its own** (toy)" in text and "the paper's released values** (gpt2-small)" in text
    assert "not a comparison of our models with each other" in text and "selfrepair sweep" in text
    run = chapter.table[chapter.table["source"] != "paper"]["run"].iloc[0]
    chapter.estimates = {run: {"many": Estimate(0.72, 0.67, 0.75, 64, "rows", 40, "documents", 1000, 0)}}
    said = holds(chapter)
    assert "of our 1 run" not in said and "on our one run: toy" in said, said
