""""What this chapter shows" for chapters 2-4 (layernorm, neurons, iterative): from synthetic
verdicts of every outcome each sentence says its outcome and prints exactly the computed numbers,
the take-away follows its verdict; on the tiny run every chapter closes with three to six sentences
whose numbers are its own verdicts' values, and no number is printed as a raw float (``6.89e-09``)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pandas as pd
import pytest

from selfrepair.chapters import iterative, layernorm, neurons
from selfrepair.chapters.layernorm_text import logits
from selfrepair.chapters.signed import changes
from selfrepair.claims import Verdict, _fmt
from selfrepair.findings import OUTCOMES, outcome_findings

from test_findings import OPENING, check_real, check_sentence, estimate, of_outcome, tiny

RAW_FLOAT = re.compile(r"\d[eE][+-]?\d")


@pytest.mark.parametrize("claims", [
    (layernorm.RATIO["resample"], layernorm.SHARE, layernorm.APP_H, layernorm.APP_B),
    (layernorm.NORMS_ONLY, layernorm.RATIO["zero"], layernorm.APP_B, layernorm.SHARE),
    (neurons.FIG7, neurons.SPARSE, neurons.ERASURE, neurons.VARIES),
    (iterative.EXIST, iterative.EXIST, iterative.EXIST, iterative.PROPORTIONAL)], ids=["ch2a", "ch2b", "ch3", "ch4"])
def test_outcome_sentences_match_their_verdicts(claims):
    """Holds, differs, straddles and untested: one sentence each, the verdicts' numbers exactly."""
    verdicts = [of_outcome(c, o, why="only 5 independent documents" if i == 3 else "")
                for i, (c, o) in enumerate(zip(claims, [True, False, None, None]))]
    module = layernorm if claims[0] in layernorm.CLAIMS else neurons if claims[0] in neurons.CLAIMS else iterative
    found = outcome_findings(verdicts, module.FIGURES, "model-x")
    assert len(found) == 3
    for (holds, opening), f in zip(OUTCOMES, found):
        assert f.text.startswith(opening.format(model="model-x", whose="the paper's claims")) and OPENING[holds] in f.text
        check_sentence(f, [v for v in verdicts if v.holds is holds])
        assert all(fig.anchor.startswith(f"ch0{'234'[[layernorm, neurons, iterative].index(module)]}-")
                   for fig in f.figures)
    assert ("which straddles the rule's" in found[2].text or ", which includes " in found[2].text) and "untested: only 5" in found[2].text
    for f in found:
        assert not RAW_FLOAT.search(f.text)


def test_every_claim_has_a_figure():
    for module in (layernorm, neurons, iterative):
        assert {c.key for c in module.CLAIMS} <= set(module.FIGURES)


def _layernorm(share: Verdict):
    return SimpleNamespace(meta={"model": "tiny-x", "n_tokens": 512}, verdicts=[share],
                           evidence=SimpleNamespace(clusters=SimpleNamespace(n=16, unit="documents"),
                                                    last=[(1, 0), (1, 1)], late=[(1, 0), (1, 1), (1, 2)]))


@pytest.mark.parametrize("lo, hi, words", [(0.25, 0.35, "as the paper's “around 30%”"),
                                           (0.02, 0.06, "less than the paper's"),
                                           (0.6, 0.8, "more than the paper's"),
                                           (0.1, 0.3, "cannot say")])
def test_chapter2_takeaway_follows_the_norm_share(lo, hi, words):
    share = Verdict.of(layernorm.SHARE, estimate(lo, hi))
    found = layernorm.findings(_layernorm(share))
    take = found[-1]
    assert take.text.startswith("Take-away:") and words in take.text
    assert f"{share.value:.0%}" in take.text and take.values == (share.value,)
    assert found[0].values == (2, 3, 512, 16) and "2 last-layer heads" in found[0].text
    assert 3 <= len(found) <= 6


@pytest.mark.parametrize("block", [0.0, 0.05])
def test_chapter2_takeaway_reconciles_the_norm_share_with_the_norms_only_repair(block):
    """The take-away quoted the clipped norm share (~24%) beside a frozen-norm repair of ~5% with
    nothing between them: one sentence now says what each is (clipped per-token share of eq. 2's
    final-norm term; the repair with every other component frozen) and why they differ, with the
    same term unclipped and the live norm terms, all computed from the per-head frame."""
    share = Verdict.of(layernorm.SHARE, estimate(0.22, 0.26))
    ch = _layernorm(share)
    ch.frozen = pd.DataFrame({"direct_effect": [2.0, 1.0], "from_norm": [0.2, 0.1],
                              "from_block_norms": [block, block], "self_repair_norms_only": [0.09, 0.06]})
    ch.frozen["norm_terms"] = ch.frozen["from_norm"] + ch.frozen["from_block_norms"]
    take = layernorm.findings(ch)[-1]
    term, only, terms = 0.15 / 1.5, 0.075 / 1.5, (0.15 + block) / 1.5
    s = take.text[take.text.index(f"The {share.value:.0%} and"):]
    assert s.count(". ") == s.count("eq. ") and s.endswith(".")  # both numbers and why, in one sentence
    assert f"{share.value:.0%} and the frozen-norm run's {only:.0%}" in s
    assert f"({term:.0%} unclipped" in s and "clipped to [0, 1]" in s and "every other downstream" in s
    assert take.values[:3] == pytest.approx((share.value, term, only))
    if block:
        assert f"are {terms:.0%}" in s and take.values[3] == pytest.approx(terms)
    else:
        assert "block norms" not in s and len(take.values) == 3
    assert layernorm.FIGURES["norms_only"] in take.figures


def _neurons(anti: Verdict):
    return SimpleNamespace(meta={"model": "tiny-x", "d_mlp": 128}, verdicts=[anti],
                           result=SimpleNamespace(heads=[(0, 1), (0, 2)], neuron_layer=1),
                           evidence=SimpleNamespace(clusters=SimpleNamespace(n=16, unit="documents")))


@pytest.mark.parametrize("outcome, words", [(True, "mostly an erasure neuron erasing less"),
                                            (False, "mostly not anti-erasure"), (None, "cannot say")])
def test_chapter3_takeaway_follows_fig7(outcome, words):
    anti = of_outcome(neurons.FIG7, outcome)
    found = neurons.findings(_neurons(anti))
    assert words in found[-1].text and f"{anti.value:.0%}" in found[-1].text
    assert found[-1].values == (anti.value,) and "128 neurons" in found[0].text


def _iterative(verdicts):
    return SimpleNamespace(clusters=SimpleNamespace(n=16, unit="documents"), classes=pd.DataFrame({"x": range(8)}),
                           result=SimpleNamespace(meta={"model": "tiny-x"}, alphas=(1.0, 3.0, 5.0)),
                           verdicts=verdicts)


@pytest.mark.parametrize("outcome, words", [(True, "writes less beyond a random push"),
                                            (False, "no head self-represses"), (None, "cannot say")])
def test_chapter4_takeaway_follows_exist(outcome, words):
    exist = of_outcome(iterative.EXIST, outcome)
    untested = Verdict.of(iterative.PROPORTIONAL, estimate(0.1, 0.3, why="x"), why="no head self-represses")
    found = iterative.findings(_iterative([exist, untested]))
    take = found[-1]
    said = changes(exist.value, ".0%", relative=True)  # from the sign: "falls by 38% of itself", not "-38%"
    assert words in take.text and said in take.text and take.values == (exist.value,)
    assert "α = 1, 3, 5" in found[0].text and found[0].values == (8, 16, 1.0, 3.0, 5.0)
    none = iterative.findings(_iterative([Verdict.of(iterative.EXIST, estimate(0.1, 0.3, why="x"), why="no head"),
                                          untested]))
    assert "cannot test" in none[-1].text and none[-1].values == ()


@pytest.mark.parametrize("x, text", [(6.89e-9, "+6.9×10⁻⁹"), (-3.2e-7, "−3.2×10⁻⁷"), (0.011, "+0.011"),
                                     (0.0, "+0"), (-1.5, "−1.5")])
def test_small_logits_read_as_powers_of_ten(x, text):
    assert logits(x) == text


def test_scientific_claim_values_read_as_powers_of_ten():
    assert _fmt(1.9e-6, ".1e") == "1.9×10⁻⁶" and _fmt(0.25, ".0%") == "25%"
    assert layernorm.APP_B.rule.text(layernorm.APP_B.fmt) == "below 1.0×10⁻³"


# -- real results on the tiny profile --------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("findings24_cache")


def test_real_chapter2(cache):
    ch = layernorm.measure(tiny(layernorm, cache), progress=False)
    found = layernorm.findings(ch)
    check_real(found, ch.verdicts)
    share = next(v for v in ch.verdicts if v.claim is layernorm.SHARE)
    assert f"{share.value:.0%}" in found[-1].text
    verdicts = [layernorm.verdict(ch, c.key) for c in layernorm.CLAIMS]
    for text in (layernorm.shows(ch), layernorm.on_this_model(ch), layernorm.frozen_markdown(ch), *verdicts):
        assert not RAW_FLOAT.search(re.sub(r"\(#?[\w-]+\)|\"#[\w-]+\"", "", text)), text
    assert all('href="#ch02-rules"' in text for text in verdicts)


def test_real_chapters_3_and_4(cache):
    ch = neurons.measure(tiny(neurons, cache), progress=False)
    check_real(neurons.findings(ch), ch.verdicts)
    fig7 = next(v for v in ch.verdicts if v.claim is neurons.FIG7)
    assert "a different selection" in fig7.detail  # one number, one definition: the two selections said
    assert 'href="#ch03-rules"' in neurons.verdict(ch, "anti_erasure")
    it = iterative.measure(tiny(iterative, cache), progress=False)
    check_real(iterative.findings(it), it.verdicts)
    verdicts = "\n".join(iterative.verdict(it, c.key) for c in iterative.CLAIMS)
    assert verdicts.count('href="#ch04-rules"') == len(iterative.CLAIMS) and "under its own output alone" in verdicts
    # issue 25: the control is said, and each of the chosen head's numbers names its quantity and documents
    text = iterative.on_this_model(it)
    assert "The control is a random push" in text and "a larger fall is more repression" in text
    assert "as a share of itself, on every document" in text
    exist = next(v for v in it.verdicts if v.claim is iterative.EXIST)
    for said in ("chosen on the selection half as the head whose smaller fall is largest there",
                 "On the test half, at α = ", "under the random push it", "beyond the push (the first change minus "
                 "the second)", "value above is the smaller of the two falls"):
        assert said in exist.detail, said


@pytest.mark.parametrize("own, control, means", [(-0.25, -0.46, "falls no further under its own output"),
                                                 (-0.67, -0.48, "falls further under its own output")])
def test_chapter4_control_sentence_says_what_the_comparison_means(own, control, means):
    """Issue 25: "-46% under a random push (-25% under their own output)" said nothing of what the control
    is or which way is more repression."""
    said = iterative.control_sentence(own, control, 5.0)
    assert "random direction of the same norm as the head's own output at α = 5" in said
    assert f"falls by {-own:.0%} of itself under its own output" in said
    assert f"falls by {-control:.0%} of itself under the random push" in said
    assert means in said and "a larger fall is more repression" in said and " -" not in said


def test_chapter4_says_which_fall_each_interval_of_the_same_value_belongs_to():
    """Chapter 4 printed "456%" with "(−589% to −204%)" and then "(−664% to −204%)", only "the value
    above is the smaller of the two falls" hinting why: the sentence where the second appears names
    which quantity each interval belongs to."""
    from selfrepair.uncertainty import Estimate

    def e(v, lo, hi):
        return Estimate(v, lo, hi, 10, "documents", 20, "documents", 0, 100)

    said = iterative.smaller_of_two(e(-4.56, -5.89, -2.04), e(-4.56, -6.64, -2.04), e(-5.0, -6.0, -4.0))
    assert "here the fall under its own output" in said
    assert "its interval (95% interval 204% to 589%) is that of the smaller of the two falls" in said
    assert "the interval of the fall under its own output alone (95% interval 204% to 664%)" in said
    said = iterative.smaller_of_two(e(-0.3, -0.4, -0.2), e(-0.5, -0.6, -0.4), e(-0.3, -0.45, -0.2))
    assert "here the fall beyond the push" in said and "204%" not in said
    same = iterative.smaller_of_two(e(-0.3, -0.4, -0.2), e(-0.3, -0.4, -0.2), e(-0.5, -0.6, -0.4))
    assert same == "The verdict's value above is the smaller of the two falls, here the fall under its own output."


def test_chapter4_solution_gives_the_size_medians_beside_the_paragraphs_signed_ones():
    """Issue 25: §4.3 said the median head falls by 25% / 46% and Solution 4.2 gave 69% / 56%
    ("unsigned"), two medians of what reads as one thing: the solution's sentence names both, for
    the same heads and tokens, from the one definition (:func:`iterative.medians`)."""
    from types import SimpleNamespace

    import pandas as pd

    from selfrepair.exercises import reveal

    classes = pd.DataFrame({"class": ["self-repressing"] * 3 + ["self-reinforcing"] * 2 + ["weak"],
                            "relative_change": [-0.9, -0.5, -0.25, 0.6, 0.8, -5.0],
                            "control_change": [-0.7, -0.46, -0.3, 0.2, 0.5, 3.0],
                            "specific": [True, True, False, True, False, True], "alpha": 5.0})
    m = iterative.medians(classes)  # the weak head (-500%) counts in neither
    assert (m["n"], m["own"], m["own_size"]) == (5, -0.25, 0.6)
    assert (m["control"], m["control_size"]) == (-0.3, 0.46)
    said = reveal.control(SimpleNamespace(classes=classes))
    assert ("Over the same 5 classified heads as the paragraph above (each head's top tokens, at α = 5), the "
            "median size of the change, ignoring its sign, is 60% of the direct effect under the head's own "
            "output and 46% under a random push of the same norm; the paragraph's medians, a fall of 25% and "
            "a fall of 30%, keep the sign") in said
    assert "3 of them respond" in said and "±10%" in said
    assert "with its sign" in iterative.control_sentence(m["own"], m["control"], 5.0)
