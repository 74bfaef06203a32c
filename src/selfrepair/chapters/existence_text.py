"""Chapter 1's computed paragraphs that read the whole chapter: the note under the regions table
(:func:`regions_note`, :func:`every_token_note`) and "What this chapter shows" (:func:`findings`),
which puts the held claims beside what goes against them on this model — the late heads' self-repair
over every token and the early heads' on their own top tokens (:func:`other_side`)."""

from __future__ import annotations

import math

import pandas as pd

from ..findings import Figure, Finding, markdown, shows as _shows
from ..rules import number
from ..structure import late_start
from ..tables import readable


def regions_note(r) -> str:
    """One sentence under the regions table: its share of repaired late heads beside the verdict on
    "many", and why they differ (other tokens, another class of heads, another test)."""
    s = r.summary.set_index("group").loc["late"]
    many = next(v for v in r.verdicts if v.claim.key == "many")
    n_pos = int(s["n_positive_de"])
    if n_pos == 0 or not math.isfinite(many.value):
        return ""
    return (f"The table counts {int(s['n_repaired'])} of the {n_pos} late-layer heads with a positive "
            f"direct effect ({s['n_repaired'] / n_pos:.0%}) as repaired, reading each head's means over "
            f"every token and Fig 2's band; the verdict on 'many' counts {many.value:.0%} of all "
            f"{many.n} late-layer heads as self-repaired, reading each head's own top-k% tokens (where "
            "its direct effect is largest) and a positive mean self-repair: different tokens, a different "
            "class of heads and a different test, so the two shares need not agree." + every_token_note(s))


# the paper's reason for reading each head on its top 2% of tokens (self-repair paper, §2.2)
TOP_TOKENS_REASON = ("“for each head, we measure the average self-repair each attention head experiences across "
                     "the top 2% of tokens filtered by each head's direct effect, to ensure we are seeing "
                     "self-repair of the head's role in the model, rather than noise” — since “each language "
                     "model component tends to be useful on a sparse set of tokens”")


def every_token_note(late: pd.Series) -> str:
    """One sentence on the late heads' self-repair over *every* token (the regions table's
    ``mean_self_repair`` and ``share_negative_self_repair``), worded from their signs, and why the
    paper's claim reads each head's top tokens instead (its own words, §2.2)."""
    share, mean = float(late["share_negative_self_repair"]), float(late["mean_self_repair"])
    if not (math.isfinite(share) and math.isfinite(mean)):
        return ""
    most = ("most late-layer heads' mean self-repair is negative" if share > 0.5 else
            "most late-layer heads' mean self-repair is positive" if share < 0.5 else
            "half the late-layer heads' mean self-repair is negative")
    return (f" Over every token, {most} ({share:.0%} of them below zero; the mean over them "
            f"{number(mean, '+.3f')} logits: the fold's {readable('share_negative_self_repair')} and "
            f"{readable('mean_self_repair')}). The claim is "
            f"about each head's top tokens, not its average one, because the paper measures it so (§2.2): "
            f"{TOP_TOKENS_REASON}. Why the every-token mean has the sign it has here is not tested in this chapter.")


FIGURES = {"many": Figure("ch01-fig1", "Fig 1"), "exists": Figure("ch01-fig1", "Fig 2"),
           "imperfect": Figure("ch01-imperfect", "the regions by layer"),
           "noisy": Figure("ch01-noisy", "the spread within each head")}


def against(r) -> tuple[float, float, float]:
    """What goes against "many" on this run: the share of late-layer heads whose mean self-repair
    over every token is negative, that mean (logits), and the share of early-layer heads with
    negative mean self-repair on their own top-k% tokens (NaN where the run does not have them)."""
    summary, top = getattr(r, "summary", None), getattr(r, "top", None)
    nan = float("nan")
    if summary is None or top is None or "late" not in set(summary["group"]):
        return nan, nan, nan
    late = summary.set_index("group").loc["late"]
    early = top[top["layer"] < late_start(r.evidence.n_layers)]["self_repair"]
    return (float(late["share_negative_self_repair"]), float(late["mean_self_repair"]),
            float((early < 0).mean()) if len(early) else nan)


def _most(share: float, who: str, what: str) -> str:
    side = "negative" if share > 0.5 else "positive" if share < 0.5 else "negative for half of them"
    return f"{who}' {what} is {'mostly ' + side if share != 0.5 else side} ({share:.0%} of them below zero"


def other_side(r) -> Finding | None:
    """The sentence beside the held claims: over every token, and for the early-layer heads on their
    top tokens, the sign of self-repair, in words of its sign (:func:`against`); None without them."""
    share, mean, early = against(r)
    if not all(math.isfinite(x) for x in (share, mean, early)):
        return None
    costs = "more" if mean < 0 else "less"
    text = (f"The other side: averaged over every token, {_most(share, 'the late-layer heads', 'self-repair')}; "
            f"on average ablating one costs {abs(mean):.3f} logits {costs} than its direct effect), and "
            f"{_most(early, 'the early-layer heads', 'self-repair on their own top tokens')}). Self-repair on "
            "this model is a property of a late head's top tokens, not of every ablation.")
    return Finding(text, (FIGURES["many"], Figure("ch01-imperfect", "the regions by layer")), (share, mean, early))


def findings(r) -> list[Finding]:
    """"What this chapter shows": where it ran, the claims by outcome, what goes against them
    (:func:`other_side`), and the take-away (from "many": is self-repair of late heads widespread
    on this model, and where it is not)."""
    m, cl, model = r.meta, r.evidence.clusters, str(r.meta.get("model"))
    where = Finding(f"This chapter ablated every head of {model} on {m.get('n_tokens', 0):,} tokens from "
                    f"{cl.n:,} independent {cl.unit}, with {m.get('ablation')} ablation.",
                    values=(m.get("n_tokens", 0), cl.n))
    many = next(v for v in r.verdicts if v.claim.key == "many")
    share = f"{many.value:.0%}" if math.isfinite(many.value) else "n/a"
    side = other_side(r)
    if many.holds:
        text = (f"Take-away: on this model, ablating a late-layer head costs less than its direct effect "
                f"for {share} of them on the tokens where they matter most, so there an ablation understates what "
                "such a head writes" + ("; but on the average token, and for the early-layer heads even on "
                                        "their top tokens, an ablation mostly costs more than the direct effect"
                                        if side and side.values[0] > 0.5 and side.values[2] > 0.5 else "")
                + ": read a head's importance from its direct effect and its ablation together, on the tokens "
                  "you care about.")
    elif many.holds is False:
        text = (f"Take-away: self-repair of late-layer heads is not widespread on this model ({share} of them), "
                "so ablating one mostly costs its full direct effect.")
    else:
        text = (f"Take-away: this run cannot say whether self-repair of late-layer heads is widespread on this "
                f"model ({share} of them); a run on more tokens would narrow the interval.")
    takeaway = Finding(text, (FIGURES["many"],), (many.value,) if math.isfinite(many.value) else ())
    found = _shows(where, r.verdicts, FIGURES, model, takeaway)
    return found if side is None else [*found[:-1], side, found[-1]]


def shows(r) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(r))
