"""Chapter 5's verdicts (selfrepair.chapters.hydra_claims) on the uncertainty layer: each statistic
against a by-hand numpy computation from the result's tensors, bootstrap replicates that recompute
it on resampled prompts, the σ′ reading beside the clean one, and the task gate."""

from __future__ import annotations

import numpy as np
import pytest

from selfrepair import hydra_scale as hs
from selfrepair.chapters import hydra as chapter
from selfrepair.chapters import hydra_claims as hcl
from selfrepair.hydra import before_after, effects_frame, impact_summary
from selfrepair.hydra_regression import erasure, erasure_cases, regression
from selfrepair.structure import span
from selfrepair.uncertainty import Bootstrap

from selfrepair.chapters.hydra_answer import FOLD_TITLE, other_readings, seen
from test_hydra import synthetic_result


def chapter_of(res, n_boot=200, seed=0):
    eff = hs.with_ablated_scale(effects_frame(res), res)
    ch = chapter.HydraChapter(res, eff, regression(eff), impact_summary(eff), before_after(res), erasure(res),
                              [], {}, {"model": "synthetic"}, regression_ablated=regression(eff, "ablated"),
                              erasure_cases=erasure_cases(res))
    chapter.decide(ch, n_boot, seed)
    return ch


@pytest.fixture(scope="module")
def deep():
    """30 prompts, 8 layers: enough prompts for reliable intervals; every prompt 'correct'."""
    res = synthetic_result(n=30, L=8, P=2, seed=4)
    res.target = res.ml_token.clone()
    return res, chapter_of(res)


def by_hand(res, prompts=None) -> dict:
    """Every verdict's statistic from the raw tensors with loops (optionally on a list of prompts,
    repeats allowed: a bootstrap replicate)."""
    n, C = res.clean_de.shape
    L = C // 2
    idx = list(range(n)) if prompts is None else list(prompts)
    de = res.clean_de.numpy()[idx]
    drop = -res.delta_logit.mean(2).numpy()[idx]
    dde = res.delta_de.mean(2).numpy()[idx]
    down = res.downstream().numpy()
    ce = np.array([[dde[i, m][down[m]].sum() for m in range(C)] for i in range(len(idx))])
    attn = [2 * l for l in range(L)]
    margin = 0.1 * np.abs(de[:, attn]).mean()
    out = {"unembed": float(np.mean(de[:, attn] - drop[:, attn] > margin))}
    mid = list(span(L, "middle"))
    out["restored"] = sum(ce[:, 2 * l].sum() for l in mid) / sum(-dde[:, 2 * l, 2 * l].sum() for l in mid)
    past = [l for l in range(L) if l / L > 13 / 32 and down[2 * l].any()]
    out["max_slope"] = max(np.polyfit(de[:, 2 * l], ce[:, 2 * l], 1)[0] for l in past)
    late = list(span(L, "last_quarter"))
    xs = [dde[i, 2 * a, 2 * a] for i in range(len(idx)) for a in range(late[0])]
    ys = [dde[i, 2 * a, [2 * l + 1 for l in late]].sum() for i in range(len(idx)) for a in range(late[0])]
    out["erasure"] = np.polyfit(xs, ys, 1)[0]
    own = res.ablated_de.mean(2).numpy()[idx]
    out["own"] = (sum(abs(own[i, 2 * l, 2 * l]) for i in range(len(idx)) for l in range(L))
                  / sum(abs(de[i, 2 * l]) for i in range(len(idx)) for l in range(L)))
    rest = total = 0.0
    for a in range(L):
        later = [2 * l for l in range(L) if down[2 * a, 2 * l]]
        if len(later) >= 2:
            v = np.abs(dde[:, 2 * a, later])
            rest += (v.sum(1) - v.max(1)).sum()
            total += v.sum()
    out["local"] = rest / total
    return out


def test_verdicts_against_a_computation_by_hand(deep):
    res, ch = deep
    want, v = by_hand(res), {x.claim.key: x for x in ch.verdicts}
    assert list(v) == [c.key for c in hcl.CLAIMS]
    for key, claim_key in (("unembed", "unembed"), ("restored", "restored"), ("max_slope", "slope"),
                           ("erasure", "erasure"), ("own", "own"), ("local", "localised")):
        assert v[claim_key].value == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        e = v[claim_key].estimate
        assert e.clusters == 30 and e.cluster_unit == "prompts" and e.seed == 0 and e.n_boot == 200
        assert v[claim_key].word == {True: "holds", False: "differs", None: "cannot tell"}[
            v[claim_key].claim.rule.decide(e.lo, e.hi)], key
    L = res.n_layers
    assert v["unembed"].n == 30 * L and v["restored"].n == 30 * len(span(L, "middle"))
    assert v["erasure"].n == 30 * span(L, "last_quarter")[0]


def test_replicates_recompute_each_statistic_on_resampled_prompts(deep):
    """Replicate i of each statistic equals the by-hand computation on the prompts replicate i drew
    (with their multiplicities): the margin, the slopes, the ratios are recomputed, not carried."""
    res, ch = deep
    ev = ch.evidence
    boot = Bootstrap.over(ev.clusters, 40, 3)
    share_of = lambda t: t[:, 0] / t[:, 1]  # noqa: E731
    got = {"unembed": hcl.share_exceeding(ev, boot.weights),
           "restored": boot.replicates(share_of, np.c_[ev.ce["clean"][:, ev.mid].sum(1),
                                                       ev.lost["clean"][:, ev.mid].sum(1)]),
           "max_slope": boot.replicates(lambda t: hcl.max_slope(t, ev.past), hcl.layer_moments(ev, "clean")),
           "erasure": boot.replicates(lambda t: hcl.least_squares(t)[0], ev.erasure),
           "own": boot.replicates(share_of, np.c_[ev.own.sum(1), ev.clean.sum(1)]),
           "local": boot.replicates(share_of, ev.local)}
    for i in (0, 5, 17, 33):
        drawn = np.repeat(np.arange(ev.n), boot.weights[i].astype(int))
        want = by_hand(res, drawn)
        for key, reps in got.items():
            assert reps[i] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (key, i)
    assert np.unique(got["restored"][1:]).size > 1


def test_both_readings_of_sigma_are_estimated_and_the_verdict_reads_the_clean_one(deep):
    res, ch = deep
    e, r = ch.estimates, ch.readings.set_index("scale")
    assert list(ch.readings["scale"]) == ["clean", "ablated"]
    assert r.loc["clean", "restored_mid"] == e.restored["clean"].value == pytest.approx(ch.numbers["restored_mid"])
    assert r.loc["ablated", "restored_mid"] == pytest.approx(ch.numbers["restored_mid_ablated"])
    v = {x.claim.key: x for x in ch.verdicts}
    assert v["restored"].estimate is e.restored["clean"] and v["slope"].estimate is e.max_slope["clean"]
    for scale in hs.SCALES:
        for key in ("restored_mid", "max_slope", "r2", "slope_mid"):
            assert r.loc[scale, f"{key}_lo"] < r.loc[scale, f"{key}_hi"]
    text = chapter.scale_markdown(ch)
    assert "compensation restores" not in text and "S/S′ of" in text
    # issue 25: Which σ?'s table shows the two claims' statistics at both readings in three columns,
    # the restored share said from its sign as the verdict says it, and folds nothing (the old fold
    # repeated the columns shown above it)
    t = chapter.scale_table(ch)
    assert t.columns == ("reading", "restored", "max_slope") and "<details" not in t._repr_html_()
    cells = t.shown()
    for i, scale in enumerate(hs.SCALES):
        assert cells.iloc[i, 1] == hcl.said(e.restored[scale]) and cells.iloc[i, 2] == e.max_slope[scale].prose(".2f")
        assert not cells.iloc[i, 1].startswith("-")
    assert f"steepest slope past layer {hcl.SLOPE_FROM * 8:.1f} of 8" in t.shown().columns


def test_a_model_that_fails_the_task_gets_no_hydra_verdict_and_the_text_says_so(deep):
    res, _ = deep
    failed = synthetic_result(n=30, L=8, P=2, seed=4)
    failed.target = failed.ml_token + 1  # no prompt completed correctly
    ch = chapter_of(failed)
    v = {x.claim.key: x for x in ch.verdicts}
    assert all(x.word == "cannot tell" and "prompts correctly" in x.why for k, x in v.items() if k != "own")
    assert not v["own"].why  # whether the ablation removes the layer is about the ablation
    assert "cannot be tested" in seen(ch)


@pytest.mark.parametrize("lo, hi, word", [(0.05, 0.2, "Yes"), (-0.3, -0.05, "No, not as the paper measures it"),
                                          (-0.1, 0.1, "Not clearly")])
def test_the_chapter_says_in_plain_words_whether_the_hydra_effect_is_seen(deep, lo, hi, word):
    _, ch = deep
    from dataclasses import replace

    part = replace(ch.estimates.hydra_part, value=(lo + hi) / 2, lo=lo, hi=hi, why="")
    ch2 = chapter.HydraChapter(**{**ch.__dict__, "estimates": replace(ch.estimates, hydra_part=part)})
    assert f"**{word}" in seen(ch2)


def test_the_slope_claim_reads_the_papers_layer_as_a_relative_depth():
    res = synthetic_result(n=12, L=8, P=2, seed=1)
    assert hcl.past_layers(res) == [l for l in range(8) if l / 8 > 13 / 32]  # sequential: every layer has a later one
    res.parallel_residual = res.parallel_residual | True
    assert hcl.past_layers(res) == [l for l in range(7) if l / 8 > 13 / 32]  # the last has nothing downstream
    assert hcl.SLOPE.rule.decide(0.5, 0.99) is True and hcl.SLOPE.rule.decide(1.0, 1.2) is False


# -- issue 25: one number, one definition; the figure, then the verdict ------------------------------
def test_the_chapter_gives_one_headline_share_and_folds_every_other_reading(deep):
    """The restored share at the clean run's σ is the one answer to "how much do the later layers
    give back": the restored verdict and the answer say it (from its sign, with its interval) and
    no other reading; the σ′ share and the slopes are in one fold, one line each with what it
    measures and why it differs."""
    res, ch = deep
    e = ch.estimates
    headline = hcl.said(e.restored["clean"])
    v = {x.claim.key: x for x in ch.verdicts}
    others = [hcl.said(e.restored["ablated"]), e.restored["ablated"].prose(".0%"), e.pooled["clean"].prose(".2f"),
              e.max_slope["ablated"].prose(".2f")]
    for text in (v["restored"].detail, seen(ch)):
        assert not any(o in text for o in others), text
    assert headline in seen(ch) and "one answer to how much the later layers give back" in v["restored"].detail
    fold = other_readings(ch)
    assert fold.title == FOLD_TITLE and fold._repr_html_().startswith("<details")
    text = repr(fold)
    assert hcl.said(e.restored["ablated"]) in text and e.pooled["clean"].prose(".2f") in text
    assert e.max_slope["clean"].prose(".2f") in text and len(fold.lines) == 3  # no per-patch slope, no Fig 7b here
    assert all(". " in line for line in fold.lines)  # each: its value, then what it measures and why it differs
    assert "<summary>" + FOLD_TITLE + "</summary>" in fold._repr_html_()


def test_the_slope_verdict_says_the_papers_cutoff_and_this_models():
    """'Past layer 13 of 32' in the paper's terms, and the layers it is on the model that ran, from
    its layer count; and that the slope tests another quantity than the headline share."""
    assert "13/32 × 18 = 7.3" in hcl.cutoff_words(18, list(range(8, 18)))
    assert "layers 8–17." in hcl.cutoff_words(18, list(range(8, 18)))
    assert "its layer 13 of 32, 41% of its depth" in hcl.cutoff_words(18, [])
    assert "layer 7 left out" in hcl.cutoff_words(8, [4, 5, 6])  # a last layer with nothing after it
    res = synthetic_result(n=30, L=8, P=2, seed=4)
    res.target = res.ml_token.clone()
    ch = chapter_of(res)
    v = {x.claim.key: x for x in ch.verdicts}
    assert hcl.cutoff_words(8, hcl.past_layers(res)) in v["slope"].detail and hcl.SLOPE_APART in v["slope"].detail
    assert "13/32 of the depth" not in chapter.verdict(ch, "slope")
