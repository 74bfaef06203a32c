"""Chapter 8's outcome regions of the repair (no / partial / full repair, over-correction) and its
closing "What this chapter shows" paragraph, re-exported by :mod:`selfrepair.chapters.ioi`."""

from __future__ import annotations

import numpy as np

from ..rules import NEGLIGIBLE, interval_words
from ..findings import Figure, Finding, markdown, shows as _shows
from .signed import fall

FULL_TOL = NEGLIGIBLE  # a remaining loss within 10% of the DE lost: full repair
REGIONS = (("no repair", -np.inf, 0.0), ("partial repair", 0.0, 1 - FULL_TOL),
           ("full repair", 1 - FULL_TOL, 1 + FULL_TOL), ("over-correction", 1 + FULL_TOL, np.inf))
MEANING = {"no repair": "the logit difference falls by more than the direct effect they lose",
           "partial repair": "the rest of the network makes up part of the loss, not all of it",
           "full repair": "the rest of the network makes up all of the loss, within 10% of it",
           "over-correction": "the rest of the network gives back more than they lose"}


def region(x: float) -> str:
    """Which of :data:`REGIONS` a share of the lost direct effect given back is in (bounds of the
    partial region inclusive, as the claim's rule)."""
    if x < 0:
        return "no repair"
    if x <= 1 - FULL_TOL:
        return "partial repair"
    return "full repair" if x <= 1 + FULL_TOL else "over-correction"


def logit_change(est, fmt: str = ".0%") -> str:
    """The sentence of how the logit difference moves when the name movers are ablated, worded from
    the sign of ``est`` (its fall as a share of the direct effect lost; negative: it rises), so the
    verb never contradicts the number: "falls by 30%", "rises by 96%", "does not change"."""
    v = est.value
    if not np.isfinite(v):
        return "How much the logit difference changes cannot be computed on this run (n/a)."
    verb = "falls by" if v > 0 else "rises by" if v < 0 else "does not change:"
    size = f"{abs(v):{fmt}}" if v else f"{0:{fmt}} of the direct effect lost"
    if not est.reliable:
        span = f" (no reliable interval: {est.why or 'undefined'})"
    elif est.lo >= 0 and v >= 0 or est.hi <= 0 and v <= 0:
        a, b = sorted((abs(est.lo), abs(est.hi)))
        span = f" ({interval_words(a, b, fmt)})"
    else:
        span = f" (95% interval from {fall(-est.lo, fmt)} to {fall(-est.hi, fmt)})"  # ends in fall units
    tail = " of the direct effect lost" if v else ""
    over = " — the rest of the network gives back more than the name movers lose" if v < 0 else ""
    return f"The logit difference {verb} {size}{span}{tail}{over}."


def repair_outcome(lo: float, hi: float) -> str:
    """The outcome a 95% interval of the share given back shows: one region, or the regions it spans."""
    a, b = region(lo), region(hi)
    names = [r[0] for r in REGIONS]
    return a if a == b else " or ".join(names[names.index(a):names.index(b) + 1])


FIGURES = {"does_ioi": Figure("ch08-task", "the task on this model"),
           "repaired": Figure("ch08-repair", "the ablation of the name movers"),
           "backups": Figure("ch08-repair", "the ablation of the name movers"),
           "moved": Figure("ch08-moving", "the residual moved")}


def findings(ch) -> list[Finding]:
    """"What this chapter shows" of an :class:`~selfrepair.chapters.ioi.IoiChapter`: where it ran,
    the claims by outcome, and what the ablation of the name movers left (the repair's region)."""
    from .ioi_claims import circuit

    model, f = str(ch.meta.get("model")), ch.performance
    missing, shown = circuit(ch)
    said = (f"the {len(ch.name_movers)} heads this book's rule takes as name movers at the end. {missing}"
            if missing else f"{len(ch.name_movers)} name movers at the end{_who(ch)}")
    where = Finding(f"This chapter ran {ch.prompts['n']:,} IOI prompts on {model}, which prefers the indirect "
                    f"object to the subject on {f['accuracy']:.0%} of them, and {ch.meta.get('ablation')}-ablated "
                    f"{said}.", values=(ch.prompts["n"], f["accuracy"], len(ch.name_movers), *shown))
    by = {v.claim.key: v for v in ch.verdicts}
    does, rep = by["does_ioi"], by["repaired"]
    if not does.holds:
        text = (f"Take-away: the model is not shown to do IOI on these prompts ({does.value:.0%} with IO above S), "
                "so there is no name moving to repair and the chapter's other claims cannot be tested on it.")
        values, figure = (does.value,), FIGURES["does_ioi"]
    elif rep.estimate is not None and rep.estimate.reliable:
        outcome = repair_outcome(rep.lo, rep.hi)
        meaning = MEANING.get(outcome, "this run cannot say which")
        text = (f"Take-away: when the name movers are ablated on this model, {rep.estimate.prose('.0%')} of the "
                f"direct effect they lose comes back — {outcome}: {meaning}.")
        values, figure = (rep.value, rep.lo, rep.hi), FIGURES["repaired"]
        grow = by.get("backups")
        if missing and grow is not None and grow.estimate is not None and np.isfinite(grow.value):  # what the "backups" are here
            text += (f" The heads whose direct effect grows most do take over part of it ("
                     f"{grow.claim.reading.said(grow.value, grow.claim.fmt)} logits in sum on the test half), "
                     "but they are not shown to be backup name movers as Wang et al. mean them, so the backups' "
                     "claims are untested here.")
            values += (grow.value,)
    else:
        text = "Take-away: this run cannot tell how much of the name movers' lost direct effect comes back."
        values, figure = (), FIGURES["repaired"]
    return _shows(where, ch.verdicts, FIGURES, model, Finding(text, (figure,), values))


def _who(ch) -> str:
    """What the chosen name movers and backups are on this model, so a reader weighs the claims about
    them: their attention to IO against S, and backups that push the wrong way on the clean run."""
    nm = ch.name_movers
    if not len(nm) or "attn_io" not in nm:
        return ""
    bk = ch.backups
    text = (f" (name movers by this book's rule, not checked to copy names as Wang et al. did: from the end they "
            f"attend to IO with a mean weight of {nm['attn_io'].mean():.2f}, to S {nm['attn_s'].mean():.2f}")
    against = int((bk["direct_effect"] < 0).sum()) if len(bk) and "direct_effect" in bk else 0
    if against:
        text += (f"; {against} of the {len(bk)} backups have a negative clean direct effect on the logit "
                 "difference")
    return text + ")"


def shows(ch) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(ch))
