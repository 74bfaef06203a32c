"""Chapter 3 — anti-erasure neurons (self-repair paper §4, App. C; Hydra §2.5.2).

Heads, as the paper picks them:

- Fig 7 and §4.2.2 — Pythia-160M L10H11, "an attention head right before the final MLP layer"
  (``fig7_head``); on other models the head with the largest mean direct effect over every token in
  the last layer whose heads feed the final MLP layer;
- Fig 8 and App. C Fig 11-14 — "heads before the final MLP layer which have a large average direct
  effect across tokens" (Pythia-160M L7H8, GPT2-Small L9H11, Pythia-410M L17H4, Llama-7B L30H8;
  ``featured_heads``); on other models the ``n_featured`` heads upstream of the final MLP layer with
  the largest whole-set mean direct effect.

Tokens: Fig 7 the tokens where the last MLP layer repairs most (``mlp_repair``); §4.2.2 those where
the head is self-repaired most (``self_repair``); Fig 8 and 11-14 each head's top-k% tokens by
direct effect (``direct_effect``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..ablation import check_ablation
from .. import neurons as nr
from ..claims import Claim, Verdict, above, at_least, below, bootstrap, render
from ..config import CorpusConfig, parse_head
from ..errors import InputError
from ..existence import whole_set_means
from ..experiment import head_sweep, measure as cached, open_model, open_tokens
from ..results import head_label
from ..tables import Layout
from . import check, featured

PAPER_FIG7 = "L10H11"  # Pythia-160M
PAPER_FIG8 = ("L7H8",)  # Pythia-160M (Fig 8 and Fig 13; the other three models' heads in the text)
FIG7_RULE = ("the head with the largest whole-set mean direct effect in the last layer whose heads "
             "feed the final MLP layer")
FIG8_RULE = "the heads upstream of the final MLP layer with the largest whole-set mean direct effect"

FIG7 = Claim("anti_erasure", "On the tokens where the last MLP layer repairs most, its top repairing "
             "neuron is mostly an erasure neuron erasing less", "§4.1, Fig 7",
             "the share of the Fig 7 head's mlp_repair tokens whose top repairing neuron has a negative "
             "clean direct effect that rises when the head is ablated", above(0.5), fmt=".0%",
             reading="On {value} of the {n} {unit}, the neuron that repairs most was pushing the "
                     "correct token down and pushes it down less once the head is gone.")
SPARSE = Claim("sparse", "A sparse set of neurons repairs heavily", "§4.2, Fig 8",
               "the share of the Fig 8 heads' top-k% (head, token) pairs with a positive direct effect on "
               "which the single top repairing neuron repairs at least 10% of the head's direct effect",
               at_least(0.2), paper=0.4, paper_context="Llama-7B L30H8, “over 40% of instances”",
               fmt=".0%",
               reading="On {value} of the {n} {unit}, one neuron alone gives back at least a tenth of "
                       "what the head contributed.")
ERASURE = Claim("erasure", "The top repairing neurons are mostly erasure neurons", "§4.2, App. C",
                "the mean over the Fig 8 heads' top-k% tokens of (the share of erasure neurons, negative "
                "clean direct effect, among the top-10 repairing neurons − their share among all the "
                "layer's neurons)", above(0.05), fmt="+.0%",
                reading="Among the neurons that repair most, erasure neurons are {value} more common "
                        "than among all of the layer's neurons (mean over {n} {unit}).")
VARIES = Claim("varies", "The repairing neurons differ across prompts", "§4.2.2",
               "the largest share of the Fig 7 head's most self-repaired tokens on which one neuron is "
               "among the top-10 repairing neurons", below(0.5), paper=0.16,
               paper_context="Pythia-160M L10H11", fmt=".0%",
               reading="No neuron is among the ten that repair most on more than {value} of the {n} "
                       "{unit}.")


@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # what replaces a head's output (the paper: resample)
    fig7_head: str | None = None  # Fig 7 / §4.2.2 head (the paper: L10H11); None: by the paper's criterion
    featured_heads: tuple[str, ...] | None = None  # Fig 8 / App. C heads (the paper: L7H8); None: by the criterion
    n_featured: int = 3  # Fig 8 heads chosen when featured_heads is None

    HEAD_FIELDS = ("fig7_head", "featured_heads")

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_featured < 1:
            raise InputError(f"n_featured must be at least 1, got {self.n_featured}")


def check_model(cfg: Config, model) -> None:
    """Pinned heads must feed the last MLP layer (its neurons are what this chapter measures)."""
    labels = ([cfg.fig7_head] if cfg.fig7_head else []) + list(cfg.featured_heads or ())
    bad = [l for l in labels if not nr.upstream(model, parse_head(l)[0], model.n_layers - 1)]
    if bad:
        raise InputError(f"heads {bad} are not upstream of the last MLP layer ({model.n_layers - 1}) of "
                         f"{model.name}" + (" (parallel residual: the same layer's MLP does not read "
                                            "its heads)" if model.parallel_residual else "")
                         + ": pick heads of earlier layers")


@dataclass
class NeuronsChapter:
    result: nr.NeuronResult
    summary: pd.DataFrame  # one row per measured head
    heads: pd.DataFrame  # which head serves which figure, and why
    fig7: str  # label of the Fig 7 / §4.2.2 head
    fig8: list  # labels of the Fig 8 heads
    verdicts: list
    meta: dict

    def _only(self, frame: pd.DataFrame, labels) -> pd.DataFrame:
        return frame[frame["label"].isin(list(labels))].reset_index(drop=True)

    @property
    def fig7_instances(self) -> pd.DataFrame:
        """Fig 7: the Fig 7 head's tokens where the last MLP layer repairs most."""
        return self._only(nr.instances(self.result, "mlp_repair"), [self.fig7])

    @property
    def sparsity(self) -> pd.DataFrame:
        """Fig 8: the Fig 8 heads' top-k% tokens by direct effect."""
        return self._only(nr.sparsity(self.result), self.fig8)

    @property
    def cumulative(self) -> pd.DataFrame:
        """App. C Fig 11-14, the Fig 8 heads."""
        return self._only(nr.cumulative(self.result), self.fig8)

    @property
    def top_frequency(self) -> pd.DataFrame:
        """§4.2.2: the Fig 7 head's most self-repaired tokens."""
        return self._only(nr.top_frequency(self.result), [self.fig7])


def choose(cfg: Config, per_head: pd.DataFrame, model) -> pd.DataFrame:
    """The heads of Fig 7 and Fig 8 with the reason each was chosen."""
    L = model.n_layers - 1
    whole = whole_set_means(per_head)
    up = whole[[nr.upstream(model, int(l), L) for l in whole["layer"]]]
    by_de = ["direct_effect", "layer", "head"]
    last = up[up["layer"] == nr.last_upstream_layer(model)]
    f7 = featured(whole, [cfg.fig7_head] if cfg.fig7_head else None,
                  lambda ph: last.sort_values(by_de, ascending=[False, True, True], kind="mergesort").head(1),
                  rule=FIG7_RULE, stands_for=(PAPER_FIG7,)).assign(figure="Fig 7, §4.2.2")
    f8 = featured(whole, cfg.featured_heads,
                  lambda ph: up.sort_values(by_de, ascending=[False, True, True], kind="mergesort")
                  .head(cfg.n_featured), rule=FIG8_RULE, stands_for=PAPER_FIG8).assign(figure="Fig 8, App. C")
    return pd.concat([f7, f8], ignore_index=True)[["figure", "layer", "head", "label", "direct_effect",
                                                    "reason", "stands_for"]]


def measure(cfg: Config, progress: bool = True) -> NeuronsChapter:
    check(cfg)
    model = open_model(cfg)
    pinned = cfg.fig7_head and cfg.featured_heads
    if pinned:  # the paper's heads: no sweep needed to choose them
        labels = [cfg.fig7_head, *cfg.featured_heads]
        heads = pd.DataFrame([{"figure": "Fig 7, §4.2.2" if i == 0 else "Fig 8, App. C", "label": l,
                               "layer": parse_head(l)[0], "head": parse_head(l)[1],
                               "reason": "pinned by the parameters", "stands_for": ""}
                              for i, l in enumerate(labels)])
    else:
        heads = choose(cfg, head_sweep(cfg, cfg.ablation, progress=progress).per_head(), model)
    pairs = tuple(sorted({(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])}))
    spec = nr.NeuronSpec(heads=pairs, ablation=cfg.ablation, top_percent=cfg.top_percent)
    res = cached(cfg, spec, open_tokens(cfg, model, progress=progress), progress=progress)
    ch = NeuronsChapter(res, nr.summary(res), heads, heads["label"].iloc[0],
                        list(heads[heads["figure"] != "Fig 7, §4.2.2"]["label"]), [], dict(res.meta))
    ch.verdicts = verdicts(ch)
    return ch


def per_token(ch: NeuronsChapter) -> dict[str, np.ndarray]:
    """The per-token evidence behind the claims: ``anti_erasure`` (Fig 7 head's mlp_repair tokens),
    ``top1_tenth`` and ``erasure_excess`` (the Fig 8 heads' top-k% tokens with DE > 0) and
    ``in_top10`` (the Fig 7 head's self_repair tokens x neurons)."""
    res = ch.result
    f7 = ch.fig7_instances
    index = {head_label(l, h): i for i, (l, h) in enumerate(res.heads)}
    top1, excess = [], []
    for label in ch.fig8:
        i = index[label]
        de, clean, delta = (res.get("direct_effect", q)[i] for q in ("direct_effect", "clean", "delta"))
        keep = de > 0
        top1.append((delta[keep].max(-1).values / de[keep] >= 0.1).numpy())
        t = delta.topk(min(10, delta.shape[-1]), -1)
        rep = t.values > 0
        neg = clean.gather(-1, t.indices) < 0
        share = ((neg & rep).sum(-1) / rep.sum(-1).clamp_min(1)).double()
        excess.append((share - (clean < 0).double().mean(-1))[rep.any(-1)].numpy())
    delta = res.get("self_repair", "delta")[index[ch.fig7]]
    in_top10 = torch.zeros_like(delta, dtype=torch.bool).scatter_(
        -1, delta.topk(min(10, delta.shape[-1]), -1).indices, True)
    return {"anti_erasure": ((f7["neuron_clean_de"] < 0) & (f7["neuron_ablated_de"] > f7["neuron_clean_de"])).to_numpy(),
            "top1_tenth": np.concatenate(top1) if top1 else np.zeros(0, bool),
            "erasure_excess": np.concatenate(excess) if excess else np.zeros(0),
            "in_top10": in_top10.numpy()}


def verdicts(ch: NeuronsChapter) -> list[Verdict]:
    s = ch.summary.set_index("label")
    f7, f8 = s.loc[ch.fig7], s.loc[[l for l in ch.fig8 if l in s.index]]
    ev = per_token(ch)
    freq = ev["in_top10"].mean(0) if len(ev["in_top10"]) else np.zeros(1)
    lo, hi = bootstrap(ev["in_top10"], lambda a: a.mean(0).max())
    return [
        Verdict.share(FIG7, ev["anti_erasure"], f"tokens where {ch.fig7} is repaired most by the last MLP layer",
                      f"On {f7['layer_positive']:.0%} of {ch.fig7}'s top tokens the whole layer's clean "
                      "direct effect is positive (the paper: frequently extremely positive)."),
        Verdict.share(SPARSE, ev["top1_tenth"], "(head, token) pairs of the Fig 8 heads",
                      "Half of the layer's absolute change sits in "
                      + ", ".join(f"{int(r.neurons_50)} of {int(r.d_mlp)} neurons for {l}" for l, r in f8.iterrows())
                      + "."),
        Verdict.mean(ERASURE, ev["erasure_excess"], "(head, token) pairs of the Fig 8 heads",
                     "Erasure neurons carry " + ", ".join(f"{r.erasure_repair_share:.0%} ({l})"
                                                          for l, r in f8.iterrows()) + " of the positive ΔDE."),
        Verdict(VARIES, float(freq.max()), len(ev["in_top10"]), f"tokens where {ch.fig7} is self-repaired most",
                f"The most frequent one is neuron {int(freq.argmax())}.", lo, hi),
    ]


def on_this_model(ch: NeuronsChapter) -> str:
    m = ch.meta
    intro = (f"**On {m.get('model')}** (MLP layer {ch.result.neuron_layer} with {m.get('d_mlp')} neurons, "
             f"{m.get('ablation')} ablation, top {m.get('top_percent'):g}% tokens = {m.get('k')} per head "
             f"and selection{', capped by max_instances: the highest of them' if m.get('capped') else ''}; "
             f"Fig 7 head {ch.fig7}, Fig 8 heads {', '.join(ch.fig8)}).")
    return render(ch.verdicts, intro)


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter."""
    from ..structure import architecture

    model = open_model(cfg)
    a = architecture(model)
    lines = ["- **Which heads feed the last MLP layer.** " + (
        "The blocks are parallel-residual: the last layer's heads do not feed the last MLP layer, so "
        f"the Fig 7 head comes from layer {nr.last_upstream_layer(model)}." if a["parallel"] else
        "The blocks are sequential: the last layer's heads feed the last MLP layer too.")]
    if a["sandwich"]:
        lines.append("- **The MLP's write is normalized.** It passes through a post-feedforward norm. "
                     "Neuron direct effects use that norm's clean scale, so they add up to the layer's "
                     "ΔDE at the clean scale; the part of the repair that comes from the norm's scale "
                     "changing is no neuron's (chapter 2 counts it as `from_block_norms`).")
    return "\n".join(lines)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
HEADS_TABLE = Layout(("figure", "label", "direct_effect", "reason", "stands_for"))
SUMMARY_TABLE = Layout(("label", "direct_effect", "self_repair", "layer_positive", "neurons_50", "d_mlp",
                        "erasure_repair_share", "negative_baseline", "max_top_frequency"),
                       percent=("layer_positive", "erasure_repair_share", "negative_baseline",
                                "max_top_frequency"),
                       names={"layer_positive": "layer's clean DE > 0", "neurons_50": "neurons for half",
                              "d_mlp": "neurons", "erasure_repair_share": "repair by erasure neurons",
                              "negative_baseline": "neurons with DE < 0",
                              "max_top_frequency": "most frequent in top 10"})
