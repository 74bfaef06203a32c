"""The rules that decide a claim, and the papers' words read as thresholds (re-exported by
:mod:`selfrepair.claims`).

A :class:`Rule` says where a claim's value (its interval) must lie for the claim to hold; it names
the paper's word or number it reads (``Rule.word``) and why its threshold reads it
(``Rule.reason``). The papers' words map to thresholds in one table, :data:`PAPER_WORDS`
(:func:`paper_word`); a share the paper calls "approximately" or "around" a value reads through
:func:`approximately`, one of the paper's own numbers through :func:`paper_number`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .tables import _superscript, minus

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
        f = [bound(b, fmt) for b in self.bounds]
        if self.op == "proportional":  # its bound is a tolerance relative to the mean of y: a share
            f = [bound(self.bounds[0], ".0%")]
        words = _SIDES[self.op][opposite]
        return words.format(*f) if self.op in ("between", "proportional") else f"{words} {f[0]}"

    def opposite(self, fmt: str) -> str:
        """Where an interval must lie for the claim to differ."""
        return self.text(fmt, opposite=True)

    def when(self, fmt: str, holds: bool = True, subject: str = "the whole interval") -> str:
        """The clause after "holds when" (``holds``) or "differs when": where ``subject`` (the
        whole 95% interval; "the value" for an exact one) must lie, a sentence for every kind of
        rule: "the whole interval is above 0", "the whole interval lies inside -0.1 to 0.1", "the
        whole interval lies above 0.1 or below -0.1", "the slope's whole interval is above 0 and ..."."""
        f = [bound(b, fmt) for b in self.bounds]
        if self.op == "proportional":
            tol = f"±{bound(self.bounds[0], '.0%')} of the mean of y"
            return (f"the slope's whole interval is above 0 and the intercept's lies inside {tol}" if holds else
                    f"the slope's whole interval is at or below 0, or the intercept's lies wholly outside {tol}")
        if self.op == "between":
            return f"{subject} lies inside {f[0]} to {f[1]}" if holds else f"{subject} lies above {f[1]} or below {f[0]}"
        return f"{subject} is {self.text(fmt, not holds)}"

    def because(self, lo: float, hi: float, fmt: str, ends: bool = True) -> str:
        """Why the interval ``[lo, hi]`` decides as it does, a clause after "as": where it lies
        (:meth:`when`; for a "between" rule that differs, on which side), or, undecided, what
        :meth:`undecided` says."""
        decided = self.decide(lo, hi)
        if decided is None:
            return f"the interval {self.undecided(lo, hi, fmt, ends)}"
        if decided is False and self.op == "between":
            a, b = (bound(x, fmt) for x in self.bounds)
            return f"the whole interval is {'above ' + b if lo > self.bounds[1] else 'below ' + a}, outside {a} to {b}"
        return self.when(fmt, decided)

    def undecided(self, lo: float, hi: float, fmt: str, ends: bool = True) -> str:
        """Why an interval that :meth:`decide` leaves undecided is so, after "the interval":
        "straddles the rule's threshold, 50%" where a threshold lies inside it, or, where an end
        is exactly at one (at the digits shown: :func:`against` prints an end off it with more
        digits), "has its lower end at the rule's threshold, 50%" ("one end" without ``ends``: a
        signed reading says its ends as sizes, not in order)."""
        inside = [t for t in self.bounds if lo < t < hi and _side(lo, t) and _side(hi, t)]
        if inside or self.op == "proportional":
            return f"straddles the rule's threshold{', ' + bound(inside[0], fmt) if inside else ''}"
        for t in self.bounds:
            for x, which in ((lo, "its lower end"), (hi, "its upper end")):
                if not _side(x, t):
                    return f"has {which if ends else 'one end'} at the rule's threshold, {bound(t, fmt)}"
        return "straddles the rule's threshold"

    def with_side(self, op: str) -> "Rule":
        """The same word and threshold on the other side (e.g. a *fall* that is significant)."""
        return replace(self, op=op)


_SIDES = {">": ("above", "at or below"), ">=": ("at least", "below"), "<": ("below", "at or above"),
          "<=": ("at most", "above"), "between": ("between {} and {}", "entirely outside {} to {}"),
          "proportional": ("a line through the origin (slope above 0, intercept within ±{} of the mean of y)",
                           "the slope is at most 0 or the intercept outside ±{} of the mean of y")}


def _side(x: float, t: float) -> int:
    """Which side of threshold ``t`` ``x`` lies on: 0 within float rounding of it (on it), else ±1."""
    return 0 if abs(x - t) <= 1e-12 * max(1.0, abs(t)) else (1 if x > t else -1)


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


# the words table's tolerance: a share of an effect within ±10% of it reads as "approximately zero"
# (every rule, class or text that counts a change as negligible uses this one number)
NEGLIGIBLE = PAPER_WORDS["approximately zero"].bounds[1]


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
    tol = NEGLIGIBLE
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


def bound(value: float, fmt: str) -> str:
    """A rule's threshold in the claim's format, but zero as "0" (a threshold is exactly zero,
    not "+0.000") and without trailing zeros (a threshold is exact: -0.1, not -0.100; 90%, not
    90.0%)."""
    if value == 0:
        return "0"
    text = _plain(value, fmt)
    m = re.fullmatch(r"([+-]?\d+)\.(\d+)(%|\s.*)?", text)
    if m is None:
        return minus(text)
    frac = m.group(2).rstrip("0")
    return minus(m.group(1) + ("." + frac if frac else "") + (m.group(3) or ""))


def against(value: float, fmt: str, thresholds=(), most: int = 3) -> str:
    """``value`` in ``fmt``, with as many more decimals (up to ``most``) as it takes to print it on
    the same side of each of ``thresholds`` as it lies: 0.896 against 90% prints "89.6%", not the
    "90%" that would read as reaching the threshold; 0.904 prints "90.4%"; a value far from every
    threshold, or exactly on one, prints in ``fmt`` as ever; one within rounding of it even at
    ``most`` more decimals is said "just under 90%" / "just over 90%". Every number that prose
    compares with a threshold (a rule's bound, a class's cut) prints through this."""
    m = re.fullmatch(r"([+ ]?)\.(\d+)([f%]|pp)", fmt)
    if value is None or not math.isfinite(value) or m is None:
        return number(value, fmt)
    sign, digits, kind = m.group(1), int(m.group(2)), m.group(3)
    scale = 1 if kind == "f" else 100
    bounds = [t for t in thresholds if t is not None and math.isfinite(t)]
    for extra in range(most + 1):
        f = f"{sign}.{digits + extra}{kind}"
        shown = lambda x: float(_plain(x, f).split(" ")[0].rstrip("%")) / scale  # noqa: E731 (as printed at f)
        if all(_side(shown(value), shown(t)) == _side(value, t) for t in bounds):
            return number(value, f)
    near = min(bounds, key=lambda t: abs(value - t))
    return f"just {'under' if value < near else 'over'} {bound(near, fmt)}"


def interval_words(lo: float, hi: float, fmt: str, thresholds=()) -> str:
    """"95% interval A to B"; where both ends print the same ("25% to 25%": at least 95% of the
    replicates give that value to the digits shown), says so instead of a range that is none. An
    end near one of ``thresholds`` prints on its side of it (:func:`against`)."""
    a, b = against(lo, fmt, thresholds), against(hi, fmt, thresholds)
    if a == b:
        return f"95% interval {a} — no spread at the digits shown"
    unit = POINTS if a.endswith(POINTS) and b.endswith(POINTS) else ""
    return f"95% interval {a[:len(a) - len(unit)]} to {b}"  # "11 to 28 percentage points": the unit once


POINTS = " percentage points"  # the unit of a format ending "pp" (".0pp": 0.21 prints "21 percentage points")


def number(value: float, fmt: str) -> str:
    """``value`` as a sentence prints it, in ``fmt`` (``"+.3f"``, ``".0%"``, ``".1e"``) with the
    tables' minus sign (``−0.24``, never ``-0.24``: :func:`selfrepair.tables.minus`); a scientific
    one as prose reads it, ``1.9×10⁻⁶`` rather than ``1.9e-06``, and plainly where the power would
    be 10⁻¹ to 10² (``1.1``, not ``1.1×10⁰``; ``0.94``, not ``9.4×10⁻¹``), with the same
    significant digits. Every number a chapter's sentences print goes through this (or
    :func:`against`, which does)."""
    return minus(_plain(value, fmt))


def _plain(value: float, fmt: str) -> str:
    """``value`` in the claim's format (``.Npp``: a difference of shares in percentage points) with
    the hyphen-minus format() gives; :func:`number` is what a sentence prints."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if fmt.endswith("pp"):  # a difference of two shares, in percentage points (never "+21%")
        return format(100 * value, fmt[:-2] + "f") + POINTS
    text = format(value, fmt)
    if fmt.endswith("e") and "e" in text:
        mantissa, exponent = text.split("e")
        power = int(exponent)
        if -1 <= power <= 2:
            digits = int(fmt.rstrip("e").lstrip("+ ").lstrip(".") or 6)
            sign = "+" if fmt.startswith("+") else ""
            return format(float(text), f"{sign}.{max(0, digits - power)}f")
        text = f"{mantissa}×10{_superscript(power)}"
    return text


def signed_interval_words(value: float, lo: float, hi: float, fmt: str, thresholds=(),
                          down: str = "a fall of {}", up: str = "a rise of {}", none: str = "") -> str:
    """A signed value's 95% interval, read in the frame of the words that carry the value's sign
    ("falls by 456%", "takes away a further 196%"): where the whole interval is on the value's side
    of 0, its ends as sizes in increasing order ("95% interval 204% to 589%", never "-589% to
    -204%" after "falls by"); otherwise each end in words from its own sign, ``down`` / ``up`` with
    ``{}`` for its size ("95% interval from a fall of 50% to a rise of 10%"), and, where it crosses
    0 and ``none`` is given, that it includes ``none`` ("which includes no change"). An end near
    one of ``thresholds`` on its side of 0 prints on its side of it (:func:`against`)."""
    plain = fmt.replace("+", "")

    def same_side(x: float) -> list[float]:
        return [abs(t) for t in thresholds if t is not None and (t == 0 or (t > 0) == (x > 0))]

    if value is not None and math.isfinite(value) and value != 0 and (hi <= 0 if value < 0 else lo >= 0):
        a, b = sorted((abs(lo), abs(hi)))
        return interval_words(a, b, plain, same_side(value))

    def end(x: float) -> str:
        shown = against(abs(x), plain, same_side(x))
        return (down if x < 0 else up).format(shown)

    crosses = f", which includes {none}" if none and lo < 0 < hi else ""
    return f"95% interval from {end(lo)} to {end(hi)}{crosses}"


@dataclass(frozen=True)
class Signed:
    """A claim's reading said from its value's sign, the way :mod:`selfrepair.chapters.signed` says
    a change ("gives back 5%" / "takes away a further 5%", never "gives back -5%" or "-5% (negative:
    ...)"): ``text`` with ``{way}``, which is ``up`` where the value is above 0, ``down`` where it is
    below and ``zero`` (``up`` when empty) where it is 0 at the digits shown. ``{value}`` (in
    ``text`` or in the way) is then the value's size, bold and unsigned, with its 95% interval read
    in the same frame (:func:`~selfrepair.rules.signed_interval_words`): sizes in increasing order
    where the whole interval is on the value's side of 0, else each end in words from its sign,
    ``ends`` (below 0, above 0; ``{}`` for the size), saying that it includes ``none`` where it
    crosses 0."""

    text: str
    up: str
    down: str
    zero: str = ""
    turns: str = ""  # a change relative to the thing itself: added to ``down`` from a fall of 100% on
    ends: tuple = ("a fall of {}", "a rise of {}")  # an interval's end below 0, above 0, in words
    none: str = "no change"  # what an interval that crosses 0 includes

    def interval(self, value: float, lo: float, hi: float, fmt: str, thresholds=()) -> str:
        """The 95% interval in the frame of the words for ``value``'s sign."""
        if is_zero(value, fmt, thresholds):
            value = 0.0  # said as no change: each end from its own sign
        return signed_interval_words(value, lo, hi, fmt, thresholds, *self.ends, none=self.none)

    def way(self, value: float, fmt: str, thresholds=()) -> str:
        """The words for ``value``'s sign (at the digits :func:`size` shows)."""
        if value is None or not math.isfinite(value) or is_zero(value, fmt, thresholds):
            return self.zero or self.up
        return self.up if value > 0 else self.down + (self.turns if value <= -1 else "")

    def said(self, value: float, fmt: str, thresholds=()) -> str:
        """The value alone in the words of its sign, for a summary or a table cell ("a fall of
        456%", "taking away a further 196%"; :attr:`none` at 0): the same frame as the verdict."""
        if value is None or not math.isfinite(value):
            return number(value, fmt)
        if is_zero(value, fmt, thresholds):
            return self.none
        return self.ends[0 if value < 0 else 1].format(size(value, fmt, thresholds))

    def template(self, value: float, fmt: str, thresholds=()) -> str:
        """``text`` with the way for ``value``, still holding ``{value}``, ``{n}`` and ``{unit}``."""
        return self.text.replace("{way}", self.way(value, fmt, thresholds))


def size(value: float, fmt: str, thresholds=()) -> str:
    """``|value|`` in ``fmt`` without a sign (a forced ``+`` dropped): a signed value's size, read
    after words that carry its sign; near one of ``thresholds`` on the value's side of 0, on its
    side of it (:func:`~selfrepair.rules.against`)."""
    if value is None or not math.isfinite(value):
        return number(value, fmt)
    same_side = [abs(t) for t in thresholds if t == 0 or (t > 0) == (value > 0)]
    return against(abs(value), fmt.replace("+", ""), same_side)


def is_zero(value: float, fmt: str, thresholds=()) -> bool:
    """Whether ``value``'s :func:`size` prints as zero ("0%", "0.00", "0.0×10⁰")."""
    return size(value, fmt, thresholds).split("×")[0].split(" ")[0].strip("0.%") == ""


def thresholds(rule: Rule) -> tuple[float, ...]:
    """The values a rule compares a claim's value with (a "proportional" rule's bound is a
    tolerance on the intercept, not a threshold of the value)."""
    return () if rule.op == "proportional" else rule.bounds
