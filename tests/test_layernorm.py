"""Invariants of selfrepair.layernorm (chapter 02): App. B closed form, S/S' ratios, norm shares."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from selfrepair import layernorm, load_model

ABLATIONS = ["resample", "mean", "zero"]


def tokens_for(model, batch=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (batch, seq), generator=g)


@pytest.fixture(scope="module")
def neox64():
    return load_model("tiny-gpt_neox", dtype="float64")


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_appendix_b_exact_for_last_layer_parallel_head(neox64, ablation):
    assert neox64.parallel_residual
    last = neox64.n_layers - 1
    for head in range(neox64.n_heads):
        chk = layernorm.appendix_b_check(neox64, tokens_for(neox64), (last, head), [ablation])
        assert chk["delta_logit"].abs().mean() > 1e-3  # not vacuous
        np.testing.assert_allclose(chk["closed_form"], chk["delta_logit"], atol=1e-5, rtol=0)
        assert (chk[["from_heads", "from_mlps", "from_block_norms"]] == 0).all().all()


def test_appendix_b_float32_within_1e5():
    model = load_model("tiny-gpt_neox")
    chk = layernorm.appendix_b_check(model, tokens_for(model), (model.n_layers - 1, 1))
    assert set(chk["ablation"]) == set(ABLATIONS)
    assert chk["error"].abs().max() < 1e-5


def test_appendix_b_needs_the_bias_free_logit(neox64):
    """Using the full centred logit (with the final-norm and unembedding bias) breaks the identity:
    the bias is not divided by the scale."""
    chk = layernorm.appendix_b_check(neox64, tokens_for(neox64), (neox64.n_layers - 1, 0), ["zero"])
    from selfrepair.direct_effect import readout
    from selfrepair.heads import clean_pass

    tok = tokens_for(neox64)
    ro = readout(neox64, tok, clean_pass(neox64, tok))
    bias = ro.bias.double().flatten().numpy()
    assert np.abs(bias).max() > 1e-3
    wrong = layernorm.appendix_b_delta_logit(chk["ratio"], chk["scaled_logit"] + bias,
                                             chk["delta_direct_effect"])
    assert np.abs(wrong - chk["delta_logit"]).max() > 1e-4


def test_appendix_b_not_exact_off_its_assumptions(neox64):
    """Not the last layer (parallel), or a sequential sandwich model: the left-out terms are the
    error (up to the S/S' factor), so the check reports them."""
    chk = layernorm.appendix_b_check(neox64, tokens_for(neox64), (0, 0), ["zero"])
    assert not chk["last_layer"].any()
    assert chk["error"].abs().max() > 1e-4
    gemma = load_model("tiny-gemma3", dtype="float64")
    assert not gemma.parallel_residual
    chk = layernorm.appendix_b_check(gemma, tokens_for(gemma), (gemma.n_layers - 1, 0), ["resample"])
    left_out = chk["from_heads"] + chk["from_mlps"] + chk["from_block_norms"]
    assert left_out.abs().max() > 1e-3
    np.testing.assert_allclose(chk["error"], -chk["ratio"] * left_out, atol=1e-5)
    table = layernorm.appendix_b_table(chk)
    assert table["relative_error"].iloc[0] > 1e-3


def test_appendix_b_formula_scalars():
    assert layernorm.appendix_b_delta_logit(1.0, 5.0, -0.3) == pytest.approx(-0.3)
    assert layernorm.appendix_b_delta_logit(1.1, 10.0, -1.0) == pytest.approx(1.0 - 1.1)


def _tokens_frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(3):
        for head in range(2):
            de = rng.normal(0.2, 0.5, n)
            rows.append(pd.DataFrame({
                "layer": layer, "head": head, "label": f"L{layer}H{head}", "row": np.arange(n),
                "pos": 0, "direct_effect": de, "from_norm": rng.normal(0.05, 0.3, n),
                "from_block_norms": rng.normal(0.0, 0.1, n) if layer else 0.0}))
    return pd.concat(rows, ignore_index=True)


def test_norm_share_clipping_and_means():
    top = _tokens_frame()
    top.loc[0, "direct_effect"] = 0.0  # left out, no division by zero
    shares = layernorm.norm_share(top, _tokens_frame(seed=1))
    clipped = shares[shares["clipping"] == "clipped"]["share"]
    assert ((clipped >= 0) & (clipped <= 1)).all()
    assert set(shares["tokens"]) == {"top-k%", "random sample"}
    assert set(shares["component"]) == {"final norm", "block norms"}
    f = top[(top["label"] == "L1H0") & (top["direct_effect"] != 0)]
    want = (f["from_norm"] / f["direct_effect"]).clip(0, 1).mean()
    got = shares.query("label == 'L1H0' and tokens == 'top-k%' and clipping == 'clipped' "
                       "and component == 'final norm'")["share"].iloc[0]
    assert got == pytest.approx(want)
    unclipped = shares.query("tokens == 'top-k%' and clipping == 'unclipped'")["share"]
    assert unclipped.abs().max() > 1  # the extreme values of Fig 9
    layers = layernorm.layer_shares(shares)
    assert set(layers["layer"]) == {0, 1, 2} and (layers["n_heads"] == 2).all()


def test_norm_share_skips_block_norms_when_absent():
    top = _tokens_frame().assign(from_block_norms=0.0)
    assert set(layernorm.norm_share(top)["component"]) == {"final norm"}


def test_featured_head_rule():
    ph = pd.DataFrame({"layer": [0, 0, 2, 2, 2], "head": [0, 1, 0, 1, 2],
                       "direct_effect": [9.0, 1.0, 0.5, 0.7, 0.7]})
    assert layernorm.featured_head(ph) == (2, 1)  # last layer, largest DE, lower head on ties
    assert layernorm.featured_head(ph, ("L0H1",)) == (0, 1)


@pytest.fixture(scope="module")
def tiny_chapter(tmp_path_factory):
    from selfrepair.config import RunConfig

    cfg = RunConfig.from_params(model="tiny-gpt_neox", dataset="tiny", n_tokens=512, seq_len=32,
                                batch_size=4, top_percent=10,
                                cache_dir=str(tmp_path_factory.mktemp("cache")))
    return cfg, layernorm.measure(cfg, progress=False)


def test_measure_on_tiny(tiny_chapter):
    cfg, ch = tiny_chapter
    assert ch.head[0] == ch.model.n_layers - 1
    t = ch.tokens
    assert set(t["ablation"]) == set(ABLATIONS)
    n = t.groupby(["ablation", "tokens"]).size()
    assert n.xs("top-k%", level="tokens").nunique() == 1  # the same instances under each ablation
    np.testing.assert_allclose(t["ratio"] * t["norm_ratio"], 1.0, rtol=1e-6)
    # a last-layer head of a parallel model: only the final norm can repair it
    np.testing.assert_allclose(t["self_repair"], t["from_norm"], atol=1e-5)
    # clean DE does not depend on the ablation (single-head runs agree with the sweep)
    de = t.pivot_table(index=["tokens", "row", "pos"], columns="ablation", values="direct_effect")
    np.testing.assert_allclose(de["mean"], de["resample"], atol=1e-5)
    np.testing.assert_allclose(de["zero"], de["resample"], atol=1e-5)
    r = ch.ratios.set_index("ablation")
    assert r["share_ratio_above_1"].between(0, 1).all()
    assert r.loc["zero", "paper_share_pythia160m_L11H2"] == 1.0
    assert (ch.check_table["max_abs_error"] < 1e-5).all()
    text = layernorm.on_this_model(ch, cfg.model)
    assert text.startswith("**On tiny-gpt_neox**") and "90.66%" in text


def test_single_head_is_cached(tiny_chapter):
    cfg, ch = tiny_chapter
    from selfrepair.experiment import cache_params, cache_path, open_model

    path = cache_path(cfg, f"head-{ch.label}-zero",
                      cache_params(cfg, open_model(cfg), ablation="zero", head=ch.label,
                                   kind="single_head"))
    assert path.exists()
    again = layernorm.single_head(cfg, ch.head, "zero", progress=False)
    assert again.heads == [ch.head]


def test_head_tokens_refuses_results_from_other_tokens(tiny_chapter):
    from selfrepair.errors import SelfRepairError

    cfg, ch = tiny_chapter
    run = layernorm.single_head(cfg, ch.head, "zero", progress=False)
    run.direct_effect = run.direct_effect + 1.0  # as if computed on another corpus
    with pytest.raises(SelfRepairError, match="different tokens"):
        layernorm.head_tokens(ch.top, ch.sample, ch.head, {"zero": run})
