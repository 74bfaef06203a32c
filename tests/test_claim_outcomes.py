"""Every outcome of every converted chapter's rules, rendered: for each claim, an interval on the
paper's side of its threshold holds, one on the other side differs, one across it cannot tell, an
unreliable one cannot tell — and intervals that end exactly on a threshold are decided as the rule's
words say (inclusive for "at least", "at most" and "between"; exclusive for "above" and "below")."""

from __future__ import annotations

import html
import importlib
import math
import pkgutil
import re

import pytest

import selfrepair.chapters as chapters
from selfrepair.claims import Claim, Verdict, interval_words, render, rules_table
from selfrepair.uncertainty import Estimate

from test_claims import NOT_CONVERTED


def converted_claims() -> list[Claim]:
    found = {}
    for m in pkgutil.iter_modules(chapters.__path__):
        mod = importlib.import_module(f"selfrepair.chapters.{m.name}")
        if m.name in NOT_CONVERTED or m.name.split("_")[0] in NOT_CONVERTED:
            continue
        for value in vars(mod).values():
            values = value if isinstance(value, tuple) else [value]
            found.update({(c.key, c.statement): c for c in values if isinstance(c, Claim)})
    return [c for c in found.values() if c.rule.op != "proportional"]


CLAIMS = converted_claims()
# For an interval that starts exactly at the threshold and rises, and one that ends exactly at it
# and falls: what each rule's words say.
AT_THRESHOLD = {">": ("cannot tell", "differs"), ">=": ("holds", "cannot tell"),
                "<": ("differs", "cannot tell"), "<=": ("cannot tell", "holds")}


def verdict(claim: Claim, lo: float, hi: float, why: str = "") -> Verdict:
    return Verdict.of(claim, Estimate((lo + hi) / 2, lo, hi, 40, "units", 30 if not why else 5, "prompts", 7,
                                      1000, why))


def test_the_converted_chapters_have_claims():
    keys = {c.key for c in CLAIMS}
    assert {"unembed", "restored", "slope", "erasure", "own", "localised", "ranks", "top", "blind", "does_ioi",
            "repaired", "backups", "moved", "many", "norm_share", "between"} <= keys


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.key)
def test_each_outcome_renders_with_matching_words(claim):
    b = claim.rule.bounds
    width = max(abs(b[-1] - b[0]), abs(b[0]), 1.0) * 0.5
    if claim.rule.op == "between":
        holds, other, straddle = (b[0], b[1]), (b[1] + width, b[1] + 2 * width), (b[0] - width, b[0] + 1e-9)
    elif claim.rule.op in (">", ">="):
        holds, other, straddle = (b[0] + width, b[0] + 2 * width), (b[0] - 2 * width, b[0] - width), (b[0] - width, b[0] + width)
    else:
        holds, other, straddle = (b[0] - 2 * width, b[0] - width), (b[0] + width, b[0] + 2 * width), (b[0] - width, b[0] + width)
    cases = [(holds, "holds", ""), (other, "differs", ""), (straddle, "cannot tell", ""),
             (holds, "cannot tell", "only 5 independent prompts; a cluster bootstrap needs at least 10")]
    for (lo, hi), word, why in cases:
        v = verdict(claim, lo, hi, why)
        assert v.word == word and word in v.outcomes, (claim.key, lo, hi)
        line = render([v])
        assert f"**{word}**" in line
        rule = line[line.index("<details>"):]
        for outcome, phrase in (("holds", "holds when"), ("differs", "differs when"), ("cannot tell", "cannot tell when")):
            assert (phrase in rule) == (outcome in v.outcomes)
        assert claim.rule.word in rule and claim.rule.reason in rule
        if why:
            assert "no reliable 95% interval" in line and "We cannot tell here" in line
        elif word == "cannot tell":
            assert "straddles the rule's threshold" in line
        else:
            assert interval_words(lo, hi, claim.fmt) in line
            assert "cluster bootstrap over 30 prompts, 1,000 replicates, seed 7" in line


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.key)
def test_intervals_ending_exactly_on_a_threshold(claim):
    b, op = claim.rule.bounds, claim.rule.op
    if op == "between":
        assert verdict(claim, b[0], b[1]).word == "holds"  # both ends on the bounds: inside
        assert verdict(claim, b[1], b[1] + 0.5).word == "cannot tell"  # from the upper bound up
        assert verdict(claim, b[0] - 0.5, b[0]).word == "cannot tell"  # up to the lower bound
        assert verdict(claim, math.nextafter(b[1], math.inf), b[1] + 0.5).word == "differs"
        return
    up, down = AT_THRESHOLD[op]
    assert verdict(claim, b[0], b[0] + 0.5).word == up, claim.key
    assert verdict(claim, b[0] - 0.5, b[0]).word == down, claim.key


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.key)
def test_a_verdict_links_to_its_chapters_rules_table_instead_of_repeating_them(claim):
    b = claim.rule.bounds
    v = verdict(claim, b[0] - 1.0, b[-1] + 1.0)  # across the threshold: cannot tell
    line = render([v], rules="ch00-rules")
    assert "<details>" not in line and '<a href="#ch00-rules">how this is decided</a>' in line
    assert "**cannot tell**" in line and "straddles the rule's threshold" in line
    rules = rules_table([claim])
    table, *rest = rules.split("\n\n")
    assert claim.rule.word in table and claim.metric in "\n\n".join(rest)
    assert claim.rule.text(claim.fmt) in table and claim.rule.opposite(claim.fmt) in table
    assert "cannot tell" in rules
    if claim.rule.reason:
        assert claim.rule.reason in "\n\n".join(rest)
    assert len(table.splitlines()) == 1 and table.count("<tr>") == 2  # one HTML line: header, one row


def test_the_rules_table_has_one_row_per_claim_of_four_labelled_cells():
    """One paper-style table, on one line (the Markdown keeps an HTML block whole up to a blank
    line), one row per claim of four cells, each labelled with its header for a phone, which
    shows every row as a block (``stacked``) instead of four columns wider than its screen."""
    from selfrepair.chapters import hydra
    from selfrepair.claims import RULES_HEADERS

    table = rules_table(hydra.CLAIMS).split("\n\n")[0]
    assert "\n" not in table and 'class="selfrepair-table stacked"' in table
    body = table[table.index("<tbody>"):]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    assert len(rows) == len(hydra.CLAIMS)
    headers = [h.replace("'", "&#x27;") for h in RULES_HEADERS.values()]
    for row, claim in zip(rows, hydra.CLAIMS):
        assert re.findall(r'data-label="([^"]*)"', row) == headers
        assert claim.statement in html.unescape(row.replace("<wbr>", ""))


@pytest.mark.parametrize("chapter", ["existence", "layernorm", "neurons", "iterative", "hydra", "atp", "ioi"])
def test_the_rules_give_each_words_reading_once(chapter):
    """A chapter whose claims read the same word ("many" three times in chapter 1) gives that
    word's reason once, not once per claim; every claim's metric and reason are still there."""
    claims = importlib.import_module(f"selfrepair.chapters.{chapter}").CLAIMS
    rules = rules_table(claims)
    for c in claims:
        assert c.metric in rules, c.key
        if c.rule.reason:
            assert rules.count(c.rule.reason) == 1, (c.key, c.rule.word)
