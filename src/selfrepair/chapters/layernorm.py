"""Chapter 2 — LayerNorm self-repair (self-repair paper §3, App. A, B, D, H; Fig 4-6, 9, 10, 15-17).

Heads: the paper's Fig 4 uses Pythia-160M L11H2 and Fig 5 L11H10 (its caption says L11H0), both
chosen by eye ("demonstrates this phenomena well", "selected as it shows our point well"); App. D's
Fig 15 is captioned "ablating L11H0 of Pythia-160m". The ``paper`` profile pins all three
(``ratio_head``, ``ablation_head``, ``fig15_head``); on other models Fig 4 and Fig 5 use the
last-layer head with the largest mean top-k% direct effect, and Fig 15 the Fig 5 head.
App. D (Fig 16-17) repeats Fig 4's procedure on GPT-2 small's L11H10 and L11H3: ``ratio_heads``
runs it for any list of heads (the ``appendix_d`` profile pins those two on GPT-2 small); by
default on the ratio head and the next two last-layer heads by mean top-k% direct effect
(:data:`APP_D_RULE`). It is the same computation as Fig 4 (:func:`selfrepair.layernorm.head_tokens`,
:func:`~selfrepair.layernorm.ratio_summary`, one cached mean / zero run over all the chapter's heads).
Measured on the 2-core machine on 2026-12-01 (embedded Gemma-3-270M, 8,192 tokens, other jobs
sharing the CPU): mean + zero for three last-layer heads took 186 s against 215 s for one — the
clean passes dominate and a last-layer head's ablated pass runs one block, so the two extra heads
cost no measurable time.

Frozen-norm ablation (§3's opening experiment, §5.2's "freezing LayerNorm while ablating"): every
head of the late half of the layers (:data:`FROZEN_RULE`; where the paper finds self-repair, and
what the ``cpu`` profile's time budget allows) is ablated twice more, with the norms frozen and
with everything downstream frozen but the norms (:mod:`selfrepair.frozen_norm`). Measured on the
2-core machine on 2026-12-01 (embedded Gemma-3-270M, 18 layers of 4 heads): both passes for the 36
late heads cost 0.56x the live ablation of all 72 heads on the same rows (4 rows, heavily loaded
machine), and 0.35x the whole cached sweep on 1,024 tokens — about 2-4 minutes on the ``cpu``
profile, whose sweep is about 6 minutes. All 72 heads would cost about 2.1x the sweep (a head in
layer ``l`` runs ``n_layers - l`` blocks), some 12 more minutes, past the book's 25-minute budget.

Tokens: the heads' top-k% tokens by direct effect (Fig 4, 5, 6, 10 — "filtering for the top 2% of
tokens according to direct effect") and the uniform sample of all tokens (Fig 9's unclipped view and
App. D's residual-norm ratios, "without filtering").

Claims: :mod:`selfrepair.chapters.layernorm_claims` (every last-layer head for S/S′ and App. H, so
all of them are mean- and zero-ablated beside the figures' heads; every late head for the norm share
and the norms-only repair; a cluster bootstrap over the documents). App. B's check runs on the first
rows of the token set that hold :data:`~selfrepair.chapters.layernorm_claims.CHECK_CLUSTERS` documents,
``batch_size`` rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import frozen_norm as fz
from .. import layernorm as ln
from ..claims import Verdict, render, render_claim
from ..config import CorpusConfig, parse_head
from ..errors import InputError
from ..existence import clusters_of, sweep_frames
from ..experiment import head_sweep, measure as cached, open_model, open_tokens
from ..heads import HeadsSpec
from ..models import load_model
from ..results import head_label
from ..structure import late_start, span
from ..tables import Layout
from ..verdict_records import recorded
from . import check, value_bias_note
from .layernorm_claims import (APP_B, APP_H, CHECK_CLUSTERS, CLAIMS, NORMS_ONLY, RATIO, SHARE,  # noqa: F401
                               Evidence, evidence, verdicts)
from .layernorm_text import (APP_D_TABLE, FIGURES, FROZEN_RULE, app_d_markdown, findings,  # noqa: F401 (the notebook's)
                             frozen_markdown, other_readings, shows)

PAPER_HEADS = {"ratio_head": "L11H2", "ablation_head": "L11H10",  # Pythia-160M, Fig 4 and Fig 5
               "fig15_head": "L11H0"}  # Fig 15's caption
HEAD_RULE = "the last-layer head with the largest mean top-k% direct effect"
APP_D_HEADS = ("L11H10", "L11H3")  # GPT-2 small, App. D Fig 16 and 17
APP_D_RULE = "the ratio head, then the last-layer heads with the next largest mean top-k% direct effects"
N_APP_D = 3  # heads of the default App. D rule (cheap: a last-layer head's passes run one block)

@dataclass(frozen=True)
class Config(CorpusConfig):
    ratio_head: str | None = None  # Fig 4 and App. H's head (the paper: L11H2); None: the stand-in rule
    ablation_head: str | None = None  # Fig 5 and App. D's head (the paper: L11H10); None: as ratio_head
    ratio_heads: tuple[str, ...] | None = None  # App. D Fig 16–17: Fig 4 for these heads (the paper: L11H10, L11H3 of GPT-2 small); None: APP_D_RULE
    fig15_head: str | None = None  # App. D Fig 15's head (the paper's caption: L11H0 of Pythia-160M); None: the Fig 5 head
    n_boot: int = 1000  # cluster-bootstrap replicates of every interval (documents resampled)

    HEAD_FIELDS = ("ratio_head", "ablation_head", "ratio_heads", "fig15_head")

    def validate(self) -> None:
        super().validate()
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")


def figure_heads(cfg: Config, per_head: pd.DataFrame) -> tuple[tuple[int, int], ...]:
    """``(ratio head, ablation head, Fig 15 head)``: pinned by ``ratio_head`` / ``ablation_head`` /
    ``fig15_head``, or the stand-in (Fig 15: the ablation head)."""
    ratio = parse_head(cfg.ratio_head) if cfg.ratio_head else stand_in(per_head)
    abl = parse_head(cfg.ablation_head) if cfg.ablation_head else ratio
    return ratio, abl, parse_head(cfg.fig15_head) if cfg.fig15_head else abl


def stand_in(per_head: pd.DataFrame) -> tuple[int, int]:
    """:data:`HEAD_RULE` (lowest head index on ties)."""
    return last_layer_ranking(per_head)[0]


def last_layer_ranking(per_head: pd.DataFrame) -> list[tuple[int, int]]:
    """The last layer's heads by mean top-k% direct effect, largest first (lower head on ties)."""
    last = per_head[per_head["layer"] == per_head["layer"].max()]
    rows = last.sort_values(["direct_effect", "head"], ascending=[False, True], kind="mergesort")
    return [(int(l), int(h)) for l, h in zip(rows["layer"], rows["head"])]


def ratio_heads(cfg: Config, per_head: pd.DataFrame, ratio: tuple[int, int]) -> list[tuple[int, int]]:
    """App. D's heads: ``ratio_heads`` if pinned, else :data:`APP_D_RULE` (:data:`N_APP_D` heads)."""
    if cfg.ratio_heads:
        return list(dict.fromkeys(parse_head(h) for h in cfg.ratio_heads))
    return ([ratio] + [h for h in last_layer_ranking(per_head) if h != ratio])[:N_APP_D]


@dataclass
class LayerNormChapter:
    """Everything chapter 2 shows."""

    heads: pd.DataFrame  # the figures' heads: figure, label, reason
    ratio_head: tuple[int, int]
    ablation_head: tuple[int, int]
    fig15_head: tuple[int, int]
    tokens: pd.DataFrame  # per token of both heads, three ablations (top-k% and sample)
    ratios: pd.DataFrame  # Fig 4 / App. H summary of the ratio head
    app_d: list  # App. D's heads (Fig 4's procedure for each)
    app_d_ratios: pd.DataFrame  # their summary, per head and ablation
    shares: pd.DataFrame  # norm share per head (Fig 9, 10)
    layers: pd.DataFrame  # layer means of the shares
    repair: pd.DataFrame  # the norms' self-repair in logits per head (Fig 6)
    check: pd.DataFrame  # App. B per token
    check_table: pd.DataFrame
    per_head: pd.DataFrame
    model: object
    verdicts: list
    meta: dict
    frozen: pd.DataFrame | None = None  # per late head: live, norms-frozen, norms-only self-repair
    evidence: Evidence | None = None  # per-cluster sums every interval resamples
    n_boot: int = 1000  # bootstrap replicates
    seed: int = 0  # of the replicates

    @property
    def ratio_tokens(self) -> pd.DataFrame:
        """Per-token rows of the Fig 4 head (three ablations)."""
        return self.tokens[self.tokens["label"] == head_label(*self.ratio_head)]

    @property
    def app_d_tokens(self) -> pd.DataFrame:
        """Per-token rows of App. D's heads (three ablations), in App. D's order (its table's)."""
        order = {head_label(*h): i for i, h in enumerate(self.app_d)}
        rows = self.tokens[self.tokens["label"].isin(order)]
        return rows.iloc[rows["label"].map(order).argsort(kind="stable")]

    @property
    def ablation_tokens(self) -> pd.DataFrame:
        """Per-token rows of the Fig 5 head (three ablations)."""
        return self.tokens[self.tokens["label"] == head_label(*self.ablation_head)]

    @property
    def fig15_tokens(self) -> pd.DataFrame:
        """Per-token rows of App. D's Fig 15 head (three ablations)."""
        return self.tokens[self.tokens["label"] == head_label(*self.fig15_head)]


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
def measure(cfg: Config, progress: bool = True, reference: bool = True) -> LayerNormChapter:
    """The shared resample sweep, the figures' heads under mean and zero ablation (cached), every
    head's norm share and the App. B check (here and on a tiny parallel-residual GPT-NeoX)."""
    check(cfg)
    sweep = head_sweep(cfg, "resample", progress=progress)
    per_head, top, sample = sweep_frames(sweep)
    ratio, abl, fig15 = figure_heads(cfg, per_head)
    app_d = ratio_heads(cfg, per_head, ratio)
    last = int(per_head["layer"].max())  # every last-layer head: the class S/S' is claimed of
    heads = tuple(sorted({ratio, abl, fig15, *app_d, *((last, int(h)) for h in per_head["head"].unique())}))
    model = open_model(cfg)
    data = open_tokens(cfg, model, progress=progress)
    runs = {a: cached(cfg, HeadsSpec(heads=heads, ablation=a), data, progress=progress)
            for a in ("mean", "zero")}
    tokens = pd.concat([ln.head_tokens(top, sample, h, runs) for h in heads], ignore_index=True)
    ratios = ln.ratio_summary(tokens[tokens["label"] == head_label(*ratio)])
    app_d_ratios = ln.ratio_summary(tokens[tokens["label"].isin([head_label(*h) for h in app_d])],
                                    order=[head_label(*h) for h in app_d])
    shares = ln.norm_share(top, sample)
    ref = ref_tokens = None
    if reference and not (model.parallel_residual and ratio[0] == model.n_layers - 1):
        ref = load_model("tiny-gpt_neox", dtype="float64")
        g = torch.Generator().manual_seed(cfg.seed)
        ref_tokens = torch.randint(0, ref.d_vocab, (4, 32), generator=g)
    clusters = clusters_of(sweep)
    rows = ln.check_rows(clusters, CHECK_CLUSTERS, max_rows=8 * cfg.batch_size)
    rows = rows if len(rows) >= 2 else np.arange(min(2, len(data)))
    b_check = ln.appendix_b(model, data.tokens[rows], ratio, ref, ref_tokens,
                            corrupt_tokens=data.corrupt_tokens[rows], batch_size=cfg.batch_size)
    fig = pd.DataFrame([
        {"figure": "Fig 4, App. H (S/S′)", "label": head_label(*ratio), "paper": PAPER_HEADS["ratio_head"],
         "reason": "pinned by ratio_head" if cfg.ratio_head else HEAD_RULE},
        {"figure": "Fig 5 (three ablations)", "label": head_label(*abl),
         "paper": PAPER_HEADS["ablation_head"],
         "reason": "pinned by ablation_head" if cfg.ablation_head else
         ("as ratio_head" if cfg.ratio_head else HEAD_RULE)},
        {"figure": "Fig 15, App. D (S′/S, three ablations)", "label": head_label(*fig15),
         "paper": PAPER_HEADS["fig15_head"],
         "reason": "pinned by fig15_head" if cfg.fig15_head else "as the Fig 5 head"}]
        + [{"figure": "App. D, Fig 16–17 (Fig 4's procedure)", "label": head_label(*h),
            "paper": f"{APP_D_HEADS[i]} (GPT-2 small)" if i < len(APP_D_HEADS) else "",
            "reason": "pinned by ratio_heads" if cfg.ratio_heads else APP_D_RULE} for i, h in enumerate(app_d)])
    late = tuple((l, h) for l in span(model.n_layers, "late") for h in range(model.n_heads))
    frozen = cached(cfg, fz.FrozenNormSpec(heads=late, ablation="resample"), data, progress=progress)
    ch = LayerNormChapter(fig, ratio, abl, fig15, tokens, ratios, app_d, app_d_ratios, shares,
                          ln.layer_shares(shares), ln.norm_repair(top), b_check,
                          ln.appendix_b_table(b_check), per_head, model, [], dict(sweep.meta),
                          fz.per_head(top, frozen), n_boot=cfg.n_boot, seed=cfg.seed)
    ch.evidence = evidence(clusters, model, tokens, top, b_check, rows, frozen.at(top))
    ch.verdicts = verdicts(ch)
    return ch


def on_this_model(ch: LayerNormChapter) -> str:
    m, cl = ch.meta, ch.evidence.clusters
    intro = (f"**On {m.get('model')}** (top {m.get('top_percent'):g}% tokens by direct effect, "
             f"{len(cl.of_row):,} rows from {cl.n:,} independent {cl.unit}; Fig 4's head "
             f"{head_label(*ch.ratio_head)}, Fig 5's {head_label(*ch.ablation_head)}). The claims about "
             f"S/S′ and App. H are tested on every last-layer head, the norm share and the norms-only repair "
             f"on every late-layer head; every interval is a 95% cluster bootstrap over the {cl.unit} "
             f"({ch.n_boot:,} replicates, seed {ch.seed}) that recomputes each head's statistic before "
             "the heads are averaged or counted.")
    return render(ch.verdicts, intro, rules="ch02-rules", below=FIGURES)


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes each head's direct effect, hence its top-k% tokens (Fig 4, 6, 10), the "
    "denominators of the norm shares (Fig 9, 10) and every zero-ablation number (Fig 5, 15); "
    "resample and mean Δlogit are the same either way.")


def verdict(ch: LayerNormChapter, key: str) -> str:
    """Claim ``key``'s full verdict, which the notebook shows right after the figure
    :data:`FIGURES` names for it (the overview of :func:`on_this_model` links down to it)."""
    return render_claim(ch.verdicts, key, rules="ch02-rules")


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter."""
    from ..structure import architecture

    a = architecture(open_model(cfg))
    lines = [f"- **The final norm is {a['norm']}.** " + (
        "S′/S is the ratio of the mean-centred residuals' norms." if a["norm"] == "LayerNorm" else
        "S′/S is the ratio of the residual norms ‖r′‖/‖r‖, up to the norm's ε.")]
    lines.append("- **Appendix B applies here.** The blocks are parallel-residual, so a last-layer head "
                 "has nothing downstream but the final norm." if a["parallel"] else
                 "- **Appendix B does not apply here.** The blocks are sequential, so even a last-layer "
                 "head is followed by an MLP; the tiny parallel-residual model shows where it holds.")
    if a["sandwich"]:
        lines.append("- **Norms on each block's write.** This model normalizes what attention and the "
                     "MLP write (post-attention and post-feedforward norms). Their scale changes are a "
                     "separate term of eq. 2, the block norms', shown beside the final norm in the share "
                     "charts and never folded into \"LayerNorm\".")
    lines.append(value_bias_note(cfg, VALUE_BIAS))
    return "\n".join(lines)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
HEADS_TABLE = Layout(("figure", "label", "paper", "reason"))
RATIOS_TABLE = Layout(("ablation", "share_ratio_above_1", "median_ratio", "median_abs_boost",
                       "median_direct_effect"), percent=("share_ratio_above_1",),
                      names={"share_ratio_above_1": "S/S′ > 1", "median_ratio": "median S/S′",
                             "median_abs_boost": "median |boost|", "median_direct_effect": "median DE"},
                      caption="Fig 4's head on its top-k% tokens (S/S′ > 1: the share of them)")
# five short columns fit a phone; the head, the token counts and the absolute errors are one click away
CHECK_TABLE = Layout(("case", "ablation", "relative_error", "max_left_out_term"),
                     names={"case": "model, head", "relative_error": "error / |Δlogit|",
                            "max_left_out_term": "largest left-out"},
                     caption="The closed form's mean |error| relative to the mean |Δlogit| (what the "
                             "verdict reads), and the largest term it leaves out, in logits")
