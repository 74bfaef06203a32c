"""Chapter 2 — LayerNorm self-repair (self-repair paper §3, App. A, B, D, H; Fig 4-6, 9, 10, 15-17).

Heads: the paper's Fig 4 uses Pythia-160M L11H2 and Fig 5 L11H10 (its caption says L11H0, as does
Fig 15's), both chosen by eye ("demonstrates this phenomena well", "selected as it shows our point
well"). The ``paper`` profile pins them (``ratio_head``, ``ablation_head``); on other models both
figures use the last-layer head with the largest mean top-k% direct effect, standing in for both.
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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import frozen_norm as fz
from .. import layernorm as ln
from ..claims import Claim, Verdict, above, at_least, between, below, bootstrap, render
from ..config import CorpusConfig, parse_head
from ..existence import sweep_frames
from ..experiment import head_sweep, measure as cached, open_model, open_tokens
from ..heads import HeadsSpec
from ..models import load_model
from ..results import head_label
from ..structure import late_start, span
from ..tables import Layout
from . import check
from .layernorm_text import APP_D_TABLE, FROZEN_RULE, app_d_markdown, frozen_markdown  # noqa: F401 (the notebook's)

PAPER_HEADS = {"ratio_head": "L11H2", "ablation_head": "L11H10"}  # Pythia-160M, Fig 4 and Fig 5
HEAD_RULE = "the last-layer head with the largest mean top-k% direct effect"
APP_D_HEADS = ("L11H10", "L11H3")  # GPT-2 small, App. D Fig 16 and 17
APP_D_RULE = "the ratio head, then the last-layer heads with the next largest mean top-k% direct effects"
N_APP_D = 3  # heads of the default App. D rule (cheap: a last-layer head's passes run one block)

RATIO = {a: Claim(f"ratio_{a}", f"On a head's top tokens the ablated residual is smaller, S/S′ > 1 "
                  f"({a} ablation)", "§3.2, Fig 4", "the share of the ratio head's top-k% tokens "
                  "with S/S′ > 1", at_least(0.5), paper=p,
                  paper_context="Pythia-160M L11H2", fmt=".1%",
                  reading="The ablation shrinks the residual stream, so the final norm amplifies every "
                          "logit, on {value} of the {n} {unit}.")
         for a, p in (("resample", 0.9066), ("mean", 0.9875), ("zero", 1.0))}
SHARE = Claim("norm_share", "LayerNorm explains around 30% of a head's direct effect across many layers",
              "§3.2, Fig 6/10", "the final norm's clipped per-token share of direct effect "
              "(from_norm / DE, clipped to [0, 1], top-k% tokens), averaged over the late-layer heads",
              between(0.15, 0.45), paper=0.30, paper_context="several models, top 2% tokens", fmt=".0%",
              reading="On average over the {n} {unit}, the final norm's rescaling alone gives back "
                      "{value} of a head's direct effect (per token, clipped to [0, 1]).")
APP_B = Claim("appendix_b", "For a last-layer head of a parallel-attention model, "
              "Δlogit = (S/S′ − 1)·logit + (S/S′)·ΔDE", "§3.1, App. B",
              "the closed form's mean absolute error relative to mean |Δlogit| on one batch",
              below(1e-3), fmt=".1e",
              reading="The closed form misses the real Δlogit by {value} of its size, over {n} {unit}.")
APP_H = Claim("appendix_h", "Even a ratio near 1 moves a logit by a nontrivial fraction of a direct "
              "effect", "App. H", "the median |(S/S′ − 1)·(logit − logit of the strongest other token)| "
              "over the ratio head's top-k% tokens (resample), relative to their median direct effect",
              at_least(0.05), fmt=".1%",
              reading="The norm's rescaling alone moves the correct token against its strongest "
                      "competitor by {value} of a typical direct effect (medians over {n} {unit}).")
NORMS_ONLY = Claim("norms_only", "With every downstream component frozen except the norm, the norm "
                   "alone still recovers part of a head's direct effect", "§3",
                   "per late-layer head, the mean norms-only self-repair over its top-k% tokens "
                   "divided by its mean direct effect there, averaged over the heads",
                   above(0.0), fmt=".1%",
                   reading="With only the norms live, they give back {value} of a head's direct "
                           "effect on average over the {n} {unit}.")


@dataclass(frozen=True)
class Config(CorpusConfig):
    ratio_head: str | None = None  # Fig 4 and App. H's head (the paper: L11H2); None: the stand-in rule
    ablation_head: str | None = None  # Fig 5 and App. D's head (the paper: L11H10); None: as ratio_head
    ratio_heads: tuple[str, ...] | None = None  # App. D Fig 16-17: Fig 4 for these heads (the paper: L11H10, L11H3 of GPT-2 small); None: APP_D_RULE

    HEAD_FIELDS = ("ratio_head", "ablation_head", "ratio_heads")


def figure_heads(cfg: Config, per_head: pd.DataFrame) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(ratio head, ablation head)``: pinned by ``ratio_head`` / ``ablation_head`` or the stand-in."""
    ratio = parse_head(cfg.ratio_head) if cfg.ratio_head else stand_in(per_head)
    return ratio, parse_head(cfg.ablation_head) if cfg.ablation_head else ratio


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
    tokens: pd.DataFrame  # per token of both heads, three ablations (top-k% and sample)
    ratios: pd.DataFrame  # Fig 4 / App. H summary of the ratio head
    app_d: list  # App. D's heads (Fig 4's procedure for each)
    app_d_ratios: pd.DataFrame  # their summary, per head and ablation
    shares: pd.DataFrame  # norm share per head (Fig 6, 9, 10)
    layers: pd.DataFrame  # layer means of the shares
    check: pd.DataFrame  # App. B per token
    check_table: pd.DataFrame
    per_head: pd.DataFrame
    model: object
    verdicts: list
    meta: dict
    frozen: pd.DataFrame | None = None  # per late head: live, norms-frozen, norms-only self-repair

    @property
    def ratio_tokens(self) -> pd.DataFrame:
        """Per-token rows of the Fig 4 head (three ablations)."""
        return self.tokens[self.tokens["label"] == head_label(*self.ratio_head)]

    @property
    def app_d_tokens(self) -> pd.DataFrame:
        """Per-token rows of App. D's heads (three ablations)."""
        return self.tokens[self.tokens["label"].isin([head_label(*h) for h in self.app_d])]

    @property
    def ablation_tokens(self) -> pd.DataFrame:
        """Per-token rows of the Fig 5 / App. D head (three ablations)."""
        return self.tokens[self.tokens["label"] == head_label(*self.ablation_head)]


def measure(cfg: Config, progress: bool = True, reference: bool = True) -> LayerNormChapter:
    """The shared resample sweep, the figures' heads under mean and zero ablation (cached), every
    head's norm share and the App. B check (here and on a tiny parallel-residual GPT-NeoX)."""
    check(cfg)
    sweep = head_sweep(cfg, "resample", progress=progress)
    per_head, top, sample = sweep_frames(sweep)
    ratio, abl = figure_heads(cfg, per_head)
    app_d = ratio_heads(cfg, per_head, ratio)
    heads = tuple(sorted({ratio, abl, *app_d}))
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
    rows = slice(0, max(2, min(cfg.batch_size, len(data))))
    b_check = ln.appendix_b(model, data.tokens[rows], ratio, ref, ref_tokens,
                            corrupt_tokens=data.corrupt_tokens[rows])
    fig = pd.DataFrame([
        {"figure": "Fig 4, App. H (S/S′)", "label": head_label(*ratio), "paper": PAPER_HEADS["ratio_head"],
         "reason": "pinned by ratio_head" if cfg.ratio_head else HEAD_RULE},
        {"figure": "Fig 5, App. D (three ablations)", "label": head_label(*abl),
         "paper": PAPER_HEADS["ablation_head"],
         "reason": "pinned by ablation_head" if cfg.ablation_head else
         ("as ratio_head" if cfg.ratio_head else HEAD_RULE)}]
        + [{"figure": "App. D, Fig 16–17 (Fig 4's procedure)", "label": head_label(*h),
            "paper": f"{APP_D_HEADS[i]} (GPT-2 small)" if i < len(APP_D_HEADS) else "",
            "reason": "pinned by ratio_heads" if cfg.ratio_heads else APP_D_RULE} for i, h in enumerate(app_d)])
    late = tuple((l, h) for l in span(model.n_layers, "late") for h in range(model.n_heads))
    frozen = cached(cfg, fz.FrozenNormSpec(heads=late, ablation="resample"), data, progress=progress)
    ch = LayerNormChapter(fig, ratio, abl, tokens, ratios, app_d, app_d_ratios, shares, ln.layer_shares(shares), b_check,
                          ln.appendix_b_table(b_check), per_head, model, [], dict(sweep.meta),
                          fz.per_head(top, frozen))
    ch.verdicts = verdicts(ch)
    return ch


def verdicts(ch: LayerNormChapter) -> list[Verdict]:
    r = ch.ratios.set_index("ablation")
    top = ch.ratio_tokens[ch.ratio_tokens["tokens"] == "top-k%"]
    out = [Verdict.share(RATIO[a], top[top["ablation"] == a]["ratio"] > 1,
                         f"top-k% tokens of {head_label(*ch.ratio_head)}")
           for a in ln.ABLATION_ORDER if a in r.index]
    first = late_start(ch.model.n_layers)
    clipped = ch.shares[(ch.shares["tokens"] == "top-k%") & (ch.shares["clipping"] == "clipped")]
    final = clipped[clipped["component"] == "final norm"]
    late = final[final["layer"] >= first]
    block = clipped[(clipped["component"] == "block norms") & (clipped["layer"] >= first)]
    detail = f"Over every layer's heads it is {final['share'].mean():.0%}."
    if len(block):
        detail += (f" This model's sandwich (post-attention / post-feedforward) norms, which the "
                   f"paper's models do not have, give back a further {block['share'].mean():.0%}.")
    out.append(Verdict.mean(SHARE, late["share"], "late-layer heads", detail))
    t = ch.check_table
    here, ref = t[t["role"] == "this model"], t[t["role"] == "reference"]
    applies = bool(ch.model.parallel_residual and here["last_layer"].all())
    why, detail = "", ""
    if not applies:
        why = ("its assumption fails: the head is not in the last layer, so later layers also respond"
               if not here["last_layer"].all() else "its assumption fails: the block is sequential, so "
               "the last MLP" + (" and the sandwich norms" if ch.model.sandwich else "") + " also respond")
        detail = (f"The error is the size of the terms the formula leaves out (largest "
                  f"{here['max_left_out_term'].max():.3g} logits).")
    if len(ref):
        detail += (f" On {ref['model'].iloc[0]} (parallel residual, last-layer head), where it applies, "
                   f"the error is {ref['relative_error'].max():.1e}.")
    # exact: the same tokens give the same error, there is no sampling to put an interval on
    out.append(Verdict(APP_B, float(here["relative_error"].max()), int(here["n"].sum()),
                       "token-ablations", detail.strip(), why=why))
    if ch.frozen is not None:
        f = ch.frozen[ch.frozen["direct_effect"] > 0]
        out.append(Verdict.mean(NORMS_ONLY, f["self_repair_norms_only"] / f["direct_effect"],
                                "late-layer heads with a positive direct effect",
                                f"With the norms frozen instead, the mean self-repair of these heads is "
                                f"{f['self_repair_frozen'].mean():+.3g} logits, against "
                                f"{f['self_repair'].mean():+.3g} live."))
    g = top[top["ablation"] == "resample"]
    if len(g) and g["direct_effect"].median() > 0:
        pairs = np.c_[ln.relative_boost(g["ratio"], g["competitor_gap"]).abs(), g["direct_effect"]]
        lo, hi = bootstrap(pairs, lambda a: np.median(a[:, 0]) / np.median(a[:, 1]))
        out.append(Verdict(APP_H, float(np.median(pairs[:, 0]) / np.median(pairs[:, 1])), len(g),
                           "top-k% tokens", f"The median ratio S/S′ is {g['ratio'].median():.3f} and the "
                           f"median gap between the correct token's logit and its strongest competitor's "
                           f"{g['competitor_gap'].median():+.2f} logits.", lo, hi))
    return out


def on_this_model(ch: LayerNormChapter) -> str:
    m = ch.meta
    intro = (f"**On {m.get('model')}** (ratio head {head_label(*ch.ratio_head)}, ablation head "
             f"{head_label(*ch.ablation_head)}; top {m.get('top_percent'):g}% tokens by direct effect).")
    return render(ch.verdicts, intro)


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
                     "separate term, `from_block_norms`, shown beside the final norm in the share "
                     "charts and never folded into \"LayerNorm\".")
    return "\n".join(lines)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
HEADS_TABLE = Layout(("figure", "label", "paper", "reason"))
RATIOS_TABLE = Layout(("ablation", "label", "n", "share_ratio_above_1", "median_ratio", "median_abs_boost",
                       "median_direct_effect"), percent=("share_ratio_above_1",),
                      names={"share_ratio_above_1": "tokens with S/S′ > 1", "median_ratio": "median S/S′",
                             "median_abs_boost": "median |boost|", "median_direct_effect": "median DE"})
CHECK_TABLE = Layout(("role", "model", "label", "parallel_residual", "ablation", "n", "max_abs_error",
                      "mean_abs_error", "max_left_out_term"),
                     names={"max_abs_error": "largest |error|", "mean_abs_error": "mean |error|",
                            "max_left_out_term": "largest left-out term"})
