"""Chapter 6 — across models: every cached head sweep beside the paper's released values
(self-repair paper §2.2, Fig 1 and App. I Fig 20-22; claims of §2.2 and §3.2).

Two sources, tidy per-head frames (canonical columns ``layer, head, label``):

- *this project*: every all-heads sweep cached under ``cache_dir``
  (``<cache_dir>/<model slug>/sweep-<hash>.safetensors``, :class:`~selfrepair.sweep.Sweep`; chapter 1
  computes the current model's): per head the means over its top-k% tokens by clean direct effect
  (Fig 1), the means over every token (Fig 2 and 20-22: "similar to the experimental setup for
  Figure 2"), and the final norm's clipped per-token share of direct effect on its top-k% tokens;
- *the paper*: ``data/reference/paper_per_head.csv``, the per-head values Rushing & Nanda released
  with their code (starship006/backup_research, ``FINAL_figure_files/pickle_storage/
  breakdown_self_repair/``), resample ablation on The Pile. Their script names each file by the
  share of top tokens it averages (``percentile_str = "" if PERCENTILE == 0.02 else
  f"{PERCENTILE}_"``): the unprefixed files (GPT-2 small/medium, Pythia-160M/410M) are means over
  each head's top 2% of tokens, beside our top-k% means (Fig 1 and the claims); the ``1.0_`` files
  (GPT-2 small, Pythia-160M) are means over **every** token, beside our whole-set means (Fig 2 and
  20-22). Their ``percent_LN_of_DE`` is the per-token clipped share (§3.2's "around 30%"), compared
  with ours like for like. Their ``self_repair_from_LN`` is a remainder in their code; ours is
  computed. How many tokens each file averages is read off the script (:data:`RELEASE`).

Signs as everywhere: ``delta_logit = ablated - clean``, ``self_repair = delta_logit -
(ablated_direct_effect - direct_effect)`` (eq. 1). Depth is compared as ``rel_layer = layer /
(n_layers - 1)`` because the models differ in depth.

Verdicts (:data:`CLAIMS`): per cached run, each claim's statistic with a 95% cluster bootstrap over
that run's documents (:func:`run_estimates`, from the sweep's per-row sums and per-token rows); the
release's values beside them with no interval (it holds per-head means only), placed against ours
where a run is of a released model (:func:`release_values`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..ablation import check_ablation
from ..claims import Claim, Verdict, approximately, paper_word, render
from ..config import CorpusConfig
from ..errors import InputError
from ..existence import (TOP, WHOLE, evidence, mean_of, share_in_band, share_self_repaired, top_means,
                         whole_set_means)
from ..experiment import head_sweep
from ..layernorm import norm_share
from ..measure import results_root
from ..results import CorruptResultError, head_label
from ..structure import is_late, late_start, relative_depth
from ..tables import Layout, counted
from ..uncertainty import Bootstrap, ratio
from ..verdict_records import model_label, recorded
from . import check, value_bias_note

PAPER_CITATION = ("Rushing & Nanda (2024), values released in starship006/backup_research "
                  "(FINAL_figure_files/pickle_storage/breakdown_self_repair/)")
QUANTITY_NAMES = {"direct_effects": "direct_effect", "ablated_direct_effects": "ablated_direct_effect",
                  "logit_diff": "delta_logit", "self_repair_from_heads": "from_heads",
                  "self_repair_from_layers": "from_mlps", "self_repair_from_LN": "from_norm",
                  "percent_LN_of_DE": "percent_norm_of_de", "percent_heads_of_DE": "percent_heads_of_de",
                  "percent_layers_of_DE": "percent_mlps_of_de"}
VALUES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair", "from_heads",
          "from_mlps", "from_norm", "from_block_norms", "norm_share")
COLUMNS = ("source", "run", "model", "fold_value_biases", "ablation", "tokens", "n_layers", "layer", "head", "label",
           "rel_layer") + VALUES
EXTRA = ("n_tokens", "dataset", "top_percent", "path")
WHOLE_SET = "1.0"  # the file prefix of PERCENTILE = 1.0: every token (GPT-2 small, Pythia-160M)
RELEASE = {  # read off the authors' script, FINAL_figure_files/GOOD_breakdown_self_repair.py
    "prompt_len": 128, "min_tokens": 100_000, "batch_size": 30,  # its released version's defaults
    # its versions of December 2023, the only ones that saved just the six quantities the 1.0_
    # files hold (later versions also save percent_*_of_DE under the same prefix)
    "early_prompts": 3_000, "early_prompt_len": 400}


def release_tokens() -> int:
    """Tokens the released script measures: at least ``min_tokens``, in whole batches of
    ``batch_size`` prompts of ``prompt_len`` (its ``TOTAL_TOKENS``)."""
    per = RELEASE["prompt_len"] * RELEASE["batch_size"]
    return (RELEASE["min_tokens"] // per + 1) * per


def reference_path() -> Path:
    from ..data import data_dir
    return data_dir() / "reference" / "paper_per_head.csv"


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df["label"] = [head_label(l, h) for l, h in zip(df["layer"], df["head"])]
    df["rel_layer"] = relative_depth(df["layer"], df["n_layers"])
    return df


def sweep_heads(sweep, path: str = "") -> pd.DataFrame:
    """Both per-head views of one sweep (``tokens`` = ``"top-k%"`` or ``"all"``), with the final
    norm's clipped per-token share of direct effect on the top-k% tokens (``norm_share``)."""
    meta, per_head = sweep.meta, sweep.per_head()
    shares = norm_share(sweep.tokens_frame("top"))
    clipped = shares[(shares["clipping"] == "clipped") & (shares["component"] == "final norm")]
    top = top_means(per_head).merge(clipped[["layer", "head", "share"]].rename(columns={"share": "norm_share"}),
                                    on=["layer", "head"], how="left")
    whole = whole_set_means(per_head).assign(norm_share=np.nan)
    df = pd.concat([top, whole], ignore_index=True).rename(columns={"n_tokens": "n_head_tokens"})
    key = meta.get("key", {}).get("data", {})
    df = df.assign(source="this project", model=meta["model"], ablation=meta["ablation"],
                   fold_value_biases=bool(meta.get("fold_value_biases", False)),
                   n_layers=meta["n_layers"], n_tokens=meta.get("n_tokens"), dataset=key.get("dataset"),
                   top_percent=meta.get("top_percent"), path=path)
    df["run"] = [f"{m} (ours, {a}, {n:,} tok)" for m, a, n in zip(df["model"], df["ablation"], df["n_tokens"])]
    return df


def cached_sweeps(cache_dir: str | Path):
    """``(path, sweep)`` of every sweep cached under ``cache_dir`` in the current layout
    (``SweepSpec.layout``): a damaged file is skipped with a warning, and so is an entry of an older
    layout (the same run is cached again beside it under the current one)."""
    from ..sweep import Sweep, SweepSpec

    for path in sorted(results_root(cache_dir).glob("*/sweep-*.safetensors")):
        try:
            sweep = Sweep.load(path)
        except CorruptResultError as e:
            warnings.warn(f"skipping damaged cached sweep {path}: {e}")
            continue
        spec = sweep.meta.get("key", {}).get("spec")
        if spec is not None and spec.get("layout", 0) != SweepSpec.layout:
            continue
        yield path, sweep


def load_cached_sweeps(cache_dir: str | Path) -> pd.DataFrame:
    """Per-head rows (top-k% and whole-set means) of every sweep cached under ``cache_dir``
    (:func:`cached_sweeps`). Empty frame (with the columns) when nothing is cached."""
    return _ours([sweep_heads(sweep, str(path)) for path, sweep in cached_sweeps(cache_dir)])


def _ours(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS) + list(EXTRA))
    return _finish(pd.concat(frames, ignore_index=True))


def load_paper_reference(path: str | Path | None = None, variant: str | None = None) -> pd.DataFrame:
    """The paper's released per-head values as a tidy frame, one row per (model, head), our column
    names (:data:`QUANTITY_NAMES`) plus ``self_repair`` from eq. 1. ``variant=None`` keeps the
    unprefixed files, each head's top-2% means (``tokens = "top-k%"``); ``"1.0"`` (or ``"1"``, a
    second Pythia-160M file) the whole-set means over every token (``tokens = "all"``)."""
    raw = pd.read_csv(path or reference_path(), dtype={"variant": str}, keep_default_na=False)
    raw = raw[raw["variant"] == (variant or "")]
    df = (raw.pivot_table(index=["model", "layer", "head"], columns="quantity", values="value",
                          aggfunc="mean").rename(columns=QUANTITY_NAMES).reset_index())
    df.columns.name = None
    df["self_repair"] = df["delta_logit"] - (df["ablated_direct_effect"] - df["direct_effect"])
    df["from_block_norms"] = 0.0  # GPT-2 and Pythia have no sandwich norms
    df["norm_share"] = df["percent_norm_of_de"] if "percent_norm_of_de" in df else np.nan
    df["n_layers"] = df.groupby("model")["layer"].transform("max") + 1
    df["source"], df["ablation"], df["run"] = "paper", "resample", df["model"] + " (paper)"
    df["fold_value_biases"] = True  # the authors' code loaded through TransformerLens, which folds
    df["tokens"] = "top-k%" if not variant else "all"  # PERCENTILE 0.02: no prefix; 1.0: every token
    return _finish(df)


def load_paper_release(path: str | Path | None = None) -> pd.DataFrame:
    """Both sets of the release as one frame: top-2% means of four models and whole-set means
    (:data:`WHOLE_SET`) of GPT-2 small and Pythia-160M, under the same run names."""
    return pd.concat([load_paper_reference(path), load_paper_reference(path, WHOLE_SET)], ignore_index=True)


def release_agreement(path: str | Path | None = None) -> dict:
    """How closely the release's two whole-set files of Pythia-160M (prefixes ``1.0_`` and ``1_``,
    two runs of the script) agree, head by head: the correlation of their direct effects and of
    their Δlogit, over ``n`` heads."""
    a, b = (load_paper_reference(path, v).query("model == 'pythia-160m'").set_index("label")
            for v in (WHOLE_SET, "1"))
    b = b.loc[a.index]
    return {"n": len(a), "r_direct_effect": float(np.corrcoef(a["direct_effect"], b["direct_effect"])[0, 1]),
            "r_delta_logit": float(np.corrcoef(a["delta_logit"], b["delta_logit"])[0, 1])}


def combine(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Both sources with the shared columns (:data:`COLUMNS`), ours first."""
    return pd.concat([ours[list(COLUMNS)], paper[list(COLUMNS)]], ignore_index=True)


def per_layer(heads: pd.DataFrame) -> pd.DataFrame:
    """Per run, token set and layer: mean direct effect, Δlogit and self-repair over the layer's heads."""
    out = (heads.groupby(["source", "run", "model", "tokens", "n_layers", "layer"], sort=False)
           [["direct_effect", "delta_logit", "self_repair"]].mean().reset_index())
    out["rel_layer"] = relative_depth(out["layer"], out["n_layers"])
    return out


MANY = Claim("many", "Many heads in later layers are self-repaired", "§2.2, Fig 1",
             "the share of late-layer heads with positive mean self-repair on their top-k% tokens, each head's "
             "mean recomputed in every bootstrap replicate", paper_word("many"), fmt=".0%",
             reading="{value} of the {n} {unit} lose less logit than their direct effect on their top "
                     "tokens.",
             rationale="as in chapter 1: Fig 1 plots each head's top-2% mean and the paper reads 'many heads "
                       "in later layers' off it; 'later layers' are the second half, every head there counts")
SHARE_QUOTED = 0.30  # §3.2: "30% of direct effect is self-repaired by LayerNorm", "center around 30%"
SHARE = Claim("norm_share", "The final LayerNorm explains around 30% of a head's direct effect",
              "§3.2, App. A Fig 10",
              "the mean over late-layer heads of each head's mean clipped per-token share from_norm / DE on its "
              "top-k% tokens (the statistic of the release's percent_LN_of_DE), each head's mean recomputed in "
              "every replicate", approximately(SHARE_QUOTED, "around 30%"), paper=SHARE_QUOTED, fmt=".0%",
              reading="The final norm alone gives back {value} of a head's direct effect, on average over the "
                      "{n} {unit}.",
              rationale="§3.2: 'most of the models, on many of the layers, have an average self-repair due to "
                        "LayerNorm which center around 30%', of the clipped per-token share (Fig 10)")
BETWEEN = Claim("between", "Across the whole distribution many heads fall between y = −x and the x-axis",
                "§2.2, Fig 2, App. I Fig 20-22",
                "the share of heads with a positive whole-set mean direct effect whose whole-set means lie "
                "there (0 > Δlogit > −DE), recomputed in every replicate", paper_word("many"), fmt=".0%",
                reading="Averaged over every token, {value} of the {n} {unit} sit between the line of no "
                        "repair and the line of perfect repair.",
                rationale="as in chapter 1; Fig 20-22 repeat Fig 2's setup on more models, the release's "
                          "whole-set (1.0_) files hold the same means for GPT-2 small and Pythia-160M")
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
    extra = (f"(Plus {r['block_norm_share_late']:.0%} of DE from the sandwich block norms: Σ from_block_norms / Σ DE "
             "over the late heads with a positive DE, on their top-k% tokens, unclipped — chapter 2's share of the "
             "block norms is a mean of clipped per-token shares, a different number.)"
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


def comparison_markdown(table: pd.DataFrame, current: str | None = None, estimates: dict | None = None,
                        spread: dict | None = None) -> str:
    """Each claim per cached run of this project, decided on its own 95% cluster-bootstrap interval
    (:func:`run_verdicts`), then the paper's released values beside them, like for like (top-k%
    means for Fig 1 and the norm share, whole-set means for Fig 2 / 20-22; ``spread``:
    :func:`release_spread`)."""
    estimates = estimates or {}
    ours, paper = table[table["source"] != "paper"], table[table["source"] == "paper"]
    if current is not None and (ours["model"] == current).any():
        ours = pd.concat([ours[ours["model"] == current], ours[ours["model"] != current]])
    if ours.empty:
        return "No sweep of this project is cached yet: run chapter 1 (or `selfrepair sweep`) first."
    pm = ", ".join(paper["model"]) or "none"
    parts = [f"**Across models.** This project's cached sweeps: {counted(len(ours), 'run')} of "
             f"{counted(ours['model'].nunique(), 'model')}; the paper's released values: {pm} "
             f"({PAPER_CITATION})."]
    verdicts = run_verdicts(ours, estimates)
    for claim in CLAIMS:
        parts.append(render([v for v in verdicts if v.claim is claim], rules="ch06-rules") + "\n"
                     + release_values(claim, paper, spread, ours, estimates))
    return "\n".join(parts)


def release_spread(path: str | Path | None = None) -> dict:
    """The share of heads between y = −x and the x-axis on the release's two whole-set files of
    Pythia-160M (``1.0_`` and ``1_``): ``a``, ``b``."""
    a, b = (compare_models(load_paper_reference(path, v)).set_index("model").loc["pythia-160m", "frac_between_all"]
            for v in (WHOLE_SET, "1"))
    return {"a": float(a), "b": float(b)}


def release_markdown(path: str | Path | None = None) -> str:
    """What the release's files average over, read off the authors' script (:data:`RELEASE`)."""
    agree = release_agreement(path)
    return (f"**The paper's released values.** The authors' script names each file by the share of top "
            f"tokens it averages, with no prefix for the top 2% and `1.0_` for every token, so the "
            f"release holds top-2% means for four models and **whole-set means** for GPT-2 small and "
            f"Pythia-160M: those sit beside our whole-set means (Fig 2, 20–22). The script in the "
            f"release measures at least {RELEASE['min_tokens']:,} tokens of The Pile in prompts of "
            f"{RELEASE['prompt_len']} ({release_tokens():,} in whole batches of "
            f"{RELEASE['batch_size']}), not the paper's 1M; the `1.0_` files hold only the six "
            f"quantities its December 2023 versions saved, which ran {RELEASE['early_prompts']:,} "
            f"prompts of {RELEASE['early_prompt_len']} tokens, so they may come from that run. A second "
            f"whole-set file of Pythia-160M (`1_`) agrees with the first at r = "
            f"{agree['r_direct_effect']:.2f} on direct effect and r = {agree['r_delta_logit']:.2f} on "
            f"Δlogit over its {agree['n']} heads: the run-to-run spread of the release itself.")


@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # the sweep made sure to exist for this model (the paper: resample)
    n_boot: int = 1000  # cluster-bootstrap replicates of every run's intervals (documents resampled)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")


@dataclass
class AcrossChapter:
    heads: pd.DataFrame  # per head, every cached run and the paper's release, both token sets
    table: pd.DataFrame  # per run, the claims' metrics
    layers: pd.DataFrame  # per run, token set and layer
    current: str
    estimates: dict | None = None  # run -> claim key -> Estimate (run_estimates)
    spread: dict | None = None  # the release's two Pythia-160M whole-set files (release_spread)

    @property
    def verdicts(self) -> list[Verdict]:
        """:data:`CLAIMS` on each of this project's cached runs (:func:`run_verdicts`; the scorecard
        reads them)."""
        return run_verdicts(self.table[self.table["source"] != "paper"], self.estimates)

    @property
    def top_heads(self) -> pd.DataFrame:
        """Per-head top-k% means, ours and the paper's release (Fig 1)."""
        return self.heads[self.heads["tokens"] == "top-k%"].reset_index(drop=True)

    @property
    def whole_heads(self) -> pd.DataFrame:
        """Per-head whole-set means, our runs and the release's (GPT-2 small, Pythia-160M; Fig 2, 20-22)."""
        return self.heads[self.heads["tokens"] == "all"].reset_index(drop=True)

    @property
    def top_layers(self) -> pd.DataFrame:
        """Per-layer means of the top-k% values, every run."""
        return self.layers[self.layers["tokens"] == "top-k%"].reset_index(drop=True)


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
def measure(cfg: Config, progress: bool = True) -> AcrossChapter:
    """Make sure the current model has a sweep, then read every cached sweep and the release."""
    check(cfg)
    head_sweep(cfg, cfg.ablation, progress=progress)
    frames, estimates = [], {}
    for path, sweep in cached_sweeps(cfg.cache_dir):
        frame = sweep_heads(sweep, str(path))
        frames.append(frame)
        estimates[frame["run"].iloc[0]] = run_estimates(sweep, cfg.n_boot, cfg.seed)
    heads = combine(_ours(frames), load_paper_release())
    return AcrossChapter(heads, compare_models(heads), per_layer(heads), cfg.model, estimates, release_spread())


def shows(ch: AcrossChapter) -> str:
    """The "What this chapter shows" paragraph (:mod:`selfrepair.chapters.across_text`)."""
    from ..findings import markdown
    from .across_text import findings

    return markdown(findings(ch))


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes every head's direct effect and top-k% tokens in the sweeps compared here, and"
    " every zero-ablation number; the paper's published values were computed folded.")


def model_notes(cfg: Config) -> str:
    """What the architecture of the current model means for its row of the comparison."""
    from ..experiment import open_model
    from ..structure import architecture

    a = architecture(open_model(cfg))
    text = (f"- **{cfg.model}** has {'parallel-residual' if a['parallel'] else 'sequential'} blocks (as the "
            f"paper's {'Pythia' if a['parallel'] else 'GPT-2'} models do) and {a['norm']} (the paper's "
            "models all use LayerNorm).")
    if a["sandwich"]:
        text += (" It also normalizes each block's write; that norm share is a separate term "
                 "(`from_block_norms`), not counted in the final norm's share.")
    return text + "\n" + value_bias_note(cfg, VALUE_BIAS)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
CLAIMS_TABLE = Layout(("run", "n_heads", "frac_self_repaired_late", "norm_share_late", "frac_between_all",
                       "self_repair_late", "self_repair_early"),
                      percent=("frac_self_repaired_late", "norm_share_late", "frac_between_all"),
                      names={"run": "run", "frac_self_repaired_late": "late heads self-repaired",
                             "norm_share_late": "final-norm share of DE (late)",
                             "frac_between_all": "heads between y = −x and 0",
                             "self_repair_late": "self-repair, late", "self_repair_early": "self-repair, early"})
