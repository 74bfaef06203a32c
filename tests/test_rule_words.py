"""A rule said in sentences (issue 25): "holds when the whole interval is above 0", never the
template "holds for above 0" / "differs for between -0.100 and 0.100"; an interval that only
touches a threshold said so, never "straddles"; a difference of shares in percentage points."""

from __future__ import annotations

import html
import importlib
import pkgutil
import re

import pytest

import selfrepair.chapters as chapters
from selfrepair.claims import Claim, Verdict, paper_word, render, rules_table
from selfrepair.findings import claim_phrase
from selfrepair.rules import Rule, number, bound, interval_words
from selfrepair.uncertainty import Estimate


def book_claims() -> list[Claim]:
    """Every claim of every chapter module (``CLAIMS`` and the claims defined beside it)."""
    found = {}
    for m in pkgutil.iter_modules(chapters.__path__):
        mod = importlib.import_module(f"selfrepair.chapters.{m.name}")
        for value in vars(mod).values():
            for c in value if isinstance(value, tuple) else [value]:
                if isinstance(c, Claim):
                    found[(c.key, c.statement)] = c
    return list(found.values())


CLAIMS = book_claims()
# each kind of rule, as its sentences read (the fmt and bounds of a typical claim)
SENTENCES = {
    ">": (Rule(">", (0.0,)), ".3f", "the whole interval is above 0", "the whole interval is at or below 0"),
    ">=": (Rule(">=", (0.9,)), ".1%", "the whole interval is at least 90%", "the whole interval is below 90%"),
    "<": (Rule("<", (0.25,)), ".0%", "the whole interval is below 25%", "the whole interval is at or above 25%"),
    "<=": (Rule("<=", (-0.5,)), ".2f", "the whole interval is at most −0.5", "the whole interval is above −0.5"),
    "between": (paper_word("approximately zero"), ".3f", "the whole interval lies inside −0.1 to 0.1",
                "the whole interval lies above 0.1 or below −0.1"),
    "proportional": (paper_word("proportional"), ".3f",
                     "the slope's whole interval is above 0 and the intercept's lies inside ±10% of the mean of y",
                     "the slope's whole interval is at or below 0, or the intercept's lies wholly outside ±10% of "
                     "the mean of y"),
}


def estimate(lo: float, hi: float, value: float | None = None) -> Estimate:
    return Estimate((lo + hi) / 2 if value is None else value, lo, hi, 10, "heads", 32, "documents", 0, 1000)


@pytest.mark.parametrize("op", list(SENTENCES))
def test_every_kind_of_rule_reads_as_a_sentence(op):
    rule, fmt, holds, differs = SENTENCES[op]
    assert rule.when(fmt) == holds and rule.when(fmt, False) == differs


def test_the_books_claims_use_every_kind_of_rule():
    """The sentences above cover every rule a claim or its per-unit classes decide by."""
    assert {r.op for c in CLAIMS for r in (c.rule, *c.classify)} == set(SENTENCES)


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c.key}-{c.source}")
def test_every_claims_rules_table_row_is_two_sentences(claim):
    """The rules table's cells, after "holds when" / "differs when", are clauses with a subject (the
    old cells were bare thresholds under "holds when the 95% interval is": "above 0", or "a line
    through the origin (...)" that read as "the interval is a line"), with thresholds as exact
    numbers (-0.1, not -0.100)."""
    table = html.unescape(rules_table([claim]).split("\n\n")[0].replace("<wbr>", ""))
    cells = dict(re.findall(r'data-label="([^"]*)">(.*?)</td>', table))
    assert set(cells) >= {"holds when", "differs when"}
    for header, cell in (("holds when", cells["holds when"]), ("differs when", cells["differs when"])):
        assert cell.startswith(("the whole 95% interval ", "the whole interval ", "the slope's whole interval ")), cell
        assert re.search(r"\d\.\d*0(?![\d×])", cell) is None, cell  # no trailing zero on a threshold
        assert f"{header} {cell}" == f"{header} {claim.rule.when(claim.fmt, header == 'holds when', 'the whole 95% interval' if header == 'holds when' else 'the whole interval')}"


def test_a_part_of_a_verdict_says_why_it_holds_or_differs():
    """Chapter 4's line: "The intercept / mean y is 0.134 (...): differs, as the whole interval is
    above 0.1, outside -0.1 to 0.1" (was "differs for between -0.100 and 0.100")."""
    from selfrepair.chapters.iterative import PROPORTIONAL

    v = Verdict.linear(PROPORTIONAL, estimate(0.228, 0.284, 0.256), estimate(0.102, 0.163, 0.134))
    line = render([v])
    assert v.word == "differs"
    assert "The slope is 0.256 (95% interval 0.228 to 0.284): holds, as the whole interval is above 0." in line
    assert ("The intercept / mean y is 0.134 (95% interval 0.102 to 0.163): differs, as the whole interval "
            "is above 0.1, outside −0.1 to 0.1.") in line
    assert " for above" not in line and " for between" not in line and "0.100" not in line
    undecided = render([Verdict.linear(PROPORTIONAL, estimate(0.2, 0.3), estimate(0.05, 0.2))])
    assert "cannot tell, as the interval straddles the rule's threshold, 0.1." in undecided
    assert "The intercept / mean y is undecided, so we cannot tell." in undecided


@pytest.mark.parametrize("fmt", [".0%", ".1%"])
def test_an_interval_ending_exactly_at_the_threshold_is_not_said_to_straddle_it(fmt):
    """Chapter 7: 50% (95% interval 50% to 60%) against "above 50%" cannot tell because 50% is not
    above 50%, not because the interval straddles 50%."""
    claim = Claim("top", "Most of them are found", "§1", "a share", paper_word("most"), fmt=fmt)
    v = Verdict.of(claim, estimate(0.5, 0.6, 0.5))
    assert v.word == "cannot tell"
    line = render([v])
    line = line[:line.index("<details>")]  # the verdict (the rule's general words follow it)
    at = f"at the rule's threshold, {bound(0.5, fmt)}"
    assert f"The interval has its lower end {at}, so we cannot tell." in line and "straddles" not in line
    phrase, _ = claim_phrase(v)
    assert f"which has its lower end {at}: the claim holds only when the whole interval is above 50%" in phrase
    assert "straddles" not in phrase
    crossing = Verdict.of(claim, estimate(0.45, 0.6, 0.5))  # a threshold inside the interval: straddles
    assert "The interval straddles the rule's threshold, 50%, so we cannot tell." in render([crossing])
    assert "which straddles the rule's threshold, 50%" in claim_phrase(crossing)[0]
    upper = Verdict.of(Claim("all", "Almost all", "§1", "a share", paper_word("almost always"), fmt=fmt),
                       estimate(0.85, 0.9))  # "at least 90%": an upper end at 90% leaves the rest below
    assert f"has its upper end at the rule's threshold, {bound(0.9, fmt)}" in render([upper])


def test_a_difference_of_shares_prints_in_percentage_points():
    """Chapter 3's erasure claim is a difference of two shares: "21 percentage points above", never
    "+21%" or "21% above"."""
    from selfrepair.chapters.neurons_claims import ERASURE

    assert number(0.21, ".0pp") == "21 percentage points"
    assert interval_words(0.11, 0.28, ".0pp") == "95% interval 11 to 28 percentage points"
    assert not ERASURE.fmt.startswith("+")  # its words carry the sign
    v = Verdict.of(ERASURE, estimate(0.11, 0.28, 0.21))
    line = render([v])
    assert ("The share of erasure neurons among the neurons that repair most is **21 percentage points** "
            "(95% interval 11 to 28 percentage points;") in line
    assert ") above their share among all of the layer's neurons" in line
    assert not re.search(r"[+]?\d+%\s*(above|\()", line) and "+21" not in line
    assert claim_phrase(v)[0].endswith(": 21 percentage points above, 95% interval 11 to 28 percentage points")
    below = Verdict.of(ERASURE, estimate(-0.2, -0.05, -0.1))
    assert "**10 percentage points** (95% interval 5 to 20 percentage points;" in render([below])
    assert "below their share" in render([below])
