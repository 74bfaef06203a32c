"""The papers' claims as data: what each claim says, how this book measures it, the rule that
decides it and the paper's own number — rendered by one function.

A chapter defines its :class:`Claim` s once (module-level constants) and a function computing a
:class:`Verdict` per claim from its results (the metric's value, how many tokens/heads/prompts it
rests on). :func:`render` writes the paragraph; tests check the metrics, not the sentences. The
rule is part of the data, so the text states exactly the rule that was applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Verdict:
    """A claim's metric measured on one model."""

    claim: Claim
    value: float
    n: int | None = None  # how many instances (tokens, heads, prompts) the value rests on
    unit: str = ""  # what ``n`` counts
    detail: str = ""  # a computed sentence of context

    @property
    def holds(self) -> bool | None:
        return self.claim.rule(self.value)


WORDS = {True: "**holds**", False: "**differs**", None: "**not testable here**"}


def render(verdicts: list[Verdict], intro: str = "") -> str:
    """The claims as a Markdown list: the claim and its source, this model's value (with the
    number of instances it rests on), the rule, the paper's value, and the verdict."""
    lines = [intro] if intro else []
    for v in verdicts:
        c = v.claim
        n = f" over {v.n:,} {v.unit}" if v.n is not None else ""
        paper = (f"; the paper: {_fmt(c.paper, c.fmt)}{' (' + c.paper_context + ')' if c.paper_context else ''}"
                 if c.paper is not None else "")
        detail = f" {v.detail}" if v.detail else ""
        lines.append(f"- *{c.statement}* ({c.source}) — {WORDS[v.holds]}: {c.metric} is "
                     f"**{_fmt(v.value, c.fmt)}**{n} (holds when {c.rule.text(c.fmt)}{paper}).{detail}")
    return "\n".join(lines)
