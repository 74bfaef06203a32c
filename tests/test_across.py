"""Across models (selfrepair.chapters.across): cached sweeps and the paper's released per-head values.

The claims' metrics of :func:`compare_models` are checked against hand computations on a small
synthetic frame holding both token sets ("top-k%" and "all"); the paper's rows against the raw
released CSV; cached sweeps against the sweep they were read from.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

from selfrepair import experiment
from selfrepair.claims import BELOW
from selfrepair.chapters import across
from selfrepair.config import CorpusConfig
from selfrepair.sweep import Sweep

PAPER_HEADS = {"gpt2-small": 144, "gpt2-medium": 384, "pythia-160m": 144, "pythia-410m": 384}
TINY = dict(model="tiny-gpt_neox", dataset="tiny", n_tokens=512, seq_len=32, batch_size=4, top_percent=10)


@pytest.fixture(scope="module")
def paper():
    return across.load_paper_reference()


@pytest.fixture(scope="module")
def raw_release():
    """The released CSV, complete (empty-prefix) set, as {(model, quantity): Series by (layer, head)}."""
    raw = pd.read_csv(across.reference_path(), dtype={"variant": str}, keep_default_na=False)
    return raw[raw["variant"] == ""].set_index(["model", "quantity", "layer", "head"])["value"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache dir holding one tiny sweep, made by experiment.head_sweep; and that sweep."""
    root = tmp_path_factory.mktemp("results")
    cfg = CorpusConfig.from_params(**TINY, cache_dir=str(root))
    sweep = experiment.head_sweep(cfg, "resample", progress=False)
    return root, cfg, sweep


# -- the paper's release ----------------------------------------------------------------------
def test_reference_csv_has_the_four_models_and_quantities(paper):
    assert paper.groupby("model").size().to_dict() == PAPER_HEADS
    for name in across.QUANTITY_NAMES.values():
        assert name in paper.columns and paper[name].notna().all()
    assert paper["source"].eq("paper").all() and paper["ablation"].eq("resample").all()
    assert paper["rel_layer"].between(0, 1).all()
    assert paper.groupby("model")["n_layers"].first().to_dict() == {
        "gpt2-small": 12, "gpt2-medium": 24, "pythia-160m": 12, "pythia-410m": 24}
    assert paper.loc[paper["label"] == "L11H2", "model"].nunique() == 4


def test_reference_values_are_self_consistent(paper):
    # the authors' LayerNorm term is the remainder of eq. 2: the three parts sum to eq. 1
    parts = paper["from_norm"] + paper["from_heads"] + paper["from_mlps"]
    np.testing.assert_allclose(parts, paper["self_repair"], atol=1e-5)
    assert paper[["percent_norm_of_de", "percent_heads_of_de", "percent_mlps_of_de"]].stack().between(0, 1).all()
    late = paper[paper["rel_layer"] >= 0.5]
    assert late["self_repair"].mean() > 0  # the paper's headline, in its own numbers


def test_reference_matches_the_raw_release(paper, raw_release):
    """Every value is the released one; self_repair is eq. 1 of the released values; the paper's
    rows are top-k% means only, and their norm_share is the released percent_LN_of_DE."""
    assert set(paper["tokens"]) == {"top-k%"}
    assert (paper["from_block_norms"] == 0).all()
    for model, g in paper.groupby("model"):
        key = list(zip(g["layer"], g["head"]))

        def released(q):
            return raw_release.loc[model, q].loc[key].to_numpy()

        np.testing.assert_array_equal(g["norm_share"].to_numpy(), released("percent_LN_of_DE"))
        np.testing.assert_array_equal(g["direct_effect"].to_numpy(), released("direct_effects"))
        np.testing.assert_array_equal(g["delta_logit"].to_numpy(), released("logit_diff"))
        expected = released("logit_diff") - (released("ablated_direct_effects") - released("direct_effects"))
        np.testing.assert_allclose(g["self_repair"].to_numpy(), expected, rtol=0, atol=1e-12)


def test_reference_variant(paper):
    """The 1.0_ files are whole-set means (the script's PERCENTILE = 1.0: every token): small means
    with negative minima, which a top-2% mean by direct effect cannot have."""
    other = across.load_paper_reference(variant="1.0")
    assert set(other["model"]) == {"gpt2-small", "pythia-160m"} and set(other["tokens"]) == {"all"}
    assert len(other[other["model"] == "gpt2-small"]) == 144
    for model, g in other.groupby("model"):
        top = paper[paper["model"] == model]
        assert g["direct_effect"].min() < 0 < top["direct_effect"].min()
        assert g["direct_effect"].mean() < top["direct_effect"].mean() / 5
    assert other["norm_share"].isna().all()  # no percent_*_of_DE among the 1.0_ files
    gpt2 = paper[paper["model"] == "gpt2-small"].set_index("label")["direct_effect"]
    assert not np.allclose(other[other["model"] == "gpt2-small"].set_index("label")["direct_effect"]
                           .loc[gpt2.index], gpt2)  # a different set of values
    readme = (across.reference_path().parent / "README.md").read_text()
    assert "starship006/backup_research" in readme  # the attribution ships with the data


# -- this project's cached sweeps --------------------------------------------------------------
def test_load_cached_sweeps_returns_both_token_sets(cache):
    root, cfg, sweep = cache
    ours = across.load_cached_sweeps(root)
    n_heads = sweep.meta["n_layers"] * sweep.meta["n_heads"]
    assert len(ours) == 2 * n_heads and set(ours["model"]) == {"tiny-gpt_neox"}
    assert ours.groupby("tokens").size().to_dict() == {"top-k%": n_heads, "all": n_heads}
    n = int(ours["n_tokens"].iloc[0])
    assert ours["run"].unique().tolist() == [f"tiny-gpt_neox (this book: resample, {n:,} tokens)"]  # words, not "(ours, ... tok)"
    assert set(across.COLUMNS) <= set(ours.columns) and (ours["source"] == "this project").all()
    assert ours["rel_layer"].between(0, 1).all()
    assert (ours["rel_layer"] == ours["layer"] / (ours["n_layers"] - 1)).all()
    np.testing.assert_allclose(ours["self_repair"],
                               ours["delta_logit"] - (ours["ablated_direct_effect"] - ours["direct_effect"]),
                               atol=1e-5)
    per_head = sweep.per_head().set_index(["layer", "head"])
    for tokens, suffix in (("top-k%", ""), ("all", "_all")):
        g = ours[ours["tokens"] == tokens].set_index(["layer", "head"]).loc[per_head.index]
        assert (g["label"] == per_head["label"]).all()
        for q in ("direct_effect", "delta_logit", "self_repair", "from_norm", "from_block_norms"):
            np.testing.assert_allclose(g[q], per_head[q + suffix], rtol=0, atol=1e-12, err_msg=f"{tokens} {q}")
    # the final norm's clipped per-token share of DE over each head's top tokens, by hand
    top = sweep.tokens_frame("top")
    top = top[top["direct_effect"] != 0]
    share = {}
    for (layer, head), t in top.groupby(["layer", "head"]):
        share[layer, head] = float(np.mean(np.clip(t["from_norm"].to_numpy() / t["direct_effect"].to_numpy(), 0, 1)))
    got = ours[ours["tokens"] == "top-k%"].set_index(["layer", "head"])["norm_share"]
    assert len(share) == n_heads
    for key, value in share.items():
        assert got[key] == pytest.approx(value, abs=1e-12)
    assert ours.loc[ours["tokens"] == "all", "norm_share"].isna().all()


def test_an_entry_of_an_older_sweep_layout_beside_the_current_one_is_not_read_twice(cache, tmp_path):
    """A cache that held the sweep before it kept per-row sums (``SweepSpec.layout``) holds the
    same run twice: only the current entry is read."""
    import shutil

    from selfrepair.results import load_tensors, save_tensors

    root, cfg, sweep = cache
    copy = tmp_path / "cache"
    shutil.copytree(root, copy)
    entry = next(copy.glob("*/sweep-*.safetensors"))
    tensors, meta = load_tensors(entry)
    meta["key"]["spec"].pop("layout")  # as written before the layout was part of the key
    save_tensors(entry.with_name("sweep-0000000000000000.safetensors"),
                 {k: v for k, v in tensors.items() if k != "sum_row"}, meta)
    pd.testing.assert_frame_equal(across.load_cached_sweeps(copy).drop(columns="path"),
                                  across.load_cached_sweeps(root).drop(columns="path"))


def test_chapter_measure_reuses_the_cached_sweep(cache, paper):
    root, cfg, sweep = cache
    acfg = across.Config.from_params(**TINY, cache_dir=str(root))
    ch = across.measure(acfg, progress=False)
    assert len(list(root.glob("*/sweep-*.safetensors"))) == 1
    assert len(ch.top_heads) == 8 + len(paper) and len(ch.whole_heads) == 8 + 2 * 144
    assert set(ch.whole_heads["source"]) == {"this project", "paper"}  # the release's 1.0_ files
    assert set(ch.whole_heads.loc[ch.whole_heads["source"] == "paper", "model"]) == {"gpt2-small", "pythia-160m"}
    assert set(ch.table["run"]) == set(ch.heads["run"]) and len(ch.table) == 5
    assert ch.current == "tiny-gpt_neox"


def test_empty_and_damaged_caches(tmp_path, cache):
    empty = across.load_cached_sweeps(tmp_path)
    assert empty.empty and set(across.COLUMNS) <= set(empty.columns)
    root, _, _ = cache
    good = next(root.glob("*/sweep-*.safetensors"))
    bad = tmp_path / "x" / "sweep-0000.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a safetensors file")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / good.name).write_bytes(good.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = across.load_cached_sweeps(tmp_path)
    assert any(str(bad) in str(w.message) for w in caught)
    assert len(got) == 16 and (got["path"] == str(tmp_path / "y" / good.name)).all()  # the good one is read
    Sweep.load(tmp_path / "y" / good.name)


# -- the claims' metrics, by hand -----------------------------------------------------------------
def _row(run, source, n_layers, tokens, layer, head, de, sr, ns, bn, dl):
    return {"source": source, "run": run, "model": run.split()[0], "fold_value_biases": source == "paper",
            "ablation": "resample",
            "tokens": tokens, "n_layers": n_layers, "layer": layer, "head": head,
            "label": f"L{layer}H{head}", "rel_layer": layer / (n_layers - 1), "direct_effect": de,
            "ablated_direct_effect": 0.0, "delta_logit": dl, "self_repair": sr, "from_heads": 0.0,
            "from_mlps": 0.0, "from_norm": 0.0, "from_block_norms": bn, "norm_share": ns}


@pytest.fixture
def synthetic():
    """Run "toy (ours)": 4 layers x 3 heads (late: layers 2, 3), both token sets with different
    values; run "ref (paper)": 2 layers x 2 heads (late: layer 1), top-k% only."""
    ours = "toy (ours)"
    rows = []
    # top-k%: (layer, head, direct effect, self-repair, norm share, block-norm term)
    top = [(0, 0, 1.0, 0.5, 0.9, 0.0), (0, 1, 1.0, -0.1, 0.9, 0.0), (0, 2, 1.0, 0.2, 0.9, 0.0),
           (1, 0, 1.0, 0.0, 0.9, 0.0), (1, 1, 1.0, 0.3, 0.9, 0.0), (1, 2, 1.0, -0.4, 0.9, 0.0),
           (2, 0, 1.0, 0.2, 0.1, 0.5), (2, 1, 2.0, -0.1, 0.3, 0.6), (2, 2, -0.5, 0.3, 0.5, 9.0),
           (3, 0, 0.5, 0.0, 0.2, 0.45), (3, 1, 1.5, 0.4, 0.6, 0.3), (3, 2, 0.0, 0.1, 0.4, 7.0)]
    rows += [_row(ours, "this project", 4, "top-k%", l, h, de, sr, ns, bn, -1.0) for l, h, de, sr, ns, bn in top]
    # all tokens: (layer, head, direct effect, delta logit); self-repair 5 everywhere
    every = [(0, 0, 1.0, -0.5), (0, 1, 1.0, -1.5), (0, 2, -1.0, -0.5),
             (1, 0, 0.5, 0.1), (1, 1, 0.5, -0.25), (1, 2, 0.0, -0.1),
             (2, 0, 2.0, -2.0), (2, 1, 2.0, -1.0), (2, 2, 1.0, 0.0),
             (3, 0, 1.0, -0.999), (3, 1, 3.0, -4.0), (3, 2, 0.2, -0.1)]
    rows += [_row(ours, "this project", 4, "all", l, h, de, 5.0, np.nan, 3.0, dl) for l, h, de, dl in every]
    paper = [(0, 0, 1.0, -0.2, 0.5), (0, 1, 1.0, 0.7, 0.5), (1, 0, 2.0, 0.3, 0.25), (1, 1, 1.0, 0.2, 0.35)]
    rows += [_row("ref (paper)", "paper", 2, "top-k%", l, h, de, sr, ns, 0.0, -0.5) for l, h, de, sr, ns in paper]
    return pd.DataFrame(rows)


def test_compare_models_by_hand(synthetic):
    table = across.compare_models(synthetic).set_index("run")
    assert list(table.index) == ["toy (ours)", "ref (paper)"]
    t = table.loc["toy (ours)"]
    assert t["source"] == "this project" and t["n_layers"] == 4 and t["n_heads"] == 12 and t["n_late"] == 6
    # late top-k% heads with positive self-repair: 0.2, 0.3 (layer 2) and 0.4, 0.1 (layer 3)
    assert t["frac_self_repaired_late"] == pytest.approx(4 / 6)
    assert t["norm_share_late"] == pytest.approx((0.1 + 0.3 + 0.5 + 0.2 + 0.6 + 0.4) / 6)
    # whole-set heads with DE > 0 (10 of 12) strictly between y = -DE and 0: L0H0, L1H1, L2H1, L3H0, L3H2
    assert t["frac_between_all"] == pytest.approx(5 / 10)
    assert t["self_repair_late"] == pytest.approx((0.2 - 0.1 + 0.3 + 0.0 + 0.4 + 0.1) / 6)
    assert t["self_repair_early"] == pytest.approx((0.5 - 0.1 + 0.2 + 0.0 + 0.3 - 0.4) / 6)
    # late top-k% heads with DE > 0: Σ block-norm term / Σ DE
    assert t["block_norm_share_late"] == pytest.approx((0.5 + 0.6 + 0.45 + 0.3) / (1.0 + 2.0 + 0.5 + 1.5))
    p = table.loc["ref (paper)"]
    assert p["source"] == "paper" and p["n_heads"] == 4 and p["n_late"] == 2
    assert p["frac_self_repaired_late"] == pytest.approx(1.0)
    assert p["norm_share_late"] == pytest.approx(0.3)
    assert np.isnan(p["frac_between_all"])  # the release has no whole-set means
    assert p["self_repair_early"] == pytest.approx(0.25) and p["block_norm_share_late"] == 0


def test_compare_models_on_the_release_by_hand(paper, raw_release):
    """The paper models' metrics from the raw CSV: late = layer >= n_layers // 2."""
    table = across.compare_models(paper).set_index("model")
    for model, n_heads in PAPER_HEADS.items():
        L = paper.loc[paper["model"] == model, "n_layers"].iloc[0]
        pct = raw_release.loc[model, "percent_LN_of_DE"]
        late = pct.index.get_level_values("layer") >= L // 2
        sr = (raw_release.loc[model, "logit_diff"] - raw_release.loc[model, "ablated_direct_effects"]
              + raw_release.loc[model, "direct_effects"])
        row = table.loc[model]
        assert row["n_heads"] == n_heads and row["n_late"] == late.sum()
        assert row["norm_share_late"] == pytest.approx(pct[late].mean(), abs=1e-12)
        assert row["frac_self_repaired_late"] == pytest.approx((sr.loc[pct.index][late] > 0).mean(), abs=1e-12)


def test_release_whole_set_beside_ours_by_hand():
    """Fig 2 / 20-22's metric on the release's whole-set means, from the raw CSV; the token counts
    read off the authors' script; the two Pythia-160M whole-set files' agreement."""
    raw = pd.read_csv(across.reference_path(), dtype={"variant": str}, keep_default_na=False)
    table = across.compare_models(across.load_paper_release()).set_index("model")
    for model in ("gpt2-small", "pythia-160m"):
        r = raw[(raw["variant"] == "1.0") & (raw["model"] == model)]
        de = r[r["quantity"] == "direct_effects"].set_index(["layer", "head"])["value"]
        dl = r[r["quantity"] == "logit_diff"].set_index(["layer", "head"])["value"].loc[de.index]
        pos = de > 0
        want = ((dl[pos] < 0) & (dl[pos] > -de[pos])).mean()
        assert table.loc[model, "frac_between_all"] == pytest.approx(want, abs=1e-12)
    assert np.isnan(table.loc["gpt2-medium", "frac_between_all"])  # top-2% files only
    assert across.release_tokens() == 27 * 30 * 128 == 103_680  # ((100,000 // 3,840) + 1) x 3,840
    agree = across.release_agreement()
    assert agree["n"] == 144 and 0.5 < agree["r_direct_effect"] < 0.999
    md = across.release_markdown()
    assert "103,680" in md and "128" in md and f"{agree['r_direct_effect']:.2f}" in md


def test_per_layer_by_hand(synthetic):
    layers = across.per_layer(synthetic)
    assert len(layers) == 4 * 2 + 2  # per run, token set and layer
    got = layers.set_index(["run", "tokens", "layer"])
    assert got.loc[("toy (ours)", "top-k%", 2), "self_repair"] == pytest.approx((0.2 - 0.1 + 0.3) / 3)
    assert got.loc[("toy (ours)", "all", 1), "direct_effect"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert got.loc[("ref (paper)", "top-k%", 1), "direct_effect"] == pytest.approx(1.5)
    assert got.loc[("ref (paper)", "top-k%", 1), "rel_layer"] == 1.0


def test_comparison_markdown_shows_the_computed_numbers(synthetic):
    table = across.compare_models(synthetic)
    md = across.comparison_markdown(table, current="toy")  # no estimates: every verdict cannot tell
    t = table.set_index("run").loc["toy (ours)"]
    for value in (t["frac_self_repaired_late"], t["norm_share_late"], t["frac_between_all"],
                  t["block_norm_share_late"]):
        assert format(value, ".0%") in md
    assert across.PAPER_CITATION in md and "toy (ours)" in md and "ref" in md  # the paper model by name
    assert md.count("**cannot tell**") == len(across.CLAIMS) and "no per-document sums" in md
    assert f"ref {1.0:.0%}" in md and f"ref {0.3:.0%}" in md  # the release's values, one per model
    assert "no interval of their own" in md
    assert not re.search(r"\bnan\b", md, re.I) and "n/a" not in md


def test_the_overview_links_down_to_each_claims_verdicts_after_its_figure(synthetic):
    """With ``below`` (the chapter's FIGURES) the early block lists each claim per run compactly
    (the statement linked to its verdict); :func:`verdict`'s full verdicts and release values are what it showed before,
    claim by claim, each claim's anchor on its first run only."""
    table = across.compare_models(synthetic)
    full = across.comparison_markdown(table, current="toy")
    overview = across.comparison_markdown(table, current="toy", below=across.FIGURES)
    assert 'id="claim-' not in overview and overview.count('<a href="#claim-') == len(across.CLAIMS)
    assert "no interval of their own" not in overview
    assert overview.count(BELOW) == 1  # read3/read4: said once, not once per claim (it printed three times)
    shown = [across.claim_markdown(table, c.key, current="toy") for c in across.CLAIMS]
    assert full == "\n".join([full.splitlines()[0], *shown])
    for claim, text in zip(across.CLAIMS, shown):
        assert text.count(f'id="claim-{claim.key}"') == 1 and "toy (ours)" in text
    ch = across.AcrossChapter(synthetic, table, across.per_layer(synthetic), "toy")
    assert across.verdict(ch, "between") == shown[-1]


def test_run_estimates_by_hand_from_the_cached_sweep(cache):
    """Each run's three statistics by hand with pandas from the sweep's token rows and per-row
    sums; replicates of the norm share recompute every head's mean on resampled documents."""
    from selfrepair.uncertainty import Bootstrap, Clusters

    root, cfg, sweep = cache
    est = across.run_estimates(sweep, 200, 3)
    ph, top = sweep.per_head(), sweep.tokens_frame("top")
    late = ph[ph["layer"] >= sweep.n_layers // 2]
    assert est["many"].value == pytest.approx((late["self_repair"] > 0).mean()) and est["many"].n == len(late)
    pos = ph[ph["direct_effect_all"] > 0]
    band = (pos["delta_logit_all"] < 0) & (pos["delta_logit_all"] > -pos["direct_effect_all"])
    assert est["between"].value == pytest.approx(band.mean()) and est["between"].n == len(pos)

    def norm_share(tokens):
        f = tokens[(tokens["direct_effect"] != 0) & (tokens["layer"] >= sweep.n_layers // 2)]
        share = (f["from_norm"] / f["direct_effect"]).clip(0, 1)
        return share.groupby([f["layer"], f["head"]]).mean().mean()

    assert est["norm_share"].value == pytest.approx(norm_share(top))
    t = across.compare_models(across.load_cached_sweeps(root)).iloc[0]
    assert est["norm_share"].value == pytest.approx(t["norm_share_late"])  # the table's number, same statistic
    clusters = Clusters.documents(sweep.main_document.numpy())
    assert all(e.clusters == clusters.n and e.cluster_unit == "documents" and e.seed == 3 for e in est.values())
    boot = Bootstrap.over(clusters, 200, 3)
    shares = clusters.head_sums(across.clipped_shares(top), ["share"], *sweep.sum_all.shape[:2])
    first = sweep.n_layers // 2
    reps = boot.replicates(lambda x: np.nanmean(
        (x[:, first:, :, 1] / x[:, first:, :, 0]).reshape(len(x), -1), 1), shares)
    for i in (0, 9, 150):
        docs = np.repeat(np.arange(clusters.n), boot.weights[i].astype(int))
        drawn = pd.concat([top[clusters.of_row[top["row"].to_numpy()] == d] for d in docs])
        assert reps[i] == pytest.approx(norm_share(drawn))


@pytest.mark.parametrize("lo, hi, where", [(0.2, 0.4, "inside"), (0.35, 0.5, "below"), (0.1, 0.25, "above")])
def test_the_releases_value_is_placed_against_our_interval(lo, hi, where):
    from selfrepair.uncertainty import Estimate

    e = Estimate((lo + hi) / 2, lo, hi, 8, "late-layer heads", 30, "documents", 0, 1000)
    assert across._against(0.3, e, ".0%").startswith(where)
    paper = pd.DataFrame({"model": ["pythia-160m"], "frac_between_all": [0.3]})
    ours = pd.DataFrame({"model": ["EleutherAI/pythia-160m"], "run": ["p160 (ours)"]})
    text = across.release_values(across.BETWEEN, paper, {"a": 0.3, "b": 0.35}, ours,
                                 {"p160 (ours)": {"between": e}})
    assert f"the release's 30% lies {where} our 95% interval" in text and "30% and 35%" in text
    assert across.paper_model("gpt2") == "gpt2-small" and across.paper_model("tiny-gpt2") is None


def test_comparison_markdown_without_our_runs(paper):
    empty = across.combine(across.load_cached_sweeps("/nonexistent"), paper)
    table = across.compare_models(empty)
    assert set(table["source"]) == {"paper"}
    md = across.comparison_markdown(table)
    assert md and not any(m in md for m in table["run"])  # no verdicts without a run of ours


def test_size_markdown_sets_ours_beside_the_papers_values_and_says_it_is_untested(synthetic):
    """Chapter 6: the current model's late and early mean self-repair beside the released values
    of the same table, where they lie against them, and the candidate explanations said untested."""
    table = across.compare_models(synthetic)
    cfg = across.Config.from_params(model="toy", n_tokens=8192, top_percent=2.0)
    md = across.size_markdown(table, "toy", cfg)
    t, p = table.set_index("run").loc["toy (ours)"], table[table["source"] == "paper"]
    assert f"of {t['self_repair_late']:.3f} logits and the early layers' {t['self_repair_early']:.3f}" in md  # no forced sign after 'of'
    assert f"from {p['self_repair_late'].min():+.3f} to {p['self_repair_late'].max():+.3f} (late)" in md
    assert "**not tested here**" in md and "about 164 tokens" in md and "20,000" in md
    assert not re.search(r"\bnan\b", md, re.I)
    assert across.size_markdown(table[table["source"] != "paper"], "toy", cfg) == ""  # nothing to compare
