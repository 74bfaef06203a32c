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
from selfrepair.reading import word_anchor
from selfrepair.claims import (Claim, Signed, Verdict, interval_words, is_zero, render, rules_table, size,
                               thresholds)
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
            if isinstance(claim.reading, Signed):  # read in the frame of the words carrying the sign
                assert claim.reading.interval(v.value, lo, hi, claim.fmt, thresholds(claim.rule)) in line
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
    assert html.escape(claim.rule.when(claim.fmt, True, "the whole 95% interval")) in table.replace("<wbr>", "")
    assert html.escape(claim.rule.when(claim.fmt, False)) in table.replace("<wbr>", "")
    assert "cannot tell" in rules
    if claim.rule.reason:  # the word's reason is said once for the book, linked (read3 #10)
        assert claim.rule.reason not in rules and f'#{word_anchor(claim.rule.word)}"' in "\n\n".join(rest)
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
def test_the_rules_link_to_the_books_one_reading_instead_of_repeating_it(chapter):
    """read3 #10: every chapter repeated "How the paper's words are read" and the closing "A claim
    holds or differs only when its whole 95% interval lies on one side …" verbatim. Now a chapter
    keeps its own table and metrics, and one sentence links each word it reads to the book's one
    reading (the scorecard page); every claim's metric is still there."""
    from selfrepair.reading import READING, decision_rule

    claims = importlib.import_module(f"selfrepair.chapters.{chapter}").CLAIMS
    rules = rules_table(claims)
    assert "How the paper's words are read" not in rules and "lies on one side" not in rules
    assert decision_rule()[:60] not in rules and f'href="{READING}"' in rules
    for c in claims:
        assert c.metric in rules, c.key
        if c.rule.reason:
            assert c.rule.reason not in rules and f'#{word_anchor(c.rule.word)}"' in rules, c.key


# -- signed values read from their sign (issue 25) ---------------------------------------------------
def every_claim() -> list[Claim]:
    """Every claim of every chapter, "proportional" ones included."""
    found = {}
    for m in pkgutil.iter_modules(chapters.__path__):
        mod = importlib.import_module(f"selfrepair.chapters.{m.name}")
        for value in vars(mod).values():
            values = value if isinstance(value, tuple) else [value]
            found.update({(c.key, c.statement): c for c in values if isinstance(c, Claim)})
    return list(found.values())


SIGN_AFTER_WORD = re.compile(r"\b(by|of|back)\s+(\*\*)?[-−+]")
# Claims whose metric cannot be negative (a mean absolute size, a share of sizes): their readings may
# put the value after "by" or "of", since it never carries a sign; each metric says why.
UNSIGNED = {"appendix_b": "absolute error", "appendix_h": "|(S/S′ − 1)", "norm_share": "clipped", "blind": "²"}


def sentence(claim: Claim, value: float) -> str:
    """The claim's verdict sentence (its reading, the value and interval in it) for ``value``."""
    spread = max(abs(value), 0.01) * 0.2
    v = verdict(claim, value - spread, value + spread)
    v = Verdict(claim, value, v.n, v.unit, "", value - spread, value + spread, "", v.estimate)
    return render([v]).split("<details>")[0]


@pytest.mark.parametrize("claim", every_claim(), ids=lambda c: c.key)
def test_no_signed_number_after_by_of_back_nor_a_negative_gloss(claim):
    """Whatever the value's sign, no claim's sentence reads "by -5%", "gives back -196%" or
    "-456% (negative: a fall)": a signed value's reading is a claims.Signed, said from its sign."""
    for value in (-4.56, -0.43, -0.0001, 0.0, 0.43, 4.56):
        said = sentence(claim, value)
        assert "(negative:" not in said, (claim.key, said)
        if claim.key in UNSIGNED:
            assert UNSIGNED[claim.key] in claim.metric  # a size: never negative
            continue
        assert not SIGN_AFTER_WORD.search(said), (claim.key, value, said)


SIGNED = [c for c in every_claim() if isinstance(c.reading, Signed)]


@pytest.mark.parametrize("claim", SIGNED, ids=lambda c: c.key)
def test_a_signed_reading_says_its_sign_in_words_and_its_size_bold(claim):
    """Up, down and zero read differently, the bold number is the size (no sign), and the interval's
    ends keep their signs."""
    zero = claim.reading.zero or claim.reading.up
    tiny = [x for x in (-1e-4, -1e-9) if is_zero(x, claim.fmt, thresholds(claim.rule))]  # negative, shown as 0
    for value, way in ((0.43, claim.reading.up), (-0.43, claim.reading.down), (0.0, zero), *((x, zero) for x in tiny[:1])):
        said = sentence(claim, value)
        shown = f"**{size(value, claim.fmt)}**"
        assert shown in said and not re.search(r"\*\*[-−+]", said), (claim.key, said)
        assert way.split("{value}")[0] in said, (claim.key, value, said)
        if value:
            assert claim.reading.up.split("{value}")[0] != claim.reading.down.split("{value}")[0] or \
                claim.reading.up.split("{value}")[-1] != claim.reading.down.split("{value}")[-1]
    said = sentence(claim, -0.43)  # a whole interval below 0: its ends as sizes, in increasing order
    assert interval_words(0.43 * 0.8, 0.43 * 1.2, claim.fmt.replace("+", "")) in said, (claim.key, said)
    assert interval_words(-0.43 * 1.2, -0.43 * 0.8, claim.fmt) not in said, (claim.key, said)


@pytest.mark.parametrize("claim", SIGNED, ids=lambda c: c.key)
def test_a_signed_readings_interval_is_read_in_the_frame_of_its_words(claim):
    """After words that carry the sign ("falls by 456%"), the interval is never "-589% to -204%":
    on the value's side of 0 its ends are sizes, in increasing order; across 0 each end is said
    in words from its own sign, and that the interval includes no change."""
    below = Verdict(claim, -4.56, 30, "prompts", "", -5.89, -2.04, "", None)
    said = render([below]).split("<details>")[0]
    assert interval_words(2.04, 5.89, claim.fmt.replace("+", "")) in said, (claim.key, said)
    assert not re.search(r"95% interval [-−]", said), (claim.key, said)
    across = Verdict(claim, -0.02, 30, "prompts", "", -0.07, 0.02, "", None)
    said = render([across]).split("<details>")[0]
    low, high = claim.reading.ends
    assert f"95% interval from {low.format('')}".rstrip() in said or low.split("{}")[0] in said, (claim.key, said)
    assert f"which includes {claim.reading.none}" in said, (claim.key, said)
    assert not re.search(r"95% interval [-−+]", said), (claim.key, said)


def test_the_newcomers_signed_intervals():
    """The newcomer's cases: "falls by 456% (95% interval -589% to -204%)", "take away a further
    196% (95% interval -227% to -168%)", chapter 8's "shrinks by 2.86 (95% interval -3.62 to -2.14)"."""
    from selfrepair.chapters.hydra_claims import ERASURE, RESTORED
    from selfrepair.chapters.ioi_claims import BACKUPS
    from selfrepair.chapters.iterative import EXIST

    def said(claim, value, lo, hi):
        return render([Verdict(claim, value, 30, "prompts", "", lo, hi, "", None)]).split("<details>")[0]

    assert "falls by **456%** (95% interval 204% to 589%)" in said(EXIST, -4.56, -5.89, -2.04)
    assert "take away a further **196%** (95% interval 168% to 227%)" in said(RESTORED, -1.96, -2.27, -1.68)
    assert "shrinks by **2.86** (95% interval 2.14 to 3.62)" in said(BACKUPS, -2.86, -3.62, -2.14)
    assert "falls by **20%** (95% interval from a fall of 50% to a rise of 10%, which includes no change)" in \
        said(EXIST, -0.2, -0.5, 0.1)


def test_the_cases_of_the_issue_read_from_their_sign():
    """The newcomer's cases: Hydra's restored share at -196%, the self-repressing head at -456%."""
    from selfrepair.chapters.hydra_claims import ERASURE, RESTORED, SLOPE
    from selfrepair.chapters.iterative import EXIST

    assert "the layers after it take away a further **196%**" in sentence(RESTORED, -1.96)
    assert "the opposite of giving back" in sentence(RESTORED, -1.96)
    assert "the layers after it give back **70%**" in sentence(RESTORED, 0.70)
    assert "its direct effect falls by **456%**" in sentence(EXIST, -4.56)
    assert "(it turns negative)" in sentence(EXIST, -4.56)
    assert "(it turns negative)" not in sentence(EXIST, -0.25)
    assert "its direct effect rises by **25%**" in sentence(EXIST, 0.25)
    assert "moves the other way (the way erasure predicts): a slope of **0.30**" in sentence(ERASURE, -0.3)
    assert "the other way (the way erasure predicts)" in sentence(ERASURE, -0.3)
    assert "the same way" in sentence(ERASURE, 0.3) and "erasure predicts" not in sentence(ERASURE, 0.3)
    # read3 #7: a slope said as a slope, never as something given back beside a share taken away
    assert "the per-layer slope of compensation on direct effect is **1.16**" in sentence(SLOPE, 1.16)
    assert "each extra logit of direct effect comes with that many more logits of compensation" in sentence(SLOPE, 1.16)
    assert "is below zero, at **0.20** (95% interval" in sentence(SLOPE, -0.2)
    assert "): each extra logit of direct effect comes with that many fewer" in sentence(SLOPE, -0.2)
    assert not any(w in sentence(SLOPE, x) for w in ("giving back", "gives back", "take away", "takes away")
                   for x in (-0.2, 0.8, 1.16))


def test_an_erasure_slope_whose_interval_includes_no_move_asserts_no_direction():
    """Chapter 5's "moves 0.02 logits the other way, as erasure predicts" with an interval of -0.07 to
    +0.02 and the verdict cannot tell: the sentence says the way erasure predicts, not that the late
    MLPs erase, and that the interval includes no move. read3 #11: the interval sat between the
    number and its unit and way ("moves 0.02 (95% interval ...) logits the other way"), and the
    summary said "which includes no move, which straddles ...": one clear sentence each."""
    from selfrepair.chapters.hydra_claims import ERASURE, SLOPE
    from selfrepair.findings import claim_phrase

    said = render([Verdict(ERASURE, -0.02, 30, "prompts", "", -0.07, 0.02, "", None)]).split("<details>")[0]
    assert "**cannot tell**" in said and "as erasure predicts" not in said, said
    assert ("moves the other way (the way erasure predicts): a slope of **0.02** (95% interval from 0.07 "
            "the other way to 0.02 the same way, which includes no move") in said, said
    phrase, _ = claim_phrase(Verdict(ERASURE, -0.02, 30, "prompts", "", -0.07, 0.02, "", None))
    assert "which includes no move: the claim holds only when" in phrase and "which straddles" not in phrase, phrase
    assert phrase.count("which") == 1, phrase
    phrase, _ = claim_phrase(Verdict(SLOPE, 1.16, 10, "layers", "", 0.82, 2.08, "", None))
    assert ("past the paper's cutoff: a per-layer slope of 1.16, 95% interval 0.82 to 2.08, which straddles "
            "the rule's threshold, 1") in phrase, phrase
    assert "giving back" not in phrase


CODE_NAME = re.compile(r"(?<![\w/.\\`{%:\-])([a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*)(?![\w/(])")


@pytest.mark.parametrize("claim", every_claim(), ids=lambda c: c.key)
def test_no_code_name_in_a_claims_prose(claim):
    """Chapter 5 said "'middle layers' are the middle half of the depth (structure.span)": a reader
    of the book meets the paper's and the introduction's words, not the library's function names."""
    reading = claim.reading.text if isinstance(claim.reading, Signed) else (claim.reading or "")
    for text in (claim.statement, claim.metric, claim.rationale, reading):
        names = [m for m in CODE_NAME.findall(text) if not re.fullmatch(r"(e\.g|i\.e)", m)]
        assert not names, (claim.key, names, text)


def test_no_code_name_in_the_notebooks_equations():
    """Chapter 7's method wrote eq. 2 as "Δlogit = ΔDE_head + from_heads + from_mlps + from_norm":
    the book's equations use the introduction's symbols (its eq. 2), never a table's column names."""
    import json
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("book/*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"])
                assert not re.search(r"from\\_(heads|mlps|norm|block)", text), (path.name, text[:200])
                assert "structure.span" not in text, path.name
