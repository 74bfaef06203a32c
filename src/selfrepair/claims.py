"""The papers' claims as data: what each claim says, how this book measures it, the rule that
decides it and the paper's own number — rendered by one function.

A chapter defines its :class:`Claim` s once (module-level constants) and a function computing a
:class:`Verdict` per claim from its results: the metric's value, the 95% interval around it (a
Wilson interval for a share, a bootstrap interval for a mean, none for an exact quantity) and how
many tokens / heads / prompts it rests on. A verdict is

- **holds** when the whole interval satisfies the claim's rule,
- **differs** when the whole interval violates it,
- **cannot tell** when the interval straddles the rule's threshold, when there is too little data
  to compute it, or when the model fails the task the claim is about (``why`` says which).

:func:`render` writes one sentence per claim with its number, interval and sample size, the rule
collapsed behind a click. Tests check the metrics, not the sentences; the rule is part of the
data, so the text states exactly the rule that was applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Rule:
    """``op`` one of ``">", ">=", "<", "<=", "between"`` (inclusive) with its bound(s)."""

    op: str
    bounds: tuple[float, ...]

    def __call__(self, value: float) -> bool | None:
        if value is None or not math.isfinite(value):
            return None
        lo = self.bounds[0]
        return {">": value > lo, ">=": value >= lo, "<": value < lo, "<=": value <= lo,
                "between": self.op == "between" and lo <= value <= self.bounds[-1]}[self.op]

    def decide(self, lo: float, hi: float) -> bool | None:
        """For an interval ``[lo, hi]``: True if every value in it satisfies the rule, False if none
        does, None otherwise (the interval straddles a threshold)."""
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        if self.op == "between":
            a, b = self.bounds
            if a <= lo and hi <= b:
                return True
            return False if hi < a or lo > b else None
        ends = {self(lo), self(hi)}
        return ends.pop() if len(ends) == 1 else None

    def text(self, fmt: str) -> str:
        f = [_fmt(b, fmt) for b in self.bounds]
        return f"between {f[0]} and {f[1]}" if self.op == "between" else {
            ">": "above", ">=": "at least", "<": "below", "<=": "at most"}[self.op] + f" {f[0]}"


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


def _fmt(value: float, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


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
    """One claim of a paper and how it is re-tested."""

    key: str
    statement: str  # the paper's claim, in words
    source: str  # where the paper makes it, e.g. "§2.2, Fig 1"
    metric: str  # what this book computes, in words
    rule: Rule  # when the claim counts as holding on this model
    paper: float | None = None  # the paper's own value of the metric, where it reports one
    paper_context: str = ""  # what the paper's value was measured on
    fmt: str = ".2f"  # how the metric prints
    reading: str = ""  # the result in words, with {value}, {n} and {unit} filled in


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

    @classmethod
    def share(cls, claim: Claim, flags, unit: str, detail: str = "", why: str = "") -> "Verdict":
        """The share of ``flags`` (booleans) that are true, with its Wilson interval."""
        f = np.asarray(flags, dtype=bool).ravel()
        lo, hi = wilson(int(f.sum()), len(f))
        return cls(claim, float(f.mean()) if len(f) else float("nan"), len(f), unit, detail, lo, hi, why)

    @classmethod
    def mean(cls, claim: Claim, values, unit: str, detail: str = "", why: str = "",
             seed: int = 0) -> "Verdict":
        """The mean of ``values`` (NaNs dropped), with its bootstrap interval."""
        x = np.asarray(values, dtype=float).ravel()
        x = x[np.isfinite(x)]
        lo, hi = bootstrap(x, seed=seed)
        return cls(claim, float(x.mean()) if len(x) else float("nan"), len(x), unit, detail, lo, hi, why)

    @property
    def holds(self) -> bool | None:
        """True (holds), False (differs) or None (cannot tell)."""
        if self.why or self.value is None or not math.isfinite(self.value):
            return None
        if self.lo is None or self.hi is None:
            return self.claim.rule(self.value)
        return self.claim.rule.decide(self.lo, self.hi)

    @property
    def word(self) -> str:
        return WORDS[self.holds]


WORDS = {True: "holds", False: "differs", None: "cannot tell"}


def render(verdicts: list[Verdict], intro: str = "") -> str:
    """The claims as a Markdown list: per claim its verdict, the number with its 95% interval and
    sample size, and a computed sentence of context; how the verdict is decided (the metric, the
    rule, the paper's value) collapsed behind a click."""
    lines = [intro] if intro else []
    for v in verdicts:
        c = v.claim
        interval = ("" if v.lo is None or v.hi is None or not math.isfinite(v.value) else
                    f" (95% interval {_fmt(v.lo, c.fmt)} to {_fmt(v.hi, c.fmt)})" if math.isfinite(v.lo)
                    else " (too few to give an interval)")
        n = f" over {v.n:,} {v.unit}" if v.n is not None else ""
        why = f" We cannot tell here: {v.why}." if v.why else (
            " The interval straddles the rule's threshold, so we cannot tell."
            if v.holds is None and math.isfinite(v.value) and v.lo is not None else "")
        paper = (f" The paper reports {_fmt(c.paper, c.fmt)}"
                 f"{' (' + c.paper_context + ')' if c.paper_context else ''}." if c.paper is not None else "")
        rule = (f"<details><summary>How this is decided</summary>The metric: {c.metric}. The claim "
                f"holds when {'the whole 95% interval is' if v.lo is not None else 'the value is'} "
                f"{c.rule.text(c.fmt)}, differs when {'it is entirely on the other side' if v.lo is not None else 'it is not'}"
                f"{', and we cannot tell when the interval straddles that threshold' if v.lo is not None else ''}."
                f"{paper}</details>")
        detail = f" {v.detail}" if v.detail else ""
        value = f"**{_fmt(v.value, c.fmt)}**{interval}"
        said = (c.reading.format(value=value, n=f"{v.n:,}" if v.n is not None else "", unit=v.unit)
                if c.reading else f"The value is {value}{n}.")
        lines.append(f"- *{c.statement}* ({c.source}): **{v.word}**. {said}{why}{detail} {rule}")
    return "\n".join(lines)
