"""Chapter 5's computed paragraphs and tables for the controls and panels (Hydra §2.5.2, §4.2,
Fig 7b, Fig 8, App. A): the ablated layer's own direct effect under each ablation, noise beside
resample ablation, how localised the downstream changes are, and the regression panels.

Every function reads a :class:`~selfrepair.chapters.hydra.HydraChapter` and returns Markdown (or
a :class:`~selfrepair.tables.Table` through a :class:`~selfrepair.tables.Layout`).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..hydra_scale import SCALES
from ..rules import NEGLIGIBLE, number
from ..tables import TABLE_CLASS, Layout, Table, counted, listed, scroll_box, table
from .hydra_claims import PAPER, RESTORED, SLOPE, SLOPE_FROM, said
from .signed import changes

PREDICTS = NEGLIGIBLE  # an R² under 0.1: the part predicts ~nothing

OWN_TABLE = Layout(("ablation", "n_patches", "ratio", "patch_ratio", "mean_ablated", "mean_clean"),
                   percent=("ratio", "patch_ratio"),
                   names={"n_patches": "patches", "ratio": "|own DE| / |clean DE| (patch mean)",
                          "patch_ratio": "|own DE| / |clean DE| (one patch)",
                          "mean_ablated": "mean own DE", "mean_clean": "mean clean DE",
                          # the fold's columns: the sums over the attention layers the ratios divide
                          "abs_clean": "Σ mean |clean DE|", "abs_ablated": "Σ mean |own DE| (patch mean)",
                          "abs_patch": "Σ mean |own DE| (one patch)"})
LOCAL_TABLE = Layout(("ablated", "readout_kind", "n_downstream", "total_abs_delta_de", "top", "share_top1",
                      "share_top2", "uniform", "first"), percent=("share_top1", "share_top2", "uniform"),
                     names={"ablated": "ablated layer", "readout_kind": "later layers",
                            "n_downstream": "how many", "total_abs_delta_de": "Σ mean |ΔDE|",
                            "top": "changes most", "share_top1": "top-1 share", "share_top2": "top-2 share",
                            "uniform": "even spread", "first": "first later layer",
                            # columns of the frame the table leaves out (the ablated layer again, its kind)
                            "ablated_layer": "ablated layer (index)", "ablated_kind": "ablated kind"})
KINDS = {"attn": "attention", "mlp": "MLP", "all": "all"}  # a kind of layer in words, in a table's cells

TOP_ROWS = 8  # rows of the localisation table shown above its fold
SHORT_COLUMNS = ("ablated", "readout_kind", "total_abs_delta_de", "top", "share_top1", "uniform")  # a phone's width
SHORT_NAMES = {"readout_kind": "later", "total_abs_delta_de": "Σ|ΔDE|", "top": "most", "share_top1": "share",
               "uniform": "even"}


@dataclass(frozen=True)
class Shortened:
    """A long table shown by its ``top`` rows, with every row one click away (a ``<details>``
    element); its text form is the top rows' (code and tests read it)."""

    top: Table
    every: Table
    label: str

    def _repr_html_(self) -> str:
        return (self.top._repr_html_() + f'<details class="{TABLE_CLASS}-all"><summary>{html.escape(self.label)}'
                f'</summary>{scroll_box(self.every._repr_html_(), "every row and column, one click away")}</details>')

    def __repr__(self) -> str:
        return repr(self.top)


def local_table(ch, n: int = TOP_ROWS) -> Shortened:
    """The localisation table (:data:`LOCAL_TABLE`) of the attention ablations: the ``n`` rows whose
    later layers change most (largest Σ mean |ΔDE|), every row folded below them."""
    full = ch.attention_localisation
    full = full.assign(readout_kind=full["readout_kind"].map(KINDS).fillna(full["readout_kind"]))
    top = full.sort_values("total_abs_delta_de", ascending=False).head(n)
    t = LOCAL_TABLE(full[list(LOCAL_TABLE.columns)])  # every column it shows: no second fold inside this one
    caption = f"The {min(n, len(full))} attention ablations whose later layers change most"  # the columns: in the text
    shown = table(top[list(SHORT_COLUMNS)], SHORT_COLUMNS, names=SHORT_NAMES, percent=("share_top1", "uniform"),
                  caption=caption)
    return Shortened(shown, t, f"Every row ({len(full)}), by ablated layer")


def scale_table(ch):
    """The two readings of σ (:func:`selfrepair.chapters.hydra.readings`) for the two claims they
    change: the restored share, said from its sign as the verdict says it, and the steepest slope
    past the paper's cutoff, each with its 95% interval in the same cell. Three columns: nothing
    is folded."""
    r, L = ch.readings, ch.result.n_layers
    scales = dict(zip(r["scale"], r["reading"]))
    shown = pd.DataFrame({
        "reading": [scales[x] for x in SCALES],
        "restored": [said(ch.estimates.restored[x]) for x in SCALES],
        "max_slope": [ch.estimates.max_slope[x].prose(".2f") for x in SCALES]})
    names = {"restored": "restored share, middle layers",
             "max_slope": f"steepest slope past layer {SLOPE_FROM * L:.1f} of {L}"}
    return table(shown, names=names, caption="Each estimate with its 95% interval over the prompts.")


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
        lines.append(f"- **{main.capitalize()}** ({counted(r['n_patches'], 'patch', 'patches')} per prompt): "
                     f"{_pct(r['ratio'])} averaged over the patches, {_pct(r['patch_ratio'])} for a single "
                     f"patch; the mean own direct effect is {number(r['mean_ablated'], '.3f')} logits against "
                     f"{number(r['mean_clean'], '.3f')} clean.")
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
        lines.append(f"- **Noise** (σ = {ch.noise.meta.get('noise_scale', float('nan')):g} × the write's RMS, "
                     f"{counted(r['n_patches'], 'draw')}): a single draw moves the direct effect by {_pct(r['patch_ratio'])} of its "
                     f"clean size, but the mean own direct effect stays {number(r['mean_ablated'], '.3f')} against "
                     f"{number(r['mean_clean'], '.3f')} clean: zero-mean noise on a write perturbs it without "
                     "removing what it writes, on average.")
    return "\n".join(lines)


def noise_markdown(ch) -> str:
    """Noise ablation beside the chapter's ablation, over the attention layers: how far each moves
    the logit, the ablated layer's own direct effect and the later layers' (a control: the slopes of
    the chart's lower panels are read in the fold of :func:`~selfrepair.chapters.hydra_answer.other_readings`)."""
    c = ch.comparison[ch.comparison["kind"] == "attn"]
    main = ch.meta.get("ablation", "resample")
    a, b = c[c["ablation"] == main].set_index("layer"), c[c["ablation"] == "noise"].set_index("layer")
    louder = int((b["abs_total_effect"] > a["abs_total_effect"]).sum())
    clean = clean_size(ch)
    lines = [f"**On {ch.meta.get('model')}**, averaged over the {len(a)} attention layers and every (prompt, "
             f"patch), each change the ablated run's value minus the clean run's, in logits of the "
             f"max-likelihood token (for scale: an attention layer's clean direct effect is {number(clean, '.3g')} logits "
             "in size, on average):"]
    for name, g in ((main, a), ("noise", b)):
        own, later = -g["lost"].mean(), g["compensation"].mean()
        lines.append(f"- **{name}**: the logit moves by {g['abs_total_effect'].mean():.3f} logits per patch on "
                     f"average, either way (its mean change, Δ<sub>ablate</sub>, is "
                     f"{number(g['total_effect'].mean(), '.3f')}); the ablated layer's own "
                     f"direct effect {changes(own, '.3g', unit=' logits')}{times(own, clean)} and the later layers' "
                     f"summed direct effect {changes(later, '.3g', unit=' logits')}{times(later, clean)}.")
    lines.append(f"- Noise moves the logit more than {main} ablation at {louder} of {len(a)} attention layers.")
    return "\n".join(filter(None, lines))


def clean_size(ch) -> float:
    """The mean |clean direct effect| of an attention layer over the prompts (logits): the scale the
    noise section's changes are read against."""
    own = ch.own
    if own is None or not len(own):
        return math.nan
    return float(own[own["kind"] == "attn"].drop_duplicates("layer")["abs_clean"].mean())


def times(change: float, clean: float) -> str:
    """``change`` as a multiple of ``clean`` (the clean size), in brackets; nothing where either is
    missing or the change prints as none."""
    if not (math.isfinite(change) and math.isfinite(clean)) or clean <= 0 or changes(change, ".3g") == "does not change":
        return ""
    k = abs(change) / clean
    return f" ({k:.2g} times that clean size)" if k >= 1 else f" ({k:.0%} of that clean size)"


def patch_slope(ch) -> float:
    """The noise section's slope under the chapter's ablation: the per-layer slope of compensation on
    the direct effect removed over every (prompt, patch), averaged over the middle attention layers."""
    c = ch.comparison
    if c is None:
        return math.nan
    g = c[(c["kind"] == "attn") & (c["ablation"] == ch.meta.get("ablation", "resample"))].set_index("layer")
    mid = [l for l in ch.numbers["mid"] if l in g.index]
    return float(g.loc[mid, "slope"].mean()) if mid else math.nan


def localisation_markdown(ch) -> str:
    """Which later layers change after an attention ablation, and how much of the change they carry."""
    s = ch.local_summary
    attn = s[(s["ablated_kind"] == "attn") & (s["n_downstream"] >= 2)]
    up = ch.localisation[ch.localisation["position"] == "upstream"]["abs_delta_de"]
    lines = [f"**On {ch.meta.get('model')}**, for the attention layers with at least two later layers of a kind:"]
    folds = []
    for kind, word in (("attn", "attention"), ("mlp", "MLP")):
        g = attn[attn["readout_kind"] == kind]
        if not len(g):
            continue
        nxt = int((g["top"] == g["first"]).sum())
        local = getattr(getattr(ch, "estimates", None), "local", None) if kind == "attn" else None
        pooled = local is not None and math.isfinite(local.value)
        share = (f"carries {_pct(1 - local.value)} of their change, pooled prompt by prompt (the verdict "
                 f"below reads the rest, {_pct(local.value)})" if pooled else
                 f"carries a mean {_pct(g['share_top1'].mean())} of their Σ mean |ΔDE|")
        lines.append(f"- **Later {word} layers**: the one that changes most {share} (top two, averaged over the "
                     f"ablated layers: {_pct(g['share_top2'].mean())}; an even spread would "
                     f"give {_pct(g['uniform'].mean())}); it is the first later {word} layer for {nxt} of the "
                     f"{len(g)} ablated layers.")
        folds += [_pooled(ch, g)] if pooled else []
    g = attn[attn["readout_kind"] == "all"]
    if len(g):
        mlp = int(sum(str(t).startswith("M") for t in g["top"]))
        lines.append(f"- **All later components**: the largest change is in an MLP layer for {mlp} of the "
                     f"{len(g)} ablated attention layers.")
    lines.append(f"- **Upstream**: the largest mean |ΔDE| of a component that is not downstream of the "
                 f"ablated one is {number(up.max() if len(up) else 0, '.1g')} — an ablation cannot reach back.")
    return "\n".join(lines) + "".join(f"\n\n{f}" for f in folds)


def _pooled(ch, g) -> str:
    """A fold: the other share of the most-changed later attention layer (averaged over the ablated
    layers) and why it differs from the one the page gives (read3 #19: one number, the other folded)."""
    local = ch.estimates.local
    return ('<details class="selfrepair-fold"><summary>Another share of the most-changed layer, and why it '
            f"differs</summary><p>Averaged over the ablated layers, each one's share of the prompts' mean "
            f"|ΔDE| (the table below), the later attention layer that changes most carries a mean "
            f"{_pct(g['share_top1'].mean())}, not {_pct(1 - local.value)}. That average first takes means over the "
            f"prompts, so it names one most-changed layer per ablated layer, and weighs an ablated layer that "
            f"changes little like one that changes much; the page's share, the verdict's, pools |ΔDE| prompt by "
            f"prompt and takes each prompt's own most-changed layer.</p></details>")


def panels_markdown(ch) -> str:
    """Fig 7b's layer and fit, and Fig 8's panels' attention and MLP slopes."""
    b, p = ch.best, ch.panels
    lines = []
    if len(b):
        r = b.iloc[0]
        lines.append(f"- **Fig 7b.** The variance explained peaks at {r['label']} (layer {int(r['layer'])} of "
                     f"{ch.result.n_layers}): R² = {number(r['r2'], '.2f')} over {len(b)} prompts (the paper: layer "
                     f"{PAPER['r2_layer']} of {PAPER['n_layers']}, R² = {PAPER['r2']:.2f}); its slope is one of the "
                     "other readings in the fold below.")
    fits = p.groupby(["layer", "part"])[["slope", "r2"]].first().unstack("part")
    if len(fits):
        cells = [f"layer {int(l)}: attention {number(fits.loc[l, ('slope', 'attention')], '.2f')} "
                 f"(R² {number(fits.loc[l, ('r2', 'attention')], '.2f')}), MLP {number(fits.loc[l, ('slope', 'MLP')], '.2f')} "
                 f"(R² {number(fits.loc[l, ('r2', 'MLP')], '.2f')})" for l in fits.index]
        lines.append("- **Fig 8.** Slopes of the two parts of compensation on the ablated layer's direct "
                     "effect: " + "; ".join(cells) + ".")
        lines.append(_predictive(fits))
    return "\n".join(lines)


def _predictive(fits: pd.DataFrame) -> str:
    """Which part of compensation is the more predictive at each panel's layer: the part with the
    higher R², said only where that R² explains at least :data:`PREDICTS` of the variance."""
    r2 = fits["r2"]
    weak = [int(l) for l in fits.index if r2.loc[l].max() < PREDICTS]
    mlp = [int(l) for l in fits.index if l not in weak and r2.loc[l, "MLP"] > r2.loc[l, "attention"]]
    attn = [int(l) for l in fits.index if l not in weak and l not in mlp]
    said = [f"the MLP part has the higher R² at {listed(mlp, 'layer')}" if mlp else "",
            f"the attention part at {listed(attn, 'layer')}" if attn else "",
            (f"at {listed(weak, 'layer')} neither part predicts compensation (both R² below {PREDICTS:.2f}), "
             "so neither is the more predictive") if weak else ""]
    return ("- Which part is more predictive: " + "; ".join(filter(None, said))
            + f" (the paper: \"by layer {PAPER['mlp_layer']} [...] the MLP response is considerably more "
            "predictive\"; an R² below "
            f"{PREDICTS:.2f} explains less than a tenth of the variance, which the words table reads as "
            "approximately zero).")


def scale_markdown(ch) -> str:
    """Which reading of σ the paper's words support, which the book leads with and why, and what
    the verdicts' rules say at each reading (:mod:`selfrepair.hydra_scale`; the numbers are the
    table's, :func:`scale_table`)."""
    s, e = ch.numbers, ch.estimates
    said = {True: "holds", False: "differs", None: "cannot tell"}

    def rule(claim, est) -> str:
        return said[claim.rule.decide(est.lo, est.hi) if est.reliable else None]

    return (
        f"**On {ch.meta.get('model')}**, over the middle layers' ablations the final norm's scale moves by a mean "
        f"S/S′ of {s['scale_ratio_mid']:.3f}. The table below gives the two claims' statistics at both readings; "
        f"by the verdicts' rules on these intervals alone, \"approximately {PAPER['restored']:.0%}\" "
        f"{rule(RESTORED, e.restored['clean'])} at the clean σ and {rule(RESTORED, e.restored['ablated'])} at σ′; "
        f"\"a slope of less than one\" {rule(SLOPE, e.max_slope['clean'])} at the clean σ and "
        f"{rule(SLOPE, e.max_slope['ablated'])} at σ′.\n\n"
        "**What the paper's words support.** §2.3.1 fixes σ \"to the value attained in the forward "
        "pass\", and eq. 34 takes a layer's direct effect *in the ablation run* (eq. 13): read "
        "literally, each run's own σ, so σ′ in the ablated one. But right after eq. 13 the paper "
        "states that a layer not downstream of the ablation keeps its Δ<sub>unembed</sub> exactly, and its "
        "derivation of the direct effect of an ablation (eq. 24–27) divides both runs by the clean "
        "scale σ(z<sub>t</sub><sup>L</sup>) (the final norm's scale at the last layer L and position t): both hold only at the clean σ. The text supports both readings, and its reported numbers do "
        "not say which was used.\n\n"
        "**Why the book leads with the clean σ.** At the clean σ the compensation is exactly what the "
        "later layers change in what they write, and the final norm's rescaling is a term of its own, "
        "as in the self-repair paper's eq. 2 (chapter 2). At σ′ the compensation also holds the norm's "
        "rescaling of the later layers' writes but not of the earlier ones (whose rescaling is left over "
        "apart): two mechanisms in one number. The verdicts use the clean "
        "reading; this table and the fold at the end of <a href=\"#ch05-fig7\">How much is compensated</a> give "
        "the other.")
