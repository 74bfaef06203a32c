"""Chapter 5 — the Hydra effect (McGrath et al. 2023, §2.3-2.5, §4, §6; Fig 1, 2, 3, 7, 8).

Every attention and MLP layer is ablated at the last position of each factual prompt (resample
from ``n_patches`` other prompts, averaged: the paper's eq. 39), reading the clean run's top token.
The paper's "≈70%" is its measure: the share of the reduction in the token's logit that the
downstream layers restore when a middle layer is ablated (§6) — the compensatory effect over the
direct effect the ablation removes, here summed over the middle layers' prompts.

Controls (§2.5.2, App. A; :mod:`selfrepair.hydra_controls`): the ablated layer's own direct effect
under each ablation, a noise ablation of every layer beside the resample one (the write plus
Gaussian noise, σ = ``noise_scale`` x the write's RMS, ``n_noise`` draws), how localised the
downstream changes are, and Fig 7b / Fig 8's panels. Measured on the 2-core machine on
2026-12-01 (embedded Gemma-3-270M, 215 prompts, other jobs sharing the CPU): the noise pass with
one draw cost 0.46x and 0.64x the resample pass with three patches in two runs under the same
load (278 s against 598 s; 351 s against 547 s); the resample pass alone took 162 s on a quiet
machine, so noise adds about 75-105 s to the ``cpu`` profile. Everything else is computed from
the two cached results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..ablation import check_ablation
from .. import hydra as hy
from .. import hydra_controls as hc
from .. import hydra_regression as hr
from ..claims import Claim, Verdict, above, at_most, below, between, bootstrap, render
from ..config import RunConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model, open_prompts
from ..structure import span
from . import check
from .hydra_text import (LOCAL_TABLE, OWN_TABLE, localisation_markdown, noise_markdown,  # noqa: F401 (the notebook's)
                         own_markdown, panels_markdown)

PAPER_SLOPE_FROM = 13 / 32  # slope < 1 at every layer past 13 of Chinchilla-7B's 32 (§4.2)

UNEMBED = Claim("unembed", "Unembedding and ablation disagree: a layer's direct effect exceeds the "
                "logit drop its ablation causes", "§2.5, Fig 2", "the share of (prompt, attention "
                "layer) pairs with Δ_unembed > −Δ_ablate", above(0.5), fmt=".0%",
                reading="On {value} of the {n} {unit}, a layer's direct effect is larger than the logit "
                        "drop its ablation causes.")
RESTORED = Claim("restored", "At middle layers the Hydra effect and reduced MLP erasure restore about "
                 "70% of the reduction in token logits", "§6, Fig 7", "the compensatory effect as a "
                 "share of the direct effect removed, over the middle attention layers",
                 between(0.5, 0.9), paper=0.70, paper_context="Chinchilla-7B, Counterfact", fmt=".0%",
                 reading="When a middle attention layer is ablated, the layers after it give back "
                         "{value} of the direct effect it removed ({n} {unit}).")
SLOPE = Claim("slope", "The regression slope of compensation on direct effect is below 1 past layer "
              "13 of 32", "§4.2, Fig 7d", "the relative depth from which every attention layer's "
              "slope is below 1", at_most(0.5), paper=PAPER_SLOPE_FROM,
              paper_context="13 of 32 layers", fmt=".0%",
              reading="From {value} of the depth on, every attention layer's compensation restores "
                      "less than one logit per logit of direct effect ({n} {unit}).")
ERASURE = Claim("erasure", "Late MLP layers erase: when an attention layer is ablated they push the "
                "token down less", "§2.5.2", "the share of (prompt, earlier attention ablation) cases "
                "in which the last quarter's MLPs change in the direction opposite to the ablated "
                "layer's change", above(0.5), fmt=".0%",
                reading="In {value} of the {n} {unit}, the late MLPs move against the change of the "
                        "attention layer that was ablated.")
OWN = Claim("own", "Resample ablations reduce the ablated layer's Δ_unembed to approximately zero when "
            "averaged across patches", "§2.5.2", "Σ |own direct effect in the ablated run, averaged over "
            "the patches| / Σ |clean direct effect| over every (prompt, attention layer)", below(0.25),
            fmt=".0%", reading="Averaged over its patches, an ablated attention layer keeps {value} of its "
                               "clean direct effect's size ({n} {unit}).")
LOCAL = Claim("localised", "Downstream effects of an attention ablation are localised: apart from one "
              "attention layer (the Hydra effect), later attention layers are almost unchanged", "§2.5.2",
              "per (prompt, ablated attention layer with at least two later attention layers), the share "
              "of the later attention layers' Σ |ΔDE| carried by the one that changes most, averaged",
              above(0.5), fmt=".0%",
              reading="The later attention layer that changes most carries {value} of the later "
                      "attention layers' change, on average over {n} {unit}.")
CLAIMS = (UNEMBED, RESTORED, SLOPE, ERASURE, OWN, LOCAL)


@dataclass(frozen=True)
class Config(RunConfig):
    ablation: str = "resample"  # what replaces a layer's write: "resample" (other prompts), "mean" or "zero"
    prompts: str | None = None  # a CSV of prompts (columns subject, relation, prompt, target); None: data/factual_prompts.csv
    n_prompts: int | None = None  # prompts measured (None: all; an int: a seeded subset)
    n_patches: int = 3  # resample sources per prompt, averaged (the Hydra paper used 15)
    featured_layer: int | None = None  # attention layer of the before/after figure; None: the largest mean direct effect
    noise_scale: float = 3.0  # noise ablation: σ of the Gaussian added to a layer's write, in units of that write's RMS
    n_noise: int = 1  # noise draws per prompt (each one ablated pass per layer)
    cache_dir: str = "results"  # where computed results are cached

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_patches < 1:
            raise InputError(f"n_patches must be at least 1, got {self.n_patches}")
        if not self.noise_scale >= 0:
            raise InputError(f"noise_scale must be at least 0 (σ in units of the write's RMS), got {self.noise_scale}")
        if self.n_noise < 1:
            raise InputError(f"n_noise must be at least 1, got {self.n_noise}")
        if self.n_prompts is not None and self.n_prompts < 2:
            raise InputError(f"n_prompts must be at least 2 (or None for all), got {self.n_prompts}")


def check_model(cfg: Config, model) -> None:
    """The prompts load and tokenize, there are enough for ``n_patches`` sources each, and
    ``featured_layer`` is a layer of the model."""
    data = open_prompts(model, cfg.prompts, cfg.n_prompts, cfg.seed)
    if cfg.ablation == "resample" and cfg.n_patches > len(data) - 1:
        raise InputError(f"n_patches={cfg.n_patches} needs at least {cfg.n_patches + 1} prompts, "
                         f"have {len(data)}: lower n_patches or raise n_prompts")
    if cfg.featured_layer is not None and not 0 <= cfg.featured_layer < model.n_layers:
        raise InputError(f"featured_layer={cfg.featured_layer} is out of range: {model.name} has "
                         f"attention layers 0 .. {model.n_layers - 1}")


@dataclass
class HydraChapter:
    result: hy.HydraResult
    effects: pd.DataFrame  # per (prompt, ablated layer)
    regression: pd.DataFrame  # per ablated layer (Fig 7d, 8)
    impact: pd.DataFrame  # per layer, unembedding vs ablation (Fig 2)
    before_after: pd.DataFrame  # one ablation up close (Fig 1, 3)
    erasure: pd.DataFrame  # per (ablated attention layer, MLP layer) (§2.5.2)
    verdicts: list
    numbers: dict
    meta: dict
    noise: hy.HydraResult | None = None  # every layer noise-ablated (σ = noise_scale x the write's RMS)
    own: pd.DataFrame | None = None  # per (ablation, component): own DE in the ablated run vs clean
    own_summary: pd.DataFrame | None = None  # per ablation, over attention layers
    comparison: pd.DataFrame | None = None  # per (ablation, component): noise beside resample
    localisation: pd.DataFrame | None = None  # per (ablated, readout component): mean |ΔDE|
    local_summary: pd.DataFrame | None = None  # per ablated component: top-1 / top-2 shares
    best: pd.DataFrame | None = None  # Fig 7b: the attention layer with the highest R²
    panels: pd.DataFrame | None = None  # Fig 8: attention / MLP parts at evenly spaced layers

    @property
    def attention_localisation(self) -> pd.DataFrame:
        """:attr:`local_summary` of the attention ablations, later attention and MLP layers apart."""
        s = self.local_summary
        return s[(s["ablated_kind"] == "attn") & s["readout_kind"].isin(["attn", "mlp"])].reset_index(drop=True)


def measure(cfg: Config, progress: bool = True) -> HydraChapter:
    check(cfg)
    model = open_model(cfg)
    data = open_prompts(model, cfg.prompts, cfg.n_prompts, cfg.seed)
    n_patches = cfg.n_patches if cfg.ablation == "resample" else 1
    res = cached(cfg, hy.HydraSpec(ablation=cfg.ablation, n_patches=n_patches, seed=cfg.seed), data,
                 progress=progress)
    eff = hy.effects_frame(res)
    noise = cached(cfg, hy.HydraSpec(ablation="noise", n_patches=cfg.n_noise, seed=cfg.seed,
                                     noise_scale=cfg.noise_scale), data, progress=progress)
    reg = hr.regression(eff)
    results = {cfg.ablation: res, "noise": noise}
    own = hc.own_effects(results)
    loc = hc.localisation(res)
    ch = HydraChapter(res, eff, reg, hy.impact_summary(eff), hy.before_after(res, layer=cfg.featured_layer),
                      hr.erasure(res), [], {}, dict(res.meta), noise, own, hc.own_summary(own),
                      hc.ablation_comparison(results), loc, hc.localisation_summary(loc),
                      hc.best_layer_points(eff, reg), hc.layer_panels(eff, hc.panel_layers(res.n_layers)))
    ch.numbers = numbers(ch)
    ch.verdicts = verdicts(ch)
    return ch


def numbers(ch: HydraChapter) -> dict:
    """The values behind the claims (see :data:`UNEMBED`, :data:`RESTORED`, ...)."""
    res, eff, L = ch.result, ch.effects, ch.result.n_layers
    attn = ch.regression[ch.regression["kind"] == "attn"].set_index("layer")
    slopes = attn["slope"].dropna()
    at_or_above = slopes[slopes >= 1].index
    mid = list(span(L, "middle"))
    late = hr.late_mlp_layers(L)
    dde = res.delta_de.mean(2)
    ablated = [2 * m for m in range(late[0])]
    late_sum = dde[:, ablated][:, :, [2 * l + 1 for l in late]].sum(-1)
    self_d = dde[:, ablated, ablated]
    att = eff[eff["kind"] == "attn"]
    best = attn["r2"].idxmax() if attn["r2"].notna().any() else None
    return {"n_prompts": len(res.clean_de), "n_correct": int((res.ml_token == res.target).sum()),
            "n_patches": res.ablated_de.shape[2], "mid": mid, "late": late,
            "frac_de_gt_drop": float((att["direct_effect"] > att["ablation_drop"]).mean()),
            "corr": float(att["direct_effect"].corr(att["ablation_drop"])),
            "restored_mid": hr.restored_share(eff, mid), "slope_mid": hr.pooled_slope(eff, mid),
            "ce_mid": float(att[att["layer"].isin(mid)]["compensatory_effect"].mean()),
            "lost_mid": float(-att[att["layer"].isin(mid)]["delta_direct_effect"].mean()),
            "block_mid": float(att[att["layer"].isin(mid)]["from_block_norms"].mean()),
            "slope_from": (int(at_or_above.max()) + 1 if len(at_or_above) else int(slopes.index.min()))
            if len(slopes) else None,
            "r2_layer": None if best is None else int(best),
            "r2": None if best is None else float(attn.loc[best, "r2"]),
            "late_negative": int((res.clean_de[:, 1::2][:, late].mean(0) < 0).sum()),
            "late_clean_de": float(res.clean_de[:, 1::2][:, late].sum(1).mean()),
            "opposite": float((late_sum * self_d < 0).float().mean()) if late[0] else float("nan"),
            **own_numbers(res)}


def own_numbers(res: hy.HydraResult) -> dict:
    """:data:`OWN`'s and :data:`LOCAL`'s values (:func:`~selfrepair.hydra_controls.own_sizes`)."""
    own, clean = hc.own_sizes(res)
    share, uniform = hc.prompt_top_share(res)
    return {"own_ratio": float(own.sum() / clean.sum()) if clean.sum() > 0 else float("nan"),
            "top_share": float(share.mean()) if len(share) else None,  # None: no such case
            "top_share_uniform": float(uniform.mean()) if len(uniform) else None}


def _span(layers: list[int]) -> str:
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0])


MIN_CORRECT = 0.25  # below this share of prompts completed correctly the model fails the task


def task_failed(numbers: dict) -> str:
    """Why the Hydra claims cannot be tested (the model does not do factual recall), or ``""``."""
    n, k = numbers["n_prompts"], numbers["n_correct"]
    if k < max(10, MIN_CORRECT * n):
        return (f"the model completes only {k} of {n} prompts correctly, and these claims are about how "
                "a model recalls facts (at least a quarter, and 10, are needed)")
    return ""


def verdicts(ch: HydraChapter) -> list[Verdict]:
    s, L = ch.numbers, ch.result.n_layers
    why = task_failed(s)
    att = ch.effects[ch.effects["kind"] == "attn"]
    mid = att[att["layer"].isin(s["mid"])].groupby("prompt")[["compensatory_effect", "delta_direct_effect"]].sum()
    pairs = np.c_[mid["compensatory_effect"], -mid["delta_direct_effect"]]
    lo, hi = bootstrap(pairs, lambda a: a[:, 0].sum() / a[:, 1].sum() if a[:, 1].sum() > 0 else np.nan)
    res = ch.result
    late = s["late"]
    dde = res.delta_de.mean(2)
    ablated = [2 * m for m in range(late[0])]
    opposite = (dde[:, ablated][:, :, [2 * l + 1 for l in late]].sum(-1) * dde[:, ablated, ablated] < 0)
    r2 = ("" if s["r2_layer"] is None else f" The variance explained peaks at attention layer "
          f"{s['r2_layer']} of {L} (R² = {s['r2']:.2f}; the paper: layer 23 of 32, R² = 0.92).")
    block = (f" The downstream block norms' rescaling, reported apart, adds a mean "
             f"{s['block_mid']:+.3f} logits there." if ch.result.from_block_norms.abs().max() > 0 else "")
    frm = s["slope_from"]
    return [
        Verdict.share(UNEMBED, att["direct_effect"] > att["ablation_drop"], "(prompt, attention layer) pairs",
                      f"The two correlate with r = {s['corr']:.2f}.", why=why),
        Verdict(RESTORED, s["restored_mid"], s["n_prompts"] * len(s["mid"]), f"(prompt, layer) pairs of "
                f"layers {_span(s['mid'])}, resampled by prompt", f"An ablation there removes a mean {s['lost_mid']:+.3f} logits "
                f"of direct effect and the downstream layers change theirs by a mean "
                f"{s['ce_mid']:+.3f}"
                + (" (on average downstream breakage outweighs compensation)" if s["ce_mid"] < 0 else "")
                + ". The slope of "
                f"compensation on direct effect, pooled within these layers — how much of each extra "
                f"logit of direct effect is given back — is {s['slope_mid']:.2f}.{block}", lo, hi, why),
        Verdict(SLOPE, float("nan") if frm is None else frm / L, L, "attention layers",
                ("" if frm is None else f"That is from layer {frm} of {L} on.") + r2, why=why),
        # one case per (prompt, attention layer before the late MLPs)
        Verdict.share(ERASURE, opposite.numpy(), "(prompt, earlier attention layer) cases",
                      f"{s['late_negative']} of the last {len(late)} MLP layers ({_span(late)}) push "
                      f"the top token down on average (together {s['late_clean_de']:+.2f} logits).", why=why),
        own_verdict(res, s),
        local_verdict(res, s, why),
    ]


def own_verdict(res: hy.HydraResult, s: dict) -> Verdict:
    """:data:`OWN`, with a bootstrap over prompts of the ratio of sums."""
    own, clean = hc.own_sizes(res)
    pairs = np.c_[own.sum(1), clean.sum(1)]
    lo, hi = bootstrap(pairs, lambda a: a[:, 0].sum() / a[:, 1].sum() if a[:, 1].sum() > 0 else np.nan)
    return Verdict(OWN, s["own_ratio"], own.size, f"(prompt, attention layer) pairs, {s['n_patches']} "
                   "patch(es) each", "A single patch is noisier, and other ablations differ: see the "
                   "section on the ablated layer's own direct effect.", lo, hi)


def local_verdict(res: hy.HydraResult, s: dict, why: str) -> Verdict:
    """:data:`LOCAL`: the mean top-1 share, beside what an even spread would give."""
    share, _ = hc.prompt_top_share(res)
    return Verdict.mean(LOCAL, share, "(prompt, ablated attention layer) cases",
                        (f"If every later attention layer changed alike, the share would be "
                         f"{s['top_share_uniform']:.0%}." if len(share) else ""), why=why)


def on_this_model(ch: HydraChapter) -> str:
    s = ch.numbers
    intro = (f"**On {ch.meta.get('model')}** ({ch.result.n_layers} layers, {s['n_prompts']} factual "
             f"prompts, {s['n_patches']} resample source(s) per prompt) the model completes "
             f"**{s['n_correct']} of {s['n_prompts']}** prompts correctly (its top token is the first "
             "token of the answer); as in the Hydra paper, every number reads the top token, right or "
             "wrong.")
    return render(ch.verdicts, intro)


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter."""
    from ..structure import architecture

    a = architecture(open_model(cfg))
    lines = []
    if a["sandwich"]:
        lines.append("- **A layer's write is normalized.** This model passes attention's and the MLP's "
                     "outputs through post-attention / post-feedforward norms before adding them; it is "
                     "that post-norm write that is replaced, so the ablated block's own norm cannot "
                     "rescale the replacement. The downstream blocks' norms rescale too: that is reported "
                     "as its own term (`from_block_norms`), not counted as compensation.")
    lines.append("- **The same layer's MLP.** " + (
        "The blocks are parallel-residual: a layer's MLP reads the same residual as its attention, so "
        "it cannot compensate for that attention layer (its cells in the erasure map are zero)."
        if a["parallel"] else "The blocks are sequential: a layer's MLP reads its attention's output, "
        "so it is the first component that can compensate for it."))
    return "\n".join(lines)
