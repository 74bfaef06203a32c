"""Chapter 6's claims (self-repair paper §2.2, §3.2; Fig 1, 2, 10, 20-22) and how each is decided,
re-exported by :mod:`selfrepair.chapters.across` (the notebook calls ``chapter.<name>``).

Per cached run, each claim's statistic with a 95% cluster bootstrap over that run's documents
(:func:`run_estimates`, from the sweep's per-row sums and per-token rows); the claims' metrics per
run, ours and the release's, on comparable token sets (:func:`compare_models`); the release's
values beside them with no interval (it holds per-head means only), placed against ours where a run
is of a released model (:func:`release_values`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..claims import Claim, Verdict, approximately, paper_word
from ..existence import TOP, WHOLE, evidence, mean_of, share_in_band, share_self_repaired
from ..structure import is_late, late_start
from ..uncertainty import Bootstrap, ratio
from ..verdict_records import model_label

MANY = Claim("many", "Many heads in later layers are self-repaired", "§2.2, Fig 1",
             "the share of late-layer heads with positive mean self-repair on their top-k% tokens, each head's "
             "mean recomputed in every bootstrap replicate", paper_word("many"), fmt=".0%",
             reading="{value} of the {n} {unit} lose less logit than their direct effect on their top "
                     "tokens.",
             rationale="as in chapter 1: Fig 1 plots each head's top-2% mean and the paper reads 'many heads "
                       "in later layers' off it; 'later layers' are the second half, every head there counts",
             quantity='the share of late-layer heads whose mean top-token self-repair is positive')
SHARE_QUOTED = 0.30  # §3.2: "30% of direct effect is self-repaired by LayerNorm", "center around 30%"
SHARE = Claim("norm_share", "The final LayerNorm explains around 30% of a head's direct effect",
              "§3.2, App. A Fig 10",
              "the mean over late-layer heads of each head's mean clipped per-token share of its direct "
              "effect that the final norm gives back on its top-k% tokens (the statistic of the release's "
              "percent_LN_of_DE), each head's mean recomputed in every replicate", approximately(SHARE_QUOTED, "around 30%"), paper=SHARE_QUOTED, fmt=".0%",
              reading="The final norm alone gives back {value} of a head's direct effect, on average over the "
                      "{n} {unit}.",
              rationale="§3.2: 'most of the models, on many of the layers, have an average self-repair due to "
                        "LayerNorm which center around 30%', of the clipped per-token share (Fig 10)",
              quantity="the final norm's mean share of a late-layer head's direct effect (clipped per token)")
BETWEEN = Claim("between", "Across the whole distribution many heads fall between y = −x and the x-axis",
                "§2.2, Fig 2, App. I Fig 20–22",
                "the share of heads with a positive whole-set mean direct effect whose whole-set means lie "
                "there (0 > Δlogit > −DE), recomputed in every replicate", paper_word("many"), fmt=".0%",
                reading="Averaged over every token, {value} of the {n} {unit} sit between the line of no "
                        "repair and the line of perfect repair.",
                rationale="as in chapter 1; Fig 20–22 repeat Fig 2's setup on more models, the release's "
                          "whole-set (1.0_) files hold the same means for GPT-2 small and Pythia-160M",
                quantity='the share of heads with a positive direct effect that lie in the repaired band')
CLAIMS = (MANY, SHARE, BETWEEN)
CLAIM_COLUMNS = {"many": "frac_self_repaired_late", "norm_share": "norm_share_late", "between": "frac_between_all"}


def clipped_shares(top: pd.DataFrame) -> pd.DataFrame:
    """Per token of each head's top-k% set with DE ≠ 0, the final norm's share of its direct effect,
    ``from_norm / direct_effect`` clipped to [0, 1] (:func:`selfrepair.layernorm.norm_share`'s
    clipped final-norm statistic, token by token), column ``share``."""
    f = top[top["direct_effect"] != 0]
    return f.assign(share=(f["from_norm"] / f["direct_effect"]).clip(0, 1))


def run_estimates(sweep, n_boot: int, seed: int) -> dict:
    """Each claim's statistic on one cached sweep with its 95% cluster-bootstrap interval
    (documents resampled; every head's means and classification recomputed in each replicate)."""
    ev = evidence(sweep)
    L, H = ev.whole.shape[1:3]
    first = late_start(L)
    boot = Bootstrap.over(ev.clusters, n_boot, seed)
    shares = ev.clusters.head_sums(clipped_shares(sweep.tokens_frame("top")), ["share"], L, H)
    at = {"top": ev.top.sum(0)[None], "whole": ev.whole.sum(0)[None], "share": shares.sum(0)[None]}
    sr = mean_of(at["top"], TOP, "self_repair")[0, first:]
    share_late = ratio(at["share"][0, first:, :, 1], at["share"][0, first:, :, 0])
    de = mean_of(at["whole"], WHOLE, "direct_effect")[0]

    def late_share(t):
        v = ratio(t[:, first:, :, 1], t[:, first:, :, 0])
        return np.nanmean(v.reshape(len(v), -1), 1)

    return {"many": boot.estimate(lambda t: share_self_repaired(t, first), ev.top,
                                  n=int(np.isfinite(sr).sum()), unit="late-layer heads"),
            "norm_share": boot.estimate(late_share, shares, n=int(np.isfinite(share_late).sum()),
                                        unit="late-layer heads"),
            "between": boot.estimate(share_in_band, ev.whole, n=int((de > 0).sum()),
                                     unit="heads with a positive direct effect")}


def paper_model(name: str) -> str | None:
    """The release's name of one of our models ("gpt2" -> "gpt2-small", "EleutherAI/pythia-160m" ->
    "pythia-160m"), or None when the release does not hold it."""
    base = str(name).split("/")[-1].lower()
    base = {"gpt2": "gpt2-small"}.get(base, base)
    return base if base in RELEASE_MODELS else None


RELEASE_MODELS = ("gpt2-small", "gpt2-medium", "pythia-160m", "pythia-410m")


def compare_models(heads: pd.DataFrame) -> pd.DataFrame:
    """One row per run, the claims' metrics on comparable token sets ("late" = the later half of
    the layers, :func:`selfrepair.structure.is_late`):

    - ``frac_self_repaired_late`` (top-k% means, ours and the paper's): late heads with positive
      mean self-repair (:data:`MANY`);
    - ``norm_share_late`` (top-k%, ours and the paper's): mean clipped per-token final-norm share
      (:data:`SHARE`; the paper's released ``percent_LN_of_DE``);
    - ``frac_between_all`` (whole-set means, ours and the release's for GPT-2 small and Pythia-160M):
      heads with a positive direct effect lying between y = −x and the x-axis (Fig 2 / 20-22);
    - ``self_repair_late`` / ``self_repair_early``: mean top-k% self-repair of late / early heads;
    - ``block_norm_share_late``: Σ from_block_norms / Σ DE over late heads with DE > 0 (top-k%;
      sandwich-norm models only).
    """
    rows = []
    for run, g in heads.groupby("run", sort=False):
        top, every = g[g["tokens"] == "top-k%"], g[g["tokens"] == "all"]
        late = top[is_late(top["layer"], top["n_layers"])]
        pos = late[late["direct_effect"] > 0]
        de = pos["direct_effect"].sum()
        whole_pos = every[every["direct_effect"] > 0]
        between_ = (whole_pos["delta_logit"] < 0) & (whole_pos["delta_logit"] > -whole_pos["direct_effect"])
        rows.append({"run": run, "source": g["source"].iloc[0], "model": g["model"].iloc[0],
                     "fold_value_biases": bool(g["fold_value_biases"].iloc[0]),
                     "ablation": g["ablation"].iloc[0], "n_layers": int(g["n_layers"].iloc[0]),
                     "n_heads": len(top), "n_late": len(late),
                     "frac_self_repaired_late": float((late["self_repair"] > 0).mean()) if len(late) else np.nan,
                     "norm_share_late": float(late["norm_share"].mean()),
                     "frac_between_all": float(between_.mean()) if len(whole_pos) else np.nan,
                     "self_repair_late": late["self_repair"].mean(),
                     "self_repair_early": top.loc[~is_late(top["layer"], top["n_layers"]), "self_repair"].mean(),
                     "block_norm_share_late": pos["from_block_norms"].sum() / de if de > 0 else np.nan})
    return pd.DataFrame(rows)


def _against(value: float, e, fmt: str) -> str:
    """Where a released (point) value lies relative to our 95% interval."""
    if e is None or not e.reliable:
        return "our interval is not reliable"
    where = "inside" if e.lo <= value <= e.hi else "below" if value < e.lo else "above"
    return f"{where} our 95% interval ({e.lo:{fmt}} to {e.hi:{fmt}})"


def release_values(claim: Claim, paper: pd.DataFrame, spread: dict | None, ours: pd.DataFrame,
                   estimates: dict) -> str:
    """The release's values of a claim's metric, and for each run of ours on a released model
    where the release's value lies against our interval; the release has no interval of its own."""
    col = CLAIM_COLUMNS[claim.key]
    got = paper.dropna(subset=[col])
    if got.empty:
        return "  The release holds no value of this metric."
    text = ("  The paper's released values: " + ", ".join(f"{r['model']} {r[col]:{claim.fmt}}"
                                                          for _, r in got.iterrows())
            + " (per-head means only: the release has no per-token or per-document values, so its numbers "
              "carry no interval of their own")
    if claim.key == "between" and spread:
        text += (f"; its two whole-set files of Pythia-160M, two runs of the same script, give "
                 f"{spread['a']:{claim.fmt}} and {spread['b']:{claim.fmt}}: the run-to-run spread it shows")
    text += ")."
    same = [(r, got[got["model"] == paper_model(r["model"])]) for _, r in ours.iterrows()]
    for r, g in same:
        if len(g):
            value = float(g[col].iloc[0])
            text += (f" For {r['run']}, the release's {value:{claim.fmt}} lies "
                     f"{_against(value, estimates.get(r['run'], {}).get(claim.key), claim.fmt)}.")
    return text


def run_verdict(claim: Claim, r: pd.Series, estimates: dict) -> Verdict:
    """One claim on one run (a row of :func:`compare_models`), decided on its cluster-bootstrap
    estimate; a run without per-document sums cannot tell."""
    extra = (f"(Plus {r['block_norm_share_late']:.0%} of DE from the sandwich block norms: their term of eq. 2 "
             "summed over the top-k% tokens of the late heads with a positive DE, over those tokens' summed DE, "
             "unclipped — chapter 2's share of the block norms is a mean of clipped per-token shares, a "
             "different number.)"
             if claim is SHARE and abs(r["block_norm_share_late"]) > 0 else "")
    e = estimates.get(r["run"], {}).get(claim.key)
    if e is None:
        return Verdict(claim, float(r[CLAIM_COLUMNS[claim.key]]), None, "", extra,
                       why=f"{r['run']} has no per-document sums to resample")
    return Verdict.of(claim, e, f"Run: {r['run']}. {extra}".strip())


def run_verdicts(ours: pd.DataFrame, estimates: dict | None = None) -> list[Verdict]:
    """Each of :data:`CLAIMS` on each of this project's runs in ``ours`` (rows of
    :func:`compare_models`), claim by claim (:func:`run_verdict`); ``Verdict.model`` names the
    run's model (the scorecard files each verdict there)."""
    return [replace(run_verdict(claim, r, estimates or {}), model=model_label(r["model"], bool(r["fold_value_biases"])))
            for claim in CLAIMS for _, r in ours.iterrows()]
