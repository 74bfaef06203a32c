"""The claim objects: a verdict is holds / differs only when its 95% interval is clear of the
rule's threshold, cannot tell otherwise (small samples, too few clusters, failed tasks), and the text
carries the number, its interval, its sample size and seed, with the rule one click away. Every
chapter's claims name the paper's word or number their rule reads, and the reason (the words from
one table, PAPER_WORDS); the chapters not yet converted are listed in NOT_CONVERTED."""

import importlib
import math
import pkgutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selfrepair.chapters as chapters
from selfrepair.claims import (ALMOST_ALWAYS_QUOTED, BELOW, PAPER_WORDS, Claim, Verdict, above, at_least, at_most,
                               anchor, below, between, bootstrap, paper_number, paper_word, render,
                               render_claim, wilson)
from selfrepair.uncertainty import Estimate

MOST = Claim("most", "Most tokens do it", "§1", "the share of tokens that do it", above(0.5), fmt=".0%",
             reading="{value} of the {n} {unit} do it.")


def test_wilson_interval_matches_a_textbook_value_and_covers_the_share():
    lo, hi = wilson(81, 263)  # Newcombe (1998): 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson(0, 0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.floats(0, 1))
def test_wilson_contains_the_observed_share_and_narrows_with_n(n, p):
    k = round(p * n)
    lo, hi = wilson(k, n)
    assert lo <= k / n <= hi
    lo4, hi4 = wilson(4 * k, 4 * n)
    assert hi4 - lo4 <= hi - lo + 1e-12


def test_a_small_sample_cannot_tell_and_a_large_one_decides():
    small = Verdict.share(MOST, [True, True, False], "tokens")  # 67%, but only 3 tokens
    assert small.value == pytest.approx(2 / 3) and small.holds is None and small.word == "cannot tell"
    large = Verdict.share(MOST, [True] * 670 + [False] * 330, "tokens")  # 67% of 1,000
    assert large.holds is True
    against = Verdict.share(MOST, [True] * 300 + [False] * 700, "tokens")
    assert against.holds is False


@pytest.mark.parametrize("rule, lo, hi, want", [
    (above(0.5), 0.6, 0.8, True), (above(0.5), 0.2, 0.4, False), (above(0.5), 0.4, 0.6, None),
    (at_least(1 / 3), 1 / 3, 0.5, True), (below(0.5), 0.1, 0.6, None), (at_most(0.5), 0.51, 0.9, False),
    (between(0.15, 0.45), 0.2, 0.4, True), (between(0.15, 0.45), 0.5, 0.7, False),
    (between(0.15, 0.45), 0.01, 0.1, False), (between(0.15, 0.45), 0.1, 0.3, None),
    (above(0.5), float("nan"), 0.7, None)])
def test_decide_on_an_interval(rule, lo, hi, want):
    assert rule.decide(lo, hi) is want


def test_exact_quantities_are_decided_on_their_value_and_failed_tasks_not_at_all():
    exact = Verdict(MOST, 0.7, 12, "heads")
    assert exact.lo is None and exact.holds is True
    failed = Verdict.share(MOST, [True] * 900 + [False] * 100, "prompts", why="the model fails the task")
    assert failed.value == 0.9 and failed.holds is None
    text = render([failed])
    assert "**cannot tell**" in text and "We cannot tell here: the model fails the task" in text
    assert "**90%**" in text and "1,000 prompts" in text


def test_rendered_sentence_has_the_number_interval_and_sample_size_and_hides_the_rule():
    v = Verdict.share(MOST, [True] * 70 + [False] * 30, "tokens")
    line = render([v], intro="**On m**.").splitlines()[1]
    lo, hi = wilson(70, 100)
    assert line.startswith(f'- <span id="{anchor(MOST)}"></span>*Most tokens do it* (§1): **holds**.')
    assert f"**70%** (95% interval {lo:.0%} to {hi:.0%}) of the 100 tokens do it." in line
    rule_at = line.index("<details>")
    assert "above 50%" in line[rule_at:] and "above 50%" not in line[:rule_at]  # the rule is collapsed
    assert line.endswith("</details>")


def test_bootstrap_mean_interval_is_reproducible_and_covers_the_mean():
    x = np.random.default_rng(0).normal(1.0, 2.0, 400)
    lo, hi = bootstrap(x, seed=3)
    assert (lo, hi) == bootstrap(x, seed=3) and lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.15)
    m = Verdict.mean(MOST, np.r_[x, np.nan], "heads")
    assert m.n == 400 and m.value == pytest.approx(x.mean())


# -- the papers' words, the uncertainty layer's verdicts, every chapter's claims ---------------------
MANY = Claim("many", "Many heads do it", "§1", "the share of heads that do it", paper_word("many"), fmt=".0%",
             reading="{value} of the {n} {unit} do it.", rationale="the paper says many")


ANCHOR = '<span id="claim-many"></span>'  # a claim's place in its chapter, linked from the scorecard


def estimate(value, lo, hi, clusters=40, why="", n=36):
    return Estimate(value, lo, hi, n, "late-layer heads", clusters, "documents", 7, 1000, why)


def test_paper_words_have_thresholds_with_reasons_and_quote_the_papers_numbers():
    for word, rule in PAPER_WORDS.items():
        assert rule.word == word and len(rule.reason) > 40, word
    almost = PAPER_WORDS["almost always"]
    for ablation, share_ in ALMOST_ALWAYS_QUOTED:  # the paper's numbers, quoted from the data
        assert f"{share_:.2%} ({ablation})" in almost.reason
    assert almost.bounds[0] <= min(v for _, v in ALMOST_ALWAYS_QUOTED)  # what it calls "almost always" is
    assert almost.decide(0.92, 0.99) is True and almost.decide(0.5, 0.8) is False
    assert PAPER_WORDS["most"].decide(0.45, 0.7) is None and PAPER_WORDS["many"].decide(0.3, 0.4) is True
    assert PAPER_WORDS["proportional"].bounds[0] == PAPER_WORDS["approximately zero"].bounds[1]
    fall = paper_word("significant", "<")  # the same threshold and reason on the other side
    assert (fall.bounds, fall.reason, fall.word) == (PAPER_WORDS["significant"].bounds,
                                                     PAPER_WORDS["significant"].reason, "significant")
    assert fall.decide(-0.3, -0.1) is True and fall.decide(0.1, 0.2) is False
    with pytest.raises(KeyError, match="not in PAPER_WORDS"):
        paper_word("usually")
    with pytest.raises(ValueError, match="names the number"):
        paper_number(">=", 0.3, "", "")


@pytest.mark.parametrize("lo, hi, clusters, want", [
    (0.30, 0.60, 40, "holds"), (0.05, 0.20, 40, "differs"), (0.20, 0.40, 40, "cannot tell"),
    (0.30, 0.60, 6, "cannot tell")])
def test_render_prints_each_outcome_with_value_interval_n_and_seed(lo, hi, clusters, want):
    why = "only 6 independent documents; a cluster bootstrap needs at least 10" if clusters < 10 else ""
    v = Verdict.of(MANY, estimate(0.45, lo, hi, clusters, why))
    line = render([v])
    assert v.word == want and want in v.outcomes
    how = f"cluster bootstrap over {clusters} documents, 1,000 replicates, seed 7) of the 36 late-layer heads do it."
    if clusters < 10:  # an unreliable interval is not printed as if it were one
        assert line.startswith(f"- {ANCHOR}*Many heads do it* (§1): **{want}**. **45%** (no reliable 95% interval; {how}")
        assert "We cannot tell here: only 6 independent documents" in line
    else:
        assert line.startswith(f"- {ANCHOR}*Many heads do it* (§1): **{want}**. **45%** (95% interval {lo:.0%} to "
                               f"{hi:.0%}; {how}")
    if clusters >= 10 and want == "cannot tell":
        assert "straddles the rule's threshold" in line
    rule = line[line.index("<details>"):]
    assert "“many”" in rule and PAPER_WORDS["many"].reason in rule and "the paper says many" in rule
    # the rule text describes exactly the outcomes this verdict can print
    for outcome, phrase in (("holds", "holds when"), ("differs", "differs when"), ("cannot tell", "cannot tell when")):
        assert (phrase in rule) == (outcome in v.outcomes), outcome


def test_each_claim_is_anchored_once_where_its_first_verdict_is():
    """The scorecard links to ``<chapter page>#claim-<key>``: one id per claim on a page, on its
    first verdict (chapter 6 decides one claim per cached run)."""
    a, b = Verdict(MOST, 0.7, 12, "heads of m1"), Verdict(MOST, 0.4, 12, "heads of m2")
    lines = render([a, b, Verdict.of(MANY, estimate(0.45, 0.3, 0.6))]).splitlines()
    assert [line.count('id="claim-') for line in lines] == [1, 0, 1]
    assert lines[0].startswith(f'- <span id="{anchor(MOST)}"></span>') and anchor(MANY) in lines[2]


def test_render_claim_is_the_verdict_render_writes_and_the_overview_links_down_to_it():
    """A chapter shows each claim's full verdict right after its figure (:func:`render_claim`) and
    an overview early on (``render(..., below=...)``): the statement linked to the
    claim's anchor, and one sentence above the list (read3 #12: not "the figure, then the verdict
    (see below)" after every claim) (not the verdict's word: the reader meets it after the figure), which only the full verdict carries — once per page."""
    a, b = Verdict(MOST, 0.7, 12, "heads of m1"), Verdict(MOST, 0.4, 12, "heads of m2")
    many = Verdict.of(MANY, estimate(0.45, 0.3, 0.6))
    verdicts = [a, b, many]
    full = render(verdicts, rules="ch00-rules").splitlines()
    assert render_claim(verdicts, "many", rules="ch00-rules") == full[2]
    assert render_claim(verdicts, "most", rules="ch00-rules").splitlines() == full[:2]  # one item per run
    overview = render(verdicts, "**On m**.", rules="ch00-rules", below={"many": None})
    lines = overview.splitlines()
    assert lines[0] == f"**On m**. {BELOW}" and lines[1:3] == full[:2]  # a claim without a figure keeps its verdict
    # the statement links to its verdict; "the figure, then the verdict" is said once, above the list
    assert lines[3] == f'- <a href="#{anchor(MANY)}">*Many heads do it*</a> (§1)'
    assert overview.count("figure") == 1 and "see below" not in overview
    assert "holds" not in lines[3]
    page = overview + "\n" + render_claim(verdicts, "many", rules="ch00-rules")
    assert page.count(f'id="{anchor(MANY)}"') == 1 and page.count(f'id="{anchor(MOST)}"') == 1
    assert 'href="#ch00-rules"' in render_claim(verdicts, "many", rules="ch00-rules")
    with pytest.raises(KeyError, match="no verdict of claim 'few'"):
        render_claim(verdicts, "few")


def test_an_exact_rule_describes_two_outcomes_and_a_failed_test_three():
    exact = Verdict(MOST, 0.7, 12, "heads")
    assert exact.outcomes == ("holds", "differs") and "cannot tell when" not in render([exact])
    untestable = Verdict(MOST, 0.7, 12, "heads", why="the model fails the task")
    assert untestable.word == "cannot tell" and "cannot tell" in untestable.outcomes
    assert "we cannot tell when the claim cannot be tested on this run" in render([untestable])


def test_a_proportional_rule_needs_a_slope_above_zero_and_an_intercept_near_zero():
    prop = Claim("prop", "y is proportional to x", "§6", "the least-squares line of y on x",
                 paper_word("proportional"), fmt=".2f")

    def verdict(slope, icpt):
        return Verdict.linear(prop, estimate(sum(slope) / 2, *slope), estimate(sum(icpt) / 2, *icpt))

    assert verdict((0.5, 0.9), (-0.05, 0.08)).word == "holds"
    assert verdict((-0.3, -0.1), (-0.05, 0.08)).word == "differs"  # falling
    assert verdict((0.5, 0.9), (0.3, 0.5)).word == "differs"  # rising, but with a large offset: not proportional
    assert verdict((0.5, 0.9), (-0.05, 0.3)).word == "cannot tell"
    text = render([verdict((0.5, 0.9), (0.3, 0.5))])
    assert "The slope is 0.70 (95% interval 0.50 to 0.90): holds" in text
    assert "The intercept / mean y is 0.40 (95% interval 0.30 to 0.50): differs" in text
    with pytest.raises(ValueError, match="proportional"):
        Verdict.linear(MANY, estimate(1, 0, 2), estimate(0, -1, 1))


def chapter_claims(name: str) -> list[Claim]:
    """Every Claim a chapter module defines (module constants, tuples and dicts of them)."""
    mod = importlib.import_module(f"selfrepair.chapters.{name}")
    found = {}
    for value in vars(mod).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
        found.update({id(c): c for c in values if isinstance(c, Claim)})
    return list(found.values())


WITH_CLAIMS = [m.name for m in pkgutil.iter_modules(chapters.__path__) if chapter_claims(m.name)]
# Chapters whose claims are not yet on PAPER_WORDS / the uncertainty layer (issue 21). Strict xfail:
# a chapter that converts makes its case pass, which fails here until it is taken off this list.
NOT_CONVERTED = []


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="chapter not yet converted to the paper's-words rules (issue 21)"))
    if n in NOT_CONVERTED else n for n in WITH_CLAIMS])
def test_every_claim_names_the_papers_word_or_number_and_why(name):
    for c in chapter_claims(name):
        for rule in (c.rule, *c.classify):
            assert rule.word and rule.reason, f"{name}.{c.key}: the rule names no paper word or number"
            if rule.word in PAPER_WORDS:  # a word of the table reads as the table says
                table = PAPER_WORDS[rule.word]
                assert (rule.bounds, rule.reason) == (table.bounds, table.reason), f"{name}.{c.key}"
            said = " ".join((c.statement, c.rationale, c.metric, c.paper_context)).lower()
            assert rule.word.lower() in said, f"{name}.{c.key}: '{rule.word}' is not in the claim's words"


def test_the_converted_list_names_real_chapters_and_chapter_1_is_off_it():
    assert set(NOT_CONVERTED) <= set(WITH_CLAIMS) and "existence" in WITH_CLAIMS
    assert "existence" not in NOT_CONVERTED


def test_scientific_numbers_read_as_prose():
    """No "1.1×10⁰": a power of ten from 10⁻¹ to 10² is printed plainly, with the same digits."""
    from selfrepair.rules import number

    assert [number(x, ".1e") for x in (1.08, 0.94, 123.4, 1.6e-6, 1234.0)] == ["1.1", "0.94", "120", "1.6×10⁻⁶",
                                                                             "1.2×10³"]
    assert number(-0.051, "+.2e") == "−5.10×10⁻²" and number(2.5, "+.1e") == "+2.5"


def test_a_rationale_shared_by_several_claims_is_said_once_in_the_rules_table():
    """Chapter 2 printed the last-layer class's paragraph four times, chapter 3 "chosen as §4.2
    chooses … 'highlights this well'" twice, chapter 7 Kramár's "pre-filtering step" twice: the
    rules table says each once, and the later claims refer to it."""
    import html as html_
    import re as re_

    from selfrepair.chapters import atp, layernorm_claims, neurons_claims
    from selfrepair.claims import AS_ABOVE, rules_table, said_once

    for claims, passage in ((layernorm_claims.CLAIMS, "argues the mechanism for"),
                            (neurons_claims.CLAIMS, "highlights this well"),
                            (atp.CLAIMS, "components that matter but that AtP ranks low")):
        text = html_.unescape(re_.sub(r"<[^>]+>", "", rules_table(claims)))
        assert text.count(passage) == 1, (passage, text)
        assert AS_ABOVE.strip() in text
    long = "x " * 10 + "the class is every head of the last layer: " + "because of a long reason " * 6
    once = said_once(["first; " + long, "second; " + long, "short"])
    assert once[0] == "first; " + long and once[2] == "short"
    assert once[1].rstrip() == "second; x x x x x x x x x x the class is every head of the last layer" + AS_ABOVE
