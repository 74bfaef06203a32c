"""The papers' claims as data: what each claim says, how this book measures it, the rule that
decides it and the paper's own number — rendered by one function.

A chapter defines its :class:`Claim` s once (module-level constants) and a function computing a
:class:`Verdict` per claim from its results. The metric's value and its 95% interval come from the
uncertainty layer (:mod:`selfrepair.uncertainty`: a cluster bootstrap over documents / rows /
prompts that recomputes the whole statistic in every replicate, :meth:`Verdict.of`); chapters not
yet moved there still use :meth:`Verdict.share` (Wilson) and :meth:`Verdict.mean` (a bootstrap of
independent values). A verdict is

- **holds** when the whole interval lies on the paper's side of the rule's threshold,
- **differs** when the whole interval lies on the other side,
- **cannot tell** when part of the interval meets the rule and part does not (it straddles the
  threshold, or an end is exactly at one the rule leaves out), when it is not reliable (too few
  independent units), or when the claim cannot be tested on this run (``why`` says which).

Every rule names the paper's word or number it reads (``Rule.word``) and why its threshold reads
it (``Rule.reason``); the papers' words map to thresholds in one table, :data:`PAPER_WORDS`
(:func:`paper_word`; both in :mod:`selfrepair.rules`, with :class:`Rule`, re-exported here), and the
paper's own numbers live in the claims' data. :func:`render` writes
one sentence per claim (or, for the claims a page shows beside their figures, a short overview
whose items link down to :func:`render_claim`'s full verdict) with its number, interval, sample size and seed, the rule and its reason
collapsed behind a click. Tests check the metrics, not the sentences; the rule is part of the
data, so the text states exactly the rule that was applied and every outcome it can print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from difflib import SequenceMatcher

import numpy as np
import pandas as pd

from .rules import (ALMOST_ALWAYS_QUOTED, PAPER_WORDS, Rule, _SIDES, number, above,  # noqa: F401 (re-exported)
                    against, approximately, at_least, at_most, below, between, interval_words, paper_number,
                    paper_word, signed_interval_words, Signed, is_zero, size, thresholds)
from .reading import UNDECIDED, link_sentence
from .tables import table
from .uncertainty import MIN_CLUSTERS, Estimate

RULES_HEADERS = {"claim": "claim", "word": "the paper's word", "holds": "holds when",
                 "differs": "differs when"}  # rules_table's columns and headers
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``successes / n`` (``nan`` for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n ** 2)) / (1 + Z95 ** 2 / n)
    # at 0 and n the bounds are exactly 0 and 1 (rounding would put them a hair inside)
    return (0.0 if successes == 0 else max(0.0, centre - half),
            1.0 if successes == n else min(1.0, centre + half))


def bootstrap(values, statistic=np.mean, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of ``statistic`` over ``values`` (rows of a 1-d or
    2-d array resampled with replacement); ``nan`` for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = np.array([statistic(x[i]) for i in idx])
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and how it is re-tested. ``rule.word`` names the paper's word or number
    the rule reads and ``rule.reason`` why; ``rationale`` says why the metric tests the claim;
    ``classify`` holds the per-unit rules the metric counts with (e.g. when a head's correlation is
    'clear'), each from :data:`PAPER_WORDS` where the paper uses one of its words."""

    key: str
    statement: str  # the paper's claim, in words
    source: str  # where the paper makes it, e.g. "§2.2, Fig 1"
    metric: str  # what this book computes, in words
    rule: Rule  # when the claim counts as holding on this model
    paper: float | None = None  # the paper's own value of the metric, where it reports one
    paper_context: str = ""  # what the paper's value was measured on
    fmt: str = ".2f"  # how the metric prints
    reading: "str | Signed" = ""  # the result in words, with {value}, {n} and {unit} filled in; a
    # signed value's reading is a Signed: said from its sign, the number unsigned
    rationale: str = ""  # why the metric and its population test the paper's claim
    classify: tuple[Rule, ...] = ()  # per-unit rules the metric counts with
    quantity: str = ""  # what the number is, in a few words (a summary's label; else the metric's first clause)


@dataclass(frozen=True)
class Verdict:
    """A claim's metric measured on one model, with its interval and its evidence."""

    claim: Claim
    value: float
    n: int | None = None  # how many instances (tokens, heads, prompts) the value rests on
    unit: str = ""  # what ``n`` counts
    detail: str = ""  # a computed sentence of context
    lo: float | None = None  # 95% interval (None: an exact quantity, no sampling uncertainty)
    hi: float | None = None
    why: str = ""  # set: the claim cannot be tested on this run, and why
    estimate: Estimate | None = None  # the uncertainty layer's estimate (clusters, replicates, seed)
    parts: tuple = ()  # (name, Estimate, Rule) that must all hold (a "proportional" rule)
    model: str = ""  # the model it is about, where not the chapter's own (chapter 6: each cached run's)

    @classmethod
    def of(cls, claim: Claim, estimate: Estimate, detail: str = "", why: str = "") -> "Verdict":
        """The verdict on an :class:`~selfrepair.uncertainty.Estimate` (value, 95% interval, n,
        clusters, seed); an unreliable interval (``estimate.why``) cannot tell."""
        return cls(claim, estimate.value, estimate.n, estimate.unit, detail, estimate.lo, estimate.hi,
                   why or estimate.why, estimate)

    @classmethod
    def linear(cls, claim: Claim, slope: Estimate, intercept: Estimate, detail: str = "") -> "Verdict":
        """A ``proportional`` claim: holds when the slope is significantly above 0 and the
        ``intercept`` (relative: intercept / mean of y) approximately zero, differs when either
        is clearly not, cannot tell otherwise. The value shown is the slope."""
        if claim.rule.op != "proportional":
            raise ValueError(f"{claim.key}: Verdict.linear needs the 'proportional' rule")
        parts = (("slope", slope, paper_word("significant")),
                 ("intercept / mean y", intercept, paper_word("approximately zero")))
        return cls(claim, slope.value, slope.n, slope.unit, detail, slope.lo, slope.hi,
                   slope.why or intercept.why, slope, parts)

    @classmethod
    def share(cls, claim: Claim, flags, unit: str, detail: str = "", why: str = "") -> "Verdict":
        """(Chapters not yet on :mod:`selfrepair.uncertainty`.) The share of ``flags`` that are
        true, with its Wilson interval — which treats them as independent draws."""
        f = np.asarray(flags, dtype=bool).ravel()
        lo, hi = wilson(int(f.sum()), len(f))
        return cls(claim, float(f.mean()) if len(f) else float("nan"), len(f), unit, detail, lo, hi, why)

    @classmethod
    def mean(cls, claim: Claim, values, unit: str, detail: str = "", why: str = "",
             seed: int = 0) -> "Verdict":
        """(Chapters not yet on :mod:`selfrepair.uncertainty`.) The mean of ``values`` (NaNs
        dropped), with a bootstrap interval that resamples them as independent draws."""
        x = np.asarray(values, dtype=float).ravel()
        x = x[np.isfinite(x)]
        lo, hi = bootstrap(x, seed=seed)
        return cls(claim, float(x.mean()) if len(x) else float("nan"), len(x), unit, detail, lo, hi, why)

    @property
    def holds(self) -> bool | None:
        """True (holds), False (differs) or None (cannot tell)."""
        if self.why or self.value is None or not math.isfinite(self.value):
            return None
        if self.parts:
            got = [rule.decide(e.lo, e.hi) if e.reliable else None for _, e, rule in self.parts]
            return False if False in got else (True if all(g is True for g in got) else None)
        if self.lo is None or self.hi is None:
            return self.claim.rule(self.value)
        return self.claim.rule.decide(self.lo, self.hi)

    @property
    def word(self) -> str:
        return WORDS[self.holds]

    @property
    def outcomes(self) -> tuple[str, ...]:
        """The words this verdict's rule can print: holds and differs, and cannot tell wherever
        there is an interval that can straddle or a reason the claim cannot be tested."""
        can_straddle = self.lo is not None or bool(self.parts) or bool(self.why)
        return ("holds", "differs") + (("cannot tell",) if can_straddle else ())


WORDS = {True: "holds", False: "differs", None: "cannot tell"}


def _interval(v: Verdict) -> str:
    c = v.claim
    if v.lo is None or v.hi is None or not math.isfinite(v.value):
        return ""
    how = f"; {v.estimate.describe()}" if v.estimate is not None else ""
    if v.estimate is not None and v.estimate.why:  # shown as unreliable, not as if it were an interval
        return f" (no reliable 95% interval{how})"
    if not (math.isfinite(v.lo) and math.isfinite(v.hi)):
        return f" (too few to give an interval{how})"
    if isinstance(c.reading, Signed):  # read after words that carry the sign: in their frame
        return f" ({c.reading.interval(v.value, v.lo, v.hi, c.fmt, thresholds(c.rule))}{how})"
    return f" ({interval_words(v.lo, v.hi, c.fmt, thresholds(c.rule))}{how})"


def _decided(v: Verdict) -> str:
    """How the verdict is decided, naming every outcome the rule can print."""
    c, interval = v.claim, v.lo is not None or bool(v.parts)
    where = "the whole 95% interval" if interval else "the value"
    word = f" It reads the paper's “{c.rule.word}”:" if c.rule.word else ""
    text = (f"The metric: {c.metric}.{word} {_why(c)} The claim holds when {c.rule.when(c.fmt, True, where)}, "
            f"differs when {c.rule.when(c.fmt, False, 'the whole interval' if interval else 'it')}")
    if "cannot tell" in v.outcomes:
        untestable = bool(v.why) and not (v.estimate is not None and v.estimate.why)
        text += (f", and we cannot tell when the interval {UNDECIDED} or is not reliable "
                 f"(fewer than {MIN_CLUSTERS} independent units)"
                 + (", or when, as here, the claim's assumption does not hold on this run" if untestable else "")
                 if interval else ", and we cannot tell when the claim cannot be tested on this run")
    text += "."
    return f"<details><summary>How this is decided</summary>{text}</details>"


def _why(c: Claim) -> str:
    """Why a claim's rule reads the paper as it does: the reason, then :func:`_metric_why`."""
    text = f"{c.rule.reason}. " if c.rule.reason else ""
    return (text + _metric_why(c)).strip()


def _metric_why(c: Claim) -> str:
    """The metric's rationale, the per-unit rules and the paper's own value (not the word's reason,
    which :func:`rules_table` gives once per word)."""
    text = f"Why this metric: {c.rationale}." if c.rationale else ""
    for rule in c.classify:
        text += f" A unit counts by “{rule.word}” (when it is {rule.text('.2g')}): {rule.reason}."
    return (text + _paper_reports(c)).strip()


def _paper_reports(c: Claim) -> str:
    """" The paper reports X (context)." for a claim with the paper's own number, else ""."""
    if c.paper is None:
        return ""
    return f" The paper reports {number(c.paper, c.fmt)}{' (' + c.paper_context + ')' if c.paper_context else ''}."


def anchor(claim: Claim) -> str:
    """The HTML id of a claim's place in its chapter (the scorecard links to it)."""
    return f"claim-{claim.key}"


def rules_table(claims) -> str:
    """A chapter's rules, which each verdict of :func:`render` (``rules=``) links to instead of
    repeating them: one short table (per claim the paper's word or number it reads and where the
    95% interval must lie to hold and to differ), then per claim what is measured and why, then
    one sentence linking to the book's one reading of the papers' words and of when a verdict
    cannot tell (:mod:`selfrepair.reading`, on the scorecard page), said there once, not per chapter.

    The table is a paper-style table (:mod:`selfrepair.tables`, HTML inside the Markdown: one line,
    so the Markdown keeps it whole) that a phone shows ``stacked``: each claim a block, its word
    and thresholds labelled, instead of four columns wider than the screen."""
    frame = pd.DataFrame([{"claim": f"{c.statement} ({c.source})",
                           "word": f"“{c.rule.word}”" if c.rule.word else "",
                           "holds": c.rule.when(c.fmt, True, "the whole 95% interval"),
                           "differs": c.rule.when(c.fmt, False)} for c in claims],
                         columns=list(RULES_HEADERS))
    rules = table(frame, names=RULES_HEADERS, stacked=True)._repr_html_()
    said = said_once([c.rationale for c in claims])  # a rationale's passage shared with an earlier claim: once
    measured = "\n".join(f"- *{c.statement}*: {c.metric}. {_metric_why(replace(c, rationale=r))}".rstrip()
                         for c, r in zip(claims, said))
    return "\n\n".join([rules, "**What each claim measures, and why.**", measured,
                        link_sentence(c.rule.word for c in claims)])


SHARED = 100  # characters: a passage at least this long that a later rationale repeats is said once
AS_ABOVE = " (as said in full above)"


def said_once(texts, least: int = SHARED) -> list[str]:
    """``texts`` (the rationales of a chapter's claims, in the order the page lists them) with every
    passage of at least ``least`` characters that an earlier text already holds said once: in a
    later text it shrinks to its opening words (up to its first colon or bracket, else comma or
    semicolon) and
    :data:`AS_ABOVE`, so a rationale that several claims share ("the class is every head of the last
    layer: …") is read once, and the later claims refer to it."""
    out = []
    for i, text in enumerate(texts):
        masked, cuts = text, []  # a passage once replaced is masked, so it is never matched again
        for earlier in texts[:i]:
            while True:
                m = SequenceMatcher(None, earlier, masked, autojunk=False).find_longest_match(
                    0, len(earlier), 0, len(masked))
                start, end = m.b, m.b + m.size
                while start < end and start > 0 and (text[start - 1].isalnum() or not text[start].isalnum()):
                    start += 1  # from the start of a word
                while end > start and end < len(text) and text[end].isalnum():
                    end -= 1  # to the end of a word
                passage = text[start:end].rstrip(" ;,.")
                if len(passage) < least:
                    break
                first = [k for k in (passage.find(":"), passage.find(" (")) if 0 < k <= 160]
                cut = min(first) if first else min(
                    (passage.find(x) for x in (",", ";") if 0 < passage.find(x)), default=-1)
                handle = passage[:cut] if 0 < cut <= 160 else " ".join(passage.split()[:8]) + "…"
                cuts.append((start, start + len(passage), handle + AS_ABOVE))
                masked = masked[:start] + "\0" * len(passage) + masked[start + len(passage):]
        for start, end, said in sorted(cuts, reverse=True):
            text = text[:start] + said + text[end:]
        out.append(text)
    return out


def _line(v: Verdict, rules: str, mark: bool) -> str:
    """One claim's full verdict as a Markdown list item (:func:`render`), with its :func:`anchor`
    where ``mark``."""
    c = v.claim
    span = f'<span id="{anchor(c)}"></span>' if mark else ""
    n = f" over {v.n:,} {v.unit}" if v.n is not None else ""
    why = f" We cannot tell here: {v.why}." if v.why else (
        f" {undecided(v)[0].upper()}{undecided(v)[1:]}, so we cannot tell."
        if v.holds is None and math.isfinite(v.value) and (v.lo is not None or v.parts) else "")
    parts = "".join(f" The {name} is {against(e.value, c.fmt, rule.bounds)} "
                    f"({interval_words(e.lo, e.hi, c.fmt, rule.bounds)}): {_part(e, rule, c.fmt)}."
                    for name, e, rule in v.parts)
    detail = (f" {v.detail}" if v.detail else "") + _paper_reports(c)  # the paper's number beside ours
    signed, bounds = isinstance(c.reading, Signed), thresholds(c.rule)
    shown = size(v.value, c.fmt, bounds) if signed else against(v.value, c.fmt, bounds)
    value = f"**{shown}**{_interval(v)}"
    reading = c.reading.template(v.value, c.fmt, bounds) if signed else c.reading
    said = (reading.format(value=value, n=f"{v.n:,}" if v.n is not None else "", unit=v.unit)
            if reading else f"The value is {value}{n}.")
    how = f'(<a href="#{rules}">how this is decided</a>)' if rules else _decided(v)
    return f"- {span}*{c.statement}* ({c.source}): **{v.word}**. {said}{parts}{why}{detail} {how}"


def _part(e: Estimate, rule: Rule, fmt: str) -> str:
    """One part of a verdict decided on several estimates, in words: "holds, as the whole interval
    is above 0"; "differs, as the whole interval is above 0.1, outside -0.1 to 0.1"."""
    if not e.reliable:
        return "cannot tell, as its interval is not reliable"
    return f"{WORDS[rule.decide(e.lo, e.hi)]}, as {rule.because(e.lo, e.hi, fmt)}"


def undecided(v: Verdict, subject: str = "the interval") -> str:
    """Why a verdict with an interval cannot tell: "the interval straddles the rule's threshold,
    50%", "the interval has its lower end at the rule's threshold, 50%" (an end exactly at it,
    which a rule such as "above 50%" leaves out; ``subject`` for "the interval"); for a verdict on
    several parts, which part is undecided."""
    c = v.claim
    if v.parts:
        names = [name for name, e, rule in v.parts if not e.reliable or rule.decide(e.lo, e.hi) is None]
        return f"the {' and the '.join(names) or 'parts'} {'are' if len(names) > 1 else 'is'} undecided"
    return f"{subject} {c.rule.undecided(v.lo, v.hi, c.fmt, ends=not isinstance(c.reading, Signed))}"


BELOW = "Each claim's verdict follows the figure that tests it; a claim's statement links to it."


def _brief(v: Verdict) -> str:
    """One claim in a chapter's overview: its statement, a link to its full verdict further down
    the page (:func:`render_claim`), right after its figure (:data:`BELOW`, said once above the
    list). Not the verdict's word: a reader meets the verdict after the figure that shows it."""
    c, on = v.claim, f", on {v.model}" if v.model else ""
    return f'- <a href="#{anchor(c)}">*{c.statement}*</a> ({c.source}{on})'


def render(verdicts: list[Verdict], intro: str = "", rules: str = "", below=(), say_below: bool = True) -> str:
    """The claims as a Markdown list: per claim its verdict, the number with its 95% interval,
    sample size and (for the uncertainty layer's estimates) clusters and seed, and a computed
    sentence of context; how the verdict is decided (the metric, the paper's word and the reason
    for its threshold, every outcome, the paper's value) collapsed behind a click — or, with
    ``rules`` (the anchor of the page's :func:`rules_table`), a link to it. A claim's first item
    carries its :func:`anchor` (the scorecard links to it).

    ``below``: the keys of the claims whose full verdict the page shows further down, each right
    after its figure (:func:`render_claim`); those are listed compactly — the statement, linked to
    the anchor, which only the full verdict carries, and one sentence above the list (:data:`BELOW`)
    — so the list becomes the chapter's short overview. A claim not in ``below`` keeps its full
    verdict here. ``say_below=False``: the caller says :data:`BELOW` once for several lists."""
    compact = say_below and any(v.claim.key in below for v in verdicts)
    lines = [f"{intro} {BELOW}" if compact else intro] if intro else ([BELOW, ""] if compact else [])
    seen = set()
    for v in verdicts:
        key = v.claim.key
        lines.append(_brief(v) if key in below else _line(v, rules, key not in seen))
        seen.add(key)
    return "\n".join(lines)


def render_claim(verdicts: list[Verdict], key: str, rules: str = "") -> str:
    """One claim's full verdict exactly as :func:`render` writes it (with its :func:`anchor`, once),
    for the page to show right after the claim's figure; several verdicts of the claim (one per
    model) are one item each."""
    mine = [v for v in verdicts if v.claim.key == key]
    if not mine:
        raise KeyError(f"no verdict of claim {key!r}: the claims are "
                       f"{', '.join(dict.fromkeys(v.claim.key for v in verdicts))}")
    return "\n".join(_line(v, rules, i == 0) for i, v in enumerate(mine))
