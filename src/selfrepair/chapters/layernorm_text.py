"""Chapter 2's computed paragraphs for App. D (Fig 4's procedure on more heads, Fig 16-17) and the
frozen-norm section (§3, §5.2); each reads a :class:`~selfrepair.chapters.layernorm.LayerNormChapter`
and returns Markdown.
"""

from __future__ import annotations

from .. import frozen_norm as fz
from ..tables import Layout

FROZEN_RULE = "every head of the late half of the layers"
APP_D_TABLE = Layout(("label", "ablation", "n", "share_ratio_above_1", "median_ratio", "mean_from_norm"),
                     percent=("share_ratio_above_1",),
                     names={"share_ratio_above_1": "tokens with S/S′ > 1", "median_ratio": "median S/S′",
                            "mean_from_norm": "mean final-norm self-repair"})


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
                 f"{s['mean_self_repair']:+.3g} logits live, {s['mean_frozen']:+.3g} with the norms frozen.")
    if m.sandwich:
        lines.append(f"- **Against eq. 2.** Freezing removes {s['mean_self_repair'] - s['mean_frozen']:+.3g} "
                     f"logits on average, eq. 2's norm terms (`from_norm + from_block_norms`) are "
                     f"{s['mean_norm_terms']:+.3g}. They need not agree here: with the block norms frozen, "
                     f"every later component reads a different residual. The largest per-head gap is "
                     f"{s['max_gap']:+.3g} logits ({s['max_gap_head']}), against norm terms up to "
                     f"{s['max_norm_terms']:.3g}.")
    else:
        exact = abs(s["max_gap"]) <= 1e-4 * max(1.0, s["max_norm_terms"])
        lines.append(f"- **Against eq. 2.** Nothing but the unembedding reads the final norm, so freezing it "
                     f"should remove exactly `from_norm`. The largest per-head gap between the two is "
                     f"{abs(s['max_gap']):.1e} logits ({s['max_gap_head']}), for norm terms up to "
                     f"{s['max_norm_terms']:.3g}: " + ("rounding." if exact else
                                                       "more than rounding, which points to a fault."))
    lines.append(f"- **The norms alone.** With every downstream component frozen, the norms give back "
                 f"{s['mean_norms_only']:+.3g} logits on average, against eq. 2's live norm terms of "
                 f"{s['mean_norm_terms']:+.3g} (the live norm also rescales what the later components "
                 f"changed; the frozen components change nothing).")
    return "\n".join(lines)
