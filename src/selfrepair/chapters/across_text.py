"""Chapter 6's closing "What this chapter shows": the claims on the run of the current model, and
where the paper's released values of the same statistics lie against it (so a reader can tell a
difference of the model from one of the method)."""

from __future__ import annotations

import math

from ..findings import Finding, shows as _shows
from ..tables import counted
from .across import CLAIM_COLUMNS, CLAIMS, FIGURES, AcrossChapter, run_verdict  # noqa: F401 (FIGURES: the chapter's)


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
