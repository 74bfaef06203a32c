"""Chapter 1 — self-repair exists, imperfectly and noisily (self-repair paper §2.2-2.3, Fig 1-3).

The token sets follow the paper figure by figure:

- Fig 1 — each head's mean self-repair over **its top-k% tokens** by clean direct effect (§2.2: "the
  top 2% of tokens filtered by each head's direct effect");
- Fig 2 — each head's mean direct effect and Δlogit over **every token** (§2.2: "averaging these
  values across the whole dataset"); the regions and "imperfect" use these whole-set means;
- Fig 3 and the noise statistics — per token, over a **uniform sample** of the distribution
  (Fig 3: "5000 individual tokens in The Pile"), with the top-k% view beside it.

The featured heads of Fig 3 are the paper's four handpicked Pythia-410M heads when pinned
(``featured_heads``); otherwise they are chosen by what the paper says about them: two heads that
"appear to be self-repaired on average" (standing in for L22H11 and L20H6) and two with a
significant direct effect but "no clear correlation" between DE and Δlogit (for L23H1, L20H14).
They illustrate; every verdict counts every head of the class the paper means.

**Uncertainty** (:mod:`selfrepair.uncertainty`): every interval is a cluster bootstrap over the
token set's documents (each row goes with the document holding most of it), ``n_boot`` replicates seeded by
``seed``, each recomputing every head's means and its classification before heads are counted
(:func:`selfrepair.existence.evidence` keeps the per-cluster sums). "Imperfect" selects the
repaired heads on one half of the documents and tests them on the other (``Clusters.halves``).
Thresholds read the paper's words through :data:`selfrepair.claims.PAPER_WORDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..ablation import check_ablation
from .. import existence as ex
from ..claims import Claim, Verdict, paper_word, render, render_claim
from ..config import CorpusConfig
from ..errors import InputError
from ..experiment import head_sweep
from ..structure import late_start
from ..tables import Layout
from ..uncertainty import Bootstrap
from ..verdict_records import recorded
from . import check, featured, value_bias_note
from .existence_text import (FIGURES, TOP_TOKENS_REASON, every_token_note, findings,  # noqa: F401 (the notebook's)
                               regions_note, shows)

PAPER_FIG3 = ("L22H11", "L20H6", "L23H1", "L20H14")  # Pythia-410M, handpicked (Fig 3)
FEATURED_RULE = ("two late-layer heads with the largest whole-set mean self-repair among those with "
                 "a positive direct effect (the paper's L22H11 and L20H6 'appear to be self-repaired on "
                 "average'), then two late-layer heads with a top-k% direct effect above the late median "
                 "and the weakest per-token DE–Δlogit correlation on the sample (L23H1 and L20H14: "
                 "'no clear correlation')")

REPAIRED_REASON = "largest whole-set mean self-repair among late heads with a positive direct effect"
UNCORRELATED_REASON = "weakest DE–Δlogit correlation among late heads with an above-median direct effect"
LATER = ("'later layers' are the second half of the layers (from layer n/2 on, n/2 rounded down, of an "
         "n-layer model), and the class is every head there, not a featured one")
MANY = Claim("many", "Many heads in later layers are self-repaired", "§2.2, Fig 1",
             "the share of late-layer heads whose mean self-repair on their top-k% tokens is positive, "
             "each head's mean recomputed in every bootstrap replicate", paper_word("many"), fmt=".0%",
             reading="{value} of the {n} {unit} lose less logit than their direct effect on the tokens "
                     "where they matter most (positive mean self-repair on their top-k% tokens).",
             rationale="Fig 1 plots each head's mean self-repair over its top 2% of tokens by direct "
                       "effect, and the paper reads 'many heads in later layers' off it; " + LATER,
             quantity='the share of late-layer heads whose mean top-token self-repair is positive')
EXISTS = Claim("exists", "Across the whole distribution many heads fall between y = −x and the x-axis",
               "§2.2, Fig 2", "the share of heads with a positive whole-set mean direct effect that lie "
               "there (0 > Δlogit > −DE), both means and the classification recomputed in every replicate",
               paper_word("many"), fmt=".0%",
               reading="Averaged over every token, {value} of the {n} {unit} sit between the line of no "
                       "repair and the line of perfect repair.",
               rationale="Fig 2's band between y = −x and the x-axis is −1 < Δlogit / DE < 0, where the "
                         "paper says 'there are many such heads'; heads with DE ≤ 0 are outside the "
                         "band's geometry and left out, as in the paper's reading",
               quantity='the share of heads with a positive direct effect that lie in the repaired band')
IMPERFECT = Claim("imperfect", "The heads that are self-repaired are not perfectly repaired across the "
                  "entire distribution", "§2.2",
                  "among the heads in Fig 2's band on one half of the documents (selection), the share "
                  "whose whole-set mean Δlogit on the other half (test) is below 0",
                  paper_word("most"), fmt=".0%",
                  reading="Of the {n} {unit}, {value} still lose logit when ablated, measured on documents "
                          "they were not selected on.",
                  rationale="the paper says it of the self-repaired heads in general. Under perfect repair "
                            "a head's held-out mean Δlogit is 0 and its sign a coin flip, so a share whose "
                            "interval lies above one half ('most') shows a real loss; selecting heads "
                            "because their mean fell below 0 and testing that mean on the same tokens "
                            "would count the noise that selected them",
                  quantity="the share of the repaired band's heads whose logit still falls, on held-out documents")
NOISY = Claim("noisy", "Many heads with a significant direct effect show no clear correlation between DE "
              "and Δlogit", "§2.3, Fig 3",
              "among late-layer heads whose top-k% direct effect is at least the late heads' median (both "
              "recomputed in every replicate), the share whose per-token correlation of DE and Δlogit on "
              "the uniform sample is not clear", paper_word("many"), fmt=".0%",
              reading="For {value} of the {n} {unit}, how much a token loses barely follows how much the "
                      "head contributed to it (a per-token correlation closer to zero than −0.5).",
              rationale="the paper finds it surprising 'for heads that have significant direct effects yet "
                        "no strong correlation'; 'significant direct effect' is read as the upper half of "
                        "the late heads by top-k% direct effect. Fig 3's L23H1 and L20H14 are two "
                        "handpicked examples; the verdict counts every such head, and the featured "
                        "stand-ins, picked for a weak correlation, only illustrate it",
              classify=(paper_word("clear correlation"),),
              quantity="the share of the late heads with a large direct effect whose DE and Δlogit are not clearly correlated")
CLAIMS = (MANY, EXISTS, IMPERFECT, NOISY)


@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # what replaces a head's output (the paper: resample)
    featured_heads: tuple[str, ...] | None = None  # Fig 3's heads, e.g. the paper's L22H11 ...; None: by the paper's criterion
    n_boot: int = 1000  # cluster-bootstrap replicates of every interval (documents resampled)

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
    return pd.concat([rows[per_head.columns].assign(reason=[ranked(why, i) for i in range(len(rows))])
                      for rows, why in ((repaired, REPAIRED_REASON), (uncorrelated, UNCORRELATED_REASON))],
                     ignore_index=True)


def ranked(reason: str, i: int) -> str:
    """The ``i``-th head chosen by ``reason`` ("largest …"): the first as it is, then "second
    largest …", "third largest …" (two stand-ins never read as both the largest)."""
    return reason if i == 0 else f"{['second', 'third', 'fourth'][i - 1] if i <= 3 else f'{i + 1}th'} {reason}"


@dataclass
class Existence:
    """Everything chapter 1 shows."""

    top: pd.DataFrame  # per head, top-k% means (Fig 1), classified
    whole: pd.DataFrame  # per head, whole-set means (Fig 2), classified
    top_tokens: pd.DataFrame  # per token, each head's top-k% tokens
    sample: pd.DataFrame  # per token, the uniform sample (same instances for every head)
    featured: pd.DataFrame  # Fig 3's heads with the reason they were chosen
    boot: pd.DataFrame  # per head, whole-set mean Δlogit and DE with cluster-bootstrap intervals
    spread: pd.DataFrame  # per head, per-token noise statistics on the sample
    spread_top: pd.DataFrame  # the same on each head's top-k% tokens
    summary: pd.DataFrame  # regions of the whole-set means by layer group
    verdicts: list
    meta: dict
    evidence: ex.Evidence | None = None  # per-cluster sums every interval resamples
    n_boot: int = 1000  # bootstrap replicates
    seed: int = 0  # of the replicates and of the selection / test split


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
def measure(cfg: Config, progress: bool = True) -> Existence:
    """Chapter 1 from the (cached) all-heads sweep of ``cfg``."""
    check(cfg)
    sweep = head_sweep(cfg, cfg.ablation, progress=progress)
    per_head, top_tokens, sample = ex.sweep_frames(sweep)
    spread = ex.token_spread(sample)
    feat = featured(per_head, cfg.featured_heads, lambda ph: choose_featured(ph, spread),
                    rule=FEATURED_RULE, stands_for=PAPER_FIG3)
    evidence = ex.evidence(sweep)
    whole = ex.classify_heads(ex.whole_set_means(per_head))
    top = ex.classify_heads(ex.top_means(per_head))
    result = Existence(top=top, whole=whole, top_tokens=top_tokens, sample=sample,
                       featured=feat[["layer", "head", "label", "reason", "stands_for"]],
                       boot=ex.head_intervals(evidence, cfg.n_boot, cfg.seed),
                       spread=spread, spread_top=ex.token_spread(top_tokens),
                       summary=ex.imperfection_summary(ex.whole_set_means(per_head)),
                       verdicts=[], meta=dict(sweep.meta), evidence=evidence, n_boot=cfg.n_boot,
                       seed=cfg.seed)
    result.verdicts = verdicts(result)
    return result


def verdicts(r: Existence) -> list[Verdict]:
    """Each claim's metric on this run (see :data:`CLAIMS`), from the cluster bootstrap of
    ``r.evidence``; "imperfect" selects its heads on one half of the clusters and tests them on
    the other."""
    ev = r.evidence
    first = late_start(ev.n_layers)
    boot = Bootstrap.over(ev.clusters, r.n_boot, r.seed)
    at = {k: getattr(ev, k).sum(0)[None] for k in ("whole", "top", "sample")}  # the estimate's totals
    sr = ex.mean_of(at["top"], ex.TOP, "self_repair")[0]
    many = boot.estimate(lambda t: ex.share_self_repaired(t, first), ev.top,
                         n=int(np.isfinite(sr[first:]).sum()), unit="late-layer heads")
    mean_sr = boot.estimate(lambda t: np.nanmean(ex.mean_of(t, ex.TOP, "self_repair")[:, first:], (1, 2)),
                            ev.top)
    de_all = ex.mean_of(at["whole"], ex.WHOLE, "direct_effect")[0]
    exists = boot.estimate(ex.share_in_band, ev.whole, n=int((de_all > 0).sum()),
                           unit="heads with a positive direct effect")
    clear = NOISY.classify[0].bounds[0]
    de_top = ex.mean_of(at["top"], ex.TOP, "direct_effect")[0, first:]
    noisy = boot.estimate(lambda t, s: ex.share_uncorrelated(t, s, first, clear), ev.top, ev.sample,
                          n=int((de_top >= np.nanmedian(de_top)).sum()),
                          unit="late-layer heads with a large direct effect")
    over = r.spread[r.spread["layer"] >= first]["share_overcorrecting"].median()
    early = (r.top[r.top["layer"] < first]["self_repair"] < 0).mean()
    return [
        Verdict.of(MANY, many, f"Their mean top-k% self-repair is {_est(mean_sr, '+.3f')} logits. (Not a "
                   f"claim of the paper: {early:.0%} of the early-layer heads have negative top-k% "
                   "self-repair.)"),
        Verdict.of(EXISTS, exists, _band_detail(ev, boot)),
        _imperfect(r),
        Verdict.of(NOISY, noisy, f"On a median late-layer head, {over:.0%} of the sampled tokens on which the "
                   "ablation removes direct effect see the logit go up instead (overcorrection)."
                   if np.isfinite(over) else ""),
    ]


def _est(e, fmt: str) -> str:
    """An estimate in prose: value and 95% interval (or why it has none)."""
    return e.prose(fmt)


def _band_detail(ev: ex.Evidence, boot: Bootstrap) -> str:
    """How many heads each one's own interval places inside Fig 2's band, outside it, or neither."""
    value, lo, hi = boot.intervals(ex.band_margin, ev.whole)
    known = np.isfinite(value)
    if not (np.isfinite(lo) & known).any():
        return ""
    inside, outside = int((lo > 0).sum()), int((hi < 0).sum())
    return (f"Each head's own 95% interval puts {inside} of them inside the band and {outside} outside "
            f"it; {int(known.sum()) - inside - outside} are too close to a boundary to place, and count "
            "in or out replicate by replicate.")


def repaired_on_half(ev: ex.Evidence, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(select, test, selected)``: the seeded halves of the clusters and the heads
    ``[layer, head]`` in Fig 2's band on the ``select`` half alone (what "imperfect" tests on ``test``)."""
    select, test = ev.clusters.halves(seed)
    a = ev.whole[select].sum(0)
    selected = ex.in_band(ex.mean_of(a, ex.WHOLE, "direct_effect"), ex.mean_of(a, ex.WHOLE, "delta_logit"))
    return select, test, selected


def _imperfect(r: Existence) -> Verdict:
    """:data:`IMPERFECT`: heads in Fig 2's band on one half of the clusters, their Δlogit on the other."""
    ev = r.evidence
    select, test, selected = repaired_on_half(ev, r.seed)
    boot = Bootstrap(len(test), r.n_boot, r.seed, ev.clusters.unit)
    unit = (f"{'head' if selected.sum() == 1 else 'heads'} in the band on {len(select)} "
            f"{ev.clusters.unit} (tested on the other {len(test)})")
    share = boot.estimate(lambda t: ex.share_losing(t, selected), ev.whole[test], n=int(selected.sum()),
                          unit=unit)
    lost = boot.estimate(lambda t: ex.lost_fraction(t, selected), ev.whole[test])
    detail = (f"On the test half they lose {_est(lost, '.0%')} of their direct effect together (0% would "
              "be perfect repair; the paper: 'a small, but noticeable, logit difference')."
              if selected.any() else "")
    return Verdict.of(IMPERFECT, share, detail, why="" if selected.any() else
                      "no head lies in Fig 2's band on the selection half")


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
    cl = r.evidence.clusters
    intro = (f"**On {m.get('model')}** ({m.get('n_tokens', 0):,} tokens in {m.get('n_rows', len(cl.of_row)):,} "
             f"rows of {m.get('seq_len')} from {cl.n:,} independent {cl.unit}, {m.get('ablation')} ablation; "
             f"top {m.get('top_percent'):g}% tokens per head for Fig 1, every token for Fig 2, a uniform "
             f"sample of {n_sample:,} tokens for the per-token views).{src} Every interval is a 95% "
             f"cluster bootstrap over the {cl.unit} ({r.n_boot:,} replicates, seed {r.seed}) that "
             "recomputes each head's means and classification before counting heads.")
    return render(r.verdicts, intro, rules="ch01-rules", below=FIGURES)


def verdict(r: Existence, key: str) -> str:
    """Claim ``key``'s full verdict, which the notebook shows right after the figure
    :data:`FIGURES` names for it (the overview of :func:`on_this_model` links down to it)."""
    return render_claim(r.verdicts, key, rules="ch01-rules")


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes each head's direct effect (not by a constant: the term is divided by each "
    "token's final-norm scale), hence each head's top-k% tokens (Fig 1), the regions of Fig 2"
    " and every zero-ablation number; resample and mean Δlogit are the same either way.")


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
                 "norms); their share of the repair is eq. 2's block-norm term, counted apart "
                 "from the final norm's.")
    return text + "\n" + value_bias_note(cfg, VALUE_BIAS)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
FEATURED_TABLE = Layout(("label", "reason", "stands_for"))
SUMMARY_TABLE = Layout(("group", "layers", "n_heads", "n_repaired", "n_overcorrected", "n_broken",
                        "n_no direct effect", "mean_lost_fraction"),
                       percent=("mean_lost_fraction",),
                       names={"n_repaired": "repaired", "n_overcorrected": "over-corrected",
                              "n_broken": "broken", "n_no direct effect": "no DE",
                              "mean_lost_fraction": "DE the repaired still lose"},
                       # a phone: the regions' counts (layers, heads in all, heads without a DE: one click away)
                       phone=("group", "n_repaired", "n_overcorrected", "n_broken", "mean_lost_fraction"),
                       caption="Heads per region of Fig 2, on each head's means over every token (the "
                               "verdict on 'many' reads each head's top-k% tokens instead)")
