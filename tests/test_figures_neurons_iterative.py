"""Figures of chapters 03 (anti-erasure neurons) and 04 (iterative inference) on synthetic frames."""

import numpy as np
import pandas as pd
import pytest

from selfrepair.figures import MAX_ROWS, data_rows, validate_spec
from selfrepair.figures import iterative as fi
from selfrepair.figures import neurons as fn

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


def test_fig_sparsity():
    rows = [{"label": lab, "layer": l, "head": h, "kind": kind, "rank": r, "percent": p,
             "share": 1 / r, "n_instances": 9}
            for l, h, lab in HEADS for kind in ("nth", "top_n") for r in (1, 2, 5) for p in (50, 10, 1)]
    spec = spec_of(fn.fig_sparsity(pd.DataFrame(rows)))
    assert data_rows(spec) == len(rows) == 36
    (line,) = layers_of(spec)
    assert mark_of(line) == "line"
    assert line["encoding"]["x"]["field"] == "rank" and line["encoding"]["y"]["field"] == "share"
    assert spec["facet"]["column"]["field"] == "kind" and spec["facet"]["row"]["field"] == "label"
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
    assert marks["circle"]["encoding"]["color"]["field"] == "median_clean_de"
    assert marks["circle"]["encoding"]["x"]["scale"]["type"] == "log"
    assert {"label", "neuron", "rank", "cumulative_share", "median_clean_de"} <= tooltip_fields(marks["circle"])


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
