"""Chapter 2's computed paragraphs for App. D (Fig 4's procedure on more heads, Fig 16-17) and the
frozen-norm section (§3, §5.2); each reads a :class:`~selfrepair.chapters.layernorm.LayerNormChapter`
and returns Markdown.
"""

from __future__ import annotations

import html
import math

from .. import frozen_norm as fz
from ..findings import Figure, Finding, markdown, shows as _shows
from ..rules import number
from ..results import head_label
from ..tables import Layout, format_number
from .fold import Fold, fold_line
from .signed import changes

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


def mechanism(ch) -> tuple[str, tuple[float, ...]]:
    """Whether the paper's mechanism is seen on this model, in words, and the numbers printed: the
    share of a last-layer head's top tokens with S/S′ > 1 (the three ablations' verdicts, lowest to
    highest) against the paper's for its head, and the mean final-norm repair of Fig 4's head under
    resample ablation (its table's "norm repair"), in words of its sign."""
    ratio = [v for v in ch.verdicts if v.claim.key.startswith("ratio_") and v.value is not None
             and math.isfinite(v.value)]
    text, values = "", ()
    if ratio:
        lo, hi = min(v.value for v in ratio), max(v.value for v in ratio)
        plo, phi = min(v.claim.paper for v in ratio), max(v.claim.paper for v in ratio)
        said = f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%} to {hi:.0%}"
        how = ("as" if all(v.holds for v in ratio) else "not" if all(v.holds is False for v in ratio) else "not clearly")
        text = (f"The paper's mechanism is {how} seen here: the ablation shrinks the residual stream (S/S′ > 1) on "
                f"{said} of a last-layer head's top tokens (mean over the heads, by ablation), against the paper's "
                f"{plo:.0%} to {phi:.0%} for its head")
        values = (lo, hi, plo, phi)
    r = getattr(ch, "ratios", None)
    row = r[r["ablation"] == "resample"] if r is not None and "mean_from_norm" in r else ()
    if len(row) and math.isfinite(x := float(row["mean_from_norm"].iloc[0])):
        way = changes(x, ".3f", "gives back", "takes away a further", "gives back nothing", unit=" logits")
        sign = "negative: " if x < 0 and way != "gives back nothing" else ""
        text += (("; and" if text else "") + f" on Fig 4's head {head_label(*ch.ratio_head)} the final norm's "
                 f"repair under resample ablation is {sign}on average it {way}")
        values += (x,)
    return (text[0].upper() + text[1:] + ".", values) if text else ("", ())


def findings(ch) -> list[Finding]:
    """"What this chapter shows" for chapter 2: where it ran, the claims by outcome, and the
    take-away: whether the final norm repairs on this model — the chapter's one answer to how much
    (the norm share, :data:`~selfrepair.chapters.layernorm_claims.SHARE`, the statistic of the
    paper's "around 30%"), whether the paper's mechanism (S/S′ > 1) is seen, and Fig 4's head's
    norm repair (:func:`mechanism`); the other readings of "how much" are in :func:`other_readings`."""
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
        text = (f"Take-away: yes, on average the final norm repairs on this model: eq. 2's final-norm term gives "
                f"back {said}, as {paper}, and that part of any ablation's self-repair needs no circuit.")
    elif share.holds is False:
        side = "less" if share.value < share.claim.rule.bounds[0] else "more"
        text = (f"Take-away: on this model the final norm gives back {said}, {side} than {paper}, so "
                f"LayerNorm explains {side} of self-repair here than in the paper's models.")
    else:
        text = (f"Take-away: this run cannot say whether the final norm gives back {paper} of a head's "
                f"direct effect on this model ({said}); a run on more tokens would narrow the interval.")
    values = (share.value,) if share.value is not None and math.isfinite(share.value) else ()
    if values and getattr(ch, "frozen", None) is not None:
        text += (" That share is the chapter's one answer to how much the norm gives back; the other readings "
                 "are in the fold under Fig 10, each with why it differs.")
    how, more = mechanism(ch)
    if how:
        text, values = f"{text} {how}", values + more
    return _shows(where, ch.verdicts, FIGURES, model, Finding(text, (FIGURES["norm_share"], FIGURES["appendix_h"]), values))


FOLD_TITLE = "Other readings of how much the norm gives back, and why their numbers differ"


def other_readings(ch) -> Fold | None:
    """The chapter's one answer to "how much does the norm give back?" — the norm share
    (:data:`~selfrepair.chapters.layernorm_claims.SHARE`'s statistic, the one the paper's "around
    30%" reads) — and every other reading the chapter computes, one line each on what it measures
    and why its number differs: over every layer, unclipped, the norms alone, eq. 2's live norm
    terms, the block norms (and which of chapter 6's numbers to quote beside it). None without the
    verdict or the frozen-norm run."""
    share = next((v for v in ch.verdicts if v.claim.key == "norm_share"), None)
    f = getattr(ch, "frozen", None)
    if share is None or share.value is None or not math.isfinite(share.value) or f is None or not len(f):
        return None
    de = float(f["direct_effect"].mean())
    term, only, terms = (float(f[c].mean()) / de for c in ("from_norm", "self_repair_norms_only", "norm_terms"))
    late = ch.evidence.late[0][0]
    top = ch.layers[(ch.layers["tokens"] == "top-k%") & (ch.layers["clipping"] == "clipped")]
    every = ch.shares[(ch.shares["tokens"] == "top-k%") & (ch.shares["clipping"] == "clipped")
                      & (ch.shares["component"] == "final norm")]["share"].mean()
    lead = html.escape(f"The chapter's one answer is {share.value:.0%}: the mean over the late-layer heads of the "
                       "final norm's share of each head's direct effect on its top tokens, clipped to [0, 1] per "
                       "token (Fig 10), the statistic the paper's “around 30%” reads. Each reading below "
                       "measures something else:")
    lines = [fold_line("Every layer, not only the late ones", f"{every:.0%}",
                   "The same clipped share averaged over the heads of every layer; it differs by the early layers, "
                   "which the paper's claim (later layers) leaves out"),
             fold_line("Unclipped", f"{term:.0%}",
                   "The late heads' mean final-norm term over their mean direct effect, nothing clipped; lower "
                   "because clipping counts each token the norm over-repays as 100% and none below 0"),
             fold_line("The norms alone", f"{only:.0%}",
                   "The repair the norms give when every other downstream component is frozen at its clean "
                   "output (the frozen-norm run), over the mean direct effect; lower because a live norm also "
                   "rescales what the later heads and MLPs changed", ("ch02-frozen", "the frozen-norm chart"))]
    block = top[(top["component"] == "block norms") & (top["layer"] >= late)]
    has_block_norms = bool(f["from_block_norms"].abs().gt(0).any())  # a model without them: no line names them
    if has_block_norms:
        lines.append(fold_line("Eq. 2's live norm terms", f"{terms:.0%}",
                           "The final norm's and the block norms' terms of the live ablation together, unclipped, "
                           "over the mean direct effect; it adds the block norms the paper's models do not have"))
    if has_block_norms and len(block):
        lines.append(fold_line("The block norms", f"a further {block['share'].mean():.0%}",
                           "This model's post-attention and post-feedforward norms, the same clipped per-token share "
                           "as the answer (late layers' means); a term of eq. 2 apart from the final norm, never "
                           "counted as 'LayerNorm'. Chapter 6's block-norm share is another statistic (the term "
                           "summed over tokens over the summed direct effect, unclipped, late heads with a positive "
                           "direct effect): quote this one beside this chapter's answer, chapter 6's only beside "
                           "chapter 6's other models"))
    return Fold(FOLD_TITLE, lead, tuple(lines))


def shows(ch) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(ch))
