"""Chapter 02 (LayerNorm self-repair): selfrepair.layernorm's App. B closed form, S/S' ratios,
App. H's relative boost and norm shares, and selfrepair.chapters.layernorm on a tiny run, checked
against independent computations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from claim_checks import check_outcomes, resampled
from selfrepair import layernorm, load_model
from selfrepair.chapters import layernorm as cl
from selfrepair.chapters import layernorm_claims as lc
from selfrepair.claims import WORDS, Signed, against, anchor, size, thresholds
from selfrepair.uncertainty import Bootstrap, Clusters

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
    from selfrepair.batch import clean_batch

    tok = tokens_for(neox64)
    ro = clean_batch(neox64, tok).readout
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
    left_out = chk["from_heads"] + chk["from_mlps"] + chk["from_block_norms"]
    np.testing.assert_allclose(chk["error"], -chk["ratio"] * left_out, atol=1e-9)
    gemma = load_model("tiny-gemma3", dtype="float64")
    assert not gemma.parallel_residual
    chk = layernorm.appendix_b_check(gemma, tokens_for(gemma), (gemma.n_layers - 1, 0), ["resample"])
    left_out = chk["from_heads"] + chk["from_mlps"] + chk["from_block_norms"]
    assert left_out.abs().max() > 1e-3
    np.testing.assert_allclose(chk["error"], -chk["ratio"] * left_out, atol=1e-5)
    table = layernorm.appendix_b_table(chk)
    assert table["relative_error"].iloc[0] > 1e-3
    assert table["case"].iloc[0] == f"tiny-gemma3 {chk['label'].iloc[0]}, sequential"  # one column for a phone


def test_chapter2_tables_show_few_short_columns():
    """App. B's table hid its numbers at 390 px (nine columns, 700 px wide): the chapter's tables
    show at most five columns under short headers (the rest folded below them), each column of
    the frame behind them."""
    from selfrepair.chapters import layernorm as chapter

    for layout in (chapter.CHECK_TABLE, chapter.RATIOS_TABLE, chapter.APP_D_TABLE):
        assert len(layout.columns) <= 5
        assert all(len(layout.names.get(c, c)) <= 16 for c in layout.columns), layout.columns
    assert chapter.CHECK_TABLE.columns[0] == "case" and "relative_error" in chapter.CHECK_TABLE.columns


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




def test_norm_share_unclipped_and_sample_means():
    top, sample = _tokens_frame(), _tokens_frame(seed=1)
    shares = layernorm.norm_share(top, sample)
    for kind, frame in (("top-k%", top), ("random sample", sample)):
        for component, col in (("final norm", "from_norm"), ("block norms", "from_block_norms")):
            f = frame[(frame["label"] == "L2H1")]
            want = np.mean([a / b for a, b in zip(f[col], f["direct_effect"]) if b != 0])
            got = shares.query("label == 'L2H1' and tokens == @kind and clipping == 'unclipped' "
                               "and component == @component")
            assert got["share"].iloc[0] == pytest.approx(want) and got["n"].iloc[0] == len(f)
    layers = layernorm.layer_shares(shares)
    one = layers.query("tokens == 'top-k%' and clipping == 'clipped' and component == 'final norm' "
                       "and layer == 1")["share"].iloc[0]
    per_head = shares.query("tokens == 'top-k%' and clipping == 'clipped' and component == 'final norm' "
                            "and layer == 1")["share"]
    assert one == pytest.approx(per_head.mean())


# -- App. H: the relative boost -----------------------------------------------------------------
def test_relative_boost_is_the_ratio_minus_one_times_the_logit_gap():
    assert layernorm.relative_boost(1.1, 2.0) == pytest.approx(0.2)
    assert layernorm.relative_boost(0.9, -2.0) == pytest.approx(0.2)  # both signs flip
    assert layernorm.relative_boost(1.0, 14.0) == 0.0
    r, gap = torch.tensor([1.2, 0.95]), torch.tensor([1.0, -2.0])
    torch.testing.assert_close(layernorm.relative_boost(r, gap), torch.tensor([0.2, 0.1]))
    np.testing.assert_allclose(layernorm.relative_boost(r.numpy(), gap.numpy()), [0.2, 0.1], rtol=1e-6)


def _ratio_tokens(seed=0):
    """Per-token rows of one head under two ablations (listed out of order, no "mean"); the random
    sample's rows are extreme so that using them would show."""
    rng = np.random.default_rng(seed)
    parts = []
    for ablation in ("zero", "resample"):
        for kind, n in (("top-k%", 41), ("random sample", 60)):
            top = kind == "top-k%"
            parts.append(pd.DataFrame({
                "layer": 3, "head": 1, "label": "L3H1", "tokens": kind, "ablation": ablation,
                "row": np.arange(n), "pos": 0, "ratio": rng.normal(1.01, 0.03, n) if top else 5.0,
                "logit": rng.normal(1.0, 2.0, n), "competitor_gap": rng.normal(0.5, 1.5, n),
                "direct_effect": rng.normal(0.4, 0.3, n) if top else 100.0,
                "from_norm": rng.normal(0.05, 0.1, n), "self_repair": rng.normal(0.1, 0.2, n)}))
    return pd.concat(parts, ignore_index=True)


def test_ratio_summary_against_a_hand_computation():
    t = _ratio_tokens()
    got = layernorm.ratio_summary(t)
    assert list(got["ablation"]) == ["resample", "zero"]  # ABLATION_ORDER, only those present
    for row in got.itertuples():
        g = t[(t["tokens"] == "top-k%") & (t["ablation"] == row.ablation)]
        ratio, gap = g["ratio"].to_numpy(), g["competitor_gap"].to_numpy()
        boost = [abs((r - 1) * d) for r, d in zip(ratio, gap)]
        assert row.n == 41 and row.label == "L3H1"
        assert row.share_ratio_above_1 == pytest.approx(sum(r > 1 for r in ratio) / 41)
        assert row.median_ratio == pytest.approx(sorted(ratio)[20])
        assert row.median_logit_gap == pytest.approx(sorted(gap)[20])
        assert row.median_abs_boost == pytest.approx(sorted(boost)[20])
        assert row.median_direct_effect == pytest.approx(sorted(g["direct_effect"])[20])
        assert row.mean_from_norm == pytest.approx(g["from_norm"].mean())
        assert row.mean_self_repair == pytest.approx(g["self_repair"].mean())
        # App. H's boost is not the old (S/S' - 1) * logit
        assert row.median_abs_boost != pytest.approx(np.median(np.abs((ratio - 1) * g["logit"])), rel=1e-3)


# -- the chapter's heads ------------------------------------------------------------------------
def test_stand_in_head_rule():
    ph = pd.DataFrame({"layer": [0, 0, 2, 2, 2], "head": [0, 1, 2, 1, 0],
                       "direct_effect": [9.0, 1.0, 0.7, 0.7, 0.5]})
    assert cl.stand_in(ph) == (2, 1)  # the last layer only, largest DE, lower head on ties
    assert cl.stand_in(ph.iloc[::-1]) == (2, 1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ph = pd.DataFrame({"layer": np.repeat(np.arange(4), 5), "head": np.tile(np.arange(5), 4),
                           "direct_effect": rng.normal(0, 1, 20)})
        last = ph[ph["layer"] == 3]
        assert cl.stand_in(ph) == (3, int(last["head"].iloc[int(np.argmax(last["direct_effect"]))]))


# -- the chapter's claims on synthetic results --------------------------------------------------
def synthetic_run(seed=0, n_layers=4, n_heads=3, n_docs=24, per_row=6, parallel=True, last_layer=True) -> dict:
    """Per-token frames shaped like the chapter's, on documents of 1-3 rows with an offset shared by
    a document's tokens: the sweep's top-k% rows of every head, the three ablations' rows of the
    last-layer heads, App. B's check on every row, and the norms-only rows of the late heads."""
    rng = np.random.default_rng(seed)
    doc_of_row = np.repeat(np.arange(n_docs), rng.integers(1, 4, n_docs))
    n_rows = len(doc_of_row)
    row = np.repeat(np.arange(n_rows), per_row)
    pos = np.tile(np.arange(per_row), n_rows)
    shared = rng.normal(0, 1, n_docs)[doc_of_row][row]

    def head_frame(l, h):
        de = np.abs(rng.normal(0.4, 0.3, len(row))) + 0.01 * rng.normal(size=len(row))
        clean = rng.uniform(0.8, 1.2, len(row))
        return pd.DataFrame({"layer": l, "head": h, "label": f"L{l}H{h}", "row": row, "pos": pos,
                             "direct_effect": de, "scale_clean": clean,
                             "scale_ablated": clean / (1 + rng.normal(0.01 * h, 0.02, len(row)) + 0.01 * shared),
                             "competitor_gap": rng.normal(1.0, 2.0, len(row)),
                             "from_norm": rng.normal(0.1 * (h + 1), 0.2, len(row)) * de + 0.05 * shared,
                             "from_block_norms": rng.normal(0.05, 0.05, len(row)),
                             "self_repair": rng.normal(0.1, 0.2, len(row)), "logit": rng.normal(1, 2, len(row))})

    top = pd.concat([head_frame(l, h) for l in range(n_layers) for h in range(n_heads)], ignore_index=True)
    last = top[top["layer"] == n_layers - 1]
    tokens = pd.concat([last.assign(tokens="top-k%", ablation=a,
                                    ratio=rng.normal(1.0 + 0.02 * i + 0.01 * last["head"], 0.02, len(last)))
                        for i, a in enumerate(layernorm.ABLATION_ORDER)], ignore_index=True)
    tokens["scale_ablated"] = tokens["scale_clean"] / tokens["ratio"]
    chk = []
    for role in ("this model", "reference"):  # the reference must not count
        for ablation in layernorm.ABLATION_ORDER:
            n = n_rows * per_row if role == "this model" else 20
            e = rng.normal(0, 1e-4 if role == "this model" else 1.0, n)
            chk.append(pd.DataFrame({"role": role, "model": "m" if role == "this model" else "ref",
                                     "label": f"L{n_layers - 1}H0", "parallel_residual": parallel,
                                     "last_layer": last_layer, "ablation": ablation,
                                     "row": row if role == "this model" else np.arange(n) % 4,
                                     "delta_logit": rng.normal(0, 0.3, n) + 0.1 * (shared if role == "this model" else 0),
                                     "error": e, "from_heads": 0.0, "from_mlps": e, "from_block_norms": 0.0}))
    chk = pd.concat(chk, ignore_index=True)
    late = top[top["layer"] >= n_layers // 2]
    frozen = late.assign(self_repair_norms_only=late["from_norm"] + 0.02 * rng.normal(size=len(late)))
    return {"doc_of_row": doc_of_row, "top": top, "tokens": tokens, "check": chk, "frozen": frozen,
            "check_rows": np.arange(n_rows), "model": SimpleNamespace(n_layers=n_layers, n_heads=n_heads,
                                                                      parallel_residual=parallel,
                                                                      sandwich=not parallel)}


def synthetic_chapter(run: dict, n_boot=200, seed=0) -> cl.LayerNormChapter:
    model, top, tokens = run["model"], run["top"], run["tokens"]
    shares = layernorm.norm_share(top)
    ratio_head = (model.n_layers - 1, 1)
    ch = cl.LayerNormChapter(pd.DataFrame(), ratio_head, ratio_head, ratio_head, tokens,
                             layernorm.ratio_summary(tokens), [ratio_head], pd.DataFrame(), shares,
                             layernorm.layer_shares(shares), pd.DataFrame(), run["check"],
                             layernorm.appendix_b_table(run["check"]), pd.DataFrame(), model, [], {},
                             n_boot=n_boot, seed=seed)
    clusters = Clusters.documents(run["doc_of_row"])
    ch.evidence = cl.evidence(clusters, model, tokens, top, run["check"], run["check_rows"], run["frozen"])
    return ch


def expected_layernorm(tokens: pd.DataFrame, top: pd.DataFrame, check: pd.DataFrame, n_layers: int,
                       frozen: pd.DataFrame | None = None) -> dict:
    """Chapter 2's metrics by hand with pandas, (value, n): S/S′ and App. H over every last-layer
    head, the norm share and the norms-only repair over every late head, App. B over its rows."""
    out, keys = {}, ["layer", "head"]
    last = n_layers - 1
    t = tokens[(tokens["tokens"] == "top-k%") & (tokens["layer"] == last)]
    ratio = t["scale_clean"] / t["scale_ablated"]
    for a in layernorm.ABLATION_ORDER:
        g = t[t["ablation"] == a].assign(above=ratio[t["ablation"] == a] > 1)
        if len(g):
            per_head = g.groupby(keys)["above"].mean()
            out[f"ratio_{a}"] = (per_head.mean(), len(per_head))
    g = top[top["layer"] == last]
    boost = ((g["scale_clean"] / g["scale_ablated"] - 1) * g["competitor_gap"]).abs()
    per_head = g.assign(boost=boost).groupby(keys).apply(lambda f: f["boost"].sum() / f["direct_effect"].sum(),
                                                         include_groups=False)
    out["appendix_h"] = (per_head.mean(), len(per_head))
    late = top[(top["layer"] >= n_layers // 2) & (top["direct_effect"] != 0)]
    per_head = late.assign(s=(late["from_norm"] / late["direct_effect"]).clip(0, 1)).groupby(keys)["s"].mean()
    out["norm_share"] = (per_head.mean(), len(per_head))
    here = check[check["role"] == "this model"]
    rel = max(here[here["ablation"] == a]["error"].abs().mean() / here[here["ablation"] == a]["delta_logit"].abs().mean()
              for a in set(here["ablation"]))
    out["appendix_b"] = (rel, len(here))
    if frozen is not None:
        per_head = frozen.groupby(keys)["self_repair_norms_only"].mean()
        out["norms_only"] = (per_head.mean(), len(per_head))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_verdicts_on_synthetic_results(seed):
    run = synthetic_run(seed)
    ch = synthetic_chapter(run, seed=seed)
    got = {v.claim.key: v for v in cl.verdicts(ch)}
    assert [v.claim for v in cl.verdicts(ch)] == list(cl.CLAIMS)
    want = expected_layernorm(run["tokens"], run["top"], run["check"], 4, run["frozen"])
    assert set(got) == set(want)
    for key, (value, n) in want.items():
        v = got[key]
        assert v.value == pytest.approx(value), key
        assert v.n == n, key
        e = v.estimate  # a cluster bootstrap over the documents, seeded by the chapter's seed
        assert (e.seed, e.n_boot, e.cluster_unit, e.clusters) == (seed, 200, "documents", 24), key
        assert v.word == WORDS[v.claim.rule.decide(v.lo, v.hi)] and e.reliable, key
    assert got["ratio_resample"].unit.startswith("last-layer heads") and got["norm_share"].unit == "late-layer heads"
    # the block norms' share is reported beside the final norm's, never mixed into it
    block = ch.shares.query("tokens == 'top-k%' and clipping == 'clipped' and component == 'block norms'")
    assert block["share"].mean() != pytest.approx(got["norm_share"].value)
    # the per-layer count sits in the same sentence as what the rule decides: the pooled mean
    share = got["norm_share"]
    lo, hi = cl.SHARE.rule.bounds
    assert (f"The rule decides on that one mean, pooled over the {share.n} late-layer heads ({share.value:.0%}, "
            f"{'within' if lo <= share.value <= hi else 'outside'} {lo:.0%}–{hi:.0%}), not layer by layer: taken one "
            "layer at a time, ") in share.detail


@pytest.mark.parametrize("parallel,last_layer", [(True, True), (False, True), (True, False)])
def test_appendix_b_is_decided_only_where_its_assumption_holds(parallel, last_layer):
    ch = synthetic_chapter(synthetic_run(1, parallel=parallel, last_layer=last_layer))
    v = {v.claim.key: v for v in cl.verdicts(ch)}["appendix_b"]
    assert v.lo <= v.value <= v.hi and v.estimate.clusters == 24
    untestable = "the claim's assumption does not hold on this run"
    if parallel and last_layer:
        assert v.word == "holds" and not v.why  # an error of 1e-4 of |Δlogit|-sized noise: below 1e-3
        assert untestable not in cl.render([v])
    else:  # the rule's text names this outcome, not only a straddling or unreliable interval
        assert v.word == "cannot tell" and "assumption fails" in v.why
        assert "cannot tell when" in cl.render([v]) and untestable in cl.render([v])


def test_a_replicate_recomputes_every_heads_statistic_on_resampled_documents():
    """Replicate i equals the metric computed by pandas on the rows of the documents it drew (with
    their multiplicities): each head's share, clipped share and boost recomputed, not carried over."""
    run = synthetic_run(2)
    ch = synthetic_chapter(run)
    ev = ch.evidence
    boot = Bootstrap.over(ev.clusters, 30, 0)
    reps = {"ratio_zero": boot.replicates(lc.mean_over_heads, ev.ratio["zero"]),
            "norm_share": boot.replicates(lc.mean_over_heads, ev.share),
            "appendix_h": boot.replicates(lc.boost_fraction, ev.boost),
            "appendix_b": boot.replicates(lc.worst_relative_error, ev.check)}
    for i in (0, 4, 17):
        w = boot.weights[i]
        frames = {k: resampled(run[k], ev.clusters.of_row, w) for k in ("tokens", "top", "frozen")}
        chk = run["check"]
        here = resampled(chk[chk["role"] == "this model"], ev.clusters.of_row, w)
        want = expected_layernorm(frames["tokens"], frames["top"], here.assign(role="this model"), 4)
        for key, r in reps.items():
            assert r[i] == pytest.approx(want[key][0]), (key, i)
    assert np.unique(reps["ratio_zero"][1:]).size > 1  # replicates do differ


@pytest.mark.parametrize("claim", cl.CLAIMS, ids=lambda c: c.key)
def test_every_outcome_of_every_rule_is_printed_as_it_is_described(claim):
    check_outcomes(claim)


def test_too_few_documents_cannot_tell_and_say_why():
    run = synthetic_run(0, n_docs=6)
    for v in cl.verdicts(synthetic_chapter(run)):
        assert v.word == "cannot tell" and "independent documents" in v.why, v.claim.key


# -- the chapter on a tiny run ------------------------------------------------------------------
TINY = dict(model="tiny-gpt_neox", dataset="tiny", n_tokens=512, seq_len=32, batch_size=4, top_percent=10)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_chapter(tiny_cache):
    cfg = cl.Config.from_params(**TINY, cache_dir=tiny_cache)
    return cfg, cl.measure(cfg, progress=False)


@pytest.fixture(scope="module")
def pinned_chapter(tiny_cache):
    cfg = cl.Config.from_params(**TINY, cache_dir=tiny_cache, ratio_head="L1H0", ablation_head="L0H2",
                                fig15_head="L0H3")
    return cfg, cl.measure(cfg, progress=False)


def test_measure_on_tiny(tiny_chapter):
    cfg, ch = tiny_chapter
    last = ch.per_head[ch.per_head["layer"] == ch.model.n_layers - 1]
    best = last.sort_values(["direct_effect", "head"], ascending=[False, True]).iloc[0]
    assert ch.ratio_head == ch.ablation_head == ch.fig15_head == cl.stand_in(ch.per_head) == (best["layer"], best["head"])
    assert set(ch.heads["reason"][:2]) == {cl.HEAD_RULE} and set(ch.heads["reason"][3:]) == {cl.APP_D_RULE}
    assert ch.heads["reason"][2] == "as the Fig 5 head" and ch.heads["paper"][2] == "L11H0"
    # Fig 6: the norm's self-repair in logits, the mean of from_norm over each head's top-k% tokens
    top = ch.repair[ch.repair["component"] == "final norm"].set_index("label")["self_repair"]
    assert len(top) == ch.model.n_layers * ch.model.n_heads
    np.testing.assert_allclose(top.loc[ch.per_head["label"]].to_numpy(), ch.per_head["from_norm"].to_numpy(),
                               rtol=1e-5, atol=1e-7)
    t = ch.tokens
    assert set(t["ablation"]) == set(ABLATIONS)
    n = t.groupby(["ablation", "tokens"]).size()
    assert n.xs("top-k%", level="tokens").nunique() == 1  # the same instances under each ablation
    np.testing.assert_allclose(t["ratio"] * t["norm_ratio"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(t["ratio"], t["scale_clean"] / t["scale_ablated"], rtol=1e-6)
    # a last-layer head of a parallel model: only the final norm can repair it
    np.testing.assert_allclose(t["self_repair"], t["from_norm"], atol=1e-5)
    # clean DE does not depend on the ablation (single-head runs agree with the sweep)
    de = t.pivot_table(index=["tokens", "row", "pos"], columns="ablation", values="direct_effect")
    np.testing.assert_allclose(de["mean"], de["resample"], atol=1e-5)
    np.testing.assert_allclose(de["zero"], de["resample"], atol=1e-5)
    pd.testing.assert_frame_equal(ch.ratios, layernorm.ratio_summary(ch.ratio_tokens))
    assert (ch.check_table["max_abs_error"] < 1e-5).all()
    assert set(ch.check_table["role"]) == {"this model"}  # exact here: no reference needed


def test_single_head_runs_are_cached_and_read_at_the_sweeps_instances(tiny_chapter):
    from selfrepair.experiment import measure, open_model, open_tokens
    from selfrepair.heads import HeadsSpec
    from selfrepair.measure import Cache

    cfg, ch = tiny_chapter
    model = open_model(cfg)
    data = open_tokens(cfg, model, progress=False)
    last = {(ch.model.n_layers - 1, h) for h in range(ch.model.n_heads)}  # every last-layer head: the class
    heads = tuple(sorted({ch.ratio_head, ch.ablation_head, ch.fig15_head, *ch.app_d} | last))  # one run
    assert len(heads) == ch.model.n_heads
    for ablation in ("mean", "zero"):
        spec = HeadsSpec(heads=heads, ablation=ablation)
        assert Cache(cfg.cache_dir).path(spec, model, data).exists()
        run = measure(cfg, spec, data, progress=False)
        assert run.heads == list(heads)
        for layer, head in heads:
            rows = ch.tokens[(ch.tokens["ablation"] == ablation) & (ch.tokens["layer"] == layer)
                             & (ch.tokens["head"] == head)]
            b, p = rows["row"].to_numpy(copy=True), rows["pos"].to_numpy(copy=True)
            for q in ("delta_logit", "self_repair", "from_norm", "scale_ablated"):
                np.testing.assert_allclose(rows[q], getattr(run, q)[layer, head][b, p].numpy(), atol=1e-6)


def test_logit_and_competitor_gap_match_the_models_own_logits(tiny_chapter):
    """App. H's inputs, independently: the centred clean logit of the next token, and the gap to
    the strongest other token with the final norm's bias (not rescaled) taken out, from the
    model's full output and its weights."""
    from selfrepair.experiment import open_model, open_tokens

    cfg, ch = tiny_chapter
    model = open_model(cfg)
    tokens = open_tokens(cfg, model, progress=False).tokens
    with torch.no_grad():
        logits = model.hf(tokens).logits.double()
    centred = logits - logits.mean(-1, keepdim=True)
    t = ch.ratio_tokens
    b, p = torch.tensor(t["row"].to_numpy(copy=True)), torch.tensor(t["pos"].to_numpy(copy=True))
    target = tokens[b, p + 1]
    at = centred[b, p]
    np.testing.assert_allclose(t["logit"], at.gather(1, target[:, None])[:, 0].numpy(), atol=1e-4)
    others = at.scatter(1, target[:, None], -float("inf"))
    rival = others.argmax(1)
    w = model.unembed_weight.double()
    bias = model.module(model.adapter.final_norm).bias.double()  # GPT-NeoX's LayerNorm has one
    unembed_bias = getattr(model.module(model.adapter.unembed), "bias", None)
    gap = at.gather(1, target[:, None])[:, 0] - at.gather(1, rival[:, None])[:, 0] - (w[target] - w[rival]) @ bias
    if unembed_bias is not None:
        gap = gap - (unembed_bias.double()[target] - unembed_bias.double()[rival])
    np.testing.assert_allclose(t["competitor_gap"], gap.numpy(), atol=1e-4)


def _frozen_rows(cfg, ch, top):
    """The norms-only pass at the sweep's top-k% rows of the late heads, from the cached result."""
    from selfrepair.experiment import measure, open_tokens
    from selfrepair.frozen_norm import FrozenNormSpec

    first = ch.model.n_layers // 2
    late = tuple((l, h) for l in range(first, ch.model.n_layers) for h in range(ch.model.n_heads))
    res = measure(cfg, FrozenNormSpec(heads=late), open_tokens(cfg, ch.model, progress=False), progress=False)
    rows = []
    for i, (layer, head) in enumerate(res.heads):
        f = top[(top["layer"] == layer) & (top["head"] == head)]
        rows.append(f.assign(self_repair_norms_only=[float(res.norms_only["self_repair"][i, r, p])
                                                     for r, p in zip(f["row"], f["pos"])]))
    return pd.concat(rows, ignore_index=True)


def test_verdicts_on_the_tiny_run(tiny_chapter):
    """Point values and n by hand from the sweep's top-k% rows, the single-head runs and the
    cached frozen-norm result; the clusters are the token set's documents."""
    from selfrepair.experiment import head_sweep, open_tokens

    cfg, ch = tiny_chapter
    got = {v.claim.key: v for v in ch.verdicts}
    top = head_sweep(cfg, "resample", progress=False).tokens_frame("top")
    want = expected_layernorm(ch.tokens, top, ch.check, ch.model.n_layers, _frozen_rows(cfg, ch, top))
    assert set(got) == set(want)
    for key, (value, n) in want.items():
        assert got[key].value == pytest.approx(value, rel=1e-6, nan_ok=True), key
        assert got[key].n == n, key
    data = open_tokens(cfg, ch.model, progress=False)
    assert ch.evidence.clusters.n == len(set(data.main_document.tolist()))
    assert got["appendix_b"].estimate.clusters == len(set(ch.evidence.clusters.of_row[ch.check["row"]]))
    text = cl.on_this_model(ch)
    assert text.startswith(f"**On {cfg.model}**") and f"seed {cfg.seed}" in text.splitlines()[0]
    lines = text.splitlines()[1:]
    assert len(lines) == len(ch.verdicts)
    for line, v in zip(lines, ch.verdicts):  # the overview; each claim's verdict comes below its figure
        assert v.claim.statement in line and f"**{v.word}**" not in line and f'<a href="#{anchor(v.claim)}">' in line
        line = cl.verdict(ch, v.claim.key)
        # App. B's .1e as 1.6×10⁻⁶, not 1.6e-06; a signed value (norms-only) as its size, its sign in words
        shown = size(v.value, v.claim.fmt, thresholds(v.claim.rule)) if isinstance(v.claim.reading, Signed) \
            else against(v.value, v.claim.fmt, thresholds(v.claim.rule))
        assert f"**{shown}**" in line
        assert "e-0" not in line


def test_pinned_heads(tiny_chapter, pinned_chapter):
    _, default = tiny_chapter
    cfg, ch = pinned_chapter
    assert ch.ratio_head == (1, 0) and ch.ablation_head == (0, 2) and ch.fig15_head == (0, 3)
    assert list(ch.heads["label"][:3]) == ["L1H0", "L0H2", "L0H3"]
    assert list(ch.heads["reason"]) == (["pinned by ratio_head", "pinned by ablation_head", "pinned by fig15_head"]
                                        + [cl.APP_D_RULE] * 3)
    assert ch.app_d[0] == (1, 0)  # App. D's default starts from the ratio head
    assert set(ch.ratio_tokens["label"]) == {"L1H0"} and set(ch.ablation_tokens["label"]) == {"L0H2"}
    f15 = ch.fig15_tokens  # Fig 15: its own head, under the three ablations, on the uniform sample too
    assert set(f15["label"]) == {"L0H3"} and set(f15["ablation"]) == set(ABLATIONS)
    assert (f15["tokens"] == "random sample").any()
    assert set(ch.ratios["label"]) == {"L1H0"}
    pd.testing.assert_frame_equal(ch.ratios, layernorm.ratio_summary(ch.ratio_tokens))
    # a layer-0 head of a parallel model is repaired by layer 1 as well as by the norm
    a = ch.ablation_tokens
    assert (a["self_repair"] - a["from_norm"]).abs().max() > 1e-4
    # the norm shares do not depend on which heads the figures show
    pd.testing.assert_frame_equal(ch.shares, default.shares)
    assert {v.claim.key: v.value for v in ch.verdicts}["norm_share"] == pytest.approx(
        {v.claim.key: v.value for v in default.verdicts}["norm_share"])


def test_ratio_head_alone_and_appendix_b_off_its_assumptions(tiny_cache, tiny_chapter):
    cfg = cl.Config.from_params(**TINY, cache_dir=tiny_cache, ratio_head="L0H1")
    ch = cl.measure(cfg, progress=False)
    assert ch.ratio_head == ch.ablation_head == (0, 1)
    assert list(ch.heads["reason"][:3]) == ["pinned by ratio_head", "as ratio_head", "as the Fig 5 head"]
    t = ch.check_table
    here, ref = t[t["role"] == "this model"], t[t["role"] == "reference"]
    assert not here["last_layer"].any() and (here["relative_error"] > 1e-3).all()
    assert ref["last_layer"].all() and ref["parallel_residual"].all() and (ref["max_abs_error"] < 1e-9).all()
    v = {v.claim.key: v for v in ch.verdicts}["appendix_b"]
    assert v.value == pytest.approx(here["relative_error"].max()) and v.holds is None
    assert v.n == int(here["n"].sum()) and "not in the last layer" in v.why
    _, default = tiny_chapter
    for key in ("ratio_resample", "ratio_mean", "ratio_zero", "appendix_h", "norm_share"):  # the class, not the head
        assert {x.claim.key: x.value for x in ch.verdicts}[key] == pytest.approx(
            {x.claim.key: x.value for x in default.verdicts}[key])


# -- App. D (Fig 16-17): Fig 4's procedure for a list of heads --------------------------------------
def test_app_d_heads_default_rule(tiny_chapter):
    _, ch = tiny_chapter
    last = ch.per_head[ch.per_head["layer"] == ch.model.n_layers - 1].sort_values(
        ["direct_effect", "head"], ascending=[False, True])
    ranked = [(int(l), int(h)) for l, h in zip(last["layer"], last["head"])]
    assert ch.app_d == ranked[:cl.N_APP_D] and ch.app_d[0] == ch.ratio_head
    assert cl.last_layer_ranking(ch.per_head) == ranked
    _check_app_d(ch)


def _check_app_d(ch):
    """Shares of S/S' > 1 per head and ablation, by hand from the per-token scales."""
    labels = ["L{}H{}".format(*h) for h in ch.app_d]
    assert list(ch.app_d_ratios["label"].drop_duplicates()) == labels
    assert set(ch.app_d_tokens["label"]) == set(labels)
    assert list(ch.heads.loc[ch.heads["figure"].str.startswith("App. D"), "label"]) == labels
    for label in labels:
        for ablation in ("resample", "mean", "zero"):
            t = ch.tokens[(ch.tokens["label"] == label) & (ch.tokens["ablation"] == ablation)
                          & (ch.tokens["tokens"] == "top-k%")]
            row = ch.app_d_ratios[(ch.app_d_ratios["label"] == label) & (ch.app_d_ratios["ablation"] == ablation)]
            assert len(row) == 1 and row["n"].iloc[0] == len(t) > 0
            share = float((t["scale_clean"] / t["scale_ablated"] > 1).mean())
            assert row["share_ratio_above_1"].iloc[0] == pytest.approx(share)
    # the ratio head's rows are Fig 4's own numbers: one computation, not two
    if ch.app_d[0] == ch.ratio_head:
        first = ch.app_d_ratios[ch.app_d_ratios["label"] == labels[0]].reset_index(drop=True)
        pd.testing.assert_frame_equal(first, ch.ratios)
    md = cl.app_d_markdown(ch)
    for label in labels:
        assert f"**{label}**" in md
    zero = ch.app_d_ratios[ch.app_d_ratios["ablation"] == "zero"]
    assert f"{zero['share_ratio_above_1'].iloc[0]:.1%} (zero)" in md


def test_app_d_pinned_heads(tiny_cache):
    cfg = cl.Config.from_params(**TINY, cache_dir=tiny_cache, ratio_heads=["L0H3", "L1H1", "L0H3"])
    ch = cl.measure(cfg, progress=False)
    assert ch.app_d == [(0, 3), (1, 1)]  # in the given order, repeats dropped
    assert set(ch.heads.loc[ch.heads["figure"].str.startswith("App. D"), "reason"]) == {"pinned by ratio_heads"}
    assert list(ch.heads.loc[ch.heads["figure"].str.startswith("App. D"), "paper"]) == [
        "L11H10 (GPT-2 small)", "L11H3 (GPT-2 small)"]
    _check_app_d(ch)


def test_app_d_heads_must_be_heads_of_the_model(tiny_cache):
    from selfrepair.errors import InputError

    cfg = cl.Config.from_params(**TINY, cache_dir=tiny_cache, ratio_heads=["L1H0", "L9H0"])
    with pytest.raises(InputError, match="ratio_heads: L9H0 is not a head of tiny-gpt_neox"):
        cl.measure(cfg, progress=False)


def test_ratio_summary_keeps_the_heads_order():
    t = pd.concat([_ratio_tokens(1).assign(label="L3H2"), _ratio_tokens()], ignore_index=True)
    got = layernorm.ratio_summary(t, order=["L3H1", "L3H2"])
    assert list(got["label"]) == ["L3H1", "L3H1", "L3H2", "L3H2"]
    pd.testing.assert_frame_equal(got.iloc[:2].reset_index(drop=True), layernorm.ratio_summary(_ratio_tokens()))


def test_head_tokens_refuses_results_from_other_tokens(tiny_chapter):
    from selfrepair.errors import SelfRepairError
    from selfrepair.existence import sweep_frames
    from selfrepair.experiment import head_sweep, measure, open_model, open_tokens
    from selfrepair.heads import HeadsSpec

    cfg, ch = tiny_chapter
    _, top, sample = sweep_frames(head_sweep(cfg, "resample", progress=False))
    data = open_tokens(cfg, open_model(cfg), progress=False)
    run = measure(cfg, HeadsSpec(heads=(ch.ratio_head,), ablation="zero"), data, progress=False)
    assert len(layernorm.head_tokens(top, sample, ch.ratio_head, {"zero": run}))
    run.direct_effect = run.direct_effect + 1.0  # as if computed on another corpus
    with pytest.raises(SelfRepairError, match="different tokens"):
        layernorm.head_tokens(top, sample, ch.ratio_head, {"zero": run})


def test_frozen_norm_section_on_the_tiny_run(tiny_chapter):
    """The late heads of the tiny (parallel, 2-layer) model are last-layer heads: only the final
    norm is downstream, so freezing it leaves no self-repair and the norms-only pass is the live one."""
    from selfrepair.frozen_norm import summary

    cfg, ch = tiny_chapter
    f = ch.frozen
    assert list(f["label"]) == [f"L1H{h}" for h in range(ch.model.n_heads)]
    assert (f["n"] == ch.per_head.set_index("label").loc[f["label"], "n_top"].to_numpy()).all()
    np.testing.assert_allclose(f["self_repair_frozen"], 0, atol=1e-6)
    np.testing.assert_allclose(f["self_repair_norms_only"], f["self_repair"], atol=1e-6)
    np.testing.assert_allclose(f["removed"], f["from_norm"], atol=1e-6)
    assert f["from_norm"].abs().max() > 1e-3
    s = summary(f)
    text = cl.frozen_markdown(ch)
    assert text.startswith(f"**On {cfg.model}**")
    assert f"Of the {s['n_positive']} heads with positive live self-repair, {s['n_halved']} lose" in text
    assert "rounding." in text


def test_a_share_of_few_heads_is_a_count():
    """1 of 4 heads reads as "1 of these 4 heads", not "25% (95% interval 25% …)"; of 10 heads or
    more, the share keeps its interval."""
    from selfrepair.uncertainty import Estimate

    share_of_few = lc.share_of_few
    quarter = Estimate(0.25, 0.25, 0.25, None, "", 64, "documents", 0, 100)
    assert share_of_few(quarter, 4) == "1 of these 4 heads"
    assert share_of_few(Estimate(0.0, 0.0, 0.5, None, "", 64, "documents", 0, 100), 4) == "0 of these 4 heads"
    assert share_of_few(Estimate(0.25, 0.1, 0.4, None, "", 64, "documents", 0, 100), 12) == (
        "25% (95% interval 10% to 40%) of these heads")
