"""The claim objects: a verdict is holds / differs only when its 95% interval is clear of the
rule's threshold, cannot tell otherwise (small samples, failed tasks), and the text carries the
number, its interval and its sample size, with the rule one click away."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrepair.claims import (Claim, Verdict, above, at_least, at_most, below, between, bootstrap,
                               render, wilson)

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
    assert line.startswith("- *Most tokens do it* (§1): **holds**.")
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
