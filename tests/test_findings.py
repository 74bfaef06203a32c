""""What this chapter shows" (selfrepair.findings and each chapter's ``findings``): built from
synthetic verdicts of every outcome, each sentence says the outcome its verdicts have and prints
exactly the computed numbers; built from real tiny-profile results, every chapter closes with three
to six sentences whose numbers are the chapter's own verdicts' values."""

from __future__ import annotations

import math
from dataclasses import replace
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from selfrepair.book import load_profile
from selfrepair.rules import Signed, is_zero, thresholds
from selfrepair.chapters import across, atp, existence, hydra, intro, ioi, iterative
from selfrepair.chapters import across_text
from selfrepair.claims import Verdict, number, interval_words
from selfrepair.reading import short_label
from selfrepair.tables import format_number
from selfrepair.findings import OUTCOMES, Figure, Finding, markdown, outcome_findings, own
from selfrepair.uncertainty import Estimate

ROOT = Path(__file__).resolve().parents[1]
OPENING = {True: "the paper's claims that hold", False: "do not hold", None: "cannot decide"}


def estimate(lo: float, hi: float, why: str = "", value: float | None = None) -> Estimate:
    return Estimate((lo + hi) / 2 if value is None else value, lo, hi, 40, "units", 30 if not why else 5,
                    "prompts", 7, 1000, why)


def of_outcome(claim, outcome, why: str = "") -> Verdict:
    """A verdict of ``claim`` whose interval lies on the paper's side (True), the other side
    (False) or across the threshold (None)."""
    b, op = claim.rule.bounds, claim.rule.op
    w = max(abs(b[-1] - b[0]), abs(b[0]), 1.0) * 0.25
    if op == "between":
        lo, hi = {True: (b[0] + (b[1] - b[0]) / 4, b[1] - (b[1] - b[0]) / 4), False: (b[1] + w, b[1] + 2 * w),
                  None: (b[0] - w, b[0] + (b[1] - b[0]) / 4)}[outcome]
    else:
        up = op in (">", ">=")
        lo, hi = {True: (b[0] + w, b[0] + 2 * w) if up else (b[0] - 2 * w, b[0] - w),
                  False: (b[0] - 2 * w, b[0] - w) if up else (b[0] + w, b[0] + 2 * w),
                  None: (b[0] - w, b[0] + w)}[outcome]
    v = Verdict.of(claim, estimate(lo, hi, why))
    assert v.holds is (None if why else outcome)
    return v


def printed(x: float, fmt: str) -> str:
    return number(x, fmt)


def check_sentence(f: Finding, verdicts: list[Verdict]) -> None:
    """Each verdict's statement, value and interval are in the sentence, as computed."""
    numbers = []
    for v in verdicts:
        assert short_label(v.claim.statement) in f.text
        if v.why:
            assert v.why in f.text
            continue
        signed = isinstance(v.claim.reading, Signed)  # said in the words of its sign, as the verdict says it
        if signed:
            assert v.claim.reading.said(v.value, v.claim.fmt, thresholds(v.claim.rule)) in f.text
        for x in (v.value, v.lo, v.hi):
            # a signed claim's numbers as sizes beside the words that carry their signs (none at 0)
            assert (printed(abs(x), v.claim.fmt.replace("+", "")) if signed else printed(x, v.claim.fmt)) in f.text \
                or (signed and x == v.value and is_zero(x, v.claim.fmt, thresholds(v.claim.rule)))
            assert not signed or f"{printed(x, v.claim.fmt)}," not in f.text or x >= 0  # no "-456%, …"
            numbers.append(x)
    assert f.values == tuple(numbers)


@pytest.mark.parametrize("module", [existence, hydra, atp, ioi])
def test_outcome_sentences_match_their_verdicts(module):
    claims = module.CLAIMS
    outcomes = [True, False, None, None]
    verdicts = [of_outcome(c, o, why="only 5 independent prompts" if i == 3 else "")
                for i, (c, o) in enumerate(zip(claims, outcomes))]
    found = outcome_findings(verdicts, module.FIGURES if hasattr(module, "FIGURES") else {}, "model-x")
    assert len(found) == 3
    for (holds, opening), f in zip(OUTCOMES, found):
        group = [v for v in verdicts if v.holds is holds]
        whose = "the claims" if any(map(own, group)) else "the paper's claims"
        assert f.text.startswith(opening.format(model="model-x", whose=whose))
        assert OPENING[holds] in f.text if whose == "the paper's claims" else "the paper's" not in f.text
        check_sentence(f, group)
        for v in group:  # the book's own question is never passed off as the paper's
            assert (f"{short_label(v.claim.statement)}</a> (this book's own question" in f.text) is own(v)

        others = [v for v in verdicts if v.holds is not holds]
        assert not any(short_label(v.claim.statement) in f.text for v in others
                       if v.claim.statement not in {g.claim.statement for g in group})
    straddle = found[2]
    # an interval that includes no change at a threshold of 0 says so once (read3 #11), not "which straddles" too
    assert "which straddles the rule's" in straddle.text or ", which includes " in straddle.text
    assert verdicts[2].claim.rule.text(verdicts[2].claim.fmt) in straddle.text


def test_the_books_own_question_is_not_listed_among_the_papers_claims():
    """Chapter 7's "self-repair lies beyond AtP's first order" is this book's question: holding
    beside a paper's claim, the sentence opens "the claims that hold" and marks it."""
    verdicts = [of_outcome(atp.RANKS, True), of_outcome(atp.BLIND, True)]
    (f,) = outcome_findings(verdicts, atp.FIGURES, "model-x")
    assert f.text.startswith("On model-x, the claims that hold:\n") and "paper's claims" not in f.text
    assert "(this book's own question, not the papers')" in f.text and own(verdicts[1]) and not own(verdicts[0])


def test_only_the_outcomes_that_occur_get_a_sentence_and_links_point_at_figures():
    claim = existence.MANY
    found = outcome_findings([of_outcome(claim, False)], existence.FIGURES, "m")
    assert len(found) == 1 and "do not hold on m" in found[0].text
    md = found[0].markdown()
    assert md.startswith('The claims that do not hold on m (see <a href="#ch01-fig1">Fig 1</a>):\n  - ')
    assert markdown([Finding("A."), Finding("B.", (Figure("x", "X"),))]) == 'A. B; see <a href="#x">X</a>.'


def test_a_summary_lists_each_claim_on_its_line_by_a_short_label_and_what_its_number_is():
    """read3 #13: the outcomes pasted whole claim sentences in italics, joined by semicolons, with
    unlabelled numbers ("(54%, 95% interval 53% to 54%)" — of what?). Now one item per line: the
    claim's short label (linked to its verdict), what the number is, the number."""
    from selfrepair.reading import quantity

    vs = [of_outcome(c, True) for c in (existence.MANY, existence.NOISY)]
    (f,) = outcome_findings(vs, existence.FIGURES, "m")
    lines = f.text.split("\n")
    assert lines[0] == "On m, the paper's claims that hold:" and len(lines) == 3 and ";" not in lines[0]
    for line, v in zip(lines[1:], vs):
        assert line.startswith(f'  - <a href="#claim-{v.claim.key}">{short_label(v.claim.statement)}</a> — ')
        assert f" — {quantity(v.claim)}: " in line and "*" not in line
    assert short_label(iterative.EXIST.statement) == "Self-repressing heads exist"
    assert quantity(replace(existence.MANY, quantity="share of late heads repaired")) == "share of late heads repaired"
    assert quantity(existence.MANY).startswith("the share of late-layer heads")  # the metric's first clause


def _existence(many: Verdict, verdicts=None):
    return SimpleNamespace(meta={"model": "tiny-x", "n_tokens": 512, "ablation": "resample"},
                           evidence=SimpleNamespace(clusters=SimpleNamespace(n=16, unit="documents")),
                           verdicts=verdicts or [many])


@pytest.mark.parametrize("outcome, words", [(True, "costs less than its direct effect"),
                                            (False, "is not widespread"), (None, "cannot say")])
def test_chapter1_takeaway_follows_many(outcome, words):
    many = of_outcome(existence.MANY, outcome)
    found = existence.findings(_existence(many))
    take = found[-1]
    assert take.text.startswith("Take-away:") and words in take.text
    assert f"{many.value:.0%}" in take.text and take.values == (many.value,)
    assert "512 tokens" in found[0].text and found[0].values == (512, 16)
    assert 3 <= len(found) <= 6


WHOLE = estimate(-2.2, -1.7)  # the headline share: the later layers take away a further 196%


def _hydra(part: Estimate, n_correct=20):
    return SimpleNamespace(numbers={"n_prompts": 24, "n_correct": n_correct}, meta={"model": "tiny-x"},
                           estimates=SimpleNamespace(hydra_part=part, restored={"clean": WHOLE}),
                           result=SimpleNamespace(n_layers=4), verdicts=[of_outcome(hydra.RESTORED, False)])


@pytest.mark.parametrize("lo, hi, words", [(0.1, 0.3, "is seen on this model"),
                                           (-0.4, -0.1, "is not seen on this model"),
                                           (-0.1, 0.2, "cannot tell")])
def test_chapter5_says_whether_the_hydra_effect_is_seen(lo, hi, words):
    part = estimate(lo, hi)
    take = hydra.findings(_hydra(part))[-1]
    assert words in take.text and "Hydra effect" in take.text
    # the same answer as the one after Fig 7 and 8: the headline share, then the attention layers' part
    assert take.text.endswith(hydra.conclusion(_hydra(part))) and take.values == (WHOLE.value, -2.2, -1.7, part.value, lo, hi)
    for x in take.values:  # said from its sign ("take away a further 25%"): every number its size
        assert f"{abs(x):.0%}" in take.text
    assert "-" not in take.text.split("Take-away")[-1]
    failed = hydra.findings(_hydra(part, n_correct=1))[-1]
    assert "cannot be tested" in failed.text and failed.values == ()


@pytest.mark.parametrize("ranks, top, words", [(True, True, "can stand in"), (False, True, "does not stand in"),
                                               (True, None, "cannot tell")])
def test_chapter7_takeaway_needs_both_ranking_claims(ranks, top, words):
    vs = [of_outcome(atp.RANKS, ranks), of_outcome(atp.TOP, top)]
    ch = SimpleNamespace(meta={"model": "m", "n_tokens": 512}, heads=pd.DataFrame({"x": range(8)}),
                         verdicts=vs, ranks={"k": 3})
    take = atp.findings(ch)[-1]
    assert words in take.text
    assert f"{vs[0].value:.2f}" in take.text and f"{vs[1].value:.0%}" in take.text
    assert take.values == (vs[0].value, vs[1].value)


@pytest.mark.parametrize("lo, hi, outcome", [(-0.5, -0.1, "no repair"), (0.2, 0.6, "partial repair"),
                                             (0.95, 1.05, "full repair"), (1.8, 2.1, "over-correction"),
                                             (0.5, 1.0, "partial repair or full repair")])
def test_chapter8_takeaway_names_the_repair_region(lo, hi, outcome):
    rep = Verdict.of(ioi.REPAIRED, estimate(lo, hi))
    does = of_outcome(ioi.DOES_IOI, True)
    ch = SimpleNamespace(meta={"model": "m", "ablation": "mean"}, performance={"accuracy": 0.9},
                         prompts={"n": 24}, name_movers=pd.DataFrame({"x": [1, 2]}), verdicts=[does, rep])
    found = ioi.findings(ch)
    take = found[-1]
    assert f"— {outcome}:" in take.text and take.values == (rep.value, lo, hi)
    for x in take.values:
        assert f"{x:.0%}".replace("-", "−") in take.text  # the tables' minus sign
    assert rep.word == ("holds" if outcome == "partial repair" else "differs" if outcome in
                        ("no repair", "full repair", "over-correction") else "cannot tell")
    if outcome == "over-correction":  # an over-correction is never called partial repair
        assert "do not hold" in found[2].text and "partial repair" not in take.text
    fails = ioi.findings(SimpleNamespace(**{**vars(ch), "verdicts": [of_outcome(ioi.DOES_IOI, False), rep]}))
    assert "not shown to do IOI" in fails[-1].text


# -- real results on the tiny profile --------------------------------------------------------------
def tiny(module, cache: Path, **extra):
    params = {**load_profile("tiny", ROOT), "cache_dir": str(cache), "n_boot": 50, **extra}
    known = module.Config.field_names()
    return module.Config.from_params(**{k: v for k, v in params.items() if k in known})


def check_real(found: list[Finding], verdicts: list[Verdict]):
    assert 3 <= len(found) <= 6
    assert found[-1].text.startswith("Take-away:")
    text = markdown(found)
    for v in verdicts:
        assert short_label(v.claim.statement) in text
    for f in found[1:-1]:  # the outcome sentences: their numbers are the verdicts' values
        if f.text.startswith("The other side:"):  # chapter 1: what goes against the held claims
            continue
        group = [v for v in verdicts if short_label(v.claim.statement) in f.text]
        check_sentence(f, group)
    for f in found:
        assert all(math.isfinite(x) for x in f.values)
        assert "<a href=\"#ch" in f.markdown() or not f.figures


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("findings_cache")


def test_real_chapter1_and_7(cache):
    ex = existence.measure(tiny(existence, cache), progress=False)
    check_real(existence.findings(ex), ex.verdicts)
    many = next(v for v in ex.verdicts if v.claim is existence.MANY)
    assert f"{many.value:.0%}" in existence.findings(ex)[-1].text
    ch = atp.measure(tiny(atp, cache), progress=False)
    check_real(atp.findings(ch), ch.verdicts)


def test_real_chapters_5_6_8(cache):
    ch = hydra.measure(tiny(hydra, cache), progress=False)
    check_real(hydra.findings(ch), ch.verdicts)
    assert re.search(r"Hydra effect", hydra.findings(ch)[-1].text)
    ac = across.measure(tiny(across, cache), progress=False)
    run = across_text.current_run(ac)
    vs = [across.run_verdict(c, run, ac.estimates) for c in across.CLAIMS]
    check_real(across_text.findings(ac), vs)
    ic = ioi.measure(tiny(ioi, cache), progress=False)
    check_real(ioi.findings(ic), ic.verdicts)


def test_real_introduction(cache):
    cfg = tiny(intro, cache)
    live, toy = intro.measure(cfg), intro.worked_example()
    found = intro.findings(live, toy, cfg.model)
    assert 3 <= len(found) <= 6
    n = toy.numbers
    assert f"{abs(n['self_repair']):.3f}" in found[0].text and f"{abs(n['delta_logit']):.3f}" in found[0].text
    assert not re.search(r"\b(by|of|back)\s+[-−+]", found[0].text), found[0].text  # signs in words (issue 25)
    assert format_number(live.table['eq2_gap'].max()) in found[1].text and "rounding error" in found[1].text


# -- one number, one definition: related numbers on different selections say so ---------------------
@pytest.mark.parametrize("de, drop, words", [(1.0, 0.6, "on average the rest of the network made up part"),
                                             (0.6, 1.0, "added to the loss rather than")])
def test_chapter5_reveal_never_calls_a_larger_mean_drop_repair(de, drop, words):
    from selfrepair.exercises import reveal

    effects = pd.DataFrame({"kind": ["attn"] * 4 + ["mlp"], "direct_effect": [de] * 4 + [9.0],
                            "ablation_drop": [drop] * 4 + [0.0]})
    ch = SimpleNamespace(effects=effects, estimates=SimpleNamespace(unembed=estimate(0.1, 0.3),
                                                                    other_way=estimate(0.0, 0.2)))
    text = reveal.drop_vs_de(ch)
    assert words in text and f"mean DE {de:.3g}, mean drop {drop:.3g}" in text


@pytest.mark.parametrize("slope, way", [(-0.3, "moves the other way (the way erasure predicts) by 0.30 logits"),
                                        (0.3, "moves the same way by 0.30 logits"), (0.001, "does not move")])
def test_chapter5_reveal_says_the_erasure_slope_from_its_sign(slope, way):
    """Issue 25: not "moves -0.30 logits the same way (negative: the other way ...)"."""
    from selfrepair.exercises import reveal

    erasure = pd.DataFrame({"late": [True, True], "delta_direct_effect": [0.2, -0.1]})
    est = estimate(slope - 0.1, slope + 0.1, value=slope)
    text = reveal.late_mlps(SimpleNamespace(erasure=erasure, estimates=SimpleNamespace(erasure=est)))
    assert way in text and "(negative:" not in text and not re.search(r"\b(by|of|back|moves)\s+[-−+]", text)


def test_chapter5_localisation_gives_one_share_and_folds_the_other():
    """read3 #19: the localisation section said 36% and, a sentence later, the verdict's 46% for the
    same layer's share: the page gives the verdict's share; the other, with why, in a fold."""
    from selfrepair.chapters.hydra_text import _pooled

    local = estimate(0.5, 0.7)
    g = pd.DataFrame({"share_top1": [0.3, 0.42]})
    text = _pooled(SimpleNamespace(estimates=SimpleNamespace(local=local)), g)
    assert text.startswith("<details") and text.endswith("</details>")
    assert f"a mean {g['share_top1'].mean():.0%}, not {1 - local.value:.0%}" in text and "prompt by prompt" in text


def test_chapter6_block_norm_share_says_its_selection():
    row = pd.Series({"run": "r", "block_norm_share_late": 0.04, "frac_self_repaired_late": 0.5,
                     "norm_share_late": 0.3, "frac_between_all": 0.4})
    v = across.run_verdict(across.SHARE, row, {})
    assert "4% of DE from the sandwich block norms" in v.detail
    assert "top-k% tokens" in v.detail and "chapter 2" in v.detail and "different number" in v.detail
    assert "block norms" not in across.run_verdict(across.MANY, row, {}).detail


def test_a_line_that_fails_on_its_intercept_says_so():
    """Chapter 4's "proportional" is decided on the slope and the intercept: when the slope passes and
    the intercept does not, the sentence prints both, labelled, not the slope alone."""
    from selfrepair.chapters import iterative

    slope, icpt = estimate(0.23, 0.28, value=0.26), estimate(0.3, 0.6, value=0.45)
    v = Verdict.linear(iterative.PROPORTIONAL, slope, icpt)
    (f,) = outcome_findings([v], iterative.FIGURES, "m")
    assert v.holds is False and "do not hold on m" in f.text
    fmt = iterative.PROPORTIONAL.fmt
    for name, e in (("slope", slope), ("intercept / mean y", icpt)):
        assert f"{name} {number(e.value, fmt)}, {interval_words(e.lo, e.hi, fmt)}" in f.text
    assert f.values == (slope.value, slope.lo, slope.hi, icpt.value, icpt.lo, icpt.hi)


def test_the_paragraph_lists_each_outcome_on_its_own_line():
    found = [Finding("Where it ran."), Finding("Held: a."), Finding("Did not: b.", (Figure("x", "X"),)),
             Finding("Take-away: read it so.")]
    assert markdown(found) == ('Where it ran.\n\n- Held: a.\n- Did not: b; see <a href="#x">X</a>.\n\n'
                               "**Take-away:** read it so.")


def test_chapter5_reveal_erasure_interval_across_zero_includes_no_move():
    """An erasure slope whose interval crosses 0 asserts no direction: its interval includes no move."""
    from selfrepair.exercises import reveal

    erasure = pd.DataFrame({"late": [True, True], "delta_direct_effect": [0.2, -0.1]})
    est = estimate(-0.07, 0.02, value=-0.02)
    text = reveal.late_mlps(SimpleNamespace(erasure=erasure, estimates=SimpleNamespace(erasure=est)))
    assert ("95% interval from 0.07 logits the other way to 0.02 logits the same way, which includes no move"
            in text), text
    assert "as erasure predicts" not in text


def test_chapter2_reveal_prints_a_share_on_its_side_of_almost_always():
    """Exercise 2.1's solution said "S/S′ > 1 on … 90% (zero) of L17H3's top tokens" where the table,
    verdict and chart show 89.6% and the rule is "at least 90.0%": every share compared with the
    rule prints on its side of it (rules.against)."""
    from selfrepair.chapters.layernorm_claims import RATIO
    from selfrepair.exercises import reveal

    ratios = pd.DataFrame({"ablation": ["resample", "mean", "zero"], "label": ["L17H3"] * 3,
                           "share_ratio_above_1": [0.5, 0.93, 0.896]})
    verdicts = [Verdict.of(RATIO["zero"], estimate(0.88, 0.91, value=0.8996))]
    text = reveal.zero_ratio(SimpleNamespace(ratios=ratios, verdicts=verdicts))
    assert "89.6% (zero) of L17H3's top tokens" in text and "90% (zero)" not in text, text
    assert "93% (mean)" in text and "50% (resample)" in text
    assert "89.96% (zero) of a last-layer head's top tokens" in text, text


def test_estimate_prose_prints_on_its_side_of_the_thresholds():
    e = estimate(0.47, 0.52, value=0.497)
    assert e.prose(".0%") == "50% (95% interval 47% to 52%)"
    assert e.prose(".0%", (0.5,)) == "49.7% (95% interval 47% to 52%)"


@pytest.mark.parametrize("key, mean, words", [
    ("from_mlps", -0.157, "the MLPs take away a further 0.157 logits, so they make the ablation's loss worse rather than repairing it"),
    ("from_norm", 0.05, "the final norm gives back 0.050 logits, so it makes up for part of the loss"),
    ("from_heads", 0.0, "the other heads give back nothing.")])
def test_introduction_says_the_largest_terms_sign_in_words(key, mean, words):
    """read3 #4: "the term of eq. 2 largest in size is the MLPs' (−0.157 logits)" never said that a
    negative term makes the loss worse: the sentence now says it in words of its sign."""
    text = intro.largest_term(key, mean)
    assert words in text and "−" not in text and "-0" not in text


def test_every_claim_names_what_its_number_is_in_a_few_words():
    """read3 #13: a closing summary labels each claim's number by its `quantity`; without one it
    fell back to the metric's first clause, cut mid-phrase ("the share whose whole-set mean Δlogit on
    the other half", "on the other half", "the least-squares slope, over every"). Every claim of the
    book says it, in a short phrase that is not its metric."""
    import importlib

    names = ["existence", "layernorm_claims", "neurons_claims", "iterative", "hydra_claims", "across_claims",
             "atp", "ioi_claims"]
    claims = [c for n in names for c in importlib.import_module(f"selfrepair.chapters.{n}").CLAIMS]
    assert len(claims) >= 30
    for c in claims:
        assert c.quantity and len(c.quantity.split()) <= 20 and c.quantity != c.metric, c.key
        assert not re.search(r"\b(of|on|over|the|every|whose|that|and)$", c.quantity), (c.key, c.quantity)
