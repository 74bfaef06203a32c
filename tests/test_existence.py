"""Invariants of selfrepair.existence (chapter 01) on synthetic frames and a tiny sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrepair import existence
from selfrepair.errors import InputError


def synthetic_per_head(n_layers=6, n_heads=4, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            de = rng.normal(0.3, 0.4)
            dde = -de + rng.normal(0, 0.05)
            dl = rng.normal(-0.6, 0.4) * de
            rows.append({"layer": l, "head": h, "label": f"L{l}H{h}", "direct_effect": de,
                         "delta_direct_effect": dde, "delta_logit": dl, "self_repair": dl - dde})
    return pd.DataFrame(rows)


def synthetic_tokens(per_head: pd.DataFrame, n=40, seed=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for r in per_head.itertuples():
        de = np.abs(rng.normal(r.direct_effect, 0.2, n)) + 0.01
        dde = -de + rng.normal(0, 0.02, n)
        dl = -0.5 * de + rng.normal(0, 0.3, n)
        parts.append(pd.DataFrame({"layer": r.layer, "head": r.head, "label": r.label,
                                   "row": np.arange(n), "pos": 0, "direct_effect": de,
                                   "delta_direct_effect": dde, "delta_logit": dl,
                                   "self_repair": dl - dde}))
    return pd.concat(parts, ignore_index=True)


def test_region_boundaries_and_signs():
    de = [1.0, 1.0, 1.0, 1.0, 1.0, -0.5, 0.0]
    dl = [-0.5, 0.2, 0.0, -1.0, -1.5, -0.1, 0.3]
    assert list(existence.region(de, dl)) == ["repaired", "overcorrected", "overcorrected",
                                              "broken", "broken", "no direct effect",
                                              "no direct effect"]


@settings(max_examples=50, deadline=None)
@given(st.floats(-5, 5, allow_nan=False), st.floats(-5, 5, allow_nan=False))
def test_overcorrection_is_self_repair_above_removed_effect(dde, dl):
    """For a token whose ablation removes direct effect, Δlogit > 0 <=> self_repair > -ΔDE."""
    if dde >= 0:
        return
    sr = dl - dde
    assert (dl > 0) == (sr > -dde) or np.isclose(sr, -dde)


def test_classify_heads_repair_fraction():
    ph = synthetic_per_head()
    out = existence.classify_heads(ph)
    removed = -ph["delta_direct_effect"]
    ok = removed > 0
    np.testing.assert_allclose(out.loc[ok, "repair_fraction"], ph.loc[ok, "self_repair"] / removed[ok])
    assert out.loc[~ok, "repair_fraction"].isna().all()
    assert set(out["category"]) <= set(existence.CATEGORIES)


def test_layer_means():
    ph = synthetic_per_head()
    lm = existence.layer_means(ph)
    assert list(lm["layer"]) == list(range(6)) and (lm["n_heads"] == 4).all()
    np.testing.assert_allclose(lm["self_repair"], ph.groupby("layer")["self_repair"].mean())


def test_featured_rule_is_deterministic_and_late():
    ph = synthetic_per_head()
    a = existence.featured_heads(ph)
    b = existence.featured_heads(ph.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 4 and (a["layer"] >= 3).all()
    late = ph[ph["layer"] >= 3]
    assert a["direct_effect"].min() >= late["direct_effect"].nlargest(4).min()
    assert "second half" in a["reason"].iloc[0]


def test_featured_ties_go_to_lower_layer_then_head():
    ph = synthetic_per_head().assign(direct_effect=1.0)
    got = existence.featured_heads(ph, n=3)
    assert list(got["label"]) == ["L3H0", "L3H1", "L3H2"]


def test_featured_override_and_errors():
    ph = synthetic_per_head()
    got = existence.featured_heads(ph, override=("L1H2", "L0H0"))
    assert list(got["label"]) == ["L1H2", "L0H0"]
    with pytest.raises(InputError, match="not heads of this model"):
        existence.featured_heads(ph, override=("L9H0",))


def test_bootstrap_contains_mean_and_is_deterministic():
    tok = synthetic_tokens(synthetic_per_head())
    a = existence.bootstrap_means(tok, "delta_logit", n_boot=300, seed=7)
    b = existence.bootstrap_means(tok, "delta_logit", n_boot=300, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert ((a["lo"] <= a["mean"]) & (a["mean"] <= a["hi"])).all()
    np.testing.assert_allclose(a["mean"], tok.groupby(["layer", "head"])["delta_logit"].mean())
    c = existence.bootstrap_means(tok, "delta_logit", n_boot=300, seed=8)
    assert not np.allclose(a["lo"], c["lo"])


def test_bootstrap_of_a_head_does_not_depend_on_other_heads():
    tok = synthetic_tokens(synthetic_per_head())
    whole = existence.bootstrap_means(tok, n_boot=200, seed=0)
    one = existence.bootstrap_means(tok[tok["label"] == "L2H1"], n_boot=200, seed=0)
    pd.testing.assert_frame_equal(whole[whole["label"] == "L2H1"].reset_index(drop=True), one)


def test_bootstrap_interval_narrows_with_more_tokens():
    ph = synthetic_per_head(n_layers=1, n_heads=1)
    small = existence.bootstrap_means(synthetic_tokens(ph, n=20), n_boot=500)
    big = existence.bootstrap_means(synthetic_tokens(ph, n=2000), n_boot=500)
    assert (big["hi"] - big["lo"]).iloc[0] < (small["hi"] - small["lo"]).iloc[0]


def test_token_spread():
    tok = synthetic_tokens(synthetic_per_head())
    sp = existence.token_spread(tok)
    assert len(sp) == 24
    assert ((sp["q10"] <= sp["q25"]) & (sp["q25"] <= sp["median"]) & (sp["median"] <= sp["q75"])
            & (sp["q75"] <= sp["q90"])).all()
    shares = sp[["share_repaired", "share_overcorrected", "share_broken"]]
    assert ((shares >= 0) & (shares <= 1)).all().all()
    assert (shares.sum(1) <= 1 + 1e-12).all()
    g = tok[tok["label"] == "L0H0"]
    removed = g["delta_direct_effect"] < 0
    want = (g.loc[removed, "delta_logit"] > 0).mean()
    assert sp.loc[sp["label"] == "L0H0", "share_overcorrecting"].iloc[0] == pytest.approx(want)


def test_imperfection_summary_counts():
    ph = synthetic_per_head()
    tok = synthetic_tokens(ph)
    boot = existence.bootstrap_means(tok, n_boot=100)
    s = existence.imperfection_summary(ph, boot).set_index("group")
    assert s.loc["all", "n_heads"] == 24
    assert s.loc["early", "n_heads"] + s.loc["late", "n_heads"] == 24
    cats = [f"n_{c}" for c in existence.CATEGORIES]
    assert s.loc["all", cats].sum() == 24
    assert s.loc["all", "n_repaired_ci_below_0"] <= s.loc["all", "n_repaired"]
    assert s.loc["early", "layers"] == "0-2" and s.loc["late", "layers"] == "3-5"


@pytest.fixture(scope="module")
def tiny_existence(tmp_path_factory):
    from selfrepair.config import RunConfig

    cfg = RunConfig.from_params(model="tiny-gpt_neox", dataset="tiny", n_tokens=512, seq_len=32,
                                batch_size=4, top_percent=10,
                                cache_dir=str(tmp_path_factory.mktemp("cache")))
    return existence.measure(cfg, n_boot=200, progress=False)


def test_measure_on_tiny_sweep(tiny_existence):
    ex = tiny_existence
    assert len(ex.per_head) == 8 and len(ex.boot) == 8 and len(ex.spread) == 8
    # per-head means of the top tokens are what the sweep reports
    means = ex.top.groupby(["layer", "head"])["self_repair"].mean().to_numpy()
    np.testing.assert_allclose(means, ex.per_head["self_repair"].to_numpy(), atol=1e-5)
    text = existence.on_this_model(ex, "tiny-gpt_neox")
    assert text.startswith("**On tiny-gpt_neox**")
    for claim in ("Many later-layer heads self-repair", "Early layers often negative", "Imperfect",
                  "Noisy"):
        assert claim in text
    assert text.count("**holds**") + text.count("**differs**") == 4
