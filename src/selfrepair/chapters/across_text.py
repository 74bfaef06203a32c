"""Chapter 6's prose: the closing "What this chapter shows" (the claims on the run of the current
model, and where the paper's released values of the same statistics lie against it, so a reader
can tell a difference of the model from one of the method) and the size of the repair beside
those values (:func:`size_markdown`)."""

from __future__ import annotations

import math

from ..findings import Finding, shows as _shows
from ..rules import number
from ..tables import counted
from ..models.loading import EMBEDDED_MODEL
from .across import CLAIM_COLUMNS, CLAIMS, FIGURES, AcrossChapter, _and, _split, run_verdict  # noqa: F401 (FIGURES: the chapter's)


def current_run(ch: AcrossChapter):
    """The row of :func:`~selfrepair.chapters.across.compare_models` of the current model (its
    first cached run), or None."""
    ours = ch.table[(ch.table["source"] != "paper") & (ch.table["model"] == ch.current)]
    return ours.iloc[0] if len(ours) else None


def findings(ch: AcrossChapter) -> list[Finding]:
    """Where it ran, the current run's claims by outcome, and the paper's released values of the
    same statistics beside the current run's."""
    ours = ch.table[ch.table["source"] != "paper"]
    paper = ch.table[ch.table["source"] == "paper"]
    where = Finding(f"This chapter set {counted(len(ours), 'cached run')} of this project "
                    f"({counted(ours['model'].nunique(), 'model')}) beside the paper's released values for "
                    f"{counted(len(paper), 'model')}, on the same statistics.",
                    values=(len(ours), ours["model"].nunique(), len(paper)))
    r = current_run(ch)
    if r is None:
        return [where, Finding(f"Take-away: {ch.current} has no cached run to compare yet.")]
    verdicts = [run_verdict(c, r, ch.estimates or {}) for c in CLAIMS]
    parts, values = [], []
    for c in CLAIMS:
        got = paper[CLAIM_COLUMNS[c.key]].dropna()
        ours_v = float(r[CLAIM_COLUMNS[c.key]])
        if len(got) and math.isfinite(ours_v):
            parts.append(f"{c.statement[0].lower() + c.statement[1:]}: {ours_v:{c.fmt}} here, "
                         f"{got.min():{c.fmt}} to {got.max():{c.fmt}} in the release")
            values += [ours_v, float(got.min()), float(got.max())]
    text = ("Take-away: on the same statistics, " + "; ".join(parts) + " — where the release's models agree "
            "with each other and not with this run, the difference lies with the model (or its data), not the "
            "method." if parts else "Take-away: the release holds none of these statistics to set beside this run.")
    takeaway = Finding(text, (FIGURES["many"], FIGURES["between"]), tuple(values))
    return _shows(where, verdicts, FIGURES, str(ch.current), takeaway)


def _in_range(value: float, lo: float, hi: float) -> str:
    """Where ``value`` lies against the range ``lo``–``hi``, in words."""
    if value > hi:
        return f"above all of them ({value / hi:.1f}× the largest)" if hi > 0 else "above all of them"
    if value < lo:
        return "below all of them"
    return "within their range"


def size_markdown(table: pd.DataFrame, current: str, cfg: Any = None) -> str:
    """The current model's mean late- and early-layer top-k% self-repair beside the paper's released
    values in the same table, where it lies against them, and what might explain the size — said
    plainly as untested (``cfg``: the chapter's parameters, for the tokens and corpus)."""
    ours, paper = _split(table, current)
    ours = ours[ours["model"] == current]
    if ours.empty or paper.empty:
        return ""
    me = ours.iloc[0]
    late, early = float(me["self_repair_late"]), float(me["self_repair_early"])
    pl, pe = paper["self_repair_late"].astype(float), paper["self_repair_early"].dropna().astype(float)
    text = (f"**The size of the repair.** On {me['run']}, the late layers' heads have a mean top-k% self-repair "
            f"of {number(late, '.3f')} logits and the early layers' {number(early, '.3f')}; the paper's released values in the "
            f"table run from {number(pl.min(), '+.3f')} to {number(pl.max(), '+.3f')} (late) and "
            f"{number(pe.min(), '+.3f')} to {number(pe.max(), '+.3f')} "
            f"(early) over {_and(list(paper['model']))}: ours is {_in_range(late, pl.min(), pl.max())} in the late "
            f"layers and {_in_range(early, pe.min(), pe.max())} in the early ones.")
    why = []
    if "block_norm_share_late" in me and float(me["block_norm_share_late"] or 0) != 0:
        why.append("another architecture (this model also normalizes each block's write, which none of the "
                   "paper's models does)")
    else:
        why.append("another architecture")
    if str(current) == EMBEDDED_MODEL:
        why.append("4-bit quantized weights")
    if cfg is not None and getattr(cfg, "n_tokens", None):
        per_head = cfg.n_tokens * cfg.top_percent / 100
        why.append(f"another corpus and far fewer tokens (each head's top {cfg.top_percent:g}% of "
                   f"{cfg.n_tokens:,} tokens of the `{cfg.dataset}` corpus is about {per_head:,.0f} tokens, "
                   f"against about {1_000_000 * cfg.top_percent / 100:,.0f} of the paper's 1M tokens of The Pile)")
    why.append("a different logit scale (self-repair is in logits, not a share of the head's direct effect)")
    return text + (" What makes the difference is **not tested here**; candidates are " + "; ".join(why) + ".")


def scope_markdown(ch: AcrossChapter) -> str:
    """The chapter's scope, computed: how many models of this project's own the build has measured,
    that the comparison is with the paper's released values, and how to add a model (read3 #36:
    the title "Across models" promised more than one model of ours without saying so)."""
    ours, paper = _split(ch.table, ch.current)
    models = list(dict.fromkeys(ours["model"]))
    released = _and(list(paper["model"])) if len(paper) else "none"
    mine = (f"this build has measured **{counted(len(models), 'model')} of its own** ({_and(models)})"
            if models else "this build has measured **no model of its own** yet")
    only = (" With one model of ours, this is not a comparison of our models with each other: it sets ours "
            "beside the paper's." if len(models) == 1 else "")
    return (f"**Which models.** On this page {mine}; every other model is **the paper's released values** "
            f"({released}), measured by its authors on their models and data.{only} To add a model, run "
            "chapter 1 (or the `selfrepair sweep` command) on it: every all-heads sweep in the results "
            "folder is picked up here on the next build.")
