"""Signed numbers in words: a change is said from its sign ("falls by 5%", "gives back 5%" / "takes
away a further 5%"), never as "by -5%" or "a fall of -5%"."""
from __future__ import annotations

import math


def _abs(x: float, fmt: str) -> str:
    """``|x|`` in ``fmt`` without a forced sign."""
    return format(abs(x), fmt.replace("+", ""))


def _interval(est, fmt: str, ends=("a fall of {}", "a rise of {}"), none: str = "no change",
              shown_zero: bool = False) -> str:
    """The estimate's interval in brackets, or why it has none, read in the frame of the words
    that carry the value's sign (:func:`~selfrepair.rules.signed_interval_words`): sizes in
    increasing order where the whole interval is on the value's side of 0, else each end in words
    (``ends``: below 0, above 0) and that it includes ``none``; ``shown_zero``: the value was said
    as no change, so each end is said from its own sign."""
    if not est.reliable:
        return f" (no reliable interval: {est.why or 'undefined'})"
    from ..rules import signed_interval_words

    value = 0.0 if shown_zero else est.value
    return f" ({signed_interval_words(value, est.lo, est.hi, fmt, (), *ends, none=none)})"


def changes(x: float, fmt: str, up: str = "rises by", down: str = "falls by",
            zero: str = "does not change", relative: bool = False, unit: str = "") -> str:
    """A signed change in words: "falls by 5%" / "rises by 5%" / "does not change" (at the digits
    shown). ``relative``: ``x`` is a share of the thing itself, so a fall of 100% or more is said
    to turn it negative; ``unit`` follows the number (" logits")."""
    if not math.isfinite(x):
        return "changes by n/a"
    if _abs(x, fmt).strip("0.%") == "":
        return zero
    said = f"{up if x > 0 else down} {_abs(x, fmt)}{unit}"
    if relative:
        said += " of itself" + (" (it turns negative)" if x <= -1 else "")
    return said


def fall(x: float, fmt: str) -> str:
    """A signed change (negative: a fall) as a noun: "a fall of 5%" / "a rise of 5%" / "no change"."""
    if not math.isfinite(x):
        return "a change of n/a"
    if _abs(x, fmt).strip("0.%") == "":
        return "no change"
    return f"{'a rise' if x > 0 else 'a fall'} of {_abs(x, fmt)}"


def gives_back(x: float, fmt: str, unit: str = "") -> str:
    """What later layers give back, signed (negative: they take away more): "give back 5%" / "take
    away a further 5% (the opposite of giving back)" / "give back nothing"; ``unit`` follows the
    number ("0.67 logits")."""
    if not math.isfinite(x):
        return "give back n/a"
    if _abs(x, fmt).strip("0.%") == "":
        return "give back nothing"
    if x > 0:
        return f"give back {_abs(x, fmt)}{unit}"
    return f"take away a further {_abs(x, fmt)}{unit} (the opposite of giving back)"


def moved(est, fmt: str, how=changes, ends=None, none=None, **kw) -> str:
    """An :class:`~selfrepair.uncertainty.Estimate` said by ``how`` (:func:`changes`,
    :func:`gives_back`) from its value's sign, then its interval in the same frame (``ends`` and
    ``none`` as :func:`_interval` takes them; by default from ``how``)."""
    if not math.isfinite(est.value):
        return how(est.value, fmt, **kw)
    said = how(est.value, fmt, **kw)
    unit = kw.get("unit", "")
    if how is gives_back:
        ends = ends or ("taking away a further {}" + unit, "giving back {}" + unit)
        none = none or "giving back nothing"
    ends = ends or ("a fall of {}" + unit, "a rise of {}" + unit)
    shown_zero = _abs(est.value, fmt).strip("0.%") == ""
    interval = _interval(est, fmt, ends, none or "no change", shown_zero)
    if said.endswith(")"):  # "(it turns negative)" / "(the opposite of giving back)": one bracket
        return said[:-1] + "; " + interval[2:]
    return said + interval


def said(est, claim, thresholds=()) -> str:
    """An :class:`~selfrepair.uncertainty.Estimate` said as ``claim``'s reading (a
    :class:`~selfrepair.rules.Signed`) says it, from its sign, the number unsigned, with its 95%
    interval in the same frame: "take away a further 196% (95% interval 168% to 227%)", "give back
    30% (95% interval 10% to 50%)"; a value or end near one of ``thresholds`` on its side of it."""
    from ..rules import size

    r, fmt = claim.reading, claim.fmt
    if est.value is None or not math.isfinite(est.value):
        return r.way(math.nan, fmt).replace("{value}", "n/a")
    way = r.way(est.value, fmt, thresholds).replace("{value}", size(est.value, fmt, thresholds))
    interval = (r.interval(est.value, est.lo, est.hi, fmt, thresholds) if est.reliable
                else f"no reliable interval: {est.why or 'undefined'}")
    if way.endswith(")"):  # "(the opposite of giving back)": one bracket for it and the interval
        return f"{way[:-1]}; {interval})"
    return f"{way} ({interval})"
