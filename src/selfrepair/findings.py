"""What a chapter shows: the closing "What this chapter shows" paragraph, three to six plain
sentences computed from the chapter's verdicts (:mod:`selfrepair.claims`) — where it ran, which of
the papers' claims held there, which did not, which this run cannot decide, and what a reader
should take away — each linked to the figure that shows it.

A chapter lists its claims' figures (:class:`Figure`: a label on the page, e.g. ``(ch01-fig1)=``
above the figure's section) and builds the paragraph with :func:`shows`; every number a
:class:`Finding` prints is kept beside its text (``values``), so a test can hold the words
against the computed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from .claims import Signed, Verdict, against, anchor, interval_words, thresholds, undecided
from .reading import quantity, short_label


@dataclass(frozen=True)
class Figure:
    """A figure on the page: ``anchor`` is the label above its section (``(anchor)=``)."""

    anchor: str
    label: str

    def link(self) -> str:
        return f'<a href="#{self.anchor}">{self.label}</a>'


@dataclass(frozen=True)
class Finding:
    """One sentence of "What this chapter shows", the figures it points to and the numbers it prints."""

    text: str
    figures: tuple[Figure, ...] = ()
    values: tuple[float, ...] = ()

    def markdown(self) -> str:
        if not self.figures:
            return self.text
        links = ", ".join(dict.fromkeys(f.link() for f in self.figures))
        if "\n" in self.text:  # an opening line and its list of claims: the links on the opening line
            first, rest = self.text.split("\n", 1)
            return f"{first.rstrip(':')} (see {links}):\n{rest}"
        return f"{self.text.rstrip('.')}; see {links}."


# the outcome groups, in the order a reader wants them, and how each sentence opens ({whose}: "the
# paper's claims" unless the group holds a question of this book's own, :func:`own`)
OUTCOMES = ((True, "On {model}, {whose} that hold:"),
            (False, "The claims that do not hold on {model}:"),
            (None, "What this run cannot decide:"))
OWN = "this book"  # a claim whose source starts so is the book's own question, not a paper's


def own(v: Verdict) -> bool:
    """Is the claim the book's own question (``source`` "this book ...") rather than a paper's?"""
    return v.claim.source.startswith(OWN)


def measured(v: Verdict) -> tuple[str, tuple[float, ...]]:
    """A verdict's value in words: the value and its 95% interval, or the reason it has none; and
    the numbers printed. A verdict decided on several estimates (``parts``: a line's slope and
    intercept) names each, so a failed intercept is never hidden behind a slope that passed."""
    fmt = v.claim.fmt
    if v.value is None or not math.isfinite(v.value):
        return "no value", ()
    if v.parts:
        said = [_interval(e.value, e.lo, e.hi, fmt, e.why, rule.bounds) for _, e, rule in v.parts]
        return ("; ".join(f"{name} {text}" for (name, _, _), (text, _) in zip(v.parts, said)),
                tuple(x for _, numbers in said for x in numbers))
    why = v.estimate.why if v.estimate is not None else ""
    signed = v.claim.reading if isinstance(v.claim.reading, Signed) else None  # said as the verdict says it
    return _interval(v.value, v.lo, v.hi, fmt, why, thresholds(v.claim.rule), signed)


def _interval(value: float, lo, hi, fmt: str, why: str, bounds=(), signed: Signed | None = None
              ) -> tuple[str, tuple[float, ...]]:
    """``value`` and its 95% interval in words (or why it has no reliable one), and the numbers;
    near one of the rule's ``bounds``, on its side of it (:func:`~selfrepair.rules.against`);
    ``signed``: the claim's reading, in the words of the value's sign with its interval in that frame."""
    shown = against(value, fmt, bounds) if signed is None else signed.said(value, fmt, bounds)
    if lo is None or hi is None:
        return shown, (value,)
    if why or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{shown}, no reliable interval", (value,)
    said = interval_words(lo, hi, fmt, bounds) if signed is None else signed.interval(value, lo, hi, fmt, bounds)
    return f"{shown}, {said}", (value, lo, hi)


def claim_phrase(v: Verdict) -> tuple[str, tuple[float, ...]]:
    """The claim's short label, then what its number is and the number: "Self-repressing heads
    exist — the weaker of its two falls …: a fall of 456%, 95% interval …" (for a claim that cannot
    be tested on this run, the label alone: the reason follows the claims that share it, :func:`_phrases`)."""
    value, numbers = measured(v)
    label = link_label(v)
    if v.why:
        return label, ()
    if v.holds is None:  # why not, and what the claim needs
        crosses = ", which includes " in value and 0 in thresholds(v.claim.rule)  # "includes no move" says it
        value += (f"; {undecided(v)}" if v.parts else
                  f"{'' if crosses else ', ' + undecided(v, 'which')}: the claim holds only when "
                  f"{v.claim.rule.when(v.claim.fmt)}")
    if own(v):
        label += " (this book's own question, not the papers')"
    return f"{label} — {quantity(v.claim)}: {value}", numbers


def link_label(v: Verdict) -> str:
    """The claim's short label (:func:`~selfrepair.reading.short_label`), linked to its full verdict."""
    return f'<a href="#{anchor(v.claim)}">{short_label(v.claim.statement)}</a>'


def _phrases(group: list[Verdict]) -> list[tuple[str, tuple[float, ...]]]:
    """The claims' phrases in order; those that cannot be tested for the same reason together,
    the reason said once after them."""
    out, why = [], {}
    for v in group:
        if v.why:
            why.setdefault(v.why, []).append(claim_phrase(v)[0])
        else:
            out.append(claim_phrase(v))
    for reason, statements in why.items():
        out.append((f"{', '.join(statements)} ({'each ' if len(statements) > 1 else ''}untested: {reason})", ()))
    return out


def outcome_findings(verdicts: list[Verdict], figures: Mapping[str, Figure], model: str) -> list[Finding]:
    """One sentence per outcome that occurs: the claims that hold, those that do not, those this
    run cannot decide, each with its value and interval and a link to its figure."""
    out = []
    for holds, opening in OUTCOMES:
        group = [v for v in verdicts if v.holds is holds]
        if not group:
            continue
        phrases = _phrases(group)
        whose = "the claims" if any(map(own, group)) else "the paper's claims"
        text = opening.format(model=model, whose=whose) + "".join(f"\n  - {p}" for p, _ in phrases)
        out.append(Finding(text, tuple(figures[v.claim.key] for v in group if v.claim.key in figures),
                           tuple(x for _, numbers in phrases for x in numbers)))
    return out


def shows(where: Finding, verdicts: list[Verdict], figures: Mapping[str, Figure], model: str,
          takeaway: Finding) -> list[Finding]:
    """The paragraph's sentences: where the chapter ran, one per outcome, and the take-away."""
    return [where, *outcome_findings(verdicts, figures, model), takeaway]


def markdown(findings: list[Finding]) -> str:
    """The sentences, each ending with links to its figures: where the chapter ran, the outcomes
    one per bullet (so a reader scans what held and what did not), then the take-away (bold)."""
    if len(findings) < 3:
        return " ".join(f.markdown() for f in findings)
    where, *outcomes, last = findings
    tail = last.markdown()
    if tail.startswith("Take-away:"):
        tail = "**Take-away:**" + tail[len("Take-away:"):]
    return "\n\n".join((where.markdown(), "\n".join(f"- {f.markdown()}" for f in outcomes), tail))
