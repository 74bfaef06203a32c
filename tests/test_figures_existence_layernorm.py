"""Figures of chapters 01 and 02 built from small synthetic frames: valid Vega-Lite, the intended
marks, fields and tooltips, and small embedded data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from selfrepair import existence, layernorm
from selfrepair.chapters import existence as ce
from selfrepair.chapters import featured as featured_frame
from selfrepair import figures
from selfrepair.figures import check_width, data_rows, validate_spec
from selfrepair.figures import existence as fe
from selfrepair.figures import layernorm as fl
from selfrepair.tables import format_number
from selfrepair.uncertainty import Clusters


def per_head(n_layers=4, n_heads=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            de = rng.normal(0.3, 0.3)
            dde = -de
            dl = rng.normal(-0.5, 0.5) * de
            rows.append({"layer": l, "head": h, "label": f"L{l}H{h}", "direct_effect": de,
                         "delta_direct_effect": dde, "delta_logit": dl, "self_repair": dl - dde})
    return existence.classify_heads(pd.DataFrame(rows))


def tokens(ph, n=30, seed=1, **extra):
    rng = np.random.default_rng(seed)
    parts = []
    for r in ph.itertuples():
        de = np.abs(rng.normal(r.direct_effect, 0.2, n))
        dl = -0.5 * de + rng.normal(0, 0.2, n)
        parts.append(pd.DataFrame({"layer": r.layer, "head": r.head, "label": r.label,
                                   "row": np.arange(n), "pos": 1, "direct_effect": de,
                                   "delta_direct_effect": -de, "delta_logit": dl,
                                   "self_repair": dl + de, **extra}))
    return pd.concat(parts, ignore_index=True)


def intervals(ph, n=30):
    """Fig 2's per-head intervals as the chapter makes them: a cluster bootstrap (each token row its
    own document here) of the whole-set means of :func:`tokens`."""
    tok = tokens(ph, n=n).assign(ablated_direct_effect=0.0)
    L, H = int(ph["layer"].max()) + 1, int(ph["head"].max()) + 1
    cl = Clusters.rows(n)
    cl = Clusters(cl.of_row, "documents")
    ev = existence.Evidence(cl, cl.head_sums(tok, existence.WHOLE[1:], L, H), None, None)
    return existence.head_intervals(ev, n_boot=50, seed=0)


def featured(ph, n=4):
    """Fig 3's heads as the chapter makes them (pinned: the n heads with the largest DE)."""
    labels = ph.sort_values("direct_effect", ascending=False)["label"].head(n).tolist()
    return featured_frame(ph, labels, None, rule=ce.FEATURED_RULE)


def spec_of(chart):
    spec = chart.to_dict()
    validate_spec(spec)
    check_width(spec)  # fits the book's column from 1440 px down to 1024 px
    return spec


def walk(node):
    """Every dict in a spec (layers, concats, facets)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def marks(spec):
    return {(n["mark"]["type"] if isinstance(n["mark"], dict) else n["mark"])
            for n in walk(spec) if "mark" in n}


def fields(spec, channel):
    return {n["encoding"][channel].get("field") for n in walk(spec)
            if "encoding" in n and channel in n["encoding"]}


def tooltip_fields(spec):
    out = set()
    for n in walk(spec):
        tips = n.get("encoding", {}).get("tooltip", [])
        for t in tips if isinstance(tips, list) else [tips]:
            out.add(t.get("field"))
    return out


def test_fig_self_repair_by_layer():
    ph = per_head()
    s = spec_of(fe.fig_self_repair_by_layer(ph))
    assert {"circle", "line", "rule"} <= marks(s)
    assert "layer" in fields(s, "x") and "self_repair" in fields(s, "y")
    assert {"label", "layer", "head", "direct_effect", "delta_logit"} <= tooltip_fields(s)
    assert any(n.get("encoding", {}).get("y", {}).get("aggregate") == "mean" for n in walk(s))
    assert data_rows(s) == len(ph)


def test_fig_de_vs_delta_logit_has_diagonal_and_intervals():
    ph = per_head()
    boot = intervals(ph)
    s = spec_of(fe.fig_de_vs_delta_logit(ph, boot=boot))
    assert {"circle", "line", "rule"} <= marks(s)
    assert fields(s, "x") >= {"direct_effect"} and "delta_logit" in fields(s, "y")
    assert {"lo", "hi"} <= tooltip_fields(s)
    # the y = -x line is computed from the data by Vega-Lite
    assert any(t.get("calculate") == "-datum.x" for n in walk(s) for t in n.get("transform", []))
    assert data_rows(s) == len(ph)


def panel_rows(spec, panel):
    """The rows of the dataset a panel of a concatenated chart reads."""
    names = {n["data"]["name"] for n in walk(panel) if isinstance(n.get("data"), dict) and "name" in n["data"]}
    if not names and "data" in spec:  # one frame for every panel: Altair moves it to the top
        names = {spec["data"]["name"]}
    assert len(names) == 1
    return spec["datasets"][names.pop()]


def test_fig_overview_top_left_whole_set_right():
    top = per_head()
    whole = existence.classify_heads(per_head(seed=7).assign(direct_effect=lambda f: f["direct_effect"] / 3))
    boot = intervals(whole)
    s = spec_of(fe.fig_overview(top, whole, boot))
    assert "hconcat" in s and len(s["hconcat"]) == 2
    params = [p for n in walk(s) for p in n.get("params", [])]
    assert any(p.get("name") == "layers" and p["select"]["type"] == "interval" for p in params)
    conds = [n["encoding"]["color"] for n in walk(s)
             if "encoding" in n and isinstance(n["encoding"].get("color"), dict)
             and "condition" in n["encoding"]["color"]]
    assert conds and conds[0]["condition"]["param"] == "layers"
    left, right = (panel_rows(s, p) for p in s["hconcat"])
    # Fig 1 (left) shows the top-k% means, Fig 2 (right) the whole-set means with their intervals
    assert [r["self_repair"] for r in left] == pytest.approx(list(top["self_repair"]))
    assert [r["category"] for r in left] == list(top["category"])
    assert [r["direct_effect"] for r in right] == pytest.approx(list(whole["direct_effect"]))
    assert [r["category"] for r in right] == list(whole["category"])
    assert [r["hi"] for r in right] == pytest.approx(list(boot["hi"]))
    assert "self_repair" in fields(s["hconcat"][0], "y")
    assert "delta_logit" in fields(s["hconcat"][1], "y") and "direct_effect" in fields(s["hconcat"][1], "x")
    # without whole-set means both panels read the same frame
    s = spec_of(fe.fig_overview(top))
    assert panel_rows(s, s["hconcat"][0]) == panel_rows(s, s["hconcat"][1])


def test_featured_tokens_and_fig3():
    ph = per_head()
    feat = featured(ph, n=4)
    top, sample = tokens(ph, n=30), tokens(ph, n=100, seed=2)
    t = fe.featured_tokens(top, feat, sample, max_per_head=50, seed=0)
    assert set(t["label"]) == set(feat["label"])
    assert (t.groupby(["label", "tokens"]).size() <= 50).all()
    pd.testing.assert_frame_equal(t, fe.featured_tokens(top, feat, sample, max_per_head=50, seed=0))
    s = spec_of(fe.fig_featured_tokens(t))
    assert s["facet"]["field"] == "label" and s["columns"] == 2
    assert "circle" in marks(s) and "tokens" in fields(s, "color")
    assert {"label", "layer", "head", "row", "pos", "self_repair"} <= tooltip_fields(s)
    assert data_rows(s) == len(t) <= 4 * 80


def test_fig_regions_spread_bootstrap():
    ph = per_head()
    tok = tokens(ph)
    s = spec_of(fe.fig_regions_by_layer(ph))
    assert marks(s) == {"bar"} and "category" in fields(s, "color")
    spread = existence.token_spread(tok)
    s = spec_of(fe.fig_token_spread(spread))
    assert {"rule", "bar", "point"} <= marks(s) and "layer" in s  # the median: a short rule
    assert {"label", "median", "share_overcorrecting"} <= tooltip_fields(s)
    assert data_rows(s) == len(spread)  # every layer shares one dataset
    s = spec_of(fe.fig_overcorrecting(spread))
    assert marks(s) == {"bar"} and fields(s, "y") == {"share_overcorrecting"}
    assert "y2" in s["encoding"] and {"label", "share_overcorrecting"} <= tooltip_fields(s)
    assert data_rows(s) == len(spread)
    boot = intervals(ph)
    s = spec_of(fe.fig_bootstrap(boot, ph))
    assert {"rule", "point"} <= marks(s) and {"lo", "hi", "mean"} <= tooltip_fields(s)
    assert data_rows(s) == len(boot)


def test_regions_count_axis_has_whole_ticks():
    """The regions chart counts heads: its y-axis never ticks between two whole heads (it showed
    0.5, 1.5, ... on a layer of 4 heads)."""
    s = spec_of(fe.fig_regions_by_layer(per_head(n_layers=18, n_heads=4)))
    axis = s["encoding"]["y"]["axis"]
    assert s["encoding"]["y"]["aggregate"] == "count"
    assert axis["tickMinStep"] == 1 and axis["format"] == "d"


def test_spread_charts_take_the_columns_width():
    """Chapter 1's spread of self-repair per head was a fixed 560 px concatenation, cut at a
    phone's column; both charts are now single views drawn at the column's width by Vega."""
    spread = existence.token_spread(tokens(per_head(n_layers=18, n_heads=4), n=12))
    for chart in (fe.fig_token_spread(spread), fe.fig_overcorrecting(spread)):
        s = spec_of(chart)
        assert s["width"] == "container"
        assert not {"vconcat", "hconcat", "concat", "facet"} & set(s)  # Vega fits only single views
        assert all(n.get("width", "container") == "container" for n in walk(s.get("layer", [])))


def test_the_mean_de_diamond_is_legible_at_a_glance():
    """Issue 25: the mean DE's red diamond (25 px², no outline) was a speck among 18 layers of
    boxes at 1440 and 390 px: it is drawn at least 60 px² with a dark outline (3:1 on white)."""
    from selfrepair.figures.legible import MIN_CONTRAST, contrast

    spread = existence.token_spread(tokens(per_head(n_layers=18, n_heads=4), n=12))
    s = spec_of(fe.fig_token_spread(spread))
    diamond = [m for m in (n.get("mark") for n in walk(s.get("layer", []))) if isinstance(m, dict)
               and m.get("shape") == "diamond"]
    assert len(diamond) == 1
    d = diamond[0]
    assert d["size"] >= 60 and d.get("strokeWidth", 0) >= 1 and contrast(d["stroke"]) >= MIN_CONTRAST, d


def test_per_head_charts_label_layers_not_heads():
    """72 heads (18 layers x 4, the embedded model): the x-axis is the layer, 18 labels at the
    layers' middles with a layer's heads side by side in it (a gap between layers), not 72 head
    labels; a model with more than 25 layers labels every other one."""
    ph = per_head(n_layers=18, n_heads=4)
    tok = tokens(ph, n=12)
    for chart in (fe.fig_token_spread(existence.token_spread(tok)),
                  fe.fig_bootstrap(intervals(ph, n=12), ph)):
        s = spec_of(chart)
        assert fields(s, "x") <= {"slot", "slot_lo"} and "slot" in fields(s, "x")
        axes = [n["encoding"]["x"]["axis"] for n in walk(s) if "axis" in n.get("encoding", {}).get("x", {})]
        assert axes and all(a["values"] == [l + 0.5 for l in range(18)] and a["labelAngle"] == 0 for a in axes)
        rows = pd.DataFrame(next(iter(s["datasets"].values())))
        for layer, heads in rows.groupby("layer"):  # inside its layer, in head order
            assert (heads.sort_values("head")["slot"].diff().dropna() > 0).all()
            assert heads["slot_lo"].min() > layer and heads["slot_hi"].max() < layer + 1
        assert {"label", "layer", "head"} <= tooltip_fields(s)  # the head on hover
        bars = [n for n in walk(s) if "x2" in n.get("encoding", {}) and marks(n) == {"bar"}]
        assert all("y2" in n["encoding"] for n in bars)  # bars from their base, not dashes
        zero = [n for n in walk(s) if n.get("encoding", {}).get("y", {}).get("datum") == 0]
        assert zero and all("x" not in n["encoding"] for n in zero)  # the zero line spans the chart
    many = figures.layer_x(per_head(n_layers=36, n_heads=2)).to_dict()["axis"]["values"]
    assert many == [l + 0.5 for l in range(0, 36, 2)] and len(many) <= figures.MAX_LABELS


def test_bootstrap_legend_lists_only_drawn_intervals():
    ph = per_head()
    boot = intervals(ph).assign(hi=-1.0, lo=-2.0)  # all below 0
    s = spec_of(fe.fig_bootstrap(boot, ph))
    domains = [n["encoding"]["color"]["scale"]["domain"] for n in walk(s) if "color" in n.get("encoding", {})]
    assert domains and all(d == ["below 0"] for d in domains)


# -- chapter 02 ---------------------------------------------------------------------------------
def head_frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for ablation in ("resample", "mean", "zero"):
        for kind, m in (("top-k%", n), ("random sample", 2 * n)):
            de = rng.normal(0.5, 0.3, m)
            ratio = rng.normal(1.02, 0.02, m)
            parts.append(pd.DataFrame({"layer": 3, "head": 1, "label": "L3H1", "row": np.arange(m),
                                       "pos": 2, "tokens": kind, "ablation": ablation,
                                       "direct_effect": de, "delta_direct_effect": -de,
                                       "delta_logit": -0.6 * de, "self_repair": 0.4 * de,
                                       "from_norm": 0.2 * de, "scale_clean": 10.0,
                                       "scale_ablated": 10.0 / ratio, "logit": 5.0,
                                       "ratio": ratio, "norm_ratio": 1 / ratio}))
    return pd.concat(parts, ignore_index=True)


def test_fig_scale_ratio():
    t = head_frame()
    s = spec_of(fl.fig_scale_ratio(t))
    assert s["facet"]["field"] == "panel" and s["columns"] == 3
    assert {"bar", "rule"} <= marks(s)
    rows = pd.DataFrame(next(iter(s["datasets"].values())))  # binned here, per panel: 60 bins each
    assert len(rows) == data_rows(s) == 3 * 60 and rows.groupby("panel")["count"].sum().eq(60).all()
    assert s["resolve"]["scale"]["x"] == "shared"
    counts = [n["encoding"]["y"] for n in walk(s) if n.get("encoding", {}).get("y", {}).get("field") == "count"]
    assert counts and all(y["axis"]["tickMinStep"] == 1 and y["axis"]["format"] == "d" for y in counts)


def test_fig_scale_ratio_y_domain_holds_the_tallest_bar_and_the_share_is_off_the_plot():
    """Fig 4's tallest bars touched the top of their panel (18 tokens on an axis ending at 18) and
    the share above 1, a text mark in the panel's top-right corner, sat on them and on the dashed
    line at 1. Each panel's y domain now reaches a tenth above its tallest bin (an invisible rule
    at that height, per panel) and the share is the second line of the panel's title."""
    t = head_frame()
    s = spec_of(fl.fig_scale_ratio(t))
    assert "text" not in marks(s)  # nothing written over the bars
    rows = pd.DataFrame(next(iter(s["datasets"].values())))
    (room,) = [n for n in walk(s) if n.get("encoding", {}).get("y", {}).get("field") == "headroom"]
    assert room["mark"]["opacity"] == 0 and s["resolve"]["scale"]["y"] == "independent"
    for panel, g in rows.groupby("panel"):
        assert g["headroom"].max() > g["count"].max()  # from the panel's own bin counts
        assert g["headroom"].max() == pytest.approx(1.1 * g["count"].max())
        head, share = panel.split(fl.SEP)
        assert share == f"{g['share'].iloc[0]:.1%} with S/S′ > 1"
    assert "split(datum.value" in s["facet"]["header"]["labelExpr"]


def test_data_domain_is_the_data_padded():
    assert fl.data_domain([1.0, 3.0]) == pytest.approx([0.9, 3.1])
    assert fl.data_domain([-3.2, -1.0], include=(0,)) == pytest.approx([-3.36, 0.16])
    assert fl.data_domain([np.nan, 2.0, np.inf]) == pytest.approx([1.5, 2.5])  # one finite value


def test_fig_ablation_scatter_y_axis_spans_the_tokens_not_the_diagonal():
    """Fig 5's y-axis ran to -10 (the y = -x line down to -max DE) while Δlogit reached -3.2: the
    domain is now the tokens' Δlogit and 0, padded, and the line is clipped to it."""
    t = head_frame()
    t["direct_effect"] = t["direct_effect"] * 20  # DE far beyond the Δlogits
    for shift in (0.0, -2.0):  # a domain derived from the data moves with it
        u = t.assign(delta_logit=t["delta_logit"] + shift)
        s = spec_of(fl.fig_ablation_scatter(u, max_per_panel=50))
        drawn = pd.DataFrame(next(iter(s["datasets"].values())))["delta_logit"]
        (domain,) = [n["encoding"]["y"]["scale"]["domain"] for n in walk(s)
                     if n.get("encoding", {}).get("y", {}).get("field") == "delta_logit"]
        assert domain == pytest.approx(fl.data_domain(drawn, include=(0,)))
        assert domain[0] > -drawn.abs().max() * 2 > -u["direct_effect"].max()
        assert all(n["mark"].get("clip") for n in walk(s) if isinstance(n.get("mark"), dict)
                   and n["mark"].get("type") == "line")


def test_fig_scale_ratio_for_several_heads():
    """App. D: one row of three ablations per head, in the order the heads come."""
    t = pd.concat([head_frame(seed=1).assign(label="L3H2", head=2), head_frame()], ignore_index=True)
    s = spec_of(fl.fig_scale_ratio(t))
    assert [p.split(fl.SEP)[0] for p in s["facet"]["sort"]] == [f"{h} · {a}" for h in ["L3H2", "L3H1"] for a in fl.ABLATIONS]
    rows = pd.DataFrame(next(iter(s["datasets"].values())))
    assert rows["count"].sum() == (t["tokens"] == "top-k%").sum()  # every top-k% token in one bin
    assert "each head" in json.dumps(s["title"])


def test_fig_ablation_scatter():
    t = head_frame()
    s = spec_of(fl.fig_ablation_scatter(t, max_per_panel=50))
    assert s["facet"]["column"]["field"] == "ablation"
    assert {"label", "layer", "head", "ablation", "from_norm", "ratio"} <= tooltip_fields(s)
    assert data_rows(s) == 3 * 2 * 50


def test_fig_norm_share_and_variants():
    rng = np.random.default_rng(0)
    top = pd.DataFrame({"layer": np.repeat([0, 1, 2], 40), "head": np.tile(np.repeat([0, 1], 20), 3),
                        "direct_effect": rng.normal(0.3, 0.3, 120), "from_norm": rng.normal(0.1, 0.2, 120),
                        "from_block_norms": rng.normal(0.0, 0.1, 120)})
    top["label"] = "L" + top["layer"].astype(str) + "H" + top["head"].astype(str)
    shares = layernorm.norm_share(top, top)
    s = spec_of(fl.fig_norm_share(shares))
    assert {"circle", "line", "rule"} <= marks(s) and "component" in fields(s, "color")
    assert {"label", "layer", "head", "share"} <= tooltip_fields(s)
    assert data_rows(s) == 6 * 2  # heads x (final, block) norms, clipped, top-k%
    assert "Fig 10" in json.dumps(s["title"]) and "Fig 6" not in json.dumps(s["title"])
    repair = layernorm.norm_repair(top)  # Fig 6: the norm's self-repair in logits, not a share
    np.testing.assert_allclose(repair[repair["component"] == "final norm"]["self_repair"],
                               top.groupby(["layer", "head"])["from_norm"].mean().to_numpy())
    s = spec_of(fl.fig_norm_repair(repair))
    assert {"circle", "line", "rule"} <= marks(s) and "self_repair" in fields(s, "y")
    assert {"label", "layer", "head", "self_repair", "n"} <= tooltip_fields(s)
    assert data_rows(s) == 6 * 2 and "Fig 6" in json.dumps(s["title"])
    s = spec_of(fl.fig_share_variants(layernorm.layer_shares(shares)))
    assert "line" in marks(s) and len(s["hconcat"]) in (2, 3)


def test_fig_norm_ratio_embeds_bins_that_count_every_sampled_token():
    t = head_frame()
    sample = t[t["tokens"] == "random sample"]
    s = spec_of(fl.fig_norm_ratio(t, bins=20))
    assert "lo" in fields(s, "x") and "ablation" in fields(s, "color")
    n_ablations = sample["ablation"].nunique()
    assert data_rows(s) <= 2 * 20 * n_ablations  # the bins (twice: bars and rule share the data)
    h = fl.histogram(sample, "norm_ratio", "ablation", bins=20)
    assert h.groupby("ablation")["count"].sum().to_dict() == sample.groupby("ablation").size().to_dict()
    big = pd.concat([sample] * 40, ignore_index=True)  # 5,000+ sampled tokens per ablation still fit
    assert data_rows(spec_of(fl.fig_norm_ratio(big))) <= 2 * 40 * n_ablations


def _x_domains(spec):
    return [n["encoding"]["x"]["scale"]["domain"] for n in walk(spec)
            if n.get("encoding", {}).get("x", {}).get("field") == "lo"]


def test_fig_norm_ratio_fits_its_axis_to_the_ratios():
    """Fig 15: ratios near 1 on an axis from their smallest to their largest bin (not from 0: the
    bars' default zero baseline drew 0-1.1 with every bar in a spike at 1)."""
    t = head_frame()
    s = spec_of(fl.fig_norm_ratio(t, bins=20))
    sample = t.loc[t["tokens"] == "random sample", "norm_ratio"]
    (domain,) = _x_domains(s)
    assert domain[0] == pytest.approx(sample.min()) and domain[1] == pytest.approx(sample.max())
    assert all(n["encoding"]["x"]["scale"]["zero"] is False for n in walk(s)
               if n.get("encoding", {}).get("x", {}).get("field") == "lo")
    assert "hconcat" not in s  # no outliers: one panel at the column's width
    bars = [n for n in walk(s) if n.get("encoding", {}).get("x2")]
    assert bars and all(n["encoding"]["y2"] == {"datum": 0} for n in bars)  # bars from 0, not dashes


def test_fig_norm_ratio_zooms_beside_the_full_range_when_outliers_squeeze_it():
    t = head_frame(n=200)
    sample = t["tokens"] == "random sample"
    t.loc[sample & (t["row"] < 2), "norm_ratio"] = 0.2  # a few tokens far below the spike
    s = spec_of(fl.fig_norm_ratio(t, bins=20))
    full, zoom = _x_domains(s)
    assert full[0] == pytest.approx(0.2) and zoom[0] > 0.9  # the zoom holds the spike, not 0.2
    assert len(s["hconcat"]) == 2 and "zoom" in json.dumps(s["hconcat"][1]["title"])
    bins = [r for rows in s["datasets"].values() for r in rows]
    assert sum(r["count"] for r in bins if r["lo"] < 0.5) > 0  # the outliers are in the full panel

def test_fig_appendix_b():
    rng = np.random.default_rng(0)
    rows = []
    for model, par in (("a", True), ("b", False)):
        for ablation in ("resample", "mean", "zero"):
            dl = rng.normal(0, 0.3, 400)
            rows.append(pd.DataFrame({"model": model, "label": "L1H0", "parallel_residual": par,
                                      "ablation": ablation, "row": 0, "pos": np.arange(400),
                                      "delta_logit": dl, "closed_form": dl + (0 if par else 0.1),
                                      "error": 0.0, "ratio": 1.0, "scaled_logit": 1.0,
                                      "from_mlps": 0.0, "from_block_norms": 0.0}))
    chk = pd.concat(rows, ignore_index=True)
    s = spec_of(fl.fig_appendix_b(chk, max_per_panel=300))
    assert s["facet"]["field"] == "panel" and s["columns"] == 2  # wraps: any number of models fits
    assert {"circle", "line"} <= marks(s) and "closed_form" in fields(s, "y")
    assert data_rows(s) == 2 * 300


def test_fig_frozen_norm():
    rng = np.random.default_rng(0)
    heads = pd.DataFrame([{"layer": l, "head": h, "label": f"L{l}H{h}"} for l in (3, 2) for h in range(3)])
    heads = heads.assign(direct_effect=rng.normal(0.5, 0.2, 6), n=10, self_repair=rng.normal(0.1, 0.05, 6),
                         self_repair_frozen=rng.normal(0.0, 0.05, 6), self_repair_norms_only=rng.normal(0.05, 0.02, 6),
                         from_norm=rng.normal(0.1, 0.05, 6), from_block_norms=0.0)
    heads = heads.assign(norm_terms=heads["from_norm"], removed=heads["self_repair"] - heads["self_repair_frozen"])
    heads["gap"] = heads["removed"] - heads["norm_terms"]
    s = spec_of(fl.fig_frozen_norm(heads))
    assert len(s["vconcat"]) == 2  # stacked: the per-head panel takes the column
    check_width(s)
    assert {"point", "circle", "line", "rule"} <= marks(s)
    assert {"value"} <= fields(s, "y") and {"removed"} <= fields(s, "y") and {"norm_terms"} <= fields(s, "x")
    left = s["vconcat"][0]["layer"][1]["encoding"]
    assert left["x"]["sort"] == [f"L{l}H{h}" for l in (2, 3) for h in range(3)]  # by layer, head
    assert left["color"]["scale"]["domain"] == fl.FROZEN_MEASURES
    # the four values of a head side by side (equal ones stay visible), the legend above the panel
    # it names (not under the bottom panel, which draws one series)
    assert left["xOffset"]["field"] == "measure" and left["color"]["legend"]["orient"] == "top"
    assert "gap" in tooltip_fields(s)
    assert data_rows(s) == 4 * 6 + 6  # four measures per head (left), one point per head (right)


def test_fig_frozen_norm_legend_and_labels():
    """A measure with no value is not in the legend; of 40 heads only the FROZEN_LABELS with the
    largest live self-repair are labelled (the rest on hover)."""
    rng = np.random.default_rng(1)
    heads = pd.DataFrame([{"layer": l, "head": h, "label": f"L{l}H{h}"} for l in range(10) for h in range(4)])
    heads = heads.assign(direct_effect=0.5, n=10, self_repair=rng.normal(0.1, 0.05, 40),
                         self_repair_frozen=rng.normal(0.0, 0.05, 40), self_repair_norms_only=np.nan,
                         from_norm=0.1, from_block_norms=0.0)
    heads = heads.assign(norm_terms=heads["from_norm"], removed=heads["self_repair"] - heads["self_repair_frozen"])
    heads["gap"] = heads["removed"] - heads["norm_terms"]
    left = spec_of(fl.fig_frozen_norm(heads))["vconcat"][0]["layer"][1]["encoding"]
    assert left["color"]["scale"]["domain"] == ["live", "norms frozen", "eq. 2 norm terms"]
    assert left["shape"]["scale"]["domain"] == left["color"]["scale"]["domain"]
    shown = json.loads(left["x"]["axis"]["labelExpr"].split("indexof(")[1].split(", datum.value")[0])
    top = heads.reindex(heads["self_repair"].abs().sort_values(ascending=False).index)["label"][:fl.FROZEN_LABELS]
    assert shown == list(top) and len(shown) == fl.FROZEN_LABELS


@pytest.mark.parametrize("n", [4000])
def test_sampling_keeps_charts_small(n):
    ph = per_head(n_layers=2, n_heads=2)
    feat = featured(ph, n=4)
    t = fe.featured_tokens(tokens(ph, n=n), feat, tokens(ph, n=n, seed=3))
    assert data_rows(spec_of(fe.fig_featured_tokens(t))) <= 5000
    big = head_frame(n=n)
    assert data_rows(spec_of(fl.fig_ablation_scatter(big))) <= 5000


def test_fig_decomposition_from_a_real_closure_table():
    from selfrepair import load_model
    from selfrepair.chapters.intro import closure_markdown, closure_table
    from selfrepair.figures import intro
    from selfrepair.heads import self_repair

    model = load_model("tiny-gemma3")
    tok = torch.randint(0, model.d_vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    result = self_repair(model, tok, ablation="resample", heads=[(0, 1), (1, 3)], progress=False)
    table = closure_table(result)
    assert list(table["label"]) == ["L0H1", "L1H3"]
    terms = ("from_heads", "from_mlps", "from_norm", "from_block_norms")
    for (layer, head), row in zip([(0, 1), (1, 3)], table.itertuples()):
        gap = (result.self_repair[layer, head] - sum(getattr(result, t)[layer, head] for t in terms)).abs()
        assert row.eq2_gap == pytest.approx(float(gap.max()), abs=1e-9)
        assert row.eq2_gap < 1e-4  # eq. 2 closes to rounding
        assert row.self_repair == pytest.approx(float(result.self_repair[layer, head].mean()), abs=1e-7)
        assert row.from_block_norms == pytest.approx(float(result.from_block_norms[layer, head].mean()), abs=1e-7)
    assert f"**{format_number(table['eq2_gap'].max())}**" in closure_markdown(table)  # as the table prints it
    s = spec_of(intro.fig_decomposition(table))
    assert {"bar", "tick", "rule"} <= marks(s)
    assert data_rows(s) == 2 * 4 + 2 + 1  # four eq. 2 terms per head, one tick per head, the zero line
    bars = next(l for l in s["layer"] if marks(l) == {"bar"})
    assert bars["encoding"]["x"]["stack"] == "zero" and bars["encoding"]["y"]["sort"] == ["L0H1", "L1H3"]
    assert {"self_repair", "eq2_gap", "delta_logit"} <= tooltip_fields(s)


def test_intro_demo_heads_pinned_and_default():
    from types import SimpleNamespace

    from selfrepair.chapters.intro import demo_heads

    model = SimpleNamespace(n_layers=6, n_heads=4)
    assert demo_heads(SimpleNamespace(featured_heads=None), model) == sorted({(5, 0), (5, 1), (2, 0)})
    assert demo_heads(SimpleNamespace(featured_heads=("L3H2", "L0H1")), model) == [(3, 2), (0, 1)]
    one = SimpleNamespace(n_layers=1, n_heads=1)  # the last layer is the middle one
    assert demo_heads(SimpleNamespace(featured_heads=None), one) == [(0, 0)]


def test_fig3_panels_follow_the_featured_tables_order():
    """read3 #27: the table listed L12H0, L14H0, L14H2, L12H2 and the chart L12H0, L12H2, L14H0,
    L14H2 (sorted by layer): the panels now come in the table's order."""
    ph = per_head()
    feat = featured(ph, n=4).iloc[::-1].reset_index(drop=True)  # not in layer order
    t = fe.featured_tokens(tokens(ph, n=30), feat, tokens(ph, n=100, seed=2), max_per_head=20, seed=0)
    assert list(t["label"].drop_duplicates()) == list(feat["label"])
    assert spec_of(fe.fig_featured_tokens(t))["facet"]["sort"] == list(feat["label"])


def test_app_d_panels_follow_its_tables_order():
    """read3 #27: App. D's table listed L17H3, L17H1, L17H0 and the chart started with L17H0 (the
    token frame's order): the rows, hence the panels, now come in App. D's order."""
    from selfrepair.chapters.layernorm import LayerNormChapter

    t = head_frame()
    t = pd.concat([t.assign(label=f"L1H{h}") for h in (0, 1, 2)], ignore_index=True)
    ch = object.__new__(LayerNormChapter)
    ch.tokens, ch.app_d = t, [(1, 2), (1, 0), (1, 1)]
    assert list(ch.app_d_tokens["label"].drop_duplicates()) == ["L1H2", "L1H0", "L1H1"]
    s = spec_of(fl.fig_scale_ratio(ch.app_d_tokens))
    assert [p.split(fl.SEP)[0] for p in s["facet"]["sort"]][:3] == ["L1H2 · resample", "L1H2 · mean", "L1H2 · zero"]


def test_fig4_panels_share_one_ratio_axis():
    """read3 #23: "zero moves the scale 4.1× as far" compared panels whose x ranges differed: every
    panel now bins over one span and shares the x scale, and the subtitle says so."""
    t = head_frame()
    wide = t.copy()
    top = wide["tokens"] == "top-k%"
    wide.loc[top & (wide["ablation"] == "zero"), "ratio"] = np.linspace(1.2, 1.5, int((top & (wide["ablation"] == "zero")).sum()))
    s = spec_of(fl.fig_scale_ratio(wide))
    rows = pd.DataFrame(next(iter(s["datasets"].values())))
    assert s["resolve"]["scale"]["x"] == "shared" and "one S/S′ axis" in s["title"]["subtitle"]
    spans = rows.groupby("panel").agg(lo=("lo", "min"), hi=("hi", "max"))
    assert spans["lo"].nunique() == 1 and spans["hi"].nunique() == 1 and spans["hi"].iloc[0] == pytest.approx(1.5)


def test_frozen_norm_chart_labels_few_enough_heads_for_a_phone():
    """read3 #21: 25 of 36 head labels ran together at 390 px: at most FROZEN_LABELS are printed,
    and Vega drops any that would still touch."""
    rng = np.random.default_rng(2)
    heads = pd.DataFrame([{"layer": l, "head": h, "label": f"L{l}H{h}"} for l in range(9, 18) for h in range(4)])
    heads = heads.assign(direct_effect=0.5, n=10, self_repair=rng.normal(0.1, 0.5, 36),
                         self_repair_frozen=rng.normal(0.0, 0.05, 36), self_repair_norms_only=0.01,
                         from_norm=0.1, from_block_norms=0.0)
    heads = heads.assign(norm_terms=heads["from_norm"], removed=heads["self_repair"] - heads["self_repair_frozen"])
    heads["gap"] = heads["removed"] - heads["norm_terms"]
    axis = spec_of(fl.fig_frozen_norm(heads))["vconcat"][0]["layer"][1]["encoding"]["x"]["axis"]
    shown = json.loads(axis["labelExpr"].split("indexof(")[1].split(", datum.value")[0])
    assert len(shown) == fl.FROZEN_LABELS <= 12 and axis["labelOverlap"] == "greedy"
