"""Chapter 2's computed paragraphs for App. D (Fig 4's procedure on more heads, Fig 16-17) and the
frozen-norm section (§3, §5.2); each reads a :class:`~selfrepair.chapters.layernorm.LayerNormChapter`
and returns Markdown.
"""

from __future__ import annotations

import math

from .. import frozen_norm as fz
from ..findings import Figure, Finding, markdown, shows as _shows
from ..rules import number
from ..tables import Layout, format_number

FROZEN_RULE = "every head of the late half of the layers"
APP_D_TABLE = Layout(("label", "ablation", "share_ratio_above_1", "median_ratio", "mean_from_norm"),
                     percent=("share_ratio_above_1",),
                     names={"share_ratio_above_1": "S/S′ > 1", "median_ratio": "median S/S′",
                            "mean_from_norm": "norm repair"},
                     caption="Each head's top-k% tokens (S/S′ > 1: the share of them; norm repair: "
                             "its mean self-repair by the final norm, in logits)")


def said(x: float, up: str, down: str) -> str:
    """A size said in words of its sign, so without a "+": "removes 0.224" / "adds 0.224"."""
    return f"{up if x >= 0 else down} {logits(abs(x)).lstrip('+')}"


def logits(x: float) -> str:
    """A signed number of logits as prose shows it: ``+0.011``, and a rounding-sized one as
    ``+6.9×10⁻⁹`` rather than ``+6.89e-09``."""
    if x != 0 and math.isfinite(x) and abs(x) < 1e-4:
        return ("+" if x > 0 else "") + format_number(x, digits=2)
    return number(x, "+.3g")


def app_d_markdown(ch) -> str:
    """Per App. D head, how often S/S′ > 1 under each ablation, and how much more zero ablation
    moves the scale than resample ablation (median |S/S′ − 1|, zero over resample)."""
    t = ch.app_d_tokens
    t = t[t["tokens"] == "top-k%"]
    r = ch.app_d_ratios
    lines = [f"**On {ch.meta.get('model')}** (top {ch.meta.get('top_percent'):g}% tokens of each head):"]
    spread = {}
    for label in r["label"].drop_duplicates():
        g = r[r["label"] == label].set_index("ablation")
        shares = ", ".join(f"{g.loc[a, 'share_ratio_above_1']:.1%} ({a})" for a in g.index)
        h = t[t["label"] == label]
        dev = {a: float((h[h["ablation"] == a]["ratio"] - 1).abs().median()) for a in ("resample", "zero")
               if (h["ablation"] == a).any()}
        if len(dev) == 2 and dev["resample"] > 0:
            spread[label] = dev["zero"] / dev["resample"]
        lines.append(f"- **{label}**: S/S′ > 1 on {shares} of its top tokens"
                     + (f"; zero ablation moves the scale {spread[label]:.1f}x as far as resample ablation "
                        "(median |S/S′ − 1|)" if label in spread else "") + ".")
    if len(spread) > 1:
        hi, lo = max(spread, key=spread.get), min(spread, key=spread.get)
        lines.append(f"- Relative to resample ablation, zero ablation moves the scale most for {hi} "
                     f"({spread[hi]:.1f}x) and least for {lo} ({spread[lo]:.1f}x); App. D finds heads of both kinds.")
    return "\n".join(lines)


def frozen_markdown(ch) -> str:
    """The frozen-norm section's paragraph, computed from ``ch.frozen``."""
    f = ch.frozen
    s = fz.summary(f)
    m = ch.model
    first, last = int(f["layer"].min()), int(f["layer"].max())
    layers = f"layer {first}" if first == last else f"layers {first}–{last}"
    lines = [f"**On {ch.meta.get('model')}** ({s['n_heads']} heads: {FROZEN_RULE}, {layers}; means "
             f"over each head's top {ch.meta.get('top_percent'):g}% tokens)."]
    lines.append(f"- **Freezing the norms.** Of the {s['n_positive']} heads with positive live self-repair, "
                 f"{s['n_halved']} lose more than half of it when the norms cannot react "
                 f"({s['n_halved'] / max(1, s['n_positive']):.0%}). Mean self-repair: "
                 f"{logits(s['mean_self_repair'])} logits live, {logits(s['mean_frozen'])} with the norms frozen.")
    if m.sandwich:
        lines.append(f"- **Against eq. 2.** Freezing {said(s['mean_self_repair'] - s['mean_frozen'], 'removes', 'adds')} "
                     f"logits on average, eq. 2's norm terms (the final norm's and the block norms') are "
                     f"{logits(s['mean_norm_terms'])}. They need not agree here: with the block norms frozen, "
                     f"every later component reads a different residual. The largest per-head gap is "
                     f"{logits(s['max_gap'])} logits ({s['max_gap_head']}), against norm terms up to "
                     f"{s['max_norm_terms']:.3g}.")
    else:
        exact = abs(s["max_gap"]) <= 1e-4 * max(1.0, s["max_norm_terms"])
        lines.append(f"- **Against eq. 2.** Nothing but the unembedding reads the final norm, so freezing it "
                     f"should remove exactly eq. 2's final-norm term. The largest per-head gap between the two is "
                     f"{format_number(abs(s['max_gap']), digits=2)} logits ({s['max_gap_head']}), for norm terms up to "
                     f"{s['max_norm_terms']:.3g}: " + ("rounding." if exact else
                                                       "more than rounding, which points to a fault."))
    lines.append(f"- **The norms alone.** With every downstream component frozen, the norms "
                 f"{said(s['mean_norms_only'], 'give back', 'take away')} logits on average, against eq. 2's live norm terms of "
                 f"{logits(s['mean_norm_terms'])} (the live norm also rescales what the later components "
                 f"changed; the frozen components change nothing).")
    return "\n".join(lines)


FIGURES = {**{f"ratio_{a}": Figure("ch02-fig4", "Fig 4") for a in ("resample", "mean", "zero")},
           "norm_share": Figure("ch02-fig6", "Fig 10"), "appendix_b": Figure("ch02-appb", "the App. B check"),
           "appendix_h": Figure("ch02-fig4", "Fig 4's table"),
           "norms_only": Figure("ch02-frozen", "the frozen-norm chart")}


def findings(ch) -> list[Finding]:
    """"What this chapter shows" for chapter 2: where it ran, the claims by outcome, and the
    take-away (from the norm share, :data:`~selfrepair.chapters.layernorm_claims.SHARE`: how much of a
    late head's direct effect the final norm gives back on this model, without any circuit)."""
    m, cl, model = ch.meta, ch.evidence.clusters, str(ch.meta.get("model"))
    n_last, n_late = len(ch.evidence.last), len(ch.evidence.late)
    where = Finding(f"This chapter ablated the {n_last} last-layer heads of {model} three ways (resample, mean, "
                    f"zero) and its {n_late} late-layer heads with the norms frozen, on {m.get('n_tokens', 0):,} "
                    f"tokens from {cl.n:,} independent {cl.unit}.",
                    values=(n_last, n_late, m.get("n_tokens", 0), cl.n))
    share = next(v for v in ch.verdicts if v.claim.key == "norm_share")
    said = f"{share.value:.0%} of a late-layer head's direct effect on its top tokens"
    paper = f"the paper's “around {share.claim.paper:.0%}”"
    if share.holds:
        text = (f"Take-away: on this model eq. 2's final-norm term gives back {said}, as {paper}: part of "
                "any ablation's self-repair needs no circuit, and a frozen-norm ablation removes it.")
    elif share.holds is False:
        side = "less" if share.value < share.claim.rule.bounds[0] else "more"
        text = (f"Take-away: on this model the final norm gives back {said}, {side} than {paper}, so "
                f"LayerNorm explains {side} of self-repair here than in the paper's models.")
    else:
        text = (f"Take-away: this run cannot say whether the final norm gives back {paper} of a head's "
                f"direct effect on this model ({said}); a run on more tokens would narrow the interval.")
    values = (share.value,) if share.value is not None and math.isfinite(share.value) else ()
    both, more = reconcile(ch, share.value)
    text, values = (f"{text} {both}", values + more) if both and values else (text, values)
    figures = (FIGURES["norm_share"],) + ((FIGURES["norms_only"],) if both and values else ())
    return _shows(where, ch.verdicts, FIGURES, model, Finding(text, figures, values))


def reconcile(ch, clipped: float) -> tuple[str, tuple[float, ...]]:
    """One sentence putting the norm share (``clipped``: eq. 2's final-norm term over each token's
    direct effect, clipped to [0, 1], averaged) beside the frozen-norm run's repair with every other
    component frozen, saying what each is and why they differ, with the numbers it prints: the
    same term unclipped, the norms-only repair and eq. 2's live norm terms, each over the late
    heads' mean direct effect on their top-k% tokens. ``("", ())`` without a frozen-norm run."""
    f = getattr(ch, "frozen", None)
    if f is None or not len(f) or clipped is None or not math.isfinite(clipped):
        return "", ()
    de = float(f["direct_effect"].mean())
    if not math.isfinite(de) or de == 0:
        return "", ()
    term, only, terms = (float(f[c].mean()) / de for c in ("from_norm", "self_repair_norms_only", "norm_terms"))
    block = bool(f["from_block_norms"].abs().gt(0).any())
    live = (f"eq. 2's live norm terms, the final norm's and the block norms', are {terms:.0%}" if block else
            f"the live term is the {term:.0%} above")
    return (f"The {clipped:.0%} and the frozen-norm run's {only:.0%} are different quantities: {clipped:.0%} is "
            f"eq. 2's final-norm term in the live ablation as a share of each token's direct effect, clipped "
            f"to [0, 1] token by token and then averaged ({term:.0%} unclipped, as the mean term over the mean "
            f"direct effect), while {only:.0%} is the repair the norms give when every other downstream "
            "component is frozen at its clean output (the mean repair over the mean direct effect), lower "
            "because clipping counts each token the norm over-repays as 100% and none below 0, and because a "
            f"live norm also rescales what the later heads and MLPs changed ({live}).",
            (term, only) + ((terms,) if block else ()))


def shows(ch) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(ch))
