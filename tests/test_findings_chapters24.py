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
from selfrepair.claims import Verdict, number
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


def _layernorm_full(block: float):
    """A chapter-2 stand-in with the verdicts, Fig 4's table and the frozen-norm and share frames."""
    share = Verdict.of(layernorm.SHARE, estimate(0.22, 0.26))
    ratios = [Verdict.of(layernorm.RATIO[a], estimate(lo, lo + 0.08)) for a, lo in
              (("resample", 0.43), ("mean", 0.42), ("zero", 0.51))]
    ch = _layernorm(share)
    ch.verdicts = [*ratios, share]
    ch.ratio_head = (1, 3)
    ch.ratios = pd.DataFrame({"ablation": ["resample", "mean", "zero"], "mean_from_norm": [-0.0491, -0.04, 0.14]})
    ch.frozen = pd.DataFrame({"direct_effect": [2.0, 1.0], "from_norm": [0.2, 0.1],
                              "from_block_norms": [block, block], "self_repair_norms_only": [0.09, 0.06]})
    ch.frozen["norm_terms"] = ch.frozen["from_norm"] + ch.frozen["from_block_norms"]
    rows = [{"layer": l, "tokens": "top-k%", "clipping": "clipped", "component": c, "share": x, "head": h}
            for l in (0, 1) for h in (0, 1, 2) for c, x in (("final norm", 0.2 + 0.1 * (l == 0)),
                                                             ("block norms", block * 3))
            if c == "final norm" or block]
    ch.shares = pd.DataFrame(rows)
    ch.layers = ch.shares.groupby(["layer", "tokens", "clipping", "component"], as_index=False)["share"].mean()
    return ch, share


def test_chapter2_takeaway_says_whether_the_norm_repairs_and_that_the_mechanism_fails():
    """read3 #1: the take-away led with "24% ... as the paper's 'around 30%'" and never said that
    S/S′ > 1 holds on only about half the top tokens (the paper: 91–100%) nor that Fig 4's head has a
    negative norm repair: it now says all three, computed, the repair in words of its sign."""
    ch, share = _layernorm_full(0.0)
    take = layernorm.findings(ch)[-1]
    assert "yes, on average the final norm repairs on this model" in take.text
    assert "The paper's mechanism is not seen here" in take.text
    assert "on 46% to 55% of a last-layer head's top tokens" in take.text and "the paper's 91% to 100%" in take.text
    assert "on Fig 4's head L1H3 the final norm's repair under resample ablation is negative: on average it " \
           "takes away a further 0.049 logits" in take.text
    assert take.values == pytest.approx((share.value, 0.46, 0.55, 0.9066, 1.0, -0.0491))
    assert "one answer" in take.text and "−" not in take.text


@pytest.mark.parametrize("block", [0.0, 0.05])
def test_chapter2_names_one_answer_and_folds_the_other_readings(block):
    """read3 #2: six numbers answered "how much does the norm give back" and only one was named: the
    fold names the clipped late-head share as the one answer and gives every other reading one line
    (what it measures, why it differs), with which block-norm number to quote beside chapter 6's."""
    ch, share = _layernorm_full(block)
    fold = layernorm.other_readings(ch)
    text = repr(fold)
    assert f"The chapter's one answer is {share.value:.0%}" in text and "around 30%" in text
    term, only, terms = 0.15 / 1.5, 0.075 / 1.5, (0.15 + block) / 1.5
    names = [line.split("</b>")[0].removeprefix("<b>") for line in fold.lines]
    assert names[:3] == ["Every layer, not only the late ones", "Unclipped", "The norms alone"]
    assert f"Unclipped: {term:.0%}." in text and f"The norms alone: {only:.0%}." in text
    assert "Every layer, not only the late ones: 25%." in text  # (0.3 + 0.2) / 2
    if block:
        assert f"Eq. 2's live norm terms: {terms:.0%}." in text
        assert "The block norms: a further 15%." in text and "quote this one beside this chapter's answer" in text
    else:
        assert len(fold.lines) == 3 and "block norms" not in text.lower().split("each reading below")[1]
    assert "<details" in fold._repr_html_()
    ch.frozen = None
    assert layernorm.other_readings(ch) is None


def test_chapter2_opening_lists_claims_not_the_argument():
    """read3 #37: "Their claims:" was followed by "The argument", which is not a claim: the argument
    is now a paragraph of its own before the list."""
    import json
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / "book" / "02_layernorm.ipynb").read_text())
    opening = "".join(nb["cells"][0]["source"])
    before, _, claims = opening.partition("Their claims:")
    assert "**The argument**" in before and "The argument" not in claims
    assert claims.lstrip().startswith("- **$S/S' > 1$ almost always**")


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
    assert number(1.9e-6, ".1e") == "1.9×10⁻⁶" and number(0.25, ".0%") == "25%"
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
    assert "The control is a random push" in text and "Is the response specific to the head's own output?" in text
    assert iterative.tested_head(it) in it.featured  # issue 25: the head the verdict rests on is shown
    assert "as a share of itself, on every document" in text
    exist = next(v for v in it.verdicts if v.claim is iterative.EXIST)
    for said in ("chosen on the selection half as the head whose smaller fall is largest there",
                 "On the test half, at α = ", "under the random push it", "beyond the push (the first change minus "
                 "the second)", "value above is the smaller of the two falls"):
        assert said in exist.detail, said


def _classes(own, control, specific):
    import pandas as pd

    n = len(own)
    return pd.DataFrame({"class": ["self-repressing" if o < 0 else "self-reinforcing" for o in own],
                         "relative_change": own, "control_change": control, "specific": specific,
                         "alpha": [5.0] * n})


@pytest.mark.parametrize("own, control, answer", [
    ([-0.9, -0.5, 0.7], [-0.05, 0.02, 0.08], "Yes:"),
    ([-0.9, -0.69, 0.7], [-0.6, 0.56, 0.3], "Only in part:"),
    ([-0.25, -0.2, 0.3], [-0.46, 0.5, -0.6], "No:")])
def test_chapter4_control_sentence_gives_one_answer_from_the_sizes(own, control, answer):
    """Issue 25 (read3 #6): §4.3 said "the typical head falls no further under its own output than
    under the push" (signed medians, 25% against 46%) while Solution 4.2 read 69% against 56%
    (sizes) the other way: both now give the one answer, from the sizes."""
    from types import SimpleNamespace

    from selfrepair.exercises import reveal

    classes = _classes(own, control, [True, False, True])
    said = iterative.control_sentence(classes)
    assert "random direction of the same norm as the head's own output at α = 5" in said
    assert f"Is the response specific to the head's own output? {answer}" in said
    assert "falls no further" not in said and "with its sign" not in said and " -" not in said
    assert reveal.control(SimpleNamespace(classes=classes)) in said  # the solution: the same answer


def test_chapter4_one_value_one_interval_the_other_folded():
    """Issue 25 (read3 #11): "456%" printed with "204% to 589%" and again with "204% to 664%": the
    verdict's value keeps its interval; the other interval of the same value is in a fold saying why."""
    from selfrepair.uncertainty import Estimate

    def e(v, lo, hi):
        return Estimate(v, lo, hi, 10, "documents", 20, "documents", 0, 100)

    est, own, beyond = e(-4.56, -5.89, -2.04), e(-5.0, -6.0, -4.0), e(-4.56, -6.64, -2.04)
    said, fold = iterative.smaller_of_two(est, own, beyond).split("<details>")
    assert said == " The verdict's value above is the smaller of the two falls, here the fall beyond the push."
    assert fold.startswith("<summary>Why the fall beyond the push has no interval of its own here")
    assert "95% interval 204% to 664%" in fold and fold.endswith("</details>")
    said = iterative._beyond(est, own, beyond)
    assert "456%" in said and "664%" not in said and "interval" not in said
    assert "95% interval" in iterative._beyond(est, e(-4.56, -5.89, -2.04), e(-5.0, -6.0, -4.0))
    assert "<details>" not in iterative.smaller_of_two(est, est, beyond)  # the same interval: nothing to fold


def test_chapter3_fold_headers_and_shares_and_the_sparse_sentence():
    """Issue 25 (read3 #18, #31, #32, #35): chapter 3's fold had "neurons 90", "erasure top",
    "top-1 fraction", "max top neuron", "Fig 7 anti-erasure" as headers, shares as "0.104" beside
    the table's percentages, neuron indices as "1,451"; and "sits in 24 of 2048 for L16H2, 201 of
    2048 for L15H2 ... neurons" read as a template."""
    import pandas as pd

    from selfrepair.chapters.neurons_claims import half_spread

    row = {"label": "L11H2", "direct_effect": 8.74, "self_repair": 2.16, "layer_positive": 0.785, "neurons_50": 253,
           "d_mlp": 2048, "erasure_repair_share": 0.673, "negative_baseline": 0.492, "max_top_frequency": 0.472,
           "n_instances": 163, "layer_delta": 0.317, "top1_fraction": 0.104, "erasure_top": 0.59,
           "neurons_90": 1500, "fig7_anti_erasure": 0.982, "max_top_neuron": 1451}
    t = neurons.SUMMARY_TABLE(pd.DataFrame([row]))
    fold = dict(zip(t.left_out(), t.cells(t.left_out())[0]))
    assert fold["top1_fraction"] == "10.4%" and fold["erasure_top"] == "59.0%" and fold["fig7_anti_erasure"] == "98.2%"
    assert fold["max_top_neuron"] == "1451" and fold["neurons_90"] == "1,500"
    for c in t.left_out():
        assert "_" not in t.header(c) and t.named(c), c
    s = pd.DataFrame({"label": ["L16H2", "L15H2", "L11H2"], "neurons_50": [24, 201, 253], "d_mlp": [2048] * 3})
    assert half_spread(s) == "24 of the layer's 2,048 neurons for L16H2, 201 for L15H2 and 253 for L11H2"
    assert half_spread(s.iloc[:1]) == "24 of the layer's 2,048 neurons for L16H2"


@pytest.mark.parametrize("norm, down, word", [(5.08, 5.6, "about half of it (48%"), (2.0, 8.0, "less than half of it (20%"),
                                              (8.0, 2.0, "most of it (80%")])
def test_chapter7_error_split_words_follow_the_share(norm, down, word):
    """Issue 25 (read3 #38): Solution 7.1 said "mostly the downstream components' part" of 5.6
    logits against 5.08 (52%): the words come from the final norm's computed share."""
    from selfrepair.exercises.reveal import _error_split

    said = _error_split(norm, down)
    assert f"the final norm's scale carries {word}" in said and "mostly" not in said


def test_chapter2_takeaway_names_its_one_answer_before_the_mechanism():
    """"That share is the chapter's one answer" follows the share it names, not Fig 4's head's logits."""
    ch, share = _layernorm_full(0.0)
    text = layernorm.findings(ch)[-1].text
    assert text.index("That share is the chapter's one answer") < text.index("The paper's mechanism")
    assert text.index(f"{share.value:.0%} of a late-layer head") < text.index("That share")
