"""Chapter 5's claims (Hydra paper §2.5, §4.2, §6) and how each is decided.

Every verdict reads a statistic of per-prompt sums (:class:`PromptEvidence`), recomputed in each
replicate of a cluster bootstrap over the **prompts** (:mod:`selfrepair.uncertainty`): each factual
prompt is an independent draw, and its resample sources are part of the treatment, not a second
draw. Layers are never the unit: the (prompt, layer) pairs of one prompt share its forward pass.

The paper's own numbers live once, in :data:`PAPER`; every rule names the paper's word or number
it reads (:data:`selfrepair.claims.PAPER_WORDS`) and why. Two readings of the final norm's scale σ
(:mod:`selfrepair.hydra_scale`): the verdicts read the clean run's σ (the book's lead, see
``hydra_text.scale_markdown``); the other reading, each ablation run's own σ′, is computed with its
own interval and shown beside each verdict it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import hydra_controls as hc
from .. import hydra_regression as hr
from .. import hydra_scale as hs
from ..claims import Claim, Signed, Verdict, approximately, paper_number, paper_word
from ..rules import NEGLIGIBLE, number
from ..structure import span
from ..tables import counted
from . import signed
from .signed import changes
from ..uncertainty import Bootstrap, Clusters, Estimate, least_squares, moments, pearson, ratio

# The Hydra paper's numbers (Chinchilla-7B on Counterfact), quoted from here everywhere else.
PAPER = {"model": "Chinchilla-7B", "dataset": "Counterfact", "n_prompts": 1209, "n_patches": 15,
         "n_layers": 32, "restored": 0.70, "slope_past": 13, "r2_layer": 23, "r2": 0.92, "mlp_layer": 22}
SLOPE_FROM = PAPER["slope_past"] / PAPER["n_layers"]  # "past layer 13" of 32, as a relative depth
SCALE_NAMES = {"clean": "the clean run's σ", "ablated": "each ablation run's own σ′"}
MIN_CORRECT = 0.25  # below this share of prompts completed correctly the model fails the task
MIN_CORRECT_N = 10  # ... and below this many

UNEMBED = Claim(
    "unembed", "Unembedding and ablation disagree: Δ_unembed > Δ_ablate for most prompts and layers",
    "§2.5, Fig 2c",
    "the share of (prompt, attention layer) pairs whose direct effect exceeds the logit drop its "
    "ablation causes by more than a margin, 10% of the mean |direct effect| over every pair (both "
    "recomputed in each replicate)", paper_word("most"), fmt=".0%",
    reading="On {value} of the {n} {unit}, a layer's direct effect exceeds the logit drop its "
            "ablation causes by more than the margin.",
    rationale="Fig 2c's caption says Δ_unembed > Δ_ablate 'for most prompts and layers'. Most layers "
              "have a direct effect and a drop near zero on most prompts, and there the sign of their "
              "difference is a coin flip, so counting bare signs over thousands of pairs reads about "
              "50% whatever the network does; a pair counts only when the direct effect exceeds the "
              "drop by more than a margin, and a pair inside the margin counts against 'most'. The "
              "margin is the table's 'approximately zero' tolerance (10%) of the typical direct effect. "
              "Pairs are not independent: the prompts are resampled",
    quantity='the share of (prompt, attention layer) pairs whose direct effect exceeds the logit drop')
RESTORED = Claim(
    "restored", "At middle layers the Hydra effect and reduced MLP erasure restore approximately 70% of "
    "the reduction in token logits", "§6, Fig 7",
    "the compensatory effect as a share of the direct effect removed, Σ CE / Σ (−ΔDE of the ablated "
    "layer) over every prompt of the middle attention layers, read at the clean run's σ (each ablation "
    "run's own σ′ beside it)", approximately(PAPER["restored"], "approximately 70%"),
    paper=PAPER["restored"], paper_context=f"{PAPER['model']}, {PAPER['dataset']}", fmt=".0%",
    reading=Signed("When a middle attention layer is ablated, the layers after it {way} of the direct "
                   "effect it removed, read at the clean run's σ ({n} {unit}).",
                   up="give back {value}", down="take away a further {value} (the opposite of giving back)",
                   ends=("taking away a further {}", "giving back {}"), none="giving back nothing"),
    rationale="§6's 'restore approximately 70% of the reduction in token logits' is the compensation "
              "over the logit reduction an ablation would cause without it, the direct effect removed; "
              "'middle layers' are the middle half of the depth. The clean σ is the "
              "book's lead reading (the chapter's section on σ says why); the same share at σ′ is "
              "given beside it with its own interval",
    quantity="the later layers' compensation as a share of the direct effect removed, at middle layers")
SLOPE = Claim(
    "slope", "Compensation does not fully restore the output: the regression slope of compensation on "
    "direct effect is less than one at all layers past layer 13 of the paper's 32 (on another model: past "
    "the same share of its depth)", "§4.2, Fig 7d",
    "the largest, over the attention layers past the paper's cutoff (its layer 13 of 32 as a share of the "
    "depth: layer l of a model of L layers counts when l / L > 13/32), of the least-squares slope of "
    "the compensatory effect on the direct effect across prompts (each layer's slope recomputed in "
    "every replicate), at the clean run's σ",
    paper_number("<", 1.0, "a slope of less than one at all layers past layer 13",
                 "a slope below 1 means each extra logit of a layer's direct effect comes with less than "
                 "one logit of compensation, the paper's 'does not fully restore the output'; 'all layers' "
                 "is tested through the largest slope, 'past layer 13' of its 32 layers as the "
                 "layers deeper than 13/32 of the depth"),
    fmt=".2f",
    reading=Signed("At the steepest attention layer past the paper's cutoff, the per-layer slope of "
                   "compensation on direct effect is {way} ({n} {unit}).",
                   up="{value}: each extra logit of direct effect comes with that many more logits of compensation",
                   down="below zero, at {value}: each extra logit of direct effect comes with that many fewer logits "
                        "of compensation",
                   zero="{value}: compensation does not grow with the direct effect",
                   ends=("a per-layer slope of {} below zero", "a per-layer slope of {}"), none="a flat slope"),
    rationale="§4.2: 'fitting a linear regression between direct effect and compensatory response "
              "gives a slope of less than one at all layers past layer 13'. The models have different "
              "depths, so the paper's layer is compared as a relative depth (the verdict says which layers "
              "that is on the model that ran). The slope is a "
              "different quantity from the restored share: how a layer's compensation scales with "
              "its direct effect, not how much of what an ablation removes comes back on average",
    quantity="the steepest per-layer slope of compensation on direct effect, past the paper's cutoff")
ERASURE = Claim(
    "erasure", "Late MLP layers erase: when an attention layer's Δ_unembed is reduced, theirs is "
    "similarly attenuated", "§2.5.2, §6",
    "the least-squares slope, over every (prompt, attention layer before the last quarter), of the "
    "last quarter's MLPs' summed ΔDE on the ablated layer's own ΔDE (clean σ; erasure predicts a "
    "negative slope)", paper_word("significant", "<"), fmt="+.2f",
    reading=Signed("For each logit an ablation moves the ablated layer's direct effect, the late MLPs' direct "
                   "effect {way} ({n} {unit}).", up="moves the same way: a slope of {value}",
                   down="moves the other way (the way erasure predicts): a slope of {value}",
                   zero="does not move: a slope of {value}", ends=("{} the other way", "{} the same way"),
                   none="no move"),
    rationale="§2.5.2: 'when the attention layer has a high positive impact they have a high negative "
              "impact and when the attention layer's Δ_unembed is reduced theirs is similarly "
              "attenuated' — the late MLPs' change moves against the ablated layer's, in proportion to "
              "it. A regression weighs each case by what it removed; a sign count over every layer "
              "would weigh the many layers that remove nothing like those that remove the most, and "
              "read about 50% by chance. The paper gives no number, so the slope must be "
              "significantly below 0 (the table's 'significant')",
    quantity="the slope of the late MLPs' change of direct effect on the ablated layer's")
OWN = Claim(
    "own", "Resample ablations reduce the ablated layer's Δ_unembed to approximately zero when averaged "
    "across patches", "§2.5.2",
    "Σ |own direct effect in the ablated run, averaged over the patches| / Σ |clean direct effect| "
    "over every (prompt, attention layer)", paper_word("approximately zero"), fmt=".0%",
    reading="Averaged over its patches, an ablated attention layer keeps {value} of its clean direct "
            "effect's size ({n} {unit}).",
    rationale="the paper's check that its ablation removes the layer; the own direct effect is "
              "compared as a share of the clean one it replaces",
    quantity="the ablated layer's own direct effect left in the ablated run, as a share of its clean one")
LOCAL = Claim(
    "localised", "Downstream effects of an attention ablation are localised: apart from the attention "
    "layer involved in the Hydra effect, later attention layers have Δ_unembed almost entirely "
    "unchanged", "§2.5.2",
    "the share of the later attention layers' Σ |ΔDE| carried by all but the one that changes most, "
    "pooled over every (prompt, ablated attention layer with at least two later attention layers)",
    paper_word("approximately zero"), fmt=".0%",
    reading="Apart from the later attention layer that changes most, the others carry {value} of the "
            "later attention layers' change ({n} {unit}).",
    rationale="'almost entirely unchanged' is read as approximately zero: the change of the other "
              "later attention layers, as a share of all of theirs, within the table's 10%",
    quantity="the share of the later attention layers' change carried by all but the one that changes most")
CLAIMS = (UNEMBED, RESTORED, SLOPE, ERASURE, OWN, LOCAL)


@dataclass
class PromptEvidence:
    """Per-prompt values of a Hydra result, ``[prompt, attention layer]`` unless said: what every
    chapter-5 statistic is computed from, with the clusters (one per prompt)."""

    clusters: Clusters
    de: np.ndarray  # clean direct effect of each attention layer (Δ_unembed)
    drop: np.ndarray  # −Δ_ablate, patch mean
    ce: dict  # scale -> compensatory effect of each attention layer's ablation
    lost: dict  # scale -> the direct effect it removes, −ΔDE of the ablated layer
    ce_attn: np.ndarray  # the later attention layers' part of ce (the Hydra effect; clean σ)
    own: np.ndarray  # |own direct effect in the ablated run| (patch mean)
    clean: np.ndarray  # |clean direct effect|
    erasure: np.ndarray  # [prompt, 1 + MOMENTS]: count and moments of (ablated layer's ΔDE, late MLPs' ΔDE) over its cases
    n_erasure: int  # (prompt, earlier attention layer) cases
    local: np.ndarray  # [prompt, 2]: Σ |ΔDE| of all but the largest later attention layer, Σ of all
    n_local: int  # (prompt, ablated layer) cases with at least two later attention layers
    mid: list
    past: list  # attention layers deeper than SLOPE_FROM

    @property
    def n(self) -> int:
        return len(self.de)

    @property
    def n_layers(self) -> int:
        return self.de.shape[1]


def evidence(effects, res) -> PromptEvidence:
    """:class:`PromptEvidence` of a result and its effects frame (with the σ′ columns,
    :func:`selfrepair.hydra_scale.with_ablated_scale`)."""
    n, L = len(res.clean_de), res.n_layers
    att = effects[effects["kind"] == "attn"].sort_values(["prompt", "layer"], kind="mergesort")
    arr = lambda col: att[col].to_numpy(float).reshape(n, L)  # noqa: E731
    ce = {s: arr(hs.column("compensatory_effect", s)) for s in hs.SCALES}
    lost = {s: -arr(hs.column("delta_direct_effect", s)) for s in hs.SCALES}
    own, clean = hc.own_sizes(res)
    cases = hr.erasure_cases(res)
    x, y = (cases[c].to_numpy(float).reshape(n, -1) for c in ("x", "y"))
    per_prompt = np.stack([np.full(n, x.shape[1]), x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1),
                           (x * y).sum(1)], 1)
    top, total, _ = hc.prompt_top_parts(res)
    return PromptEvidence(Clusters.rows(n, unit="prompts"), arr("direct_effect"), arr("ablation_drop"), ce,
                          lost, arr("ce_attn"), own, clean,
                          per_prompt, x.size,
                          np.c_[(total - top).sum(1), total.sum(1)], int(total.size),
                          list(span(L, "middle")), past_layers(res))


def past_layers(res) -> list[int]:
    """The attention layers deeper than :data:`SLOPE_FROM` of the depth that have a downstream
    component (the last attention layer of a parallel-residual model has none: its compensation is
    0 by construction, and its slope says nothing)."""
    L, down = res.n_layers, res.downstream()
    return [l for l in range(L) if l / L > SLOPE_FROM and bool(down[2 * l].any())]


# -- statistics (a leading replicate axis) -------------------------------------------------------
def share_exceeding(ev: PromptEvidence, w: np.ndarray, other_way: bool = False) -> np.ndarray:
    """Per replicate (weights ``w [R, prompt]``): the share of (prompt, layer) pairs with DE − drop
    above the margin (``other_way``: below minus the margin), the margin 10% of the replicate's
    mean |DE| (the table's "approximately zero")."""
    tol = NEGLIGIBLE
    count = w.sum(1) * ev.n_layers
    margin = tol * (w @ np.abs(ev.de).sum(1)) / count
    gap = (ev.de - ev.drop) * (-1 if other_way else 1)
    hits = (gap[None] > margin[:, None, None]).sum(2)  # [R, prompt]
    return ratio((w * hits).sum(1), count)


def layer_moments(ev: PromptEvidence, scale: str) -> np.ndarray:
    """``[prompt, layer, 1 + MOMENTS]``: count and moments of (direct effect, compensation)."""
    m = moments(ev.de.ravel(), ev.ce[scale].ravel()).reshape(ev.n, ev.n_layers, 5)
    return np.concatenate([np.ones((ev.n, ev.n_layers, 1)), m], -1)


def max_slope(t: np.ndarray, layers: list) -> np.ndarray:
    """The largest least-squares slope among ``layers`` (NaN-skipping) from ``t [R, layer, MOMENTS]``."""
    slope = least_squares(t[:, layers])[0]
    return np.where(np.isfinite(slope).any(1), np.nanmax(np.where(np.isfinite(slope), slope, -np.inf), 1),
                    np.nan)


def max_r2(t: np.ndarray) -> np.ndarray:
    """The highest R² (Pearson's r squared) over the layers, from ``t [R, layer, MOMENTS]``."""
    r2 = pearson(t) ** 2
    return np.where(np.isfinite(r2).any(1), np.nanmax(np.where(np.isfinite(r2), r2, -np.inf), 1), np.nan)


def pooled_slope(t: np.ndarray, layers: list) -> np.ndarray:
    """Within-layer slope pooled over ``layers``: Σ cov / Σ var (each layer its own intercept)."""
    n, sx, sy, sxx, _, sxy = np.moveaxis(t[:, layers], -1, 0)
    return ratio((sxy - ratio(sx * sy, n)).sum(1), (sxx - ratio(sx ** 2, n)).sum(1))


def slope_from(slopes: np.ndarray) -> float | None:
    """The first attention layer from which every slope is below 1 (None: no slope)."""
    ok = np.isfinite(slopes)
    if not ok.any():
        return None
    steep = np.flatnonzero(ok & (slopes >= 1))
    return int(steep.max()) + 1 if len(steep) else int(np.flatnonzero(ok).min())


@dataclass
class Estimates:
    """The statistics behind the verdicts, each an :class:`~selfrepair.uncertainty.Estimate`
    (``scale`` -> one per reading of σ where the reading changes it)."""

    unembed: Estimate
    other_way: Estimate
    restored: dict
    hydra_part: Estimate
    max_slope: dict
    pooled: dict
    r2: dict
    erasure: Estimate
    own: Estimate
    local: Estimate


def estimates(ev: PromptEvidence, n_boot: int, seed: int) -> Estimates:
    """Every statistic of :class:`Estimates` with its 95% interval over resampled prompts."""
    boot = Bootstrap.over(ev.clusters, n_boot, seed)
    pairs = dict(n=ev.n * ev.n_layers, unit="(prompt, attention layer) pairs")
    mid = dict(n=ev.n * len(ev.mid), unit=f"(prompt, layer) pairs of the middle layers {_span(ev.mid)}")
    sums = lambda a, b: np.c_[a[:, ev.mid].sum(1), b[:, ev.mid].sum(1)]  # noqa: E731
    share_of = lambda t: ratio(t[:, 0], t[:, 1])  # noqa: E731
    mom = {s: layer_moments(ev, s) for s in hs.SCALES}
    late = dict(n=len(ev.past), unit=f"attention layers past the cutoff: {_span(ev.past)}")
    return Estimates(
        unembed=boot.of_weights(lambda w: share_exceeding(ev, w), **pairs),
        other_way=boot.of_weights(lambda w: share_exceeding(ev, w, other_way=True), **pairs),
        restored={s: boot.estimate(share_of, sums(ev.ce[s], ev.lost[s]), **mid) for s in hs.SCALES},
        hydra_part=boot.estimate(share_of, sums(ev.ce_attn, ev.lost["clean"]), **mid),
        max_slope={s: boot.estimate(lambda t: max_slope(t, ev.past), mom[s], **late) if ev.past else _none(late)
                   for s in hs.SCALES},
        pooled={s: boot.estimate(lambda t: pooled_slope(t, ev.mid), mom[s], **mid) for s in hs.SCALES},
        r2={s: boot.estimate(max_r2, mom[s], n=ev.n_layers, unit="attention layers") for s in hs.SCALES},
        erasure=boot.estimate(lambda t: least_squares(t)[0], ev.erasure, n=ev.n_erasure, unit="(prompt, earlier attention layer) cases"),
        own=boot.estimate(share_of, np.c_[ev.own.sum(1), ev.clean.sum(1)], **pairs),
        local=boot.estimate(share_of, ev.local, n=ev.n_local,
                            unit="(prompt, ablated attention layer) cases"))


def _none(what: dict) -> Estimate:
    nan = float("nan")
    return Estimate(nan, nan, nan, what["n"], what["unit"], 0, "prompts", 0, 0,
                    "no attention layer past the paper's cutoff has a later component to compensate")


def _layers(layers: list) -> str:
    """``layer 3``, ``layers 8–17`` (a run of layers), ``none``."""
    return "none" if not layers else f"layer {layers[0]}" if len(layers) == 1 else f"layers {_span(layers)}"


def _span(layers: list) -> str:
    if not layers:
        return "none"
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0])


def task_failed(n_prompts: int, n_correct: int) -> str:
    """Why the Hydra claims cannot be tested (the model does not do factual recall), or ``""``."""
    if n_correct < max(MIN_CORRECT_N, MIN_CORRECT * n_prompts):
        return (f"the model completes only {n_correct} of {n_prompts} prompts correctly, and these claims "
                f"are about how a model recalls facts (at least {MIN_CORRECT:.0%} of the prompts, and "
                f"{MIN_CORRECT_N}, are needed)")
    return ""


# the mean direct effect an ablation removes, and the block norms' rescaling, from their signs
LOST = Signed("", "", "", ends=("adds a mean {} logits of direct effect", "removes a mean {} logits of direct effect"),
              none="removes no direct effect on average")
BLOCK = Signed("", "", "", ends=("takes away a mean {} logits", "adds a mean {} logits"), none="adds nothing on average")


def verdicts(ch) -> list[Verdict]:
    """Each claim's verdict on a :class:`~selfrepair.chapters.hydra.HydraChapter` (its ``estimates``
    and ``numbers``), at the clean run's σ (the other reading, σ′, is in *Which σ?* and in the fold of
    :func:`~selfrepair.chapters.hydra_answer.other_readings`)."""
    e, s, L = ch.estimates, ch.numbers, ch.result.n_layers
    why = task_failed(s["n_prompts"], s["n_correct"])
    block = (f" The downstream block norms' rescaling, reported apart, {BLOCK.said(s['block_mid'], '.3f')} "
             "there." if ch.result.from_block_norms.abs().max() > 0 else "")
    restored = (f"An ablation there {LOST.said(s['lost_mid'], '.3f')} and the later "
                f"layers' direct effect {changes(s['ce_mid'], '.3f', 'rises by a mean', 'falls by a mean', 'does not change on average')}"
                + (" (on average downstream breakage outweighs compensation)" if s["ce_mid"] < 0 else "")
                + f"; the later attention layers alone (the Hydra effect proper) "
                f"{said(e.hydra_part)}.{block} This share is the chapter's one answer to how "
                "much the later layers give back; the slopes and the other reading of σ measure other things, "
                "each in one line of the fold at the end of this section with why its number differs.")
    frm = s["slope_from"]
    slope = (cutoff_words(L, ch.evidence.past) + " " + SLOPE_APART + " "
             + (f"Every attention layer's slope is below 1 from layer {frm} of {L} on (the paper: past "
                f"{PAPER['slope_past']} of {PAPER['n_layers']}). " if frm is not None else "")
             + f"The highest R² over the layers is {e.r2['clean'].prose('.2f')} (the paper: "
             f"{PAPER['r2']:.2f} at layer {PAPER['r2_layer']} of {PAPER['n_layers']}).")
    return [
        Verdict.of(UNEMBED, e.unembed, f"The other way round — the drop exceeding the direct effect by more "
                   f"than the margin (breakage) — holds on {e.other_way.prose('.0%')}; the two measures "
                   f"correlate at r = {number(s['corr'], '.2f')}.", why=why),
        Verdict.of(RESTORED, e.restored["clean"], restored, why=why),
        Verdict.of(SLOPE, e.max_slope["clean"], slope, why=why),
        Verdict.of(ERASURE, e.erasure, erasure_detail(s, len(s["late"])), why=why),
        Verdict.of(OWN, e.own, f"With {counted(s['n_patches'], 'patch', 'patches')} per prompt; a single patch is noisier, and "
                   "other ablations differ: see the section on the ablated layer's own direct effect."),
        Verdict.of(LOCAL, e.local, f"If every later attention layer changed alike, the others would carry "
                   f"{1 - s['top_share_uniform']:.0%}." if s["top_share_uniform"] is not None else "", why=why),
    ]


def said(est: Estimate, claim: Claim = RESTORED) -> str:
    """A share of the direct effect removed said as ``claim``'s reading says it, from its sign, with
    its 95% interval in the same frame (:func:`~selfrepair.chapters.signed.said`): "take away a
    further 196% (95% interval 168% to 227%)", "give back 30% (95% interval 10% to 50%)"."""
    return signed.said(est, claim)


SLOPE_APART = ("This tests a different quantity from the chapter's headline share: how a layer's compensation "
               "scales with its direct effect (a slope, layer by layer), not how much of what an ablation "
               "removes comes back on average.")


def cutoff_words(n_layers: int, past: list[int]) -> str:
    """The slope claim's cutoff in the paper's terms (its layer 13 of 32) and on a model of
    ``n_layers`` layers (the same share of the depth), with the attention layers tested (``past``:
    :func:`past_layers`)."""
    at = SLOPE_FROM * n_layers
    deeper = [l for l in range(n_layers) if l / n_layers > SLOPE_FROM]
    left = [l for l in deeper if l not in past]
    return (f"The paper's cutoff is its layer {PAPER['slope_past']} of {PAPER['n_layers']}, {SLOPE_FROM:.0%} of "
            f"its depth; the same share of this model's {n_layers} layers is {PAPER['slope_past']}/"
            f"{PAPER['n_layers']} × {n_layers} = {at:.1f}, so the attention layers tested here are those past "
            f"it: {_layers(past)}"
            + (f" ({_layers(left)} left out: nothing after {'it' if len(left) == 1 else 'them'} can "
               "compensate)" if left else "") + ".")


def erasure_detail(s: dict, n_late: int) -> str:
    """The late MLPs' clean direct effect and the sign share on the cases that removed the most."""
    total = s["late_clean_de"]
    text = (f"{s['late_negative']} of the last {n_late} MLP layers push the top token down on average; "
            f"together they push it {'down' if total < 0 else 'up'} by {abs(total):.2f} logits.")
    if s.get("erasure_n_large"):
        text += (f" On the {s['erasure_n_large']} cases that removed the most direct effect (top quarter), "
                 f"the late MLPs move against the ablated layer in {s['erasure_opposite_large']:.0%} "
                 f"(R² of the regression over every case: {s['erasure_r2']:.2f}).")
    return text
