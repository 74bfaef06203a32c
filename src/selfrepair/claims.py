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
- **cannot tell** when the interval straddles the threshold, when it is not reliable (too few
  independent units), or when the claim cannot be tested on this run (``why`` says which).

Every rule names the paper's word or number it reads (``Rule.word``) and why its threshold reads
it (``Rule.reason``); the papers' words map to thresholds in one table, :data:`PAPER_WORDS`
(:func:`paper_word`), and the paper's own numbers live in the claims' data. :func:`render` writes
one sentence per claim with its number, interval, sample size and seed, the rule and its reason
collapsed behind a click. Tests check the metrics, not the sentences; the rule is part of the
data, so the text states exactly the rule that was applied and every outcome it can print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .tables import _superscript
from .uncertainty import MIN_CLUSTERS, Estimate

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Rule:
    """``op`` one of ``">", ">=", "<", "<=", "between"`` (inclusive) with its bound(s), or
    ``"proportional"`` (decided on a line's slope and intercept: :meth:`Verdict.linear`).

    ``word`` is the papers' word or number the rule operationalizes ("almost always", "many",
    "90.66%") and ``reason`` why this threshold reads it; a word of :data:`PAPER_WORDS` always
    reads as that table says (:func:`paper_word`)."""

    op: str
    bounds: tuple[float, ...]
    word: str = ""
    reason: str = ""

    def __call__(self, value: float) -> bool | None:
        if value is None or not math.isfinite(value) or self.op == "proportional":
            return None
        lo = self.bounds[0]
        return {">": value > lo, ">=": value >= lo, "<": value < lo, "<=": value <= lo,
                "between": self.op == "between" and lo <= value <= self.bounds[-1]}[self.op]

    def decide(self, lo: float, hi: float) -> bool | None:
        """For an interval ``[lo, hi]``: True if every value in it satisfies the rule, False if none
        does, None otherwise (the interval straddles a threshold)."""
        if not (math.isfinite(lo) and math.isfinite(hi)) or self.op == "proportional":
            return None
        if self.op == "between":
            a, b = self.bounds
            if a <= lo and hi <= b:
                return True
            return False if hi < a or lo > b else None
        ends = {self(lo), self(hi)}
        return ends.pop() if len(ends) == 1 else None

    def text(self, fmt: str, opposite: bool = False) -> str:
        """Where a value (an interval) must lie for the claim to hold, or with ``opposite`` to differ."""
        f = [_fmt(b, fmt) for b in self.bounds]
        words = _SIDES[self.op][opposite]
        return words.format(*f) if self.op in ("between", "proportional") else f"{words} {f[0]}"

    def opposite(self, fmt: str) -> str:
        """Where an interval must lie for the claim to differ."""
        return self.text(fmt, opposite=True)

    def with_side(self, op: str) -> "Rule":
        """The same word and threshold on the other side (e.g. a *fall* that is significant)."""
        return replace(self, op=op)


_SIDES = {">": ("above", "at or below"), ">=": ("at least", "below"), "<": ("below", "at or above"),
          "<=": ("at most", "above"), "between": ("between {} and {}", "entirely outside {} to {}"),
          "proportional": ("a line through the origin (slope above 0, intercept within ±{} of the mean)",
                           "the slope is at most 0 or the intercept outside ±{} of the mean")}


def above(x: float) -> Rule:
    return Rule(">", (x,))


def at_least(x: float) -> Rule:
    return Rule(">=", (x,))


def at_most(x: float) -> Rule:
    return Rule("<=", (x,))


def below(x: float) -> Rule:
    return Rule("<", (x,))


def between(lo: float, hi: float) -> Rule:
    return Rule("between", (lo, hi))


# -- the papers' words, read as thresholds (one table; every rule using one of them comes from it) --
ALMOST_ALWAYS_QUOTED = (("resample", 0.9066), ("mean", 0.9875), ("zero", 1.0))  # self-repair §3.1

PAPER_WORDS: dict[str, Rule] = {r.word: r for r in (
    Rule(">=", (0.9,), "almost always",
         "the self-repair paper says S/S′ is 'almost always greater than one' on a head's top tokens "
         "at " + ", ".join(f"{v:.2%} ({a})" for a, v in ALMOST_ALWAYS_QUOTED) + " of them (§3.1): "
         "the lowest share it calls 'almost always' is 90.66%, so a share reads as 'almost always' "
         "when its interval lies at or above 90%"),
    Rule(">", (0.5,), "most",
         "a majority, the word's ordinary meaning; the papers never put a number on it"),
    Rule(">=", (0.25,), "many",
         "the paper never counts 'many' ('many heads in later layers', Fig 1; 'many such heads', "
         "Fig 2; 'many heads ... don't have clear correlations', §2.3); we read it as at least one "
         "in four of the class the claim is about: less than 'most' (more than half), and more "
         "than the stray member or two that noise alone puts anywhere"),
    Rule(">", (0.0,), "significant",
         "the papers attach no number to 'significant'; we read it as distinguishable from zero: "
         "the whole 95% interval on the claimed side of 0"),
    Rule(">", (0.0,), "noticeable",
         "'a small, but noticeable, logit difference' (§2.2) has no number; like 'significant', "
         "we read it as distinguishable from zero: the whole 95% interval on the claimed side of 0"),
    Rule("<", (0.0,), "decreased",
         "a self-repressing head is one whose direct effect 'decreases proportional to how much of "
         "the original output of the head is added' (App. G; 'L21H1 has a decreased direct effect', "
         "Fig 19), and such heads 'robustly respond to their own output' (App. F). The paper puts no "
         "size on the decrease, so we read 'decreased' as a fall distinguishable from zero, the whole "
         "95% interval below 0, and 'robustly respond to their own output' as the same fall beyond "
         "what a random push of the same norm does"),
    Rule("between", (-0.1, 0.1), "approximately zero",
         "the Hydra paper gives no tolerance ('reduce Δ_unembed of the ablated layer to "
         "approximately zero', §3); for a quantity expressed as a share of the effect it is "
         "compared with, we read it as within ±10% of that effect, an order of magnitude below it"),
    Rule("proportional", (0.1,), "proportional",
         "proportional is a line through the origin, not merely a rising curve (a monotone relation "
         "with a large offset is not proportional): the slope's interval above 0 ('significant') "
         "and the intercept's within ±10% of the mean of y ('approximately zero')"),
    Rule("<=", (-0.5,), "clear correlation",
         "with no repair Δlogit = −DE token by token (r = −1); the paper's 'no clear correlation' "
         "has no number, so we take Cohen's (1988) conventional 'large' correlation, |r| = 0.5, as "
         "the least that is clear: a head's correlation is clear at r ≤ −0.5"),
)}


def paper_word(word: str, op: str | None = None) -> Rule:
    """The rule that reads one of the papers' words (:data:`PAPER_WORDS`); ``op`` puts the same
    threshold on the other side (``paper_word("significant", "<")`` for a significant *fall*)."""
    if word not in PAPER_WORDS:
        raise KeyError(f"{word!r} is not in PAPER_WORDS ({', '.join(PAPER_WORDS)}): add it there "
                       "with its threshold and the reason, or use a rule naming the paper's number")
    rule = PAPER_WORDS[word]
    return rule if op is None else rule.with_side(op)


def approximately(value: float, quoted: str) -> Rule:
    """A share the paper quotes as "approximately" or "around" a value (``quoted``: its words, e.g.
    "approximately 70%"): between ``value`` ± the tolerance the table gives "approximately zero"
    (a share of an effect within ±10% of that effect)."""
    tol = PAPER_WORDS["approximately zero"].bounds[1]
    return Rule("between", (value - tol, value + tol), quoted,
                f"the paper gives no tolerance for '{quoted}'; the table reads 'approximately zero' for a "
                f"share of an effect as within ±{tol:.0%} of that effect, so a share reads as "
                f"'{quoted}' when it lies within ±{tol:.0%} of the effect around the paper's "
                f"{value:.0%}: {value - tol:.0%} to {value + tol:.0%}")


def paper_number(op: str, value: float, word: str, reason: str) -> Rule:
    """A rule that tests one of the paper's own numbers (``word``: the number as the paper gives
    it, e.g. "30%") against ``value``, with the reason for the comparison."""
    if not word or not reason:
        raise ValueError("a rule from a paper's number names the number and why it is compared so")
    return Rule(op, (value,), word, reason)


def _fmt(value: float, fmt: str) -> str:
    """``value`` in the claim's format; a scientific one (``.1e``) as prose reads it, ``1.9×10⁻⁶``
    rather than ``1.9e-06``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = format(value, fmt)
    if fmt.endswith("e") and "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}×10{_superscript(int(exponent))}"
    return text


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
    reading: str = ""  # the result in words, with {value}, {n} and {unit} filled in
    rationale: str = ""  # why the metric and its population test the paper's claim
    classify: tuple[Rule, ...] = ()  # per-unit rules the metric counts with


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
    return f" (95% interval {_fmt(v.lo, c.fmt)} to {_fmt(v.hi, c.fmt)}{how})"


def _decided(v: Verdict) -> str:
    """How the verdict is decided, naming every outcome the rule can print."""
    c, interval = v.claim, v.lo is not None or bool(v.parts)
    where = "the whole 95% interval is" if interval else "the value is"
    word = f" It reads the paper's “{c.rule.word}”:" if c.rule.word else ""
    text = (f"The metric: {c.metric}.{word} {_why(c)} The claim holds when {where} {c.rule.text(c.fmt)}, "
            f"differs when {'the whole interval is' if interval else 'it is'} {c.rule.opposite(c.fmt)}")
    if "cannot tell" in v.outcomes:
        untestable = bool(v.why) and not (v.estimate is not None and v.estimate.why)
        text += (", and we cannot tell when the interval straddles that threshold or is not reliable "
                 f"(fewer than {MIN_CLUSTERS} independent units)"
                 + (", or when, as here, the claim's assumption does not hold on this run" if untestable else "")
                 if interval else ", and we cannot tell when the claim cannot be tested on this run")
    text += "."
    return f"<details><summary>How this is decided</summary>{text}</details>"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _why(c: Claim) -> str:
    """Why a claim's rule reads the paper as it does: the reason, the metric's rationale, the
    per-unit rules and the paper's own value."""
    text = f"{c.rule.reason}." if c.rule.reason else ""
    if c.rationale:
        text += f" Why this metric: {c.rationale}."
    for rule in c.classify:
        text += f" A unit counts by “{rule.word}” ({rule.text('.2g')}): {rule.reason}."
    if c.paper is not None:
        text += (f" The paper reports {_fmt(c.paper, c.fmt)}"
                 f"{' (' + c.paper_context + ')' if c.paper_context else ''}.")
    return text.strip()


def anchor(claim: Claim) -> str:
    """The HTML id of a claim's place in its chapter (the scorecard links to it)."""
    return f"claim-{claim.key}"


def rules_table(claims) -> str:
    """A chapter's rules as one Markdown table, which each verdict of :func:`render` (``rules=``)
    links to instead of repeating them: per claim what is measured, the paper's word or number it
    reads, where the value must lie to hold and to differ, and why; then when a verdict cannot tell."""
    rows = ["| claim | what is measured | the paper's word | holds when | differs when | why |",
            "|---|---|---|---|---|---|"]
    for c in claims:
        sides = "the whole 95% interval is " if c.rule.op != "proportional" else ""
        rows.append("| " + " | ".join(_cell(x) for x in (
            f"{c.statement} ({c.source})", c.metric, f"“{c.rule.word}”" if c.rule.word else "",
            sides + c.rule.text(c.fmt), sides + c.rule.opposite(c.fmt), _why(c))) + " |")
    after = (f"\n\nA verdict **cannot tell** when its interval straddles the threshold or is not reliable "
             f"(fewer than {MIN_CLUSTERS} independent units), or when the claim cannot be tested on the run "
             "(its sentence says why).")
    return "\n".join(rows) + after


def render(verdicts: list[Verdict], intro: str = "", rules: str = "") -> str:
    """The claims as a Markdown list: per claim its verdict, the number with its 95% interval,
    sample size and (for the uncertainty layer's estimates) clusters and seed, and a computed
    sentence of context; how the verdict is decided (the metric, the paper's word and the reason
    for its threshold, every outcome, the paper's value) collapsed behind a click — or, with
    ``rules`` (the anchor of the page's :func:`rules_table`), a link to it. A claim's first item
    carries its :func:`anchor` (the scorecard links to it)."""
    lines = [intro] if intro else []
    seen = set()
    for v in verdicts:
        c = v.claim
        mark = "" if c.key in seen else f'<span id="{anchor(c)}"></span>'
        seen.add(c.key)
        n = f" over {v.n:,} {v.unit}" if v.n is not None else ""
        why = f" We cannot tell here: {v.why}." if v.why else (
            " The interval straddles the rule's threshold, so we cannot tell."
            if v.holds is None and math.isfinite(v.value) and (v.lo is not None or v.parts) else "")
        parts = "".join(f" The {name} is {_fmt(e.value, c.fmt)} (95% interval {_fmt(e.lo, c.fmt)} to "
                        f"{_fmt(e.hi, c.fmt)}): {WORDS[rule.decide(e.lo, e.hi) if e.reliable else None]} "
                        f"for {rule.text(c.fmt)}." for name, e, rule in v.parts)
        detail = f" {v.detail}" if v.detail else ""
        value = f"**{_fmt(v.value, c.fmt)}**{_interval(v)}"
        said = (c.reading.format(value=value, n=f"{v.n:,}" if v.n is not None else "", unit=v.unit)
                if c.reading else f"The value is {value}{n}.")
        how = f'(<a href="#{rules}">how this is decided</a>)' if rules else _decided(v)
        lines.append(f"- {mark}*{c.statement}* ({c.source}): **{v.word}**. {said}{parts}{why}{detail} {how}")
    return "\n".join(lines)
