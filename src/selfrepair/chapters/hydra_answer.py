"""Chapter 5's answer (Hydra §6, Fig 7 and 8): whether the Hydra effect, as the paper measures it, is
seen on the model that ran, said once after the figures that show it, and the chapter's one
headline number for how much the later layers give back — the restored share at the clean run's σ
(:data:`~selfrepair.chapters.hydra_claims.RESTORED`'s statistic, the paper's §6 sentence) — with
every other reading of the same compensation in one fold, each with why its number differs
(:func:`other_readings`)."""

from __future__ import annotations

import html
import math

from ..rules import number
from .hydra_claims import PAPER, said, task_failed
from .fold import Fold, fold_line  # noqa: F401 (Fold: the notebook's type, re-exported)


def hydra_answer(ch) -> tuple[bool | None, str]:
    """Is the Hydra effect, as the paper measures it, seen on this model: True, False or None
    (cannot tell, or cannot be tested), and why in words (the later attention layers' response to
    a middle attention layer's ablation, :attr:`Estimates.hydra_part`)."""
    part = ch.estimates.hydra_part
    why = task_failed(ch.numbers["n_prompts"], ch.numbers["n_correct"])
    if why:
        return None, f"it cannot be tested here: {why}"
    if not part.reliable:
        return None, f"the interval is not reliable ({part.why})"
    if part.lo > 0:
        return True, f"together they {said(part)} of what it removed, so they make up part of the loss"
    if part.hi < 0:
        return False, f"together they {said(part)} of what it removed, so they do not make up for it"
    return None, f"their part ({said(part)} of what it removed) cannot be told apart from none"


def conclusion(ch) -> str:
    """The answer in sentences (after its figures, and in "What this chapter shows"): the chapter's
    headline share (:data:`RESTORED`'s statistic at the clean run's σ), then the later attention
    layers' part of it, which decides whether the Hydra effect is seen."""
    whole = ch.estimates.restored["clean"]
    _, words = hydra_answer(ch)
    return (f"When a middle attention layer is ablated, the later layers {said(whole)} of the direct effect it "
            f"removed, where the paper finds approximately {PAPER['restored']:.0%} given back. The Hydra effect "
            f"proper is the later attention layers' part of that, and it decides the answer: {words}.")


def seen(ch) -> str:
    """In plain words: is the Hydra effect, as the paper measures it, seen on this model? (Shown
    after the figures of compensation, Fig 7 and 8.)"""
    e, model = ch.estimates, ch.meta.get("model")
    whole, part = e.restored["clean"], e.hydra_part
    head = f"**Is the Hydra effect seen on {model}?**"
    answer, words = hydra_answer(ch)
    if task_failed(ch.numbers["n_prompts"], ch.numbers["n_correct"]):
        return f"{head} {words[0].upper() + words[1:]}."
    if not (whole.reliable and part.reliable):
        return f"{head} We cannot tell: the intervals are not reliable ({whole.why or part.why})."
    label = {True: "**Yes.**", False: "**No, not as the paper measures it.**", None: "**Not clearly.**"}[answer]
    return f"{head} {label} {conclusion(ch)}"


FOLD_TITLE = "Other ways to read the same compensation, and why they give different numbers"


def other_readings(ch) -> Fold:
    """Every other reading of the compensation the chapter shows, one line each: what it measures
    and why its number is not the headline's (the restored share at the clean run's σ)."""
    from .hydra_text import patch_slope

    e, s = ch.estimates, ch.numbers
    lead = html.escape("The chapter's one number for how much the later layers give back is the headline above, "
                       "the restored share at the clean run's σ. Each reading below measures something else:")
    lines = [fold_line("The same share at each ablation run's own σ′", f"the later layers {said(e.restored['ablated'])}",
                   "Every direct effect divided by the ablated run's final-norm scale instead of the clean run's "
                   f"(the two differ by a mean S/S′ of {s['scale_ratio_mid']:.3f} there); the number differs "
                   "because the norm's rescaling of the later layers' writes then counts as compensation",
                   ("ch05-scale", "Which σ?")),
             fold_line("The pooled slope over the middle layers", e.pooled["clean"].prose(".2f"),
                   "The extra compensation per extra logit of clean direct effect, from prompt to prompt within "
                   "each middle layer; a slope reads how compensation varies, not its average, so it need not "
                   "have the headline's size or sign")]
    per_patch = patch_slope(ch)
    if math.isfinite(per_patch):
        lines.append(fold_line("The per-patch slope", number(per_patch, ".2f"),
                           "The same kind of slope over every (prompt, resample source), on the direct effect each "
                           "single source removed, the middle layers' slopes averaged with equal weight; single "
                           "sources vary more than their average, and every layer counts alike",
                           ("ch05-noise", "the lower panels of the noise chart")))
    lines.append(fold_line("The steepest slope past the paper's cutoff", e.max_slope["clean"].prose(".2f"),
                       "The slope claim's statistic, with its own verdict above: the largest single layer's slope "
                       "among the later layers, so it reads the steepest layer, not the middle layers together"))
    if ch.best is not None and len(ch.best):
        b = ch.best.iloc[0]
        lines.append(fold_line(f"The slope at the best-fitting layer, {b['label']}", number(b["slope"], ".2f"),
                           f"Fig 7b's layer, chosen because its fit explains the most variance (R² {number(b['r2'], '.2f')}), "
                           "not for how much it compensates: one layer's slope, not a share"))
    return Fold(FOLD_TITLE, lead, tuple(lines))
