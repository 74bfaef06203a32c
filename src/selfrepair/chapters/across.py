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
  breakdown_self_repair/``): GPT-2 small/medium and Pythia-160M/410M, resample ablation, means over
  each head's top 2% of tokens on The Pile — so they sit beside our top-k% means only (Fig 1 and the
  claims), never beside whole-set means. Their ``percent_LN_of_DE`` is the per-token clipped share
  (§3.2's "around 30%"), compared with ours like for like. Their ``self_repair_from_LN`` is a
  remainder in their code; ours is computed.

Signs as everywhere: ``delta_logit = ablated - clean``, ``self_repair = delta_logit -
(ablated_direct_effect - direct_effect)`` (eq. 1). Depth is compared as ``rel_layer = layer /
(n_layers - 1)`` because the models have 12 to 24 (or 18) layers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..ablation import check_ablation
from ..claims import Claim, Verdict, at_least, between, render
from ..config import CorpusConfig
from ..existence import top_means, whole_set_means
from ..experiment import head_sweep
from ..layernorm import norm_share
from ..results import CorruptResultError, head_label
from ..structure import is_late, relative_depth
from ..tables import Layout
from . import check

PAPER_CITATION = ("Rushing & Nanda (2024), values released in starship006/backup_research "
                  "(FINAL_figure_files/pickle_storage/breakdown_self_repair/)")
QUANTITY_NAMES = {"direct_effects": "direct_effect", "ablated_direct_effects": "ablated_direct_effect",
                  "logit_diff": "delta_logit", "self_repair_from_heads": "from_heads",
                  "self_repair_from_layers": "from_mlps", "self_repair_from_LN": "from_norm",
                  "percent_LN_of_DE": "percent_norm_of_de", "percent_heads_of_DE": "percent_heads_of_de",
                  "percent_layers_of_DE": "percent_mlps_of_de"}
VALUES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair", "from_heads",
          "from_mlps", "from_norm", "from_block_norms", "norm_share")
COLUMNS = ("source", "run", "model", "ablation", "tokens", "n_layers", "layer", "head", "label",
           "rel_layer") + VALUES
EXTRA = ("n_tokens", "dataset", "top_percent", "path")


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
                   n_layers=meta["n_layers"], n_tokens=meta.get("n_tokens"), dataset=key.get("dataset"),
                   top_percent=meta.get("top_percent"), path=path)
    df["run"] = [f"{m} (ours, {a}, {n:,} tok)" for m, a, n in zip(df["model"], df["ablation"], df["n_tokens"])]
    return df


def load_cached_sweeps(cache_dir: str | Path) -> pd.DataFrame:
    """Per-head rows (top-k% and whole-set means) of every sweep cached under ``cache_dir``; a
    damaged file is skipped with a warning. Empty frame (with the columns) when nothing is cached."""
    from ..sweep import Sweep

    frames = []
    for path in sorted(Path(cache_dir).glob("*/sweep-*.safetensors")):
        try:
            sweep = Sweep.load(path)
        except CorruptResultError as e:
            warnings.warn(f"skipping damaged cached sweep {path}: {e}")
            continue
        frames.append(sweep_heads(sweep, str(path)))
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS) + list(EXTRA))
    return _finish(pd.concat(frames, ignore_index=True))


def load_paper_reference(path: str | Path | None = None, variant: str | None = None) -> pd.DataFrame:
    """The paper's released per-head values as a tidy frame, one row per (model, head), our column
    names (:data:`QUANTITY_NAMES`) plus ``self_repair`` from eq. 1. ``variant=None`` keeps the
    complete, unprefixed set (see ``data/reference/README.md``); ``"1.0"`` the other one."""
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
    df["tokens"] = "top-k%"  # the released values are top-2% means
    return _finish(df)


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
             "the share of late-layer heads with positive mean self-repair on their top-k% tokens",
             at_least(0.5), fmt=".0%",
             reading="{value} of the {n} {unit} lose less logit than their direct effect on their top "
                     "tokens.")
SHARE = Claim("norm_share", "The final LayerNorm explains around 30% of a head's direct effect",
              "§3.2, Fig 6", "the mean over late-layer heads of the clipped per-token share from_norm / DE "
              "on their top-k% tokens (the released percent_LN_of_DE for the paper's models)",
              between(0.15, 0.45), paper=0.30, fmt=".0%",
              reading="The final norm alone gives back {value} of a head's direct effect, on average "
                      "over the {n} {unit}.")


def compare_models(heads: pd.DataFrame) -> pd.DataFrame:
    """One row per run, the claims' metrics on comparable token sets ("late" = the later half of
    the layers, :func:`selfrepair.structure.is_late`):

    - ``frac_self_repaired_late`` (top-k% means, ours and the paper's): late heads with positive
      mean self-repair (:data:`MANY`);
    - ``norm_share_late`` (top-k%, ours and the paper's): mean clipped per-token final-norm share
      (:data:`SHARE`; the paper's released ``percent_LN_of_DE``);
    - ``frac_between_all`` (whole-set means, ours only — the release has top-2% means): heads with a
      positive direct effect lying between y = −x and the x-axis (Fig 2 / 20-22);
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
                     "ablation": g["ablation"].iloc[0], "n_layers": int(g["n_layers"].iloc[0]),
                     "n_heads": len(top), "n_late": len(late),
                     "frac_self_repaired_late": float((late["self_repair"] > 0).mean()) if len(late) else np.nan,
                     "norm_share_late": float(late["norm_share"].mean()),
                     "frac_between_all": float(between_.mean()) if len(whole_pos) else np.nan,
                     "self_repair_late": late["self_repair"].mean(),
                     "self_repair_early": top.loc[~is_late(top["layer"], top["n_layers"]), "self_repair"].mean(),
                     "block_norm_share_late": pos["from_block_norms"].sum() / de if de > 0 else np.nan})
    return pd.DataFrame(rows)


def _range(values: pd.Series, fmt: str) -> str:
    v = values.dropna()
    return "n/a" if v.empty else f"{format(v.min(), fmt)} to {format(v.max(), fmt)}"


def _late_heads(heads: pd.DataFrame | None, run: str) -> pd.DataFrame | None:
    if heads is None:
        return None
    top = heads[(heads["run"] == run) & (heads["tokens"] == "top-k%")]
    return top[is_late(top["layer"], top["n_layers"])]


def comparison_markdown(table: pd.DataFrame, current: str | None = None,
                        heads: pd.DataFrame | None = None) -> str:
    """Each claim per cached run of this project, with the paper models' released range. With
    ``heads`` (the per-head frame behind ``table``) every verdict carries its 95% interval over the
    run's late heads; without, the values stand alone."""
    ours, paper = table[table["source"] != "paper"], table[table["source"] == "paper"]
    if current is not None and (ours["model"] == current).any():
        ours = pd.concat([ours[ours["model"] == current], ours[ours["model"] != current]])
    if ours.empty:
        return "No sweep of this project is cached yet: run chapter 1 (or `selfrepair sweep`) first."
    pm = ", ".join(paper["model"]) or "none"
    parts = [f"**Across models.** This project's cached sweeps: {len(ours)} run(s) of "
             f"{ours['model'].nunique()} model(s); the paper's released values: {pm} "
             f"({PAPER_CITATION})."]
    for claim, col in ((MANY, "frac_self_repaired_late"), (SHARE, "norm_share_late")):
        verdicts = []
        for _, r in ours.iterrows():
            unit = f"late heads of {r['run']}"
            extra = (f"(Plus {r['block_norm_share_late']:.0%} of DE from the sandwich block norms.)"
                     if col == "norm_share_late" and abs(r["block_norm_share_late"]) > 0 else "")
            late = _late_heads(heads, r["run"])
            if late is None:
                verdicts.append(Verdict(claim, float(r[col]), int(r["n_late"]), unit, extra))
            elif claim is MANY:
                verdicts.append(Verdict.share(claim, late["self_repair"] > 0, unit, extra))
            else:
                verdicts.append(Verdict.mean(claim, late["norm_share"], unit, extra))
        parts.append(render(verdicts) + f"\n  The paper's models: {_range(paper[col], claim.fmt)}.")
    parts.append("- *Across the whole distribution, heads between y = −x and the x-axis* (Fig 2, "
                 "20-22; whole-set means, which the paper's release does not contain): "
                 + "; ".join(f"{r['run']}: {r['frac_between_all']:.0%} of the heads with a positive "
                             f"direct effect" for _, r in ours.iterrows()) + ".")
    return "\n".join(parts)


@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # the sweep made sure to exist for this model (the paper: resample)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)


@dataclass
class AcrossChapter:
    heads: pd.DataFrame  # per head, every cached run and the paper's release, both token sets
    table: pd.DataFrame  # per run, the claims' metrics
    layers: pd.DataFrame  # per run, token set and layer
    current: str

    @property
    def top_heads(self) -> pd.DataFrame:
        """Per-head top-k% means, ours and the paper's release (Fig 1)."""
        return self.heads[self.heads["tokens"] == "top-k%"].reset_index(drop=True)

    @property
    def whole_heads(self) -> pd.DataFrame:
        """Per-head whole-set means, our runs only (Fig 2, 20-22; the release has none)."""
        return self.heads[self.heads["tokens"] == "all"].reset_index(drop=True)

    @property
    def top_layers(self) -> pd.DataFrame:
        """Per-layer means of the top-k% values, every run."""
        return self.layers[self.layers["tokens"] == "top-k%"].reset_index(drop=True)


def measure(cfg: Config, progress: bool = True) -> AcrossChapter:
    """Make sure the current model has a sweep, then read every cached sweep and the release."""
    check(cfg)
    head_sweep(cfg, cfg.ablation, progress=progress)
    heads = combine(load_cached_sweeps(cfg.cache_dir), load_paper_reference())
    return AcrossChapter(heads, compare_models(heads), per_layer(heads), cfg.model)


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
    return text


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
CLAIMS_TABLE = Layout(("run", "n_heads", "frac_self_repaired_late", "norm_share_late", "frac_between_all",
                       "self_repair_late", "self_repair_early"),
                      percent=("frac_self_repaired_late", "norm_share_late", "frac_between_all"),
                      names={"run": "run", "frac_self_repaired_late": "late heads self-repaired",
                             "norm_share_late": "final-norm share of DE (late)",
                             "frac_between_all": "heads between y = −x and 0",
                             "self_repair_late": "self-repair, late", "self_repair_early": "self-repair, early"})
