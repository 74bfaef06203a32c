"""Chapter 5 — the Hydra effect (McGrath et al. 2023, §2.3-2.5, §4, §6; Fig 1, 2, 3, 7, 8).

Every attention and MLP layer is ablated at the last position of each factual prompt (resample
from ``n_patches`` other prompts, averaged: the paper's eq. 39), reading the clean run's top token.
The paper's "≈70%" is its measure: the share of the reduction in the token's logit that the
downstream layers restore when a middle layer is ablated (§6) — the compensatory effect over the
direct effect the ablation removes, here summed over the middle layers' prompts.

The claims and their verdicts are in :mod:`selfrepair.chapters.hydra_claims` (every interval a
cluster bootstrap over the prompts, ``n_boot`` replicates seeded by ``seed``).

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
from .. import hydra_scale as hs
from ..claims import render, render_claim
from ..config import RunConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model, open_prompts
from ..findings import Figure, Finding, markdown, shows as _shows
from ..structure import span
from ..tables import counted
from ..verdict_records import recorded
from . import check
from . import hydra_claims as hcl
from .hydra_answer import conclusion, hydra_answer, other_readings, seen  # noqa: F401 (the notebook's)
from .hydra_claims import (CLAIMS, ERASURE, LOCAL, OWN, PAPER, RESTORED, SLOPE, UNEMBED,  # noqa: F401
                           task_failed, verdicts)
from .hydra_text import (LOCAL_TABLE, OWN_TABLE, scale_table, localisation_markdown,  # noqa: F401 (the notebook's)
                         local_table, noise_markdown, own_markdown, panels_markdown, patch_slope,
                         scale_markdown)

@dataclass(frozen=True)
class Config(RunConfig):
    ablation: str = "resample"  # what replaces a layer's write: "resample" (other prompts), "mean" or "zero"
    prompts: str | None = None  # a CSV of prompts (columns subject, relation, prompt, target); None: data/factual_prompts.csv
    n_prompts: int | None = None  # prompts measured (None: all; an int: a seeded subset)
    n_patches: int = 3  # resample sources per prompt, averaged (the Hydra paper used more: the paper profile sets its number)
    featured_layer: int | None = None  # attention layer of the before/after figure; None: the largest mean direct effect
    noise_scale: float = 3.0  # noise ablation: σ of the Gaussian added to a layer's write, in units of that write's RMS
    n_noise: int = 1  # noise draws per prompt (each one ablated pass per layer)
    cache_dir: str = "results"  # where computed results are cached
    n_boot: int = 1000  # cluster-bootstrap replicates of every interval (prompts resampled)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")
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
    regression_ablated: pd.DataFrame | None = None  # Fig 7d / 8 with σ at each ablation run's own value
    erasure_cases: pd.DataFrame | None = None  # per (prompt, earlier attention layer): its ΔDE, the late MLPs' ΔDE
    readings: pd.DataFrame | None = None  # the 70% share, slopes and R² at either reading of σ
    evidence: hcl.PromptEvidence | None = None  # per-prompt values every verdict resamples
    estimates: hcl.Estimates | None = None  # the verdicts' statistics with their 95% intervals

    @property
    def attention_localisation(self) -> pd.DataFrame:
        """:attr:`local_summary` of the attention ablations, later attention and MLP layers apart."""
        s = self.local_summary
        return s[(s["ablated_kind"] == "attn") & s["readout_kind"].isin(["attn", "mlp"])].reset_index(drop=True)


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
def measure(cfg: Config, progress: bool = True) -> HydraChapter:
    check(cfg)
    model = open_model(cfg)
    data = open_prompts(model, cfg.prompts, cfg.n_prompts, cfg.seed)
    n_patches = cfg.n_patches if cfg.ablation == "resample" else 1
    res = cached(cfg, hy.HydraSpec(ablation=cfg.ablation, n_patches=n_patches, seed=cfg.seed), data,
                 progress=progress)
    eff = hs.with_ablated_scale(hy.effects_frame(res), res)
    noise = cached(cfg, hy.HydraSpec(ablation="noise", n_patches=cfg.n_noise, seed=cfg.seed,
                                     noise_scale=cfg.noise_scale), data, progress=progress)
    reg = hr.regression(eff)
    results = {cfg.ablation: res, "noise": noise}
    own = hc.own_effects(results)
    loc = hc.localisation(res)
    ch = HydraChapter(res, eff, reg, hy.impact_summary(eff), hy.before_after(res, layer=cfg.featured_layer),
                      hr.erasure(res), [], {}, dict(res.meta), noise, own, hc.own_summary(own),
                      hc.ablation_comparison(results), loc, hc.localisation_summary(loc),
                      hc.best_layer_points(eff, reg), hc.layer_panels(eff, hc.panel_layers(res.n_layers)),
                      hr.regression(eff, "ablated"), hr.erasure_cases(res))
    decide(ch, cfg.n_boot, cfg.seed)
    return ch


def decide(ch: HydraChapter, n_boot: int, seed: int) -> None:
    """Fill in ``ch``'s numbers, per-prompt evidence, estimates (``n_boot`` replicates over the
    prompts, ``seed``), readings of σ and verdicts."""
    ch.numbers = numbers(ch)
    ch.evidence = hcl.evidence(ch.effects, ch.result)
    ch.estimates = hcl.estimates(ch.evidence, n_boot, seed)
    ch.readings = readings(ch)
    ch.verdicts = verdicts(ch)


def readings(ch: HydraChapter) -> pd.DataFrame:
    """One row per reading of σ (:data:`selfrepair.hydra_scale.SCALES`: the clean run's, which the
    book leads with and the verdicts read, and each ablation run's own): the middle layers'
    restored share, the pooled slope there, the steepest slope past the paper's cutoff and the
    highest R² over the layers, each with its 95% interval over the prompts, and the layer from
    which every slope is below 1."""
    s, e, rows = ch.numbers, ch.estimates, []
    for scale, name in zip(hs.SCALES, ("clean run's σ (the book's lead)", "each ablation run's own σ′")):
        tail = "" if scale == "clean" else "_ablated"
        row = {"reading": name, "scale": scale, "slope_from": s["slope_from" + tail]}
        for key, value in (("restored_mid", e.restored[scale]), ("slope_mid", e.pooled[scale]),
                           ("max_slope", e.max_slope[scale]), ("r2", e.r2[scale])):
            row.update({key: value.value, f"{key}_lo": value.lo, f"{key}_hi": value.hi})
        rows.append(row)
    return pd.DataFrame(rows)


def slope_reading(regression: pd.DataFrame) -> dict:
    """From a :func:`~selfrepair.hydra_regression.regression` frame: the first attention layer from
    which every slope is below 1 (``slope_from``) and the layer with the highest R²."""
    attn = regression[regression["kind"] == "attn"].set_index("layer")
    slopes = attn["slope"].dropna()
    at_or_above = slopes[slopes >= 1].index
    best = attn["r2"].idxmax() if attn["r2"].notna().any() else None
    return {"slope_from": (int(at_or_above.max()) + 1 if len(at_or_above) else int(slopes.index.min()))
            if len(slopes) else None,
            "r2_layer": None if best is None else int(best),
            "r2": None if best is None else float(attn.loc[best, "r2"])}


def numbers(ch: HydraChapter) -> dict:
    """The point values shown beside the claims (the verdicts read :mod:`.hydra_claims`' estimates), the clean-scale
    reading of σ first and the ablation run's own (``*_ablated``) beside it
    (:mod:`selfrepair.hydra_scale`)."""
    res, eff, L = ch.result, ch.effects, ch.result.n_layers
    mid = list(span(L, "middle"))
    late = hr.late_mlp_layers(L)
    att = eff[eff["kind"] == "attn"]
    at_own_scale = slope_reading(ch.regression_ablated)
    fit = hr.erasure_fit(ch.erasure_cases)
    return {"n_prompts": len(res.clean_de), "n_correct": int((res.ml_token == res.target).sum()),
            "n_patches": res.ablated_de.shape[2], "mid": mid, "late": late,
            "frac_de_gt_drop": float((att["direct_effect"] > att["ablation_drop"]).mean()),
            "corr": float(att["direct_effect"].corr(att["ablation_drop"])),
            "restored_mid": hr.restored_share(eff, mid), "slope_mid": hr.pooled_slope(eff, mid),
            "ce_mid": float(att[att["layer"].isin(mid)]["compensatory_effect"].mean()),
            "lost_mid": float(-att[att["layer"].isin(mid)]["delta_direct_effect"].mean()),
            "block_mid": float(att[att["layer"].isin(mid)]["from_block_norms"].mean()),
            **slope_reading(ch.regression),
            "restored_mid_ablated": hr.restored_share(eff, mid, scale="ablated"),
            "slope_mid_ablated": hr.pooled_slope(eff, mid, scale="ablated"),
            **{f"{k}_ablated": v for k, v in at_own_scale.items()},
            "scale_ratio_mid": float(att[att["layer"].isin(mid)]["scale_ratio"].mean()),
            **{f"erasure_{k}": v for k, v in fit.items()},
            "late_negative": int((res.clean_de[:, 1::2][:, late].mean(0) < 0).sum()),
            "late_clean_de": float(res.clean_de[:, 1::2][:, late].sum(1).mean()),
            **own_numbers(res)}


def own_numbers(res: hy.HydraResult) -> dict:
    """:data:`OWN`'s and :data:`LOCAL`'s values (:func:`~selfrepair.hydra_controls.own_sizes`)."""
    own, clean = hc.own_sizes(res)
    share, uniform = hc.prompt_top_share(res)
    return {"own_ratio": float(own.sum() / clean.sum()) if clean.sum() > 0 else float("nan"),
            "top_share": float(share.mean()) if len(share) else None,  # None: no such case
            "top_share_uniform": float(uniform.mean()) if len(uniform) else None}


def on_this_model(ch: HydraChapter) -> str:
    s = ch.numbers
    intro = (f"**On {ch.meta.get('model')}** ({ch.result.n_layers} layers, {s['n_prompts']} factual "
             f"prompts, {counted(s['n_patches'], 'resample source')} per prompt) the model completes "
             f"**{s['n_correct']} of {s['n_prompts']}** prompts correctly (its top token is the first "
             "token of the answer); as in the Hydra paper, every number reads the top token, right or "
             "wrong.")
    return (render(ch.verdicts, intro, rules="ch05-rules", below=FIGURES) + "\n\nWhether the Hydra effect "
            "is seen on this model is answered after the figures that show it: "
            "<a href=\"#ch05-seen\">Is the Hydra effect seen here?</a>")


def verdict(ch: HydraChapter, key: str) -> str:
    """Claim ``key``'s full verdict, which the notebook shows right after the figure
    :data:`FIGURES` names for it (the overview of :func:`on_this_model` links down to it)."""
    return render_claim(ch.verdicts, key, rules="ch05-rules")


FIGURES = {"unembed": Figure("ch05-fig2", "Hydra Fig 2"), "restored": Figure("ch05-fig7", "Fig 7 and 8"),
           "slope": Figure("ch05-fig7", "Fig 7 and 8"), "erasure": Figure("ch05-erasure", "the erasure map"),
           "own": Figure("ch05-own", "the ablated layer's own effect"),
           "localised": Figure("ch05-local", "the localisation chart")}


def findings(ch: HydraChapter) -> list[Finding]:
    """"What this chapter shows": where it ran, the claims by outcome, and whether the Hydra effect
    as the paper measures it (the later attention layers giving back part of what a middle
    attention layer's ablation removed) is seen on this model."""
    s, model, part = ch.numbers, str(ch.meta.get("model")), ch.estimates.hydra_part
    where = Finding(f"This chapter ablated each of the {ch.result.n_layers} layers' attention and MLP of {model} "
                    f"on {s['n_prompts']:,} factual prompts, of which the model completes {s['n_correct']:,} "
                    "correctly.", values=(ch.result.n_layers, s["n_prompts"], s["n_correct"]))
    whole, (answer, words) = ch.estimates.restored["clean"], hydra_answer(ch)
    tested = part.reliable and whole.reliable and not task_failed(s["n_prompts"], s["n_correct"])
    values = (whole.value, whole.lo, whole.hi, part.value, part.lo, part.hi) if tested else ()
    if not tested:
        why = words if answer is None else f"the interval is not reliable ({whole.why})"
        text = (f"Take-away: is the Hydra effect as the paper measures it seen on this model? This run cannot "
                f"tell: {why}.")
    elif answer is None:
        text = ("Take-away: is the Hydra effect as the paper measures it seen on this model? This run cannot "
                f"tell. {conclusion(ch)}")
    else:
        text = (f"Take-away: the Hydra effect as the paper measures it is {'' if answer else 'not '}seen on this "
                f"model. {conclusion(ch)}")
    takeaway = Finding(text, (FIGURES["restored"],), values)
    return _shows(where, ch.verdicts, FIGURES, model, takeaway)


def shows(ch: HydraChapter) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(ch))


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
                     "as its own term (the block norms' term), not counted as compensation.")
    lines.append("- **The same layer's MLP.** " + (
        "The blocks are parallel-residual: a layer's MLP reads the same residual as its attention, so "
        "it cannot compensate for that attention layer (its cells in the erasure map are zero)."
        if a["parallel"] else "The blocks are sequential: a layer's MLP reads its attention's output, "
        "so it is the first component that can compensate for it."))
    return "\n".join(lines)
