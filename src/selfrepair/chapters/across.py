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

Verdicts (:data:`CLAIMS`, in :mod:`selfrepair.chapters.across_claims`): per cached run, each claim's
statistic with a 95% cluster bootstrap over that run's documents (:func:`run_estimates`, from the
sweep's per-row sums and per-token rows); the release's values beside them with no interval (it
holds per-head means only), placed against ours where a run is of a released model
(:func:`release_values`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd

from ..ablation import check_ablation
from ..claims import BELOW, Verdict, render, render_claim
from ..config import CorpusConfig
from ..errors import InputError
from ..existence import top_means, whole_set_means
from ..experiment import head_sweep
from ..findings import Figure
from ..layernorm import norm_share
from ..measure import results_root
from ..results import CorruptResultError, head_label
from ..structure import relative_depth
from ..tables import Layout, counted
from ..verdict_records import recorded
from . import check, value_bias_note
from .across_claims import (BETWEEN, CLAIM_COLUMNS, CLAIMS, MANY, RELEASE_MODELS, SHARE,  # noqa: F401 (re-exported)
                            SHARE_QUOTED, _against, clipped_shares, compare_models, paper_model, release_values,
                            run_estimates, run_verdict, run_verdicts)

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
    # in words, as the prose and the charts print it (not "(ours, resample, 8,192 tok)": read3 #16)
    df["run"] = [f"{m} (this book: {a}, {n:,} tokens)" for m, a, n in zip(df["model"], df["ablation"], df["n_tokens"])]
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


FIGURES = {"many": Figure("ch06-fig1", "Fig 1, every model"), "norm_share": Figure("ch06-fig1", "Fig 1, every model"),
           "between": Figure("ch06-explorer", "Fig 20–22's setup")}  # each claim's figure on the page


def _split(table: pd.DataFrame, current: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """This project's runs (the current model's first) and the paper's release, rows of ``table``."""
    ours, paper = table[table["source"] != "paper"], table[table["source"] == "paper"]
    if current is not None and (ours["model"] == current).any():
        ours = pd.concat([ours[ours["model"] == current], ours[ours["model"] != current]])
    return ours, paper


def comparison_markdown(table: pd.DataFrame, current: str | None = None, estimates: dict | None = None,
                        spread: dict | None = None, below=()) -> str:
    """Each claim per cached run of this project, decided on its own 95% cluster-bootstrap interval
    (:func:`run_verdicts`), then the paper's released values beside them, like for like (top-k%
    means for Fig 1 and the norm share, whole-set means for Fig 2 / 20-22; ``spread``:
    :func:`release_spread`). The claims in ``below`` (keys: the page shows them after their figures,
    :func:`claim_markdown`) are listed compactly, each run's verdict word linking down to them."""
    estimates = estimates or {}
    ours, paper = _split(table, current)
    if ours.empty:
        return "No sweep of this project is cached yet: run chapter 1 (or `selfrepair sweep`) first."
    pm = ", ".join(paper["model"]) or "none"
    parts = [f"**Across models.** This project's cached sweeps: {counted(len(ours), 'run')} of "
             f"{counted(ours['model'].nunique(), 'model')}; the paper's released values: {pm} "
             f"({PAPER_CITATION})."]
    verdicts = run_verdicts(ours, estimates)
    if any(c.key in below for c in CLAIMS):
        parts.append(BELOW)  # once, not once per claim's list
    for claim in CLAIMS:
        mine = [v for v in verdicts if v.claim is claim]
        parts.append(render(mine, rules="ch06-rules", below=below, say_below=False) if claim.key in below else
                     render(mine, rules="ch06-rules") + "\n" + release_values(claim, paper, spread, ours, estimates))
    return "\n".join(parts)


def _and(items: list) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def size_markdown(table: pd.DataFrame, current: str, cfg: Any = None) -> str:
    """The current model's self-repair beside the paper's released values, and what might explain
    the size, said as untested (:func:`selfrepair.chapters.across_text.size_markdown`)."""
    from .across_text import size_markdown as said

    return said(table, current, cfg)


def claim_markdown(table: pd.DataFrame, key: str, current: str | None = None, estimates: dict | None = None,
                   spread: dict | None = None) -> str:
    """One claim's full verdicts, one per cached run (:func:`~selfrepair.claims.render_claim`, with
    the claim's anchor), then the paper's released values: what :func:`comparison_markdown` shows
    of it, for the page to show right after the claim's figure (:data:`FIGURES`)."""
    estimates = estimates or {}
    ours, paper = _split(table, current)
    if ours.empty:
        return ""
    claim = next(c for c in CLAIMS if c.key == key)
    return (render_claim(run_verdicts(ours, estimates), key, rules="ch06-rules") + "\n"
            + release_values(claim, paper, spread, ours, estimates))


def verdict(ch: "AcrossChapter", key: str) -> str:
    """Claim ``key`` on every cached run, shown right after the figure :data:`FIGURES` names for it."""
    return claim_markdown(ch.table, key, ch.current, ch.estimates, ch.spread)


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
                 "(the block norms' term of eq. 2), not counted in the final norm's share.")
    return text + "\n" + value_bias_note(cfg, VALUE_BIAS)


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
CLAIMS_TABLE = Layout(("run", "n_heads", "frac_self_repaired_late", "norm_share_late", "frac_between_all",
                       "self_repair_late", "self_repair_early"),
                      percent=("frac_self_repaired_late", "norm_share_late", "frac_between_all"),
                      names={"run": "run", "frac_self_repaired_late": "late heads self-repaired",
                             "norm_share_late": "final-norm share of DE (late)",
                             "frac_between_all": "heads between y = −x and 0",
                             "self_repair_late": "self-repair, late", "self_repair_early": "self-repair, early"},
                      # a phone: the three claims' numbers per run; heads and mean self-repair one click away
                      phone=("run", "frac_self_repaired_late", "norm_share_late", "frac_between_all"))
