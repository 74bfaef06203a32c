"""Chapter 01 (self-repair exists, imperfect, noisy): selfrepair.existence on synthetic frames and
selfrepair.chapters.existence on a tiny run, checked against independent computations.

Token sets, as in the paper: Fig 1 uses each head's top-k% tokens, Fig 2 and the "imperfect"
regions use every token (whole-set means), Fig 3 and the noise statistics a uniform sample."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from selfrepair.claims import wilson
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrepair import existence
from selfrepair.chapters import existence as ce
from selfrepair.chapters import featured
from selfrepair.errors import InputError
from selfrepair.structure import top_k

QUANTITIES = list(existence.MEANS)


# -- synthetic frames ---------------------------------------------------------------------------
def synthetic_per_head(n_layers=6, n_heads=4, seed=0) -> pd.DataFrame:
    """A per-head frame shaped like ``Sweep.per_head()``: ``<q>`` top-k% means, ``<q>_all``
    whole-set means (deliberately different from the top-k% ones)."""
    rng = np.random.default_rng(seed)
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            row = {"layer": l, "head": h, "label": f"L{l}H{h}", "n_top": 10, "n_all": 500}
            for suffix, scale in (("", 1.0), ("_all", 0.3)):
                de = rng.normal(0.3, 0.4) * scale
                dde = -de + rng.normal(0, 0.05) * scale
                dl = rng.normal(-0.6, 0.4) * de
                terms = rng.normal(0, 0.1, 4) * scale
                row.update({f"direct_effect{suffix}": de, f"ablated_direct_effect{suffix}": de + dde,
                            f"delta_direct_effect{suffix}": dde, f"delta_logit{suffix}": dl,
                            f"self_repair{suffix}": dl - dde, f"from_heads{suffix}": terms[0],
                            f"from_mlps{suffix}": terms[1], f"from_norm{suffix}": terms[2],
                            f"from_block_norms{suffix}": terms[3]})
            rows.append(row)
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


def head_region(de: float, dl: float) -> str:
    """Fig 2/3's regions, written out case by case."""
    if de <= 0:
        return "no direct effect"
    if dl >= 0:
        return "overcorrected"
    if dl <= -de:
        return "broken"
    return "repaired"


# -- selfrepair.existence -----------------------------------------------------------------------
def test_region_boundaries_and_signs():
    de = [1.0, 1.0, 1.0, 1.0, 1.0, -0.5, 0.0]
    dl = [-0.5, 0.2, 0.0, -1.0, -1.5, -0.1, 0.3]
    assert list(existence.region(de, dl)) == [head_region(a, b) for a, b in zip(de, dl)]
    assert list(existence.region(de, dl)) == ["repaired", "overcorrected", "overcorrected",
                                              "broken", "broken", "no direct effect",
                                              "no direct effect"]


@settings(max_examples=100, deadline=None)
@given(st.floats(0.01, 5), st.floats(-5, -0.01), st.floats(-5, 5))
def test_overcorrected_region_is_repair_at_least_the_removed_effect(de, dde, dl):
    """For a token with DE > 0 whose ablation removes direct effect (ΔDE < 0): the region is
    "overcorrected" exactly when self_repair = Δlogit − ΔDE >= −ΔDE (repair >= damage)."""
    sr = dl - dde
    got = existence.region([de], [dl])[0]
    assert got == head_region(de, dl)
    if not math.isclose(sr, -dde, abs_tol=1e-9):
        assert (got == "overcorrected") == (sr > -dde)


def test_top_and_whole_set_means_read_their_own_columns():
    ph = synthetic_per_head()
    top, whole = existence.top_means(ph), existence.whole_set_means(ph)
    for q in QUANTITIES:
        np.testing.assert_array_equal(top[q], ph[q])
        np.testing.assert_array_equal(whole[q], ph[f"{q}_all"])
    assert (top["n_tokens"] == ph["n_top"]).all() and (whole["n_tokens"] == ph["n_all"]).all()
    assert set(top["tokens"]) == {"top-k%"} and set(whole["tokens"]) == {"all"}
    assert list(top["label"]) == list(ph["label"]) == list(whole["label"])


def test_classify_heads_regions_and_repair_fraction():
    ph = synthetic_per_head()
    out = existence.classify_heads(ph)
    assert list(out["category"]) == [head_region(a, b) for a, b in
                                     zip(ph["direct_effect"], ph["delta_logit"])]
    removed = -ph["delta_direct_effect"]
    ok = removed > 0
    np.testing.assert_allclose(out.loc[ok, "repair_fraction"], ph.loc[ok, "self_repair"] / removed[ok])
    assert out.loc[~ok, "repair_fraction"].isna().all()
    assert set(out["category"]) <= set(existence.CATEGORIES)


def test_layer_means():
    ph = synthetic_per_head()
    lm = existence.layer_means(ph)
    assert list(lm["layer"]) == list(range(6)) and (lm["n_heads"] == 4).all()
    for layer in range(6):
        want = np.mean([r.self_repair for r in ph.itertuples() if r.layer == layer])
        assert lm.loc[lm["layer"] == layer, "self_repair"].iloc[0] == pytest.approx(want)


def test_bootstrap_contains_mean_and_is_deterministic():
    tok = synthetic_tokens(synthetic_per_head())
    a = existence.bootstrap_means(tok, "delta_logit", n_boot=300, seed=7)
    b = existence.bootstrap_means(tok, "delta_logit", n_boot=300, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert ((a["lo"] <= a["mean"]) & (a["mean"] <= a["hi"])).all()
    np.testing.assert_allclose(a["mean"], tok.groupby(["layer", "head"])["delta_logit"].mean())
    assert (a["n"] == 40).all()
    c = existence.bootstrap_means(tok, "delta_logit", n_boot=300, seed=8)
    assert not np.allclose(a["lo"], c["lo"])


def test_bootstrap_interval_is_the_percentile_interval_of_the_heads_own_generator():
    """Per-head seeding: head (l, h) resamples with ``default_rng([seed, l, h])``."""
    tok = synthetic_tokens(synthetic_per_head(n_layers=2, n_heads=2), n=25)
    got = existence.bootstrap_means(tok, n_boot=400, seed=3, ci=0.9).set_index("label")
    for (layer, head), g in tok.groupby(["layer", "head"]):
        x = g["delta_logit"].to_numpy()
        rng = np.random.default_rng([3, layer, head])
        boots = x[rng.integers(0, len(x), size=(400, len(x)))].mean(1)
        row = got.loc[f"L{layer}H{head}"]
        assert row["lo"] == pytest.approx(np.quantile(boots, 0.05))
        assert row["hi"] == pytest.approx(np.quantile(boots, 0.95))


def test_bootstrap_of_a_head_does_not_depend_on_other_heads():
    tok = synthetic_tokens(synthetic_per_head())
    whole = existence.bootstrap_means(tok, n_boot=200, seed=0)
    one = existence.bootstrap_means(tok[tok["label"] == "L2H1"], n_boot=200, seed=0)
    pd.testing.assert_frame_equal(whole[whole["label"] == "L2H1"].reset_index(drop=True), one)
    shuffled = existence.bootstrap_means(tok.sample(frac=1.0, random_state=0).sort_values(
        ["layer", "head", "row"], kind="mergesort"), n_boot=200, seed=0)
    pd.testing.assert_frame_equal(whole, shuffled)


def test_bootstrap_interval_narrows_with_more_tokens():
    ph = synthetic_per_head(n_layers=1, n_heads=1)
    small = existence.bootstrap_means(synthetic_tokens(ph, n=20), n_boot=500)
    big = existence.bootstrap_means(synthetic_tokens(ph, n=2000), n_boot=500)
    assert (big["hi"] - big["lo"]).iloc[0] < (small["hi"] - small["lo"]).iloc[0]


def test_token_spread():
    tok = synthetic_tokens(synthetic_per_head())
    sp = existence.token_spread(tok)
    assert len(sp) == 24 and (sp["n"] == 40).all()
    assert ((sp["q10"] <= sp["q25"]) & (sp["q25"] <= sp["median"]) & (sp["median"] <= sp["q75"])
            & (sp["q75"] <= sp["q90"])).all()
    shares = sp[["share_repaired", "share_overcorrected", "share_broken"]]
    assert ((shares >= 0) & (shares <= 1)).all().all()
    assert (shares.sum(1) <= 1 + 1e-12).all()
    for label in ("L0H0", "L4H3"):
        g = tok[tok["label"] == label]
        row = sp[sp["label"] == label].iloc[0]
        removed = g["delta_direct_effect"] < 0
        assert row["share_overcorrecting"] == pytest.approx((g.loc[removed, "delta_logit"] > 0).mean())
        de, dl, sr = g["direct_effect"].to_numpy(), g["delta_logit"].to_numpy(), g["self_repair"].to_numpy()
        assert row["corr_de_delta_logit"] == pytest.approx(np.corrcoef(de, dl)[0, 1])
        assert row["iqr_over_de"] == pytest.approx((np.percentile(sr, 75) - np.percentile(sr, 25)) / de.mean())
        assert row["share_repaired"] == pytest.approx(np.mean([head_region(a, b) == "repaired"
                                                              for a, b in zip(de, dl)]))


def test_imperfection_summary_against_a_hand_count():
    ph = synthetic_per_head()
    tok = synthetic_tokens(ph)
    boot = existence.bootstrap_means(tok, n_boot=100)
    s = existence.imperfection_summary(ph, boot).set_index("group")
    assert s.loc["all", "n_heads"] == 24
    assert s.loc["early", "layers"] == "0-2" and s.loc["late", "layers"] == "3-5"
    hi = {(r.layer, r.head): r.hi for r in boot.itertuples()}
    for group, layers in (("early", range(0, 3)), ("late", range(3, 6)), ("all", range(6))):
        heads = [r for r in ph.itertuples() if r.layer in layers]
        cats = [head_region(r.direct_effect, r.delta_logit) for r in heads]
        for c in existence.CATEGORIES:
            assert s.loc[group, f"n_{c}"] == cats.count(c)
        rep = [r for r, c in zip(heads, cats) if c == "repaired"]
        positive = [r for r in heads if r.direct_effect > 0]
        assert s.loc[group, "n_positive_de"] == len(positive)
        assert s.loc[group, "share_repaired"] == pytest.approx(len(rep) / len(positive))
        assert s.loc[group, "mean_lost_fraction"] == pytest.approx(
            np.mean([-r.delta_logit / r.direct_effect for r in rep]))
        assert s.loc[group, "n_repaired_ci_below_0"] == sum(hi[(r.layer, r.head)] < 0 for r in rep)
        assert s.loc[group, "share_negative_self_repair"] == pytest.approx(
            np.mean([r.self_repair < 0 for r in heads]))


# -- Fig 3's featured heads (selfrepair.chapters.existence.choose_featured) ---------------------
def expected_featured(ph: pd.DataFrame, spread: pd.DataFrame, n: int = 4) -> list[str]:
    """The rule written out: late layers are the second half; first the n/2 late heads with the
    largest whole-set self-repair among those with a positive whole-set DE, then the late heads
    (not yet chosen) with a top-k% DE at least the late heads' median and the smallest |r| on the
    sample (no r: last); ties to the lower layer, then head."""
    first = (int(ph["layer"].max()) + 1) // 2
    late = [r for r in ph.itertuples() if r.layer >= first]
    positive = sorted((r for r in late if r.direct_effect_all > 0),
                      key=lambda r: (-r.self_repair_all, r.layer, r.head))
    chosen = [r.label for r in positive[:n // 2]]
    median = float(np.median([r.direct_effect for r in late]))
    corr = {(s.layer, s.head): s.corr_de_delta_logit for s in spread.itertuples()}

    def abs_r(r):
        c = corr.get((r.layer, r.head), np.nan)
        return abs(c) if np.isfinite(c) else np.inf

    rest = sorted((r for r in late if r.label not in chosen and r.direct_effect >= median),
                  key=lambda r: (abs_r(r), r.layer, r.head))
    return chosen + [r.label for r in rest[:n - len(chosen)]]


def synthetic_spread(ph: pd.DataFrame, seed=5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return ph[["layer", "head", "label"]].assign(corr_de_delta_logit=rng.uniform(-1, 1, len(ph)))


@pytest.mark.parametrize("seed", range(6))
def test_choose_featured_follows_the_papers_descriptions(seed):
    ph = synthetic_per_head(seed=seed)
    spread = synthetic_spread(ph, seed=seed + 10)
    got = ce.choose_featured(ph, spread)
    assert list(got["label"]) == expected_featured(ph, spread)
    assert list(got.columns) == list(ph.columns)
    # deterministic: neither the order of the rows nor of the spread changes the choice
    again = ce.choose_featured(ph.sample(frac=1.0, random_state=seed), spread.iloc[::-1])
    pd.testing.assert_frame_equal(got, again)


def test_choose_featured_on_a_hand_built_frame():
    """6 layers, late = 3-5. Whole-set: L1H0 has much self-repair but is early; L5H3 and L3H0 have
    more than any other late head but no positive whole-set DE, so L4H0 (2.0) and L5H2 (1.5) are
    "repaired on average". Top-k% DE: the late median is 0.5, so L5H1 (|r| = 0.01) is too small;
    among the big ones L4H1 (|r| = 0.05) and L5H0 (0.2) beat L3H1 (0.9); L3H2 has no r on the
    sample and comes last."""
    rows = {  # label: (top-k% DE, whole-set DE, whole-set self-repair, r on the sample)
        "L0H0": (0.0, 0.0, 0.0, 0.0), "L1H0": (2.0, 0.5, 9.0, 0.0),
        "L3H0": (0.4, -0.1, 5.0, 0.3), "L3H1": (0.9, 0.2, 0.1, -0.9), "L3H2": (0.8, 0.2, 0.0, np.nan),
        "L4H0": (0.3, 0.1, 2.0, 0.0), "L4H1": (0.6, 0.1, 0.2, -0.05),
        "L5H0": (0.7, 0.3, 1.0, 0.2), "L5H1": (0.2, 0.1, -1.0, 0.01), "L5H2": (0.5, 0.05, 1.5, 0.5),
        "L5H3": (0.1, -1.0, 99.0, 0.0)}
    ph = pd.DataFrame([{"layer": int(k[1]), "head": int(k[3]), "label": k, "direct_effect": v[0],
                        "direct_effect_all": v[1], "self_repair_all": v[2]} for k, v in rows.items()])
    spread = ph[["layer", "head"]].assign(corr_de_delta_logit=[v[3] for v in rows.values()])
    got = ce.choose_featured(ph, spread)
    assert list(got["label"]) == ["L4H0", "L5H2", "L4H1", "L5H0"]
    assert list(got["label"]) == expected_featured(ph, spread)
    # six: L5H0 (1.0) is the third repaired head; then by |r| L4H1, L3H1, and L3H2 without r
    assert list(ce.choose_featured(ph, spread, n=6)["label"]) == ["L4H0", "L5H2", "L5H0", "L4H1",
                                                                  "L3H1", "L3H2"]
    # a head missing from the sample's spread has no r either
    missing = spread[~((spread["layer"] == 4) & (spread["head"] == 1))]
    assert list(ce.choose_featured(ph, missing)["label"]) == ["L4H0", "L5H2", "L5H0", "L3H1"]


def test_pinned_featured_heads_are_used_as_given():
    ph = synthetic_per_head()

    def never(_):
        raise AssertionError("the rule must not run when heads are pinned")

    got = featured(ph, ("L1H2", "L0H0"), never, rule=ce.FEATURED_RULE, stands_for=ce.PAPER_FIG3)
    assert list(got["label"]) == ["L1H2", "L0H0"]
    assert set(got["reason"]) == {"pinned by the parameters"} and set(got["stands_for"]) == {""}
    chosen = featured(ph, None, lambda p: ce.choose_featured(p, synthetic_spread(p)),
                      rule=ce.FEATURED_RULE, stands_for=ce.PAPER_FIG3)
    assert list(chosen["stands_for"]) == list(ce.PAPER_FIG3[:len(chosen)])
    assert set(chosen["reason"]) == {ce.FEATURED_RULE}
    with pytest.raises(InputError, match="not heads of this model"):
        featured(ph, ("L9H0",), never, rule="")


# -- the chapter's claims on synthetic results --------------------------------------------------
def expected_verdicts(top, whole, boot, spread) -> dict[str, tuple[float, int]]:
    """The four metrics of chapter 1, by hand: (value, n)."""
    first = (int(top["layer"].max()) + 1) // 2
    late = [r for r in top.itertuples() if r.layer >= first]
    many = np.mean([r.self_repair > 0 for r in late])
    positive = [r for r in whole.itertuples() if r.direct_effect > 0]
    repaired = [r for r in positive if -r.direct_effect < r.delta_logit < 0]
    hi = {(b.layer, b.head): b.hi for b in boot.itertuples()}
    imperfect = np.mean([hi[(r.layer, r.head)] < 0 for r in repaired]) if repaired else np.nan
    median = np.median([r.direct_effect for r in late])
    corr = {(s.layer, s.head): s.corr_de_delta_logit for s in spread.itertuples()}
    big = [r for r in late if r.direct_effect >= median]
    noisy = np.mean([corr[(r.layer, r.head)] > -0.5 for r in big])
    return {"many": (many, len(late)), "exists": (len(repaired) / len(positive), len(positive)),
            "imperfect": (imperfect, len(repaired)), "noisy": (noisy, len(big))}


def synthetic_existence(seed=0) -> ce.Existence:
    ph = synthetic_per_head(seed=seed)
    top = existence.classify_heads(existence.top_means(ph))
    whole = existence.classify_heads(existence.whole_set_means(ph))
    sample = synthetic_tokens(whole.assign(direct_effect=whole["direct_effect"].abs()), n=30, seed=seed)
    boot = existence.bootstrap_means(sample, n_boot=100, seed=seed)
    spread = synthetic_spread(ph, seed=seed + 1).assign(share_overcorrecting=0.1)
    empty = pd.DataFrame()
    return ce.Existence(top=top, whole=whole, top_tokens=empty, sample=sample, featured=empty, boot=boot,
                        spread=spread, spread_top=empty, summary=empty, verdicts=[], meta={})


@pytest.mark.parametrize("seed", range(4))
def test_verdicts_on_synthetic_results(seed):
    r = synthetic_existence(seed)
    got = {v.claim.key: v for v in ce.verdicts(r)}
    assert [v.claim for v in ce.verdicts(r)] == list(ce.CLAIMS)
    want = expected_verdicts(r.top, r.whole, r.boot, r.spread)
    for key, (value, n) in want.items():
        assert got[key].value == pytest.approx(value, nan_ok=True), key
        assert got[key].n == n, key
        # every chapter-1 metric is a share: a Wilson interval, and a verdict only if it is clear
        lo, hi = wilson(round(value * n), n) if n else (np.nan, np.nan)
        assert (got[key].lo, got[key].hi) == pytest.approx((lo, hi), nan_ok=True), key
        assert got[key].holds == got[key].claim.rule.decide(lo, hi), key


def test_exists_and_imperfect_read_the_whole_set_means_not_the_top_ones():
    """Making every top-k% mean 'broken' changes neither whole-set claim; making the whole-set
    means broken removes every repaired head."""
    r = synthetic_existence(1)
    base = {v.claim.key: v.value for v in ce.verdicts(r)}
    broken_top = r.top.assign(delta_logit=-2 * r.top["direct_effect"].abs() - 1)
    r.top = existence.classify_heads(broken_top)
    moved = {v.claim.key: v.value for v in ce.verdicts(r)}
    assert moved["exists"] == base["exists"] and moved["imperfect"] == pytest.approx(base["imperfect"], nan_ok=True)
    r.whole = existence.classify_heads(r.whole.assign(delta_logit=-2 * r.whole["direct_effect"].abs() - 1))
    assert base["exists"] > 0
    assert {v.claim.key: v.value for v in ce.verdicts(r)}["exists"] == 0


def test_on_this_model_reports_the_sample_actually_drawn():
    """sample_size is a cap: a run with fewer instances samples all of them, and says so."""
    r = synthetic_existence(2)
    r.meta = {"model": "m", "n_tokens": 620, "seq_len": 32, "ablation": "resample", "top_percent": 2.0,
              "sample_size": 5000}
    r.verdicts = ce.verdicts(r)
    n = int(r.sample.groupby(["layer", "head"]).size().max())
    intro = ce.on_this_model(r).splitlines()[0]
    assert f"sample of {n:,} tokens" in intro and "5,000" not in intro


# -- the chapter on a tiny run ------------------------------------------------------------------
N_TOKENS, SEQ_LEN, TOP = 5120, 64, 2.0  # 80 rows x 63 = 5,040 instances: more than the 5,000 sampled
CHECKED = [(0, 1), (1, 2)]  # heads compared token by token with an independent self_repair run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from selfrepair.experiment import head_sweep, open_model, open_tokens
    from selfrepair.heads import self_repair

    params = dict(model="tiny-gpt_neox", dataset="tiny", n_tokens=N_TOKENS, seq_len=SEQ_LEN,
                  batch_size=16, top_percent=TOP, n_boot=200,
                  cache_dir=str(tmp_path_factory.mktemp("cache")))
    cfg = ce.Config.from_params(**params)
    ex = ce.measure(cfg, progress=False)
    sweep = head_sweep(cfg, cfg.ablation, progress=False)  # cached
    model = open_model(cfg)
    data = open_tokens(cfg, model, progress=False)
    res = self_repair(model, data, "resample", heads=CHECKED, progress=False)
    return dict(cfg=cfg, params=params, ex=ex, sweep=sweep, res=res, model=model, data=data)


def _head(frame, layer, head):
    return frame[(frame["layer"] == layer) & (frame["head"] == head)]


def _values(res, q, layer, head, frame=None):
    t = getattr(res, q)[layer, head].double()
    if frame is None:
        return t.flatten().numpy()
    return t[frame["row"].to_numpy(copy=True), frame["pos"].to_numpy(copy=True)].numpy()


def test_whole_set_means_are_means_over_every_token(tiny):
    ex, sweep, res = tiny["ex"], tiny["sweep"], tiny["res"]
    pd.testing.assert_frame_equal(ex.whole, existence.classify_heads(existence.whole_set_means(sweep.per_head())))
    assert (ex.whole["n_tokens"] == tiny["data"].n_instances).all()
    assert np.array_equal(res.corrupt_tokens.numpy(), sweep.corrupt_tokens.numpy())  # same TokenSet
    for layer, head in CHECKED:
        row = _head(ex.whole, layer, head).iloc[0]
        for q in ("direct_effect", "delta_logit", "self_repair", "from_norm", "from_heads"):
            assert row[q] == pytest.approx(_values(res, q, layer, head).mean(), abs=1e-6), q
        assert row["category"] == head_region(row["direct_effect"], row["delta_logit"])
    # the regions and the summary of "imperfect" are those of the whole-set means
    s = ex.summary.set_index("group")
    for c in existence.CATEGORIES:
        assert s.loc["all", f"n_{c}"] == (ex.whole["category"] == c).sum()


def test_top_means_are_means_over_each_heads_top_tokens(tiny):
    ex, res = tiny["ex"], tiny["res"]
    k = top_k(tiny["data"].n_instances, TOP)
    assert (ex.top["n_tokens"] == k).all()
    assert (ex.top_tokens.groupby(["layer", "head"]).size() == k).all()
    for layer, head in CHECKED:
        de = _values(res, "direct_effect", layer, head)
        idx = np.argsort(-de, kind="stable")[:k]
        row = _head(ex.top, layer, head).iloc[0]
        for q in ("direct_effect", "delta_logit", "self_repair"):
            assert row[q] == pytest.approx(_values(res, q, layer, head)[idx].mean(), abs=1e-5), q
        # not vacuous: the top-k% view differs from the whole set
        assert row["direct_effect"] > _head(ex.whole, layer, head)["direct_effect"].iloc[0] + 0.01
    # per-head means of the top tokens are what the per-head frame reports
    means = ex.top_tokens.groupby(["layer", "head"])["self_repair"].mean().to_numpy()
    np.testing.assert_allclose(means, ex.top["self_repair"].to_numpy(), atol=1e-5)


def test_spread_is_computed_on_the_uniform_sample(tiny):
    ex, res, data = tiny["ex"], tiny["res"], tiny["data"]
    n = min(5000, data.n_instances)
    assert data.n_instances > 5000 and n == 5000
    size = ex.sample.groupby(["layer", "head"]).size()
    assert len(size) == 8 and (size == n).all()
    keys = ex.sample.groupby("label")[["row", "pos"]].apply(lambda g: tuple(map(tuple, g.to_numpy())))
    assert keys.nunique() == 1  # the same instances for every head
    assert len(set(keys.iloc[0])) == n
    pd.testing.assert_frame_equal(ex.spread, existence.token_spread(ex.sample))
    pd.testing.assert_frame_equal(ex.spread_top, existence.token_spread(ex.top_tokens))
    assert (ex.spread["n"] == n).all()
    assert (ex.spread_top["n"] == top_k(data.n_instances, TOP)).all()
    k = top_k(data.n_instances, TOP)
    for layer, head in CHECKED:
        s = _head(ex.sample, layer, head)
        for q in ("direct_effect", "delta_logit", "self_repair"):
            np.testing.assert_allclose(s[q], _values(res, q, layer, head, s), atol=1e-5)
        de, dl = _values(res, "direct_effect", layer, head, s), _values(res, "delta_logit", layer, head, s)
        assert _head(ex.spread, layer, head)["corr_de_delta_logit"].iloc[0] == pytest.approx(
            np.corrcoef(de, dl)[0, 1], abs=1e-4)
        every_de, every_dl = _values(res, "direct_effect", layer, head), _values(res, "delta_logit", layer, head)
        idx = np.argsort(-every_de, kind="stable")[:k]
        assert _head(ex.spread_top, layer, head)["corr_de_delta_logit"].iloc[0] == pytest.approx(
            np.corrcoef(every_de[idx], every_dl[idx])[0, 1], abs=1e-3)
        b = _head(ex.boot, layer, head).iloc[0]
        assert b["n"] == n and b["mean"] == pytest.approx(dl.mean(), abs=1e-6)


def test_featured_heads_default_and_pinned(tiny):
    ex, sweep = tiny["ex"], tiny["sweep"]
    want = expected_featured(sweep.per_head(), ex.spread)
    assert list(ex.featured["label"]) == want and len(want) >= 2
    assert set(ex.featured["reason"]) == {ce.FEATURED_RULE}
    assert list(ex.featured["stands_for"]) == list(ce.PAPER_FIG3[:len(want)])
    cfg = ce.Config.from_params(**tiny["params"], featured_heads=["L1H2", "L0H0"])
    pinned = ce.measure(cfg, progress=False)  # the sweep is cached: featured_heads is not in its key
    assert list(pinned.featured["label"]) == ["L1H2", "L0H0"]
    assert set(pinned.featured["reason"]) == {"pinned by the parameters"}
    assert set(pinned.featured["stands_for"]) == {""}
    pd.testing.assert_frame_equal(pinned.whole, ex.whole)


def test_verdicts_on_the_tiny_run(tiny):
    ex = tiny["ex"]
    got = {v.claim.key: v for v in ex.verdicts}
    # the spread the NOISY claim reads is recomputed from the sample; the regions from the sweep
    spread = ex.sample.groupby(["layer", "head"]).apply(
        lambda g: np.corrcoef(g["direct_effect"], g["delta_logit"])[0, 1], include_groups=False)
    spread = spread.rename("corr_de_delta_logit").reset_index()
    whole = existence.whole_set_means(tiny["sweep"].per_head())
    top = existence.top_means(tiny["sweep"].per_head())
    want = expected_verdicts(top, whole, ex.boot, spread)
    for key, (value, n) in want.items():
        assert got[key].value == pytest.approx(value, nan_ok=True), key
        assert got[key].n == n, key
    text = ce.on_this_model(ex)
    assert text.startswith(f"**On {tiny['cfg'].model}**")
    assert f"sample of {min(5000, tiny['data'].n_instances):,} tokens" in text.splitlines()[0]
    lines = text.splitlines()[1:]
    assert len(lines) == len(ce.CLAIMS)
    for line, v in zip(lines, ex.verdicts):
        assert f"**{format(v.value, v.claim.fmt)}**" in line and f" {v.n:,} " in line
        assert f"**{v.word}**" in line and "95% interval" in line
