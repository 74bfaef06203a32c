"""Chapter 2's claims (self-repair paper §3, App. B, H) and how each is decided, on the cluster
bootstrap of :mod:`selfrepair.uncertainty`.

**Which heads.** Claims about "a head" are tested over every head of the class the paper means:

- S/S′ and App. H — the **last-layer heads**. §3.1 argues the mechanism for "a head in the last
  layer of a parallel attention model, such that this change leads only to the final residual
  stream", and every head on which the paper measures S/S′ is one (Fig 4's L11H2, Fig 5's L11H10,
  Fig 15's L11H0 of the 12-layer Pythia-160M; App. D's L11H10 and L11H3 of the 12-layer GPT-2
  small). Deeper in the model S′ also carries every later layer's reaction. All of them are
  mean- and zero-ablated (cheap: a last-layer head's ablated pass runs one block); the figures'
  head illustrates.
- the norm share and the norms-only repair — the **late-layer heads** (the second half of the
  layers, :func:`selfrepair.structure.late_start`), where Fig 6 finds "a significant effect".

**Uncertainty.** Each interval resamples the documents of the token set (each row with the
document holding most of it); every replicate recomputes each head's statistic before the heads
are averaged or counted. App. B's check runs on the first rows of the token set that hold
:data:`CHECK_CLUSTERS` documents.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np

from .. import layernorm as ln
from ..claims import (ALMOST_ALWAYS_QUOTED, Claim, Signed, Verdict, number, against, approximately, paper_number, paper_word)
from ..rules import NEGLIGIBLE
from ..results import head_label
from ..uncertainty import MIN_CLUSTERS, Bootstrap, Clusters, Estimate, mean_finite, ratio, share

CHECK_CLUSTERS = 2 * MIN_CLUSTERS  # documents App. B's check runs on (its rows: ln.check_rows)
ALMOST = paper_word("almost always")
NONTRIVIAL = NEGLIGIBLE  # a share of an effect beyond ±10% of it
FEW = 10  # a share of fewer heads is said as a count ("1 of these 4 heads")
QUOTED = dict(ALMOST_ALWAYS_QUOTED)  # §3.1: the share of L11H2's top tokens with S/S′ > 1, per ablation
SHARE_QUOTED = 0.30  # §3.2: "around 30% of the direct effect of a head"; App. A: "center around 30%"
APP_H_EXAMPLE = {"ratio": 1.02, "gap": 10.0, "boost": 0.2, "significant_de": 1.0}  # App. H's worked example

LAST = ("the class is every head of the last layer: §3.1 argues the mechanism for 'a head in the last "
        "layer of a parallel attention model, such that this change leads only to the final residual "
        "stream', and every head on which the paper measures S/S′ is one (Fig 4's L11H2, Fig 5's "
        "L11H10, Fig 15's L11H0 of the 12-layer Pythia-160M; App. D's L11H10 and L11H3 of GPT-2 small); "
        "deeper in the model S′ also carries every later layer's reaction. The figures' head only "
        "illustrates")
LATE = ("'later layers' are the second half of the layers (from layer n/2 on, n/2 rounded down, of an "
        "n-layer model), where Fig 6 finds "
        "'a significant effect on later layers'; every head there counts")

RATIO = {a: Claim(f"ratio_{a}", "On a last-layer head's top tokens the ablation shrinks the residual "
                  f"stream, S/S′ > 1 almost always ({a} ablation)", "§3.2, Fig 4, App. D Fig 16–17",
                  "the mean over the last-layer heads of each head's share of its top-k% tokens with "
                  "S/S′ > 1, each head's share recomputed in every bootstrap replicate",
                  ALMOST, paper=QUOTED[a], paper_context="Pythia-160M L11H2, a head chosen because it "
                  "'demonstrates this phenomena well'", fmt=".1%",
                  reading="On the top tokens of the {n} {unit}, the ablation shrinks the residual stream, "
                          "so the final norm amplifies every logit, on {value} of them (mean over the heads).",
                  rationale="'almost always' is the paper's word for the share of a head's top tokens; "
                            + LAST,
                  quantity=f"the share of a last-layer head's top tokens with S/S′ > 1 under {a} ablation")
         for a in ln.ABLATION_ORDER}
SHARE = Claim("norm_share", "On average over the late layers' heads, LayerNorm explains around 30% of a "
              "head's direct effect",
              "§3.2, App. A Fig 10", "the mean over the late-layer heads of each head's mean, over its "
              "top-k% tokens, of the final norm's per-token share of its direct effect (eq. 2's final-norm "
              "term over DE, clipped to [0, 1]), each head's mean recomputed in every replicate",
              approximately(SHARE_QUOTED, "around 30%"), paper=SHARE_QUOTED,
              paper_context="several models, top 2% tokens, 'a directional metric ... rather than a "
                            "concrete, precise one'", fmt=".0%",
              reading="On average over the {n} {unit}, the final norm's rescaling alone gives back "
                      "{value} of a head's direct effect (per token, clipped to [0, 1]).",
              rationale="§3.2 reads 'around 30% of the direct effect of a head on average across many "
                        "layers' off Fig 10, and App. A: 'most of the models, on many of the layers, have "
                        "an average self-repair due to LayerNorm which center around 30%'; " + LATE,
              quantity="the final norm's mean share of a late-layer head's direct effect (clipped per token)")
APP_B = Claim("appendix_b", "For a last-layer head of a parallel-attention model, "
              "Δlogit = (S/S′ − 1)·logit + (S/S′)·ΔDE", "§3.1, App. B",
              "the largest over the three ablations of the closed form's mean absolute error relative "
              "to the mean |Δlogit|, on the first rows of the token set that hold "
              f"{CHECK_CLUSTERS} documents",
              paper_number("<", 1e-3, "an identity",
                           "App. B derives the formula as an identity; computed in floating point it "
                           "misses by rounding alone (about 1e-7 of each term in float32, far less in "
                           "float64), so an error below a thousandth of the mean |Δlogit| is rounding and "
                           "one above it a term the formula leaves out"), fmt=".1e",
              reading="The closed form misses the real Δlogit by {value} of its size, over {n} {unit}.",
              rationale="the formula is an identity only where nothing but the final norm is downstream "
                        "of the head; elsewhere the claim is not about the model and cannot be tested",
              quantity="the closed form's largest error, relative to the mean size of Δlogit")
APP_H = Claim("appendix_h", "Even a ratio near 1 moves a logit by a nontrivial fraction of a direct "
              "effect", "App. H", "the mean over the last-layer heads of each head's mean "
              "|(S/S′ − 1)·(logit − logit of the strongest other token)| over its top-k% tokens "
              "(resample) divided by its mean direct effect there",
              paper_number(">", NONTRIVIAL, "a nontrivial fraction",
                           f"App. H's example: a ratio of {APP_H_EXAMPLE['ratio']} and a gap of "
                           f"{APP_H_EXAMPLE['gap']:g} logits move one token over another by "
                           f"{APP_H_EXAMPLE['boost']:g} logits, against a direct effect that is "
                           f"'significant' from about {APP_H_EXAMPLE['significant_de']:g}. The paper "
                           "puts no number on 'nontrivial'; the book reads a share of an effect as "
                           "'approximately zero' within ±10% of it, so a fraction is nontrivial above that"),
              fmt=".1%",
              reading="The norm's rescaling alone moves the correct token against its strongest "
                      "competitor by {value} of the direct effect (mean over the {n} {unit}).",
              rationale="the paper's a nontrivial fraction is said of 'the direct effect of the head' for "
                        "a typical ratio; means over each head's top tokens stand for the typical token; "
                        + LAST,
              quantity="how far the norm's rescaling alone moves a logit, as a share of a head's direct effect")
NORMS_ONLY = Claim("norms_only", "Freezing every downstream component except the norm recovers a "
                   "significant logit difference relative to freezing the norm too", "§3",
                   "the mean over the late-layer heads of each head's mean norms-only self-repair over its "
                   "top-k% tokens (every downstream attention and MLP output at its clean value, the "
                   "norms live), in logits, each head's mean recomputed in every replicate",
                   paper_word("significant"), fmt="+.3f",
                   reading=Signed("With only the norms live, they {way} on average over the {n} {unit}.",
                                  up="give back {value} logits",
                                  down="take away a further {value} logits (the opposite of giving back)",
                                  ends=("taking away a further {}", "giving back {}"), none="giving back nothing"),
                   rationale="freezing everything including the norm leaves Δlogit = ΔDE of the head, so "
                             "the logit difference the live norm recovers is the norms-only self-repair; "
                             "significant is read as distinguishable from zero. " + LATE,
                   quantity="a late-layer head's mean norms-only self-repair, in logits")
CLAIMS = (*RATIO.values(), SHARE, APP_B, APP_H, NORMS_ONLY)


@dataclass
class Evidence:
    """Per-cluster sums of chapter 2's statistics (``[cluster, head, column]``, heads in the order
    of ``last`` or ``late``); ``check`` over the clusters App. B's rows hold (``check_clusters``)."""

    clusters: Clusters
    last: list  # the last-layer heads (layer, head)
    late: list  # the late-layer heads
    ratio: dict  # ablation -> [cluster, last, (n, n with S/S' > 1)]
    boost: np.ndarray  # [cluster, last, (n, Σ|boost|, ΣDE)] (resample)
    share: np.ndarray  # [cluster, late, (n, Σ clipped share)]
    check: np.ndarray  # [check cluster, ablation, (n, Σ|error|, Σ|Δlogit|)]
    check_clusters: int
    frozen: np.ndarray | None = None  # [cluster, late, (n, Σ norms-only self-repair, ΣDE)]


def evidence(clusters, model, tokens, top, check, check_rows, frozen=None) -> Evidence:
    """The chapter's :class:`Evidence` from the per-token frames: ``tokens`` (:func:`ln.head_tokens`
    of at least the last-layer heads), the sweep's ``top`` rows, App. B's ``check`` on ``check_rows``
    and the frozen-norm rows (``FrozenNormResult.at(top)``)."""
    from ..structure import late_start

    L, H = model.n_layers, model.n_heads
    last = [(L - 1, h) for h in range(H)]
    late = [(l, h) for l in range(late_start(L), L) for h in range(H)]
    present = np.unique(clusters.of_row[check_rows])
    fz = None if frozen is None else ln.head_sums(frozen, clusters, late, {
        "sr": lambda f: f["self_repair_norms_only"], "de": lambda f: f["direct_effect"]})
    return Evidence(clusters, last, late, ln.ratio_sums(tokens, clusters, last),
                    ln.boost_sums(top, clusters, last), ln.share_sums(top, clusters, late),
                    ln.check_sums(check, clusters, check_rows)[present], len(present), fz)


# -- statistics of totals, [replicate, head, column] -> [replicate] --------------------------------
def head_means(t: np.ndarray, col: int = 1) -> np.ndarray:
    """Per replicate and head, the mean of column ``col`` (sum / count)."""
    return ratio(t[..., col], t[..., 0])


def mean_over_heads(t: np.ndarray, col: int = 1) -> np.ndarray:
    return mean_finite(head_means(t, col), axis=-1)


def heads_almost_always(t: np.ndarray) -> np.ndarray:
    """The share of heads whose share of top tokens with S/S′ > 1 is 'almost always' (≥ 90%)."""
    s = head_means(t)
    return share(s >= ALMOST.bounds[0], within=np.isfinite(s))


def boost_fraction(t: np.ndarray) -> np.ndarray:
    """Mean over heads of Σ|boost| / ΣDE (App. H)."""
    return mean_finite(ratio(t[..., 1], t[..., 2]), axis=-1)


def worst_relative_error(t: np.ndarray) -> np.ndarray:
    """App. B: the largest over ablations of Σ|error| / Σ|Δlogit|."""
    return ratio(t[..., 1], t[..., 2]).max(-1)


def _per_head(t: np.ndarray, heads, boot: Bootstrap, fmt: str, cut: float) -> str:
    """Each head's share with its interval, each number on its side of ``cut`` (a head at 89.6%
    prints "89.6%", not the "90%" that would count it as reaching 90%)."""
    value, lo, hi = boot.intervals(head_means, t)
    said = lambda x: against(x, fmt, (cut,))  # noqa: E731
    return ", ".join(f"{head_label(*h)} {said(v)}" + (f" ({said(a)}–{said(b)})" if np.isfinite(a) else "")
                     for h, v, a, b in zip(heads, value, lo, hi))


def share_of_few(est: Estimate, n: int, few: int = FEW) -> str:
    """A share of ``n`` heads in words: of fewer than ``few`` a count ("1 of these 4 heads"; a
    percentage with an interval over 4 heads is false precision), else the share with its interval."""
    if n < few and np.isfinite(est.value):
        return f"{round(est.value * n)} of these {n} heads"
    return f"{est.prose('.0%')} of these heads"


def verdicts(ch) -> list[Verdict]:
    """Every claim of :data:`CLAIMS` on ``ch`` (a :class:`~selfrepair.chapters.layernorm.LayerNormChapter`
    with its :class:`Evidence`), seeded by ``ch.seed``, ``ch.n_boot`` replicates."""
    ev = ch.evidence
    boot = Bootstrap.over(ev.clusters, ch.n_boot, ch.seed)
    unit = f"last-layer heads (layer {ev.last[0][0]})"
    out = []
    for a, t in ev.ratio.items():
        est = boot.estimate(mean_over_heads, t, n=len(ev.last), unit=unit)
        heads = boot.estimate(heads_almost_always, t)
        few = share_of_few(heads, len(ev.last))
        out.append(Verdict.of(RATIO[a], est, f"Taken one by one, {few} {'has' if few.startswith('1 of ') else 'have'} "
                              f"S/S′ > 1 on at least {ALMOST.bounds[0]:.0%} of their own top tokens. Per head: "
                              f"{_per_head(t, ev.last, boot, '.0%', ALMOST.bounds[0])}. Fig 4's head is "
                              f"{head_label(*ch.ratio_head)}."))
    out.append(_share(ch, boot))
    out.append(_app_b(ch))
    out.append(_app_h(ch, boot, unit))
    if ev.frozen is not None:
        est = boot.estimate(mean_over_heads, ev.frozen, n=len(ev.late), unit="late-layer heads")
        frac = boot.estimate(lambda t: ratio(mean_over_heads(t, 1), mean_over_heads(t, 2)), ev.frozen)
        out.append(Verdict.of(NORMS_ONLY, est, f"That is {frac.prose('.0%')} of their mean direct effect "
                              "on the same tokens, a repair with every other component frozen, not the chapter's "
                              "answer to how much the norm gives back (the fold under Fig 10 says why they differ)."))
    return out


def _share(ch, boot: Bootstrap) -> Verdict:
    ev = ch.evidence
    est = boot.estimate(mean_over_heads, ev.share, n=len(ev.late), unit="late-layer heads")
    layers = ch.layers[(ch.layers["tokens"] == "top-k%") & (ch.layers["clipping"] == "clipped")]
    final = layers[layers["component"] == "final norm"]
    lo, hi = SHARE.rule.bounds
    late = final[final["layer"] >= ev.late[0][0]]
    inside = int(late["share"].between(lo, hi).sum())
    pooled = ("" if not math.isfinite(est.value) else
              f" ({est.value:.0%}, {'within' if lo <= est.value <= hi else 'outside'} {lo:.0%}–{hi:.0%})")
    block = layers[layers["component"] == "block norms"]
    blocks = ", the block norms" if len(block) and bool(block["share"].abs().gt(0).any()) else ""  # where it has them
    detail = (f"The rule decides on that one mean, pooled over the {len(ev.late)} late-layer heads{pooled}, not layer "
              f"by layer: taken one layer at a time, {inside} of the {len(late)} late layers have a layer mean "
              f"within {lo:.0%}–{hi:.0%}. This is the chapter's one answer to how much the norm gives back; "
              f"the fold below names the other readings (every layer, unclipped, the norms alone{blocks}) and "
              "why each differs.")
    return Verdict.of(SHARE, est, detail)


def _app_b(ch) -> Verdict:
    ev, t = ch.evidence, ch.check_table
    here, ref = t[t["role"] == "this model"], t[t["role"] == "reference"]
    boot = Bootstrap(ev.check_clusters, ch.n_boot, ch.seed, ev.clusters.unit)
    est = boot.estimate(worst_relative_error, ev.check, n=int(here["n"].sum()), unit="token-ablations")
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
                   f"the error is {number(ref['relative_error'].max(), APP_B.fmt)}.")
    return Verdict.of(APP_B, est, detail.strip(), why=why)


def _app_h(ch, boot: Bootstrap, unit: str) -> Verdict:
    ev = ch.evidence
    est = boot.estimate(boost_fraction, ev.boost, n=len(ev.last), unit=unit)
    g = ch.ratio_tokens[(ch.ratio_tokens["tokens"] == "top-k%") & (ch.ratio_tokens["ablation"] == "resample")]
    each = ratio(ev.boost.sum(0)[:, 1], ev.boost.sum(0)[:, 2])
    above = int((each > APP_H.rule.bounds[0]).sum())
    detail = (f"{above} of the {len(ev.last)} heads {'is' if above == 1 else 'are'} above {APP_H.rule.bounds[0]:.0%} on their own. On "
              f"Fig 4's head {head_label(*ch.ratio_head)} the median S/S′ is {g['ratio'].median():.3f} and "
              f"the median gap between the correct token's logit and its strongest competitor's "
              f"{number(g['competitor_gap'].median(), '+.2f')} logits." if len(g) else "")
    return Verdict.of(APP_H, est, detail)
