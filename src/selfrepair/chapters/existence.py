"""Chapter 1 — self-repair exists, imperfectly and noisily (self-repair paper §2.2-2.3, Fig 1-3).

The token sets follow the paper figure by figure:

- Fig 1 — each head's mean self-repair over **its top-k% tokens** by clean direct effect (§2.2: "the
  top 2% of tokens filtered by each head's direct effect");
- Fig 2 — each head's mean direct effect and Δlogit over **every token** (§2.2: "averaging these
  values across the whole dataset"); the regions and the bootstrap intervals of "imperfect" use
  these whole-set means;
- Fig 3 and the noise statistics — per token, over a **uniform sample** of the distribution
  (Fig 3: "5000 individual tokens in The Pile"), with the top-k% view beside it.

The featured heads of Fig 3 are the paper's four handpicked Pythia-410M heads when pinned
(``featured_heads``); otherwise they are chosen by what the paper says about them: two heads that
"appear to be self-repaired on average" (standing in for L22H11 and L20H6) and two with a
significant direct effect but "no clear correlation" between DE and Δlogit (for L23H1, L20H14).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..ablation import check_ablation
from .. import existence as ex
from ..claims import Claim, Verdict, at_least, render
from ..config import CorpusConfig
from ..errors import InputError
from ..experiment import head_sweep
from ..structure import late_start
from ..tables import Layout
from . import check, featured

PAPER_FIG3 = ("L22H11", "L20H6", "L23H1", "L20H14")  # Pythia-410M, handpicked (Fig 3)
FEATURED_RULE = ("two late-layer heads with the largest whole-set mean self-repair among those with "
                 "a positive direct effect (the paper's L22H11 and L20H6 'appear to be self-repaired on "
                 "average'), then two late-layer heads with a top-k% direct effect above the late median "
                 "and the weakest per-token DE–Δlogit correlation on the sample (L23H1 and L20H14: "
                 "'no clear correlation')")

MANY = Claim("many", "Many heads in later layers are self-repaired", "§2.2, Fig 1",
             "the share of late-layer heads whose mean self-repair on their top-k% tokens is positive",
             at_least(0.5), fmt=".0%",
             reading="{value} of the {n} {unit} lose less logit than their direct effect on the tokens "
                     "where they matter most (positive mean self-repair on their top-k% tokens).")
EXISTS = Claim("exists", "Across the whole distribution many heads fall between y = −x and the x-axis",
               "§2.2, Fig 2", "the share of heads with a positive whole-set mean direct effect that lie "
               "there (0 > Δlogit > −DE)", at_least(1 / 3), fmt=".0%",
               reading="Averaged over every token, {value} of the {n} {unit} sit between the line of no "
                       "repair and the line of perfect repair.")
IMPERFECT = Claim("imperfect", "Self-repair is imperfect: repaired heads still cost a noticeable "
                  "logit difference", "§2.2", "the share of those heads whose 95% bootstrap interval "
                  "of mean Δlogit (uniform sample) lies entirely below 0", at_least(0.5), fmt=".0%",
                  reading="For {value} of the {n} {unit}, removing the head measurably lowers the "
                          "correct token's logit (its 95% interval of mean Δlogit is below zero).")
NOISY = Claim("noisy", "Self-repair is noisy: many heads with a significant direct effect show no "
              "clear correlation between DE and Δlogit", "§2.3, Fig 3",
              "the share of late-layer heads with a top-k% direct effect above the late median whose "
              "per-token correlation of DE and Δlogit on the sample is weaker than −0.5 (r > −0.5)",
              at_least(0.25), fmt=".0%",
              reading="For {value} of the {n} {unit}, how much a token loses barely follows how much the "
                      "head contributed to it (a per-token correlation weaker than −0.5).")
CLAIMS = (MANY, EXISTS, IMPERFECT, NOISY)


@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # what replaces a head's output (the paper: resample)
    featured_heads: tuple[str, ...] | None = None  # Fig 3's heads, e.g. the paper's L22H11 ...; None: by the paper's criterion
    n_boot: int = 1000  # bootstrap resamples of each head's sampled tokens

    HEAD_FIELDS = ("featured_heads",)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")


def choose_featured(per_head: pd.DataFrame, sample_spread: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """Fig 3's stand-ins by the paper's descriptions (see :data:`FEATURED_RULE`); deterministic."""
    first = late_start(int(per_head["layer"].max()) + 1)
    late = per_head[per_head["layer"] >= first]
    order = ["layer", "head"]
    repaired = (late[late["direct_effect_all"] > 0]
                .sort_values(["self_repair_all", *order], ascending=[False, True, True], kind="mergesort")
                .head(n // 2))
    rest = late[~late["label"].isin(repaired["label"])]
    big = rest[rest["direct_effect"] >= late["direct_effect"].median()]
    r = big.merge(sample_spread[["layer", "head", "corr_de_delta_logit"]], on=order, how="left")
    r = r.assign(abs_r=r["corr_de_delta_logit"].abs().fillna(np.inf))
    uncorrelated = r.sort_values(["abs_r", *order], kind="mergesort").head(n - len(repaired))
    return pd.concat([repaired, uncorrelated[per_head.columns]], ignore_index=True)


@dataclass
class Existence:
    """Everything chapter 1 shows."""

    top: pd.DataFrame  # per head, top-k% means (Fig 1), classified
    whole: pd.DataFrame  # per head, whole-set means (Fig 2), classified
    top_tokens: pd.DataFrame  # per token, each head's top-k% tokens
    sample: pd.DataFrame  # per token, the uniform sample (same instances for every head)
    featured: pd.DataFrame  # Fig 3's heads with the reason they were chosen
    boot: pd.DataFrame  # per head, mean Δlogit over the sample with a bootstrap interval
    spread: pd.DataFrame  # per head, per-token noise statistics on the sample
    spread_top: pd.DataFrame  # the same on each head's top-k% tokens
    summary: pd.DataFrame  # regions of the whole-set means by layer group
    verdicts: list
    meta: dict


def measure(cfg: Config, progress: bool = True) -> Existence:
    """Chapter 1 from the (cached) all-heads sweep of ``cfg``."""
    check(cfg)
    sweep = head_sweep(cfg, cfg.ablation, progress=progress)
    per_head, top_tokens, sample = ex.sweep_frames(sweep)
    spread = ex.token_spread(sample)
    feat = featured(per_head, cfg.featured_heads, lambda ph: choose_featured(ph, spread),
                    rule=FEATURED_RULE, stands_for=PAPER_FIG3)
    boot = ex.bootstrap_means(sample, "delta_logit", n_boot=cfg.n_boot, seed=cfg.seed)
    whole = ex.classify_heads(ex.whole_set_means(per_head))
    top = ex.classify_heads(ex.top_means(per_head))
    result = Existence(top=top, whole=whole, top_tokens=top_tokens, sample=sample,
                       featured=feat[["layer", "head", "label", "reason", "stands_for"]], boot=boot,
                       spread=spread, spread_top=ex.token_spread(top_tokens),
                       summary=ex.imperfection_summary(ex.whole_set_means(per_head), boot),
                       verdicts=[], meta=dict(sweep.meta))
    result.verdicts = verdicts(result)
    return result


def verdicts(r: Existence) -> list[Verdict]:
    """Each claim's metric on this run (see :data:`CLAIMS`)."""
    n_layers = int(r.top["layer"].max()) + 1
    first = late_start(n_layers)
    late_top = r.top[r.top["layer"] >= first]
    early_top = r.top[r.top["layer"] < first]
    positive = r.whole[r.whole["direct_effect"] > 0]
    repaired = positive[positive["category"] == "repaired"]
    ci = repaired.merge(r.boot[["layer", "head", "hi"]], on=["layer", "head"])
    big = late_top[late_top["direct_effect"] >= late_top["direct_effect"].median()]
    corr = big.merge(r.spread[["layer", "head", "corr_de_delta_logit"]], on=["layer", "head"])
    weak = corr["corr_de_delta_logit"] > -0.5
    lost = (-repaired["delta_logit"] / repaired["direct_effect"]).mean() if len(repaired) else np.nan
    over = r.spread[r.spread["layer"] >= first]["share_overcorrecting"].median()
    n_sample = int(r.sample.groupby(["layer", "head"]).size().max()) if len(r.sample) else 0
    return [
        Verdict.share(MANY, late_top["self_repair"] > 0, "late-layer heads",
                      f"Their mean top-k% self-repair is {late_top['self_repair'].mean():+.3f} logits. "
                      f"(Not a claim of the paper: {(early_top['self_repair'] < 0).mean():.0%} of the "
                      f"early-layer heads have negative top-k% self-repair.)"),
        Verdict.share(EXISTS, positive["category"] == "repaired", "heads with a positive direct effect"),
        Verdict.share(IMPERFECT, ci["hi"] < 0, f"repaired heads ({n_sample:,} sampled tokens each)",
                      f"On average they still lose {lost:.0%} of their direct effect (−Δlogit / DE of "
                      "the whole-set means)." if np.isfinite(lost) else ""),
        Verdict.share(NOISY, weak, "late-layer heads with a large direct effect",
                      f"On a median late-layer head, {over:.0%} of the sampled tokens on which the "
                      "ablation removes direct effect see the logit go up instead (overcorrection)."
                      if np.isfinite(over) else ""),
    ]


def on_this_model(r: Existence) -> str:
    """The "On this model" paragraph: the paper's §2 claims re-tested, numbers computed."""
    m = r.meta
    same = m.get("same_document_sources")
    src = ("" if r.meta.get("ablation") != "resample" else
           " Every row's resample source is a row from another document"
           + (f" (for {same} row{'s' if same != 1 else ''} the corpus left no choice but a distant part of the same one)"
              if same else "") + ".")
    # the sample actually drawn: sample_size is a cap, a small run samples every instance
    n_sample = int(r.sample.groupby(["layer", "head"]).size().max()) if len(r.sample) else 0
    intro = (f"**On {m.get('model')}** ({m.get('n_tokens', 0):,} tokens in rows of {m.get('seq_len')}, "
             f"{m.get('ablation')} ablation; top {m.get('top_percent'):g}% tokens per head for Fig 1, "
             f"every token for Fig 2, a uniform sample of {n_sample:,} tokens for the "
             f"per-token views).{src}")
    return render(r.verdicts, intro)


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter's numbers."""
    from ..experiment import open_model
    from ..structure import architecture

    a = architecture(open_model(cfg))
    if a["parallel"]:
        text = ("- **Parallel-residual blocks.** As in the paper's Pythia, a last-layer head of this "
                "model has nothing downstream but the final norm, so its self-repair can only come "
                "from the norm (chapter 2).")
    else:
        text = ("- **Sequential blocks.** A last-layer head of this model is still followed by that "
                "layer's MLP, so its self-repair can come from the MLP as well as from the final norm "
                "— unlike in the paper's parallel-attention Pythia.")
    if a["sandwich"]:
        text += (" This model also normalizes each block's write (post-attention and post-feedforward "
                 "norms); their share of the repair is the term `from_block_norms`.")
    return text


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
FEATURED_TABLE = Layout(("label", "reason", "stands_for"))
SUMMARY_TABLE = Layout(("group", "layers", "n_heads", "n_repaired", "n_overcorrected", "n_broken",
                        "n_no direct effect", "mean_lost_fraction", "n_repaired_ci_below_0"),
                       percent=("mean_lost_fraction",),
                       names={"n_repaired": "repaired", "n_overcorrected": "over-corrected",
                              "n_broken": "broken", "n_no direct effect": "no DE",
                              "mean_lost_fraction": "DE the repaired still lose",
                              "n_repaired_ci_below_0": "repaired, CI below 0"})
