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

Claims: :mod:`selfrepair.chapters.neurons_claims` (every measured head of each figure, a cluster
bootstrap over the documents, neurons picked on one half and tested on the other); erasure neurons
by their median clean direct effect on the distribution (:class:`selfrepair.erasure.NeuronBaselineSpec`:
one clean pass over the token set, per-row counts of negative neuron DEs and a uniform sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..ablation import check_ablation
from .. import neurons as nr
from .. import erasure as er
from ..claims import render, render_claim
from ..config import CorpusConfig, parse_head
from ..errors import InputError
from ..existence import whole_set_means
from ..experiment import head_sweep, measure as cached, open_model, open_tokens
from ..findings import Figure, Finding, markdown, shows as _shows
from ..results import head_label
from ..tables import Layout
from ..uncertainty import Clusters
from ..verdict_records import recorded
from . import check, featured, value_bias_note
from .neurons_claims import CLAIMS, ERASURE, FIG7, FIG8_QUOTED, SPARSE, VARIES, verdicts  # noqa: F401

SPARSE_LEVEL = FIG8_QUOTED["percent"]  # Fig 8: a neuron repairing 10% of the head's direct effect

PAPER_FIG7 = "L10H11"  # Pythia-160M
PAPER_FIG8 = ("L7H8",)  # Pythia-160M (Fig 8 and Fig 13; the other three models' heads in the text)
FIG7_RULE = ("the head with the largest whole-set mean direct effect in the last layer whose heads "
             "feed the final MLP layer")
FIG8_RULE = "the heads upstream of the final MLP layer with the largest whole-set mean direct effect"

@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # what replaces a head's output (the paper: resample)
    fig7_head: str | None = None  # Fig 7 / §4.2.2 head (the paper: L10H11); None: by the paper's criterion
    featured_heads: tuple[str, ...] | None = None  # Fig 8 / App. C heads (the paper: L7H8); None: by the criterion
    n_featured: int = 3  # Fig 8 heads chosen when featured_heads is None
    n_boot: int = 1000  # cluster-bootstrap replicates of every interval (documents resampled)

    HEAD_FIELDS = ("fig7_head", "featured_heads")

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_featured < 1:
            raise InputError(f"n_featured must be at least 1, got {self.n_featured}")
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")


def check_model(cfg: Config, model) -> None:
    """A dense MLP (mixture-of-experts models are refused); pinned heads must feed the last MLP
    layer (its neurons are what this chapter measures)."""
    nr.check_dense_mlp(model)
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
    baseline: er.NeuronBaseline | None = None  # each neuron's clean DE on the distribution (App. C)
    evidence: er.Evidence | None = None  # per-cluster sums every interval resamples
    n_boot: int = 1000  # bootstrap replicates
    seed: int = 0  # of the replicates and of the selection / test split

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

    def _on_distribution(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``median_clean_de`` of each neuron over the uniform sample of every token (App. C: "its
        median clean direct effect on the distribution"), not over the head's selected tokens."""
        if self.baseline is None:
            return frame
        return frame.assign(median_clean_de=self.baseline.medians().numpy()[frame["neuron"].to_numpy()])

    @property
    def cumulative(self) -> pd.DataFrame:
        """App. C Fig 11-14, the Fig 8 heads (neurons coloured by their median on the distribution)."""
        return self._on_distribution(self._only(nr.cumulative(self.result), self.fig8))

    @property
    def top_frequency(self) -> pd.DataFrame:
        """§4.2.2: the Fig 7 head's most self-repaired tokens."""
        return self._on_distribution(self._only(nr.top_frequency(self.result), [self.fig7]))


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


def spec(cfg: Config, heads: tuple[tuple[int, int], ...]) -> nr.NeuronSpec:
    """The neurons' measurement for ``heads``: every one of each head's top ``top_percent``% tokens
    (the paper's 2%, no cap), per selection."""
    return nr.NeuronSpec(heads=heads, ablation=cfg.ablation, top_percent=cfg.top_percent)


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
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
    data = open_tokens(cfg, model, progress=progress)
    res = cached(cfg, spec(cfg, pairs), data, progress=progress)
    baseline = cached(cfg, er.NeuronBaselineSpec(neuron_layer=res.neuron_layer, seed=cfg.seed), data,
                      progress=progress)
    fig8 = list(heads[heads["figure"] != "Fig 7, §4.2.2"]["label"])
    ch = NeuronsChapter(res, nr.summary(res), heads, heads["label"].iloc[0], fig8, [], dict(res.meta),
                        baseline, n_boot=cfg.n_boot, seed=cfg.seed)
    ch.evidence = chapter_evidence(ch, Clusters.of_tokens(data.main_document, len(data)))
    ch.verdicts = verdicts(ch)
    return ch


def chapter_evidence(ch: NeuronsChapter, clusters: Clusters) -> er.Evidence:
    """:func:`selfrepair.erasure.evidence` of the chapter's result, its Fig 8 heads and the
    :data:`~selfrepair.chapters.neurons_claims.SPARSE` level (a tenth of the direct effect)."""
    labels = [head_label(*h) for h in ch.result.heads]
    return er.evidence(ch.result, ch.baseline, clusters, [labels.index(l) for l in ch.fig8],
                       SPARSE_LEVEL)


def on_this_model(ch: NeuronsChapter) -> str:
    m = ch.meta
    kept = sum(v.nbytes for v in ch.result.data.values()) / 1e9
    intro = (f"**On {m.get('model')}** (MLP layer {ch.result.neuron_layer} with {m.get('d_mlp'):,} neurons, "
             f"{m.get('ablation')} ablation; each head keeps its top {m.get('top_percent'):g}% of tokens for "
             f"each token selection, {m.get('k')} tokens"
             f"{' (capped by max_instances: the highest ones)' if m.get('capped') else ''}; "
             f"{kept:.2g} GB of neuron vectors kept; "
             f"Fig 7 head {ch.fig7}, Fig 8 heads {', '.join(ch.fig8)}).")
    cl = ch.evidence.clusters
    intro += (f" The kept tokens come from {len(cl.of_row):,} rows of {cl.n:,} independent {cl.unit}; every "
              f"interval is a 95% cluster bootstrap over them ({ch.n_boot:,} replicates, seed {ch.seed}) "
              "that recomputes each head's shares before they are averaged, and a neuron is an erasure "
              "neuron when its median clean direct effect over every token of the run is negative.")
    return render(ch.verdicts, intro, rules="ch03-rules", below=FIGURES)


def verdict(ch: NeuronsChapter, key: str) -> str:
    """Claim ``key``'s full verdict, which the notebook shows right after the figure
    :data:`FIGURES` names for it (the overview of :func:`on_this_model` links down to it)."""
    return render_claim(ch.verdicts, key, rules="ch03-rules")


FIGURES = {"anti_erasure": Figure("ch03-fig7", "Fig 7"), "sparse": Figure("ch03-fig8", "Fig 8"),
           **dict.fromkeys(("erasure", "varies"), Figure("ch03-erasure", "the top-10 frequencies and erasure chart"))}


def findings(ch: NeuronsChapter) -> list[Finding]:
    """"What this chapter shows": where it ran, the claims by outcome, and the take-away (from
    :data:`FIG7`: is the last MLP layer's repair mostly anti-erasure on this model)."""
    m, cl, model = ch.meta, ch.evidence.clusters, str(ch.meta.get("model"))
    n_heads = len(ch.result.heads)
    where = Finding(f"This chapter ablated {n_heads} heads of {model} and read each of the {m.get('d_mlp'):,} "
                    f"neurons of its last MLP layer (layer {ch.result.neuron_layer}) on the selected tokens of "
                    f"{cl.n:,} independent {cl.unit}.", values=(n_heads, cl.n))
    anti = next(v for v in ch.verdicts if v.claim is FIG7)
    share = f"{anti.value:.0%}" if anti.value is not None and anti.value == anti.value else "n/a"
    if anti.holds:
        text = (f"Take-away: on this model the neuron that repairs most is mostly an erasure neuron erasing "
                f"less ({share} of the tokens where the layer repairs most): part of what looks like an MLP "
                "taking over an ablated head's job is the MLP no longer undoing it.")
    elif anti.holds is False:
        text = (f"Take-away: on this model the neuron that repairs most is an erasure neuron erasing less on "
                f"only {share} of the tokens where the layer repairs most, so the last MLP layer's repair "
                "here is mostly not anti-erasure.")
    else:
        text = (f"Take-away: this run cannot say whether the last MLP layer's repair is mostly anti-erasure "
                f"on this model ({share} of the tokens); a run on more tokens would narrow the interval.")
    values = (anti.value,) if share != "n/a" else ()
    return _shows(where, ch.verdicts, FIGURES, model, Finding(text, (FIGURES["anti_erasure"],), values))


def shows(ch: NeuronsChapter) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(ch))


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes each head's direct effect, hence its top-k% tokens (Fig 8, App. C) and the "
    "direct effect the neurons' repair is compared with; the neurons' own changes under "
    "resample ablation are the same either way.")


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
                     "changing is no neuron's (chapter 2 counts it in the block norms' term of eq. 2).")
    lines.append(value_bias_note(cfg, VALUE_BIAS))
    return "\n".join(lines)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
HEADS_TABLE = Layout(("figure", "label", "direct_effect", "reason", "stands_for"),
                     names={"direct_effect": "DE (mean over every token)"})
SUMMARY_TABLE = Layout(("label", "direct_effect", "self_repair", "layer_positive", "neurons_50", "d_mlp",
                        "erasure_repair_share", "negative_baseline", "max_top_frequency"),
                       # shares print as percentages, in the fold too (issue 25: "0.104" beside "78.5%")
                       percent=("layer_positive", "erasure_repair_share", "negative_baseline",
                                "max_top_frequency", "top1_fraction", "erasure_top", "fig7_anti_erasure"),
                       names={"layer_positive": "layer's clean DE > 0", "neurons_50": "neurons for half",
                              "d_mlp": "neurons", "erasure_repair_share": "repair by erasure neurons",
                              "negative_baseline": "neurons with DE < 0",
                              "max_top_frequency": "most frequent in top 10",
                              "direct_effect": "DE (mean over its top tokens)",
                              "self_repair": "self-repair (mean over its top tokens)",
                              # the fold's columns, in words (issue 25: "neurons 90", "erasure top")
                              "n_instances": "top tokens", "layer_delta": "MLP layer's ΔDE (mean)",
                              "top1_fraction": "top neuron's repair / head's DE (median)",
                              "erasure_top": "erasure neurons among the top 10 repairing",
                              "neurons_90": "neurons for 90%",
                              "fig7_anti_erasure": "Fig 7 tokens whose top neuron erases less",
                              "max_top_neuron": "most frequent top-10 neuron"},
                       # a phone: what the claims read (sparsity, erasure beside its baseline, recurrence)
                       phone=("label", "neurons_50", "erasure_repair_share", "negative_baseline", "max_top_frequency"))
