"""Chapter 5's computed paragraphs and tables for the controls and panels (Hydra §2.5.2, §4.2,
Fig 7b, Fig 8, App. A): the ablated layer's own direct effect under each ablation, noise beside
resample ablation, how localised the downstream changes are, and the regression panels.

Every function reads a :class:`~selfrepair.chapters.hydra.HydraChapter` and returns Markdown (or
a :class:`~selfrepair.tables.Table` through a :class:`~selfrepair.tables.Layout`).
"""

from __future__ import annotations

import numpy as np

from ..tables import Layout

OWN_TABLE = Layout(("ablation", "n_patches", "ratio", "patch_ratio", "mean_ablated", "mean_clean"),
                   percent=("ratio", "patch_ratio"),
                   names={"n_patches": "patches", "ratio": "|own DE| / |clean DE| (patch mean)",
                          "patch_ratio": "|own DE| / |clean DE| (one patch)",
                          "mean_ablated": "mean own DE", "mean_clean": "mean clean DE"})
LOCAL_TABLE = Layout(("ablated", "readout_kind", "n_downstream", "total_abs_delta_de", "top", "share_top1",
                      "share_top2", "uniform"), percent=("share_top1", "share_top2", "uniform"),
                     names={"ablated": "ablated layer", "readout_kind": "later layers",
                            "n_downstream": "how many", "total_abs_delta_de": "Σ mean |ΔDE|",
                            "top": "changes most", "share_top1": "top-1 share", "share_top2": "top-2 share",
                            "uniform": "even spread"})


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.0%}"


def own_markdown(ch) -> str:
    """The ablated attention layer's own direct effect in the ablated run, per ablation."""
    t = ch.own_summary.set_index("ablation")
    main = ch.meta.get("ablation", "resample")
    lines = [f"**On {ch.meta.get('model')}**, over every (prompt, attention layer), the size of the "
             "ablated layer's own direct effect in the ablated run relative to its clean size:"]
    if main in t.index:
        r = t.loc[main]
        lines.append(f"- **{main.capitalize()}** ({int(r['n_patches'])} patch(es) per prompt): "
                     f"{_pct(r['ratio'])} averaged over the patches, {_pct(r['patch_ratio'])} for a single "
                     f"patch; the mean own direct effect is {r['mean_ablated']:+.3f} logits against "
                     f"{r['mean_clean']:+.3f} clean.")
    if "resample (every source)" in t.index:
        lines.append(f"- **Resample with every other prompt as source** (eq. 39 with all "
                     f"{len(ch.result.clean_de) - 1} sources): {_pct(t.loc['resample (every source)', 'ratio'])}"
                     " — what more patches converge to. The rest is the direct effect of the *average* "
                     "source write along this prompt's top token, which no number of patches removes.")
    if "mean" in t.index:
        lines.append(f"- **Mean**: {_pct(t.loc['mean', 'ratio'])} (the direct effect of the mean write; "
                     "it differs from the every-source average only by the prompt's own write, with "
                     f"weight 1/{len(ch.result.clean_de)}).")
    if "zero" in t.index:
        lines.append(f"- **Zero**: {_pct(t.loc['zero', 'ratio'])} — the layer writes nothing.")
    if "noise" in t.index:
        r = t.loc["noise"]
        lines.append(f"- **Noise** (σ = {ch.noise.meta.get('noise_scale', float('nan')):g} × the write's RMS, {int(r['n_patches'])} "
                     f"draw(s)): a single draw moves the direct effect by {_pct(r['patch_ratio'])} of its "
                     f"clean size, but the mean own direct effect stays {r['mean_ablated']:+.3f} against "
                     f"{r['mean_clean']:+.3f} clean: zero-mean noise on a write perturbs it without "
                     "removing what it writes, on average.")
    return "\n".join(lines)


def noise_markdown(ch) -> str:
    """Noise ablation beside the chapter's ablation, over the attention layers."""
    c = ch.comparison[ch.comparison["kind"] == "attn"]
    main = ch.meta.get("ablation", "resample")
    a, b = c[c["ablation"] == main].set_index("layer"), c[c["ablation"] == "noise"].set_index("layer")
    louder = int((b["abs_total_effect"] > a["abs_total_effect"]).sum())
    mid = [l for l in ch.numbers["mid"] if l in a.index]
    lines = [f"**On {ch.meta.get('model')}**, averaged over the {len(a)} attention layers:"]
    for name, g in ((main, a), ("noise", b)):
        slope = (f" Per patch, the later layers give back {g.loc[mid, 'slope'].mean():.2f} logits per logit "
                 f"removed (the slope, averaged over the middle layers {mid[0]}–{mid[-1]})." if mid else "")
        lines.append(f"- **{name}**: the logit moves by a mean |Δ_ablate| of {g['abs_total_effect'].mean():.3f} "
                     f"per patch (mean Δ_ablate {g['total_effect'].mean():+.3f}); the ablated layer loses "
                     f"{g['lost'].mean():+.3f} logits of direct effect and the later layers change theirs by "
                     f"{g['compensation'].mean():+.3f}.{slope}")
    lines.append(f"- Noise moves the logit more than {main} ablation at {louder} of {len(a)} attention layers.")
    return "\n".join(lines)


def localisation_markdown(ch) -> str:
    """Which later layers change after an attention ablation, and how much of the change they carry."""
    s = ch.local_summary
    attn = s[(s["ablated_kind"] == "attn") & (s["n_downstream"] >= 2)]
    up = ch.localisation[ch.localisation["position"] == "upstream"]["abs_delta_de"]
    lines = [f"**On {ch.meta.get('model')}**, for the attention layers with at least two later layers of a kind:"]
    for kind, word in (("attn", "attention"), ("mlp", "MLP")):
        g = attn[attn["readout_kind"] == kind]
        if not len(g):
            continue
        nxt = int((g["top"] == g["first"]).sum())
        lines.append(f"- **Later {word} layers**: the one that changes most carries a mean {_pct(g['share_top1'].mean())} "
                     f"of their Σ mean |ΔDE| (top two: {_pct(g['share_top2'].mean())}; an even spread would "
                     f"give {_pct(g['uniform'].mean())}); it is the first later {word} layer for {nxt} of the "
                     f"{len(g)} ablated layers.")
    g = attn[attn["readout_kind"] == "all"]
    if len(g):
        mlp = int(sum(str(t).startswith("M") for t in g["top"]))
        lines.append(f"- **All later components**: the largest change is in an MLP layer for {mlp} of the "
                     f"{len(g)} ablated attention layers.")
    lines.append(f"- **Upstream**: the largest mean |ΔDE| of a component that is not downstream of the "
                 f"ablated one is {up.max() if len(up) else 0:.1g} — an ablation cannot reach back.")
    return "\n".join(lines)


def panels_markdown(ch) -> str:
    """Fig 7b's layer and fit, and Fig 8's panels' attention and MLP slopes."""
    b, p = ch.best, ch.panels
    lines = []
    if len(b):
        r = b.iloc[0]
        lines.append(f"- **Fig 7b.** The variance explained peaks at {r['label']} (layer {int(r['layer'])} of "
                     f"{ch.result.n_layers}): R² = {r['r2']:.2f}, slope {r['slope']:.2f}, over {len(b)} prompts "
                     "(the paper: layer 23 of 32, R² = 0.92, slope below 1).")
    fits = p.groupby(["layer", "part"])[["slope", "r2"]].first().unstack("part")
    if len(fits):
        cells = [f"layer {int(l)}: attention {fits.loc[l, ('slope', 'attention')]:+.2f} "
                 f"(R² {fits.loc[l, ('r2', 'attention')]:.2f}), MLP {fits.loc[l, ('slope', 'MLP')]:+.2f} "
                 f"(R² {fits.loc[l, ('r2', 'MLP')]:.2f})" for l in fits.index]
        lines.append("- **Fig 8.** Slopes of the two parts of compensation on the ablated layer's direct "
                     "effect: " + "; ".join(cells) + ".")
        mlp_more = [int(l) for l in fits.index if fits.loc[l, ("r2", "MLP")] > fits.loc[l, ("r2", "attention")]]
        lines.append("- The MLP part is the more predictive one (higher R²) at " + (
            f"layer(s) {', '.join(map(str, mlp_more))}" if mlp_more else "none of these layers")
            + " (the paper: \"by layer 22 [...] the MLP response is considerably more predictive\").")
    return "\n".join(lines)
