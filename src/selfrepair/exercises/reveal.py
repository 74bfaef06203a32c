"""Answers to the chapters' "predict, then reveal" questions, computed on the model the chapter ran.

Each function takes the chapter's measured object (``chapter.measure(cfg)``) and returns Markdown:
the answer on this model, with its numbers, and what the paper found where it says. The book shows
them inside a hidden solution; a student notebook keeps the cell, to be run after predicting.
"""

from __future__ import annotations

import math

from ..chapters.signed import changes, moved, said
from ..rules import Signed, against, number, thresholds


def _near(x: float, claim) -> str:
    """A share compared with ``claim``'s rule, in whole percent unless that would print it on the
    other side of one of the rule's thresholds ("89.6%" against "at least 90%", not "90%")."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else against(x, ".0%", thresholds(claim.rule))

TERMS = ("from_heads", "from_mlps", "from_block_norms", "from_norm")
TERM_NAMES = {"from_heads": "downstream heads", "from_mlps": "downstream MLP layers",
              "from_block_norms": "downstream block norms", "from_norm": "the final norm"}


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


# -- chapter 0 ---------------------------------------------------------------------------------------
def no_reaction(live) -> str:
    """If nothing downstream reacted, Δlogit = ΔDE_head; the measured Δlogit of the first head."""
    from ..chapters.intro import example_rows

    r = example_rows(live.table)[0]  # the table's clearest example, as its text reads it
    gap = r.delta_logit - r.delta_direct_effect
    return (f"With nothing downstream reacting, Δlogit would be exactly the head's own change, "
            f"ΔDE = {number(r.delta_direct_effect, '.3g')} for {r.label} (averaged over the live check's tokens). "
            f"Measured: Δlogit = {number(r.delta_logit, '.3g')}, so the rest of the network "
            f"{changes(gap, '.3g', 'gave back', 'took away a further', 'gave back nothing')} "
            f"(eq. 1's self-repair, {number(r.self_repair, '.3g')}): Δlogit is "
            f"{'closer to zero' if abs(r.delta_logit) < abs(r.delta_direct_effect) else 'further from zero'} "
            f"than ΔDE.")


def largest_term(live, model) -> str:
    """Which eq. 2 term is largest for the last-layer heads of the live check."""
    t = live.table
    last = [r for _, r in t.iterrows() if int(r.label[1:].split("H")[0]) == model.n_layers - 1]
    if not last:
        return ("None of the live check's heads is in the last layer: name one among the featured heads in "
                "the parameters cell.")
    r = last[0]
    terms = [q for q in TERMS if q != "from_block_norms" or model.sandwich]  # only terms this model has
    term = max(terms, key=lambda q: abs(r[q]))
    downstream = ("only the final norm (in a parallel-residual block the same layer's MLP does not read "
                  "the attention output)" if model.parallel_residual else
                  "the same block's MLP and the final norm")
    return (f"For {r.label}, a last-layer head, the largest term is **{TERM_NAMES[term]}** "
            f"({number(r[term], '.3g')}; the others: " + ", ".join(f"{TERM_NAMES[q]} {number(r[q], '.3g')}" for q in terms
                                                       if q != term) +
            f"). Downstream of a last-layer head of this model is {downstream}.")


# -- chapter 1 ---------------------------------------------------------------------------------------
def late_heads(ex) -> str:
    """How many late heads with a positive direct effect are self-repaired (whole-set means)."""
    s = ex.summary.set_index("group").loc["late"]
    n = int(s.n_positive_de)
    if n == 0:
        return "No late-layer head has a positive whole-set direct effect on this run."
    return (f"Of the {n} late-layer heads (layers {s.layers}) with a positive direct effect, "
            f"{int(s.n_repaired)} ({_pct(s.n_repaired / n)}) are self-repaired (0 < −Δlogit < DE), "
            f"{int(s.n_overcorrected)} overcorrected (Δlogit > 0) and {int(s.n_broken)} broken "
            f"(−Δlogit > DE). The paper finds 'many heads in later layers' self-repaired in every model it ran.")


def noise(ex) -> str:
    """The per-token spread of the head with the largest mean direct effect (uniform sample)."""
    sp = ex.spread
    r = sp.loc[sp["mean_de"].idxmax()]
    return (f"{r.label} (the largest mean direct effect, {number(r.mean_de, '.3g')}): over {int(r.n)} sampled "
            f"tokens its self-repair runs from {number(r.q10, '.3g')} (10th percentile) to {number(r.q90, '.3g')} "
            f"(90th), around a mean of {number(r['mean'], '.3g')}; {_pct(r.share_overcorrected)} of the tokens are "
            f"overcorrected. Self-repair is a tendency of the average, not a guarantee per token.")


# -- chapter 2 ---------------------------------------------------------------------------------------
def zero_ratio(ch) -> str:
    """Share of the ratio head's top tokens with S/S′ > 1 under each ablation, then over every
    last-layer head (the verdicts' class), with the paper's shares from the claims' data."""
    from ..chapters.layernorm_claims import QUOTED, RATIO

    r = ch.ratios.set_index("ablation")
    label = r["label"].iloc[0]
    shares = ", ".join(f"{_near(r.loc[a, 'share_ratio_above_1'], RATIO.get(a, next(iter(RATIO.values()))))} ({a})"
                       for a in r.index)  # against "almost always": 89.6%, not a 90% that reads as reaching it
    every = ", ".join(f"{_near(v.value, v.claim)} ({v.claim.key.removeprefix('ratio_')})" for v in ch.verdicts
                      if v.claim.key.startswith("ratio_"))
    paper = ", ".join(f"{v:.2%} ({a})" for a, v in QUOTED.items())
    return (f"S/S′ > 1 on {shares} of {label}'s top tokens, and on {every} of a last-layer head's top "
            f"tokens on average over all of them. Zero ablation removes the head's whole output, so the "
            f"residual stream usually shrinks the most and the norm's scale falls: S/S′ rises. The paper "
            f"(Pythia-160M L11H2): {paper}.")


def share(ch) -> str:
    """The clipped final-norm share of DE on top tokens, by layer."""
    from ..chapters.layernorm_claims import SHARE_QUOTED

    lay = ch.layers
    g = lay[(lay["tokens"] == "top-k%") & (lay["clipping"] == "clipped") & (lay["component"] == "final norm")]
    best = g.loc[g["share"].idxmax()]
    v = {x.claim.key: x for x in ch.verdicts}.get("norm_share")
    verdict = (f" The verdict above averages only the {v.n} {v.unit} ({_near(v.value, v.claim)}), so the two numbers "
               "differ by the early layers." if v is not None and v.value is not None else "")
    return (f"Averaged over every layer (each layer's mean over its heads), the final norm gives back "
            f"{_pct(g['share'].mean())} of a head's direct effect on its top tokens (per layer from "
            f"{_pct(g['share'].min())} to {_pct(g['share'].max())}, largest in layer {int(best.layer)})."
            f"{verdict} The paper reports around {SHARE_QUOTED:.0%} across many layers and models.")


# -- chapter 3 ---------------------------------------------------------------------------------------
SO = {True: "the claim holds", False: "the claim does not hold", None: "this run cannot tell whether the claim holds"}


def erasure(ch) -> str:
    """Whether the top repairing neurons erase: the verdict's numbers (erasure neurons by their
    median clean DE on the distribution), and the per-token view of the first head."""
    v = {x.claim.key: x for x in ch.verdicts}["erasure"]
    r = ch.summary.iloc[0]
    return (f"Among the ten neurons that repair each Fig 8 head most, erasure neurons (a negative median "
            f"clean direct effect over every token) are {_points(v)} "
            f"{'more' if v.value >= 0 else 'less'} common than among all the layer's neurons, so "
            f"{SO[v.holds]}. {v.detail} Token by "
            f"token, for {r.label}: "
            f"{_pct(r.erasure_top)} of its top repairing neurons have a negative clean direct effect on "
            f"that token, against {_pct(r.negative_baseline)} of all neurons, and neurons with one carry "
            f"{_pct(r.erasure_repair_share)} of the positive repair. A share above the baseline is the "
            "anti-erasure pattern.")


def _points(v) -> str:
    """The size of a difference of shares in percentage points (the claim's format), on its side
    of the rule's thresholds (a difference just above 0 is not "0 percentage points more")."""
    from ..claims import size, thresholds

    return size(v.value, v.claim.fmt, thresholds(v.claim.rule))


def sparse(ch) -> str:
    """How heavily the top neuron repairs (Fig 8), and how spread the whole change is (App. C)."""
    s = ch.summary
    v = {x.claim.key: x for x in ch.verdicts}["sparse"]
    from ..chapters.neurons_claims import half_spread

    return (f"The single top repairing neuron gives back at least a tenth of the head's direct effect on "
            f"{_near(v.value, v.claim)} of the Fig 8 heads' top tokens (mean over the heads). Half of the layer's "
            f"absolute change in direct effect — repair and its opposite together, App. C's measure — sits "
            f"in {half_spread(s)}: the top of the repair is sparse, the change below it is not.")


# -- chapter 4 ---------------------------------------------------------------------------------------
def classes(ch) -> str:
    """Counts of self-reinforcing / self-repressing / neutral / weak heads."""
    c = ch.classes
    counts = c["class"].value_counts()
    alpha = c["alpha"].max()
    text = ", ".join(f"{int(n)} {name}" for name, n in counts.items())
    return (f"At α = {alpha:g}: {text} (of {len(c)} heads). The paper observes both kinds, and some heads "
            "that are a mix, and offers self-repressing heads as evidence for the iterative inference "
            "hypothesis (App. G): a head that writes less once its own output is there may be signalling "
            "that its task is done.")


def control(ch) -> str:
    """How the heads respond to a random push of the same norm: the one answer §4.3 gives
    (:func:`~selfrepair.chapters.iterative.specificity`), over the same heads and tokens."""
    from ..chapters.iterative import specificity

    return specificity(ch.classes)


# -- chapter 5 ---------------------------------------------------------------------------------------
def drop_vs_de(ch) -> str:
    """How often a layer's direct effect exceeds the logit drop its ablation causes, by more than
    the chapter's margin and by bare sign."""
    e = ch.effects
    a = e[e["kind"] == "attn"]
    frac = float((a["direct_effect"] > a["ablation_drop"]).mean())
    est = ch.estimates
    de, drop = a["direct_effect"].mean(), a["ablation_drop"].mean()
    mean = ("on average the rest of the network made up part of the loss" if drop < de else
            "on average the drop is the larger: the rest of the network added to the loss rather than making "
            "up part of it")
    return (f"For {est.unembed.prose('.0%')} of the (prompt, attention layer) pairs the layer's direct "
            f"effect exceeds the logit drop its ablation causes by more than the chapter's margin, and for "
            f"{est.other_way.prose('.0%')} the drop exceeds the direct effect by as much (by bare sign, the "
            f"direct effect is larger on {_pct(frac)}; mean DE {de:.3g}, mean drop {drop:.3g}). Where the "
            f"direct effect is larger, the rest of the network made up part of the loss; {mean}.")


ERASURE_WAYS = dict(up="moves the same way by", down="moves the other way (the way erasure predicts) by",
                    zero="does not move", unit=" logits", none="no move",
                    ends=("{} logits the other way", "{} logits the same way"))  # the erasure slope, said from its sign


def late_mlps(ch) -> str:
    """The sign of late MLP layers' ΔDE when an attention layer is ablated, and the erasure regression."""
    er = ch.erasure
    late = er[er["late"]]
    if late.empty:
        return "This model has no late MLP layer downstream of an attention layer."
    d = late["delta_direct_effect"]
    return (f"Over every (ablated attention layer, late MLP layer) pair, the late MLPs' direct effect "
            f"{changes(d.mean(), '.3g', 'rises by', 'falls by', 'does not change')} on average ({int((d > 0).sum())} "
            f"of {len(d)} pairs up); in the chapter's erasure regression, for each logit an ablation moves the "
            f"ablated layer's direct effect, theirs {moved(ch.estimates.erasure, '.2f', **ERASURE_WAYS)}. The Hydra paper (§2.5.2): late MLPs "
            "erase — they lower the token's logit by an amount that follows what the attention layers "
            "wrote — so when an attention layer is ablated they erase less and their direct effect rises.")


# -- chapter 6 ---------------------------------------------------------------------------------------
def holds(ch) -> str:
    """On how many runs many late heads self-repair, by the chapter's rule on each run's interval."""
    from ..chapters.across import MANY
    from ..claims import Verdict
    from ..tables import counted

    t = ch.table
    ours, paper = t[t["source"] != "paper"], t[t["source"] == "paper"]
    runs, words = [], []
    for _, r in ours.iterrows():
        e = (ch.estimates or {}).get(r["run"], {}).get("many")
        if e is None:
            continue
        v = Verdict.of(MANY, e)
        words.append(v.word)
        runs.append(f"{r['run']} {e.prose('.0%', MANY.rule.bounds)}: {v.word}")
    released = ", ".join(f"{r.model} {_pct(r.frac_self_repaired_late)}" for _, r in paper.iterrows())
    rule = f"\"Many\" (at least {MANY.rule.bounds[0]:.0%}, the whole interval)"
    said = (f"{rule}, on our one run: {runs[0]}" if len(runs) == 1 else  # not "holds on 1 of our 1 run"
            f"{rule} holds on {words.count('holds')} of our {counted(len(words), 'run')}: " + "; ".join(runs))
    return said + f". The release's models, with no interval of their own: {released}."


def norm_share_range(ch) -> str:
    """The range of the late layers' norm share across runs."""
    t = ch.table.dropna(subset=["norm_share_late"])
    lo, hi = t.loc[t["norm_share_late"].idxmin()], t.loc[t["norm_share_late"].idxmax()]
    return (f"The late layers' clipped norm share runs from {_pct(lo.norm_share_late)} ({lo.run}) to "
            f"{_pct(hi.norm_share_late)} ({hi.run}).")


# -- chapter 7 ---------------------------------------------------------------------------------------
def atp_direction(ch) -> str:
    """For the exact top-k heads by |Δlogit|: how often AtP overstates the ablation's effect, and
    which part of exact − AtP (the final norm's or the downstream components') is the larger."""
    h = ch.heads
    k = ch.ranks["k"]
    top = h.assign(a=h["exact"].abs()).sort_values(["a", "layer", "head"], ascending=[False, True, True],
                                                   kind="mergesort").head(k)
    over = int((top["atp"].abs() > top["exact"].abs()).sum())
    norm, down = top["error_norm"].abs().sum(), top["error_downstream"].abs().sum()
    return (f"Of the exact top {k} heads, AtP overstates the effect of {over} (|AtP| > |exact|) and "
            f"understates it for {k - over}. {_error_split(norm, down)}. A first-order estimate overstates a "
            "head's effect where the rest of the network compensates (self-repair), understates it "
            "where the reaction amplifies the loss.")


def _error_split(norm: float, down: float) -> str:
    """How the error of exact − AtP splits, in words from the final norm's computed share (issue 25:
    "mostly the downstream components' part" said of 52%): "about half" within ±5 points of 50%,
    else "most" or "less than half" — the same share the verdict's fold gives over every head."""
    total = norm + down
    if not total or not math.isfinite(total):
        return "Their errors have no part to split here (both are zero)"
    share = norm / total
    word = "about half" if abs(share - 0.5) <= 0.05 else "most" if share > 0.5 else "less than half"
    return (f"Summed in size over these heads, the error is {total:.3g} logits, and the final norm's scale carries "
            f"{word} of it ({share:.0%}: {norm:.3g} logits, the downstream components {down:.3g})")


# -- chapter 8 ---------------------------------------------------------------------------------------
GIVING = Signed("", "", "", ends=("taking away a further {}", "giving back {}"), none="giving back nothing")


def _test_half(ch) -> str:
    """The clause that sets the repair table's all-prompt means beside the verdicts' test half
    (issue 25: 4.77 over every prompt beside the backups' 4.56, 95% interval 4.07 to 5.04, on the
    test half was read as a contradiction): the downstream heads' mean there, and the backups'."""
    sp, by = getattr(ch, "split", None), {v.claim.key: v for v in ch.verdicts}
    if sp is None or "backups" not in by or not sp.backups:
        return ""
    on = sp.prompts(sp.test)
    heads = float(ch.repair["from_heads"].to_numpy()[on].mean())
    return (f"; the verdicts read only the {int(on.sum()):,} prompts of the test half, on which "
            f"{TERM_NAMES['from_heads']} are {GIVING.said(heads, '.3g')} logits, the {len(sp.backups)} "
            f"backups alone {GIVING.said(by['backups'].value, '.3g')}")


def ioi_repair(ch) -> str:
    """Ablating the name movers: the logit difference's drop against the direct effect they lose,
    and which part of eq. 2 gives back the most."""
    r = ch.repair
    lost, drop = -r["nm_delta_de"].mean(), -r["delta_logit"].mean()
    parts = {q: r[q].mean() for q in TERMS if q != "from_block_norms" or ch.meta.get("sandwich")}
    top = max(parts, key=lambda q: abs(parts[q]))
    share = f" ({_pct(drop / lost)} of it)" if lost > 0 and drop > 0 else ""
    less = "less than" if drop < lost else "more than"
    moved = (f"drops by {drop:.3g}{share}: {less} the direct effect lost" if drop > 0 else
             f"does not drop at all but rises by {-drop:.3g}: over-correction, the rest of the network "
             "gives back more than the name movers lose")
    rep = next((v for v in ch.verdicts if v.claim.key == "repaired"), None)
    outcome = ""
    if rep is not None and rep.estimate is not None and rep.estimate.reliable:
        from ..chapters.ioi import repair_outcome
        # from its sign, the number unsigned ("none comes back: ... loses a further 32% of it", not
        # "-32% (95% interval -1017% to 826%)"), on its side of the rule's bounds
        came = said(rep.estimate, rep.claim, thresholds(rep.claim.rule))
        outcome = (f" On the test half, of the lost direct effect {came}. Outcome, by the whole "
                   f"interval: {repair_outcome(rep.lo, rep.hi)}.")
    others = ", ".join(f"{TERM_NAMES[q]} {GIVING.said(parts[q], '.3g')}" for q in parts if q != top)
    test = _test_half(ch)
    return (f"The name movers lose {lost:.3g} logits of direct effect on average; the logit difference "
            f"{moved}, on {ch.performance['n_prompts']} "
            f"prompts of {ch.meta.get('model')}.{outcome} Averaged over all {len(r):,} prompts (the repair "
            f"table's means), the largest part of eq. 2 is {TERM_NAMES[top]}, {GIVING.said(parts[top], '.3g')} "
            f"logits ({others}){test}. "
            "Wang et al. found backup name movers in GPT-2 small that take over part of the name movers' "
            "job when those are knocked out; whether a model does, and how much, is what this run measures.")
