"""Answers to the chapters' "predict, then reveal" questions, computed on the model the chapter ran.

Each function takes the chapter's measured object (``chapter.measure(cfg)``) and returns Markdown:
the answer on this model, with its numbers, and what the paper found where it says. The book shows
them inside a hidden solution; a student notebook keeps the cell, to be run after predicting.
"""

from __future__ import annotations

import math


TERMS = ("from_heads", "from_mlps", "from_block_norms", "from_norm")
TERM_NAMES = {"from_heads": "downstream heads", "from_mlps": "downstream MLP layers",
              "from_block_norms": "downstream block norms", "from_norm": "the final norm"}


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


# -- chapter 0 ---------------------------------------------------------------------------------------
def no_reaction(live) -> str:
    """If nothing downstream reacted, Δlogit = ΔDE_head; the measured Δlogit of the first head."""
    r = live.table.iloc[0]
    gap = r.delta_logit - r.delta_direct_effect
    return (f"With nothing downstream reacting, Δlogit would be exactly the head's own change, "
            f"ΔDE = {r.delta_direct_effect:.3g} for {r.label} (averaged over the live check's tokens). "
            f"Measured: Δlogit = {r.delta_logit:.3g}, so the rest of the network added "
            f"{gap:+.3g} (eq. 1's self-repair, {r.self_repair:.3g}).")


def largest_term(live, model) -> str:
    """Which eq. 2 term is largest for the last-layer heads of the live check."""
    t = live.table
    last = [r for _, r in t.iterrows() if int(r.label[1:].split("H")[0]) == model.n_layers - 1]
    if not last:
        return "None of the live check's heads is in the last layer: set `featured_heads` to one that is."
    r = last[0]
    terms = [q for q in TERMS if q != "from_block_norms" or model.sandwich]  # only terms this model has
    term = max(terms, key=lambda q: abs(r[q]))
    downstream = ("only the final norm (in a parallel-residual block the same layer's MLP does not read "
                  "the attention output)" if model.parallel_residual else
                  "the same block's MLP and the final norm")
    return (f"For {r.label}, a last-layer head, the largest term is **{TERM_NAMES[term]}** "
            f"({r[term]:.3g}; the others: " + ", ".join(f"{TERM_NAMES[q]} {r[q]:.3g}" for q in terms
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
            f"(−Δlogit > DE). The paper finds most late heads self-repaired in every model it ran.")


def noise(ex) -> str:
    """The per-token spread of the head with the largest mean direct effect (uniform sample)."""
    sp = ex.spread
    r = sp.loc[sp["mean_de"].idxmax()]
    return (f"{r.label} (the largest mean direct effect, {r.mean_de:.3g}): over {int(r.n)} sampled "
            f"tokens its self-repair runs from {r.q10:.3g} (10th percentile) to {r.q90:.3g} (90th), "
            f"around a mean of {r['mean']:.3g}; {_pct(r.share_overcorrected)} of the tokens are "
            f"overcorrected. Self-repair is a tendency of the average, not a guarantee per token.")


# -- chapter 2 ---------------------------------------------------------------------------------------
def zero_ratio(ch) -> str:
    """Share of the ratio head's top tokens with S/S′ > 1 under each ablation."""
    r = ch.ratios.set_index("ablation")
    label = r["label"].iloc[0]
    shares = ", ".join(f"{_pct(r.loc[a, 'share_ratio_above_1'])} ({a})" for a in r.index)
    return (f"S/S′ > 1 on {shares} of {label}'s top tokens. Zero ablation removes the head's whole "
            f"output, so the residual stream usually shrinks the most and the norm's scale falls: "
            f"S/S′ rises. The paper (Pythia-160M L11H2): 90.66% (resample), 98.75% (mean), 100% (zero).")


def share(ch) -> str:
    """The clipped final-norm share of DE on top tokens, by layer."""
    lay = ch.layers
    g = lay[(lay["tokens"] == "top-k%") & (lay["clipping"] == "clipped") & (lay["component"] == "final norm")]
    best = g.loc[g["share"].idxmax()]
    return (f"Averaged over heads, the final norm gives back {_pct(g['share'].mean())} of a head's "
            f"direct effect on its top tokens (per layer from {_pct(g['share'].min())} to "
            f"{_pct(g['share'].max())}, largest in layer {int(best.layer)}). The paper reports "
            "about 30% across many layers and models.")


# -- chapter 3 ---------------------------------------------------------------------------------------
def erasure(ch) -> str:
    """Whether the top repairing neurons erase (negative clean DE), against all neurons."""
    s = ch.summary
    r = s.iloc[0]
    return (f"For {r.label}: {_pct(r.erasure_top)} of its top repairing neurons have a negative clean "
            f"direct effect, against {_pct(r.negative_baseline)} of all neurons of the last MLP layer; "
            f"neurons with a negative clean DE carry {_pct(r.erasure_repair_share)} of the positive repair. "
            "A share well above the baseline is the anti-erasure pattern.")


def sparse(ch) -> str:
    """How many neurons carry half of the repair."""
    s = ch.summary
    parts = ", ".join(f"{int(r.neurons_50)} of {int(r.d_mlp)} for {r.label}" for _, r in s.iterrows())
    return f"Half of the neurons' repair is carried by {parts}."


# -- chapter 4 ---------------------------------------------------------------------------------------
def classes(ch) -> str:
    """Counts of self-reinforcing / self-repressing / neutral / weak heads."""
    c = ch.classes
    counts = c["class"].value_counts()
    alpha = c["alpha"].max()
    text = ", ".join(f"{int(n)} {name}" for name, n in counts.items())
    return (f"At α = {alpha:g}: {text} (of {len(c)} heads). The paper found both kinds and suggests "
            "self-repressing heads are one mechanism behind self-repair.")


def control(ch) -> str:
    """How the heads respond to a random push of the same norm."""
    c = ch.classes
    own, rnd = c["relative_change"].abs().median(), c["control_change"].abs().median()
    n_spec = int(c["specific"].sum())
    return (f"The median |relative change| is {own:.2g} for the head's own output and {rnd:.2g} for "
            f"a random push of the same norm; {n_spec} of {len(c)} heads respond to their own output "
            "beyond the control (\"specific\").")


# -- chapter 5 ---------------------------------------------------------------------------------------
def drop_vs_de(ch) -> str:
    """How often a layer's direct effect exceeds the logit drop its ablation causes."""
    e = ch.effects
    a = e[e["kind"] == "attn"]
    frac = float((a["direct_effect"] > a["ablation_drop"]).mean())
    return (f"For {_pct(frac)} of the (prompt, attention layer) pairs the layer's direct effect is "
            f"larger than the logit drop its ablation causes (mean DE {a['direct_effect'].mean():.3g}, "
            f"mean drop {a['ablation_drop'].mean():.3g}): the rest of the network made up part of the loss.")


def late_mlps(ch) -> str:
    """The sign of late MLP layers' ΔDE when an attention layer is ablated."""
    er = ch.erasure
    late = er[er["late"]]
    if late.empty:
        return "This model has no late MLP layer downstream of an attention layer."
    d = late["delta_direct_effect"]
    return (f"Over every (ablated attention layer, late MLP layer) pair, the late MLPs' direct effect "
            f"changes by {d.mean():+.3g} on average ({int((d > 0).sum())} of {len(d)} pairs up). "
            "The Hydra paper (§2.5.2): late MLPs erase — they lower the token's logit by an amount that "
            "follows what the attention layers wrote — so when an attention layer is ablated they erase "
            "less and their direct effect rises.")


# -- chapter 6 ---------------------------------------------------------------------------------------
def holds(ch) -> str:
    """On how many runs most late heads self-repair."""
    t = ch.table
    ok = t["frac_self_repaired_late"] > 0.5
    runs = ", ".join(f"{r.run} {_pct(r.frac_self_repaired_late)}" for _, r in t.iterrows())
    return (f"Most late heads are self-repaired on {int(ok.sum())} of {len(t)} runs "
            f"(share of late heads with 0 < −Δlogit < DE: {runs}).")


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
    larger = "the final norm's" if norm > down else "the downstream components'"
    return (f"Of the exact top {k} heads, AtP overstates the effect of {over} (|AtP| > |exact|) and "
            f"understates it for {k - over}. Their errors are mostly {larger} part: Σ|error_norm| = "
            f"{norm:.3g}, Σ|error_downstream| = {down:.3g} logits. A first-order estimate overstates a "
            "head's effect where the rest of the network compensates (self-repair), understates it "
            "where the reaction amplifies the loss.")


# -- chapter 8 ---------------------------------------------------------------------------------------
def ioi_repair(ch) -> str:
    """Ablating the name movers: the logit difference's drop against the direct effect they lose,
    and which part of eq. 2 gives back the most."""
    r = ch.repair
    lost, drop = -r["nm_delta_de"].mean(), -r["delta_logit"].mean()
    parts = {q: r[q].mean() for q in TERMS if q != "from_block_norms" or ch.meta.get("sandwich")}
    top = max(parts, key=lambda q: abs(parts[q]))
    share = f" ({_pct(drop / lost)} of it)" if lost > 0 and drop > 0 else ""
    moved = (f"drops by {drop:.3g}{share}" if drop > 0 else
             f"does not drop at all but rises by {-drop:.3g} (overcorrection)")
    less = "less than" if drop < lost else "more than"
    return (f"The name movers lose {lost:.3g} logits of direct effect on average; the logit difference "
            f"{moved}: {less} the direct effect lost, on {ch.performance['n_prompts']} "
            f"prompts of {ch.meta.get('model')}. The largest part of eq. 2 is {TERM_NAMES[top]} "
            f"({parts[top]:+.3g} logits; " + ", ".join(f"{TERM_NAMES[q]} {parts[q]:+.3g}" for q in parts
                                                      if q != top) +
            "). Wang et al. found backup name movers in GPT-2 small that take over part of the name movers' "
            "job when those are knocked out; whether a model does, and how much, is what this run measures.")
