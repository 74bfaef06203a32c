"""Figures of chapters 03 (anti-erasure neurons) and 04 (iterative inference) on synthetic frames."""

import numpy as np
import pandas as pd
import pytest

from selfrepair.figures import MAX_ROWS, check_width, data_rows, validate_spec
from selfrepair.figures import iterative as fi
from selfrepair.figures import neurons as fn
from selfrepair.figures.legible import pale_marks

HEADS = [(2, 0, "L2H0"), (3, 1, "L3H1")]
RNG = np.random.default_rng(0)


def heads_frame(n_per_head: int, **cols) -> pd.DataFrame:
    rows = [{"label": lab, "layer": l, "head": h} for l, h, lab in HEADS for _ in range(n_per_head)]
    frame = pd.DataFrame(rows)
    for name, make in cols.items():
        frame[name] = make(len(frame))
    return frame


def spec_of(chart) -> dict:
    spec = chart.to_dict()
    validate_spec(spec)
    check_width(spec)  # fits the book's column from 1440 px down to 1024 px
    assert data_rows(spec) <= MAX_ROWS
    return spec


def layers_of(spec: dict) -> list[dict]:
    inner = spec.get("spec", spec)
    return inner.get("layer", [inner])


def tooltip_fields(layer: dict) -> set[str]:
    return {t["field"] for t in layer["encoding"]["tooltip"]}


def mark_of(layer: dict) -> str:
    mark = layer["mark"]
    return mark["type"] if isinstance(mark, dict) else mark


def test_fig_top_neuron():
    rnd = lambda n: RNG.normal(size=n)  # noqa: E731
    frame = heads_frame(7, row=lambda n: np.arange(n), pos=lambda n: np.arange(n), neuron=lambda n: np.arange(n),
                        neuron_clean_de=rnd, neuron_ablated_de=rnd, layer_clean=rnd, layer_delta=rnd,
                        self_repair=rnd, direct_effect=rnd)
    spec = spec_of(fn.fig_top_neuron(frame))
    assert spec["facet"]["field"] == "label" and spec["columns"] == 2  # wraps: fits a laptop page
    assert data_rows(spec) == 14
    points = [l for l in layers_of(spec) if mark_of(l) == "circle"][0]
    assert points["encoding"]["x"]["field"] == "neuron_clean_de"
    assert points["encoding"]["y"]["field"] == "neuron_ablated_de"
    assert points["encoding"]["color"]["field"] == "layer_clean"
    assert {"label", "layer", "head", "neuron", "neuron_clean_de", "neuron_ablated_de"} <= tooltip_fields(points)
    # issue 25: the colour bar beside the panel took 100 px of a phone's column and the renderer
    # narrowed the panel to 155 px; under it, a 260 px panel and its y axis fit the 358 px column
    assert points["encoding"]["color"]["legend"]["orient"] == "bottom"
    assert spec["spec"]["width"] >= 200


def test_fig_sparsity():
    rows = [{"label": lab, "layer": l, "head": h, "kind": kind, "rank": r, "percent": p,
             "share": 1 / r, "n_instances": 9}
            for l, h, lab in HEADS for kind in ("nth", "top_n") for r in (1, 2, 5) for p in (50, 10, 1)]
    spec = spec_of(fn.fig_sparsity(pd.DataFrame(rows)))
    assert data_rows(spec) == len(rows) == 36
    (line,) = layers_of(spec)
    assert mark_of(line) == "line"
    assert line["encoding"]["x"]["field"] == "rank" and line["encoding"]["y"]["field"] == "share"
    # small multiples in a grid that fits the column: one wrapped facet of head · kind panels, a
    # head's two panels side by side (a phone stacks a wrapped facet into one column)
    assert spec["facet"]["field"] == "panel" and spec["columns"] == 2
    assert spec["facet"]["sort"] == ["L2H0 · N-th neuron alone", "L2H0 · top N together",
                                     "L3H1 · N-th neuron alone", "L3H1 · top N together"]
    assert spec["spec"]["width"] >= 260  # not the 220 px panels of a row x column grid
    panels = {r["panel"] for r in next(iter(spec["datasets"].values()))}
    assert panels == set(spec["facet"]["sort"])  # every panel has marks, every mark a panel
    assert not pale_marks(spec)  # no near-white line (each threshold its own hue: test below)
    assert {"label", "layer", "head", "rank", "percent", "share"} <= tooltip_fields(line)


def test_fig_cumulative():
    frame = heads_frame(20, rank=lambda n: np.tile(np.arange(1, 21), 2), neuron=lambda n: np.arange(n),
                        cumulative_share=lambda n: np.tile(np.linspace(0.1, 1, 20), 2),
                        share=lambda n: np.full(n, 0.05), mean_delta_de=lambda n: RNG.normal(size=n),
                        median_clean_de=lambda n: RNG.normal(size=n))
    spec = spec_of(fn.fig_cumulative(frame))
    assert data_rows(spec) == 40
    marks = {mark_of(l): l for l in layers_of(spec)}
    assert set(marks) == {"line", "circle"}
    color = marks["circle"]["encoding"]["color"]
    # categorical colours dark enough on white (not a diverging scale, white at 0), the legend's
    # title whole, and every panel its own x-axis (no axis under an empty slot)
    assert color["field"] == "sign" and color["type"] == "nominal"
    assert set(color["scale"]["domain"]) == {"negative (erasure)", "positive"}
    assert all(sum(int(c[i:i + 2], 16) for i in (1, 3, 5)) < 3 * 200 for c in color["scale"]["range"])
    assert color["legend"]["titleLimit"] >= 300
    assert spec["resolve"]["axis"]["x"] == "independent"
    assert marks["circle"]["encoding"]["x"]["scale"]["type"] == "log"
    assert {"label", "neuron", "rank", "cumulative_share", "median_clean_de"} <= tooltip_fields(marks["circle"])


def test_fig_cumulative_legend_lists_only_drawn_signs():
    frame = heads_frame(3, rank=lambda n: np.tile(np.arange(1, 4), 2), neuron=lambda n: np.arange(n),
                        cumulative_share=lambda n: np.tile([0.3, 0.6, 1.0], 2), share=lambda n: np.full(n, 0.3),
                        mean_delta_de=lambda n: np.ones(n), median_clean_de=lambda n: np.full(n, 0.2))
    color = layers_of(spec_of(fn.fig_cumulative(frame)))[1]["encoding"]["color"]
    assert color["scale"]["domain"] == ["positive"]


def test_fig_top_frequency():
    frame = heads_frame(5, rank=lambda n: np.tile(np.arange(1, 6), 2), neuron=lambda n: np.arange(n),
                        frequency=lambda n: RNG.uniform(size=n), median_clean_de=lambda n: RNG.normal(size=n),
                        n_instances=lambda n: np.full(n, 30))
    spec = spec_of(fn.fig_top_frequency(frame))
    assert data_rows(spec) == 10
    (bar,) = layers_of(spec)
    assert mark_of(bar) == "bar" and bar["encoding"]["y"]["field"] == "frequency"
    assert {"label", "layer", "head", "neuron", "frequency"} <= tooltip_fields(bar)


def test_fig_erasure():
    frame = heads_frame(1, **{k: (lambda n: RNG.uniform(size=n)) for k in fn.ERASURE_MEASURES})
    spec = spec_of(fn.fig_erasure(frame))
    assert data_rows(spec) == 2
    assert mark_of(spec) == "bar"
    assert spec["transform"][0]["fold"] == list(fn.ERASURE_MEASURES)
    assert {"label", "layer", "head", "what", "value"} <= tooltip_fields(spec)


def test_fig_amplified_tokens():
    frame = pd.concat([heads_frame(6, direct_effect=lambda n: RNG.uniform(size=n),
                                   new_direct_effect=lambda n: RNG.normal(size=n),
                                   row=lambda n: np.arange(n), pos=lambda n: np.arange(n)).assign(alpha=a)
                       for a in (1.0, 3.0, 5.0)], ignore_index=True)
    spec = spec_of(fi.fig_amplified_tokens(frame))
    assert data_rows(spec) == 36
    points = [l for l in layers_of(spec) if mark_of(l) == "circle"][0]
    assert points["encoding"]["color"]["field"] == "alpha"
    assert points["encoding"]["y"]["field"] == "new_direct_effect"
    assert {"label", "layer", "head", "alpha", "direct_effect", "new_direct_effect"} <= tooltip_fields(points)


@pytest.fixture
def classes() -> pd.DataFrame:
    frame = heads_frame(1, direct_effect=lambda n: [0.5, 0.2], alpha=lambda n: [5.0, 5.0],
                        new_direct_effect=lambda n: [0.1, 0.3], relative_change=lambda n: [-0.8, 0.5],
                        relative_change_all=lambda n: [-0.3, 0.2], control_change=lambda n: [-0.1, 0.0],
                        monotone=lambda n: [True, False], flips=lambda n: [False, False],
                        specific=lambda n: [True, False])
    frame["class"] = ["self-repressing", "self-reinforcing"]
    return frame


def test_fig_response(classes):
    rows = [{"label": lab, "layer": l, "head": h, "alpha": a, "relative_change": -0.1 * a,
             "direct_effect": 0.5, "new_direct_effect": 0.5 - 0.05 * a, "class": c}
            for (l, h, lab), c in zip(HEADS, classes["class"]) for a in (0.0, 1.0, 3.0, 5.0)]
    spec = spec_of(fi.fig_response(pd.DataFrame(rows)))
    assert data_rows(spec) == 8
    line = [l for l in spec["layer"] if mark_of(l) == "line"][0]
    assert line["encoding"]["detail"]["field"] == "label"
    assert line["encoding"]["color"]["field"] == "class"
    assert {"label", "layer", "head", "class", "alpha", "relative_change"} <= tooltip_fields(line)


def test_fig_head_map(classes):
    spec = spec_of(fi.fig_head_map(classes))
    assert data_rows(spec) == 2 and mark_of(spec) == "rect"
    assert spec["encoding"]["x"]["field"] == "head" and spec["encoding"]["y"]["field"] == "layer"
    assert {"label", "layer", "head", "class", "relative_change", "control_change",
            "relative_change_all"} <= tooltip_fields(spec)


# -- the figures on the library's own frames (synthetic results, no model) ---------------------------
def encoded_fields(spec) -> set[str]:
    """Every field an encoding (or tooltip) of ``spec`` names."""
    out = set()

    def walk(node, in_encoding=False):
        if isinstance(node, dict):
            if in_encoding and isinstance(node.get("field"), str):
                out.add(node["field"])
            for key, value in node.items():
                walk(value, in_encoding or key in ("encoding", "facet", "row", "column"))
        elif isinstance(node, list):
            for value in node:
                walk(value, in_encoding)

    walk(spec)
    return out


def derived_fields(spec) -> set[str]:
    """Fields that the spec's own transforms create (fold, calculate)."""
    out = set()

    def walk(node):
        if isinstance(node, dict):
            for t in node.get("transform", []):
                out.update(t.get("as", []) if isinstance(t.get("as"), list) else [t["as"]] if "as" in t else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    return out


def embedded_fields(spec) -> set[str]:
    """Columns of the rows the chart carries (a figure may add a column, e.g. a facet's panel)."""
    return {k for rows in spec.get("datasets", {}).values() for row in rows for k in row}


def check_fields(spec, frame):
    missing = encoded_fields(spec) - derived_fields(spec) - set(frame.columns) - embedded_fields(spec)
    assert not missing, f"the chart encodes fields its frame lacks: {sorted(missing)}"


def neuron_result(d_mlp=12, k=6, seed=0):
    import torch

    from selfrepair import neurons as nr

    g = torch.Generator().manual_seed(seed)
    heads, data = [(2, 0), (3, 1)], {}
    for sel in nr.SELECTIONS:
        data[f"{sel}/instance"] = torch.randperm(40, generator=g)[:2 * k].view(2, k)
        data[f"{sel}/score"] = torch.randn(2, k, generator=g)
        for q in nr.SCALARS:
            data[f"{sel}/{q}"] = torch.randn(2, k, generator=g, dtype=torch.float64)
        data[f"{sel}/direct_effect"] = data[f"{sel}/direct_effect"].abs()
        data[f"{sel}/clean"] = torch.randn(2, k, d_mlp, generator=g, dtype=torch.float64)
        data[f"{sel}/delta"] = torch.randn(2, k, d_mlp, generator=g, dtype=torch.float64)
    return nr.NeuronResult(heads, 4, data, meta={"seq_len": 5, "k": k, "d_mlp": d_mlp,
                                                 "model": "synthetic", "n_layers": 5})


def neuron_chapter():
    from selfrepair import neurons as nr
    from selfrepair.chapters import neurons as cn

    res = neuron_result()
    heads = pd.DataFrame([{"figure": "Fig 7, §4.2.2", "label": "L3H1", "layer": 3, "head": 1},
                          {"figure": "Fig 8, App. C", "label": "L2H0", "layer": 2, "head": 0},
                          {"figure": "Fig 8, App. C", "label": "L3H1", "layer": 3, "head": 1}])
    return cn.NeuronsChapter(res, nr.summary(res), heads, "L3H1", ["L2H0", "L3H1"], [], dict(res.meta))


def test_fig_sparsity_thresholds_in_distinct_hues():
    """Fig 8 drew thresholds 50/10/5/2/1% in five shades of one purple-to-teal ramp, hard to tell
    apart: each threshold now has its own hue from the book's palette (3:1 on white)."""
    from selfrepair.figures.legible import MIN_CONTRAST, contrast
    rows = [{"label": "L2H0", "layer": 2, "head": 0, "kind": kind, "rank": r, "percent": p,
             "share": 1 / r, "n_instances": 9}
            for kind in ("nth", "top_n") for r in (1, 2, 5) for p in (50, 10, 5, 2, 1)]
    (line,) = layers_of(spec_of(fn.fig_sparsity(pd.DataFrame(rows))))
    scale = line["encoding"]["color"]["scale"]
    assert "scheme" not in scale and scale["domain"] == [50, 10, 5, 2, 1]
    from test_figures_legible import assert_apart

    assert len(set(scale["range"])) == 5 and all(contrast(c) >= MIN_CONTRAST for c in scale["range"])
    assert_apart(scale["range"])  # every pair far apart


def test_neuron_figures_on_the_chapters_frames():
    ch = neuron_chapter()
    f7 = ch.fig7_instances
    assert set(f7["label"]) == {"L3H1"} and len(f7) == ch.meta["k"]
    spec = spec_of(fn.fig_top_neuron(f7))
    check_fields(spec, f7)
    assert data_rows(spec) == len(f7)

    sp = ch.sparsity
    spec = spec_of(fn.fig_sparsity(sp))
    check_fields(spec, sp)
    assert data_rows(spec) == len(sp) and set(sp["label"]) == {"L2H0", "L3H1"}

    cum = ch.cumulative
    spec = spec_of(fn.fig_cumulative(cum))
    check_fields(spec, cum)
    assert data_rows(spec) == len(cum) == 2 * ch.meta["d_mlp"]  # every rank of a small layer

    freq = ch.top_frequency
    spec = spec_of(fn.fig_top_frequency(freq))
    check_fields(spec, freq)
    assert set(freq["label"]) == {"L3H1"}

    assert set(fn.ERASURE_MEASURES) <= set(ch.summary.columns)  # every bar is a summary column
    spec = spec_of(fn.fig_erasure(ch.summary))
    check_fields(spec, ch.summary)
    assert data_rows(spec) == len(ch.summary) == 2


def test_iterative_figures_on_the_chapters_frames():
    import torch

    from selfrepair import iterative as it
    from selfrepair.chapters import iterative as ci

    n, k, alphas = 6, 5, (1.0, 3.0, 5.0)
    g = torch.Generator().manual_seed(0)
    de = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.5
    new = de[..., None] * (1 + torch.randn(n, 1, len(alphas), generator=g, dtype=torch.float64)
                           * torch.tensor(alphas, dtype=torch.float64) / 5)
    data = {"instance": torch.arange(k).repeat(n, 1), "direct_effect": de, "new_direct_effect": new,
            "sum_de": de.sum(1), "sum_new": new.sum(1), "n_all": torch.tensor(k),
            "control_direct_effect": de * 0.95, "sum_control": de.sum(1) * 0.95}
    res = it.IterativeResult([(l, h) for l in range(3) for h in range(2)], alphas, data,
                             meta={"seq_len": 4, "n_layers": 3, "model": "synthetic", "top_percent": 2.0, "k": k})
    classes = it.classify(res, 0.1)
    ch = ci.IterativeChapter(res, classes, it.featured(classes, 2), ci.FEATURED_RULE, [], dict(res.meta))

    tokens = ch.tokens
    assert set(tokens["label"]) == set(ch.featured) and len(tokens) == len(ch.featured) * len(alphas) * k
    spec = spec_of(fi.fig_amplified_tokens(tokens))
    check_fields(spec, tokens)
    assert data_rows(spec) == len(tokens)

    resp = ch.response
    spec = spec_of(fi.fig_response(resp))
    check_fields(spec, resp)
    assert data_rows(spec) == len(resp) == n * (len(alphas) + 1)  # alpha = 0 added

    spec = spec_of(fi.fig_head_map(classes))
    check_fields(spec, classes)
    assert data_rows(spec) == n
    assert set(classes["class"]) <= set(fi.CLASS_ORDER)  # every class has its colour
