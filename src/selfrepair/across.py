"""Across models: every cached head sweep beside the paper's released values (self-repair paper
§2.2, Fig 1 and Fig 20-22; claims of §2.2-2.3 and §3.2).

Two sources, one tidy per-head frame (canonical columns ``layer, head, label``):

- *this project*: every all-heads sweep cached under ``cache_dir``
  (``<cache_dir>/<model slug>/sweep-<ablation>-<hash>.safetensors``, :class:`~selfrepair.sweep.Sweep`);
  per head the mean over its top-k% tokens by clean direct effect;
- *the paper*: ``data/reference/paper_per_head.csv``, the per-head values Rushing & Nanda released
  with their code (starship006/backup_research, ``FINAL_figure_files/pickle_storage/
  breakdown_self_repair/``): GPT-2 small/medium and Pythia-160M/410M, resample ablation, top 2% of
  tokens on The Pile. Their ``self_repair_from_LN`` is a remainder in their code; ours is computed.

Signs as everywhere: ``delta_logit = ablated - clean``, ``self_repair = delta_logit -
(ablated_direct_effect - direct_effect)`` (eq. 1). Depth is compared as ``rel_layer = layer /
(n_layers - 1)`` because the models have 12 to 24 (or 18) layers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .results import CorruptResultError, head_label

PAPER_CITATION = ("Rushing & Nanda (2024), values released in starship006/backup_research "
                  "(FINAL_figure_files/pickle_storage/breakdown_self_repair/)")
QUANTITY_NAMES = {"direct_effects": "direct_effect", "ablated_direct_effects": "ablated_direct_effect",
                  "logit_diff": "delta_logit", "self_repair_from_heads": "from_heads",
                  "self_repair_from_layers": "from_mlps", "self_repair_from_LN": "from_norm",
                  "percent_LN_of_DE": "percent_norm_of_de", "percent_heads_of_DE": "percent_heads_of_de",
                  "percent_layers_of_DE": "percent_mlps_of_de"}
VALUES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair", "from_heads",
          "from_mlps", "from_norm", "from_block_norms")
COLUMNS = ("source", "run", "model", "ablation", "n_layers", "layer", "head", "label", "rel_layer") + VALUES


def reference_path() -> Path:
    from .data import data_dir
    return data_dir() / "reference" / "paper_per_head.csv"


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df["label"] = [head_label(l, h) for l, h in zip(df["layer"], df["head"])]
    df["rel_layer"] = df["layer"] / (df["n_layers"] - 1).clip(lower=1)
    return df


def load_cached_sweeps(cache_dir: str | Path) -> pd.DataFrame:
    """Per-head rows (top-k% means) of every sweep cached under ``cache_dir``; a damaged file is
    skipped with a warning. Empty frame (with the columns) when nothing is cached."""
    from .sweep import Sweep

    frames = []
    for path in sorted(Path(cache_dir).glob("*/sweep-*.safetensors")):
        try:
            sweep = Sweep.load(path)
        except CorruptResultError as e:
            warnings.warn(f"skipping damaged cached sweep {path}: {e}")
            continue
        meta = sweep.meta
        df = sweep.per_head()
        df["source"], df["model"], df["ablation"] = "this project", meta["model"], meta["ablation"]
        df["n_layers"], df["n_tokens"] = meta["n_layers"], meta.get("n_tokens")
        df["dataset"] = meta.get("params", {}).get("dataset")
        df["top_percent"], df["path"] = meta.get("top_percent"), str(path)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS) + ["n_tokens", "dataset", "top_percent", "path"])
    df = _finish(pd.concat(frames, ignore_index=True))
    df["run"] = [f"{m} (ours, {a}, {n} tok)" for m, a, n in zip(df["model"], df["ablation"], df["n_tokens"])]
    return df


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
    df["n_layers"] = df.groupby("model")["layer"].transform("max") + 1
    df["source"], df["ablation"], df["run"] = "paper", "resample", df["model"] + " (paper)"
    return _finish(df)


def combine(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Both sources with the shared columns (:data:`COLUMNS`), ours first."""
    return pd.concat([ours[list(COLUMNS)], paper[list(COLUMNS)]], ignore_index=True)


def per_layer(heads: pd.DataFrame) -> pd.DataFrame:
    """Per run and layer: mean direct effect, Δlogit and self-repair over the layer's heads."""
    out = (heads.groupby(["source", "run", "model", "n_layers", "layer"], sort=False)
           [["direct_effect", "delta_logit", "self_repair"]].mean().reset_index())
    out["rel_layer"] = out["layer"] / (out["n_layers"] - 1).clip(lower=1)
    return out


def compare_models(heads: pd.DataFrame) -> pd.DataFrame:
    """One row per run, the paper's claims as numbers (per-head top-k% means; "late" = the later
    half of the layers, ``rel_layer >= 0.5``):

    - ``frac_repaired_late``: late heads with DE > 0 that are self-repaired, 0 < -Δlogit < DE;
    - ``self_repair_late`` / ``self_repair_early``: mean self-repair of late / early heads;
    - ``repaired_share_late``: Σ self-repair / Σ DE over late heads with DE > 0 (1 = perfect);
    - ``norm_share_late``: Σ from_norm / Σ DE over the same heads (the final norm's part);
    - ``block_norm_share_late``: the same for the sandwich norms (Gemma-2/3; 0 elsewhere);
    - ``corr_de_dlogit``: correlation of DE and Δlogit over all heads.
    """
    rows = []
    for run, g in heads.groupby("run", sort=False):
        late = g[g["rel_layer"] >= 0.5]
        pos = late[late["direct_effect"] > 0]
        de = pos["direct_effect"].sum()
        repaired = (-pos["delta_logit"] > 0) & (-pos["delta_logit"] < pos["direct_effect"])
        rows.append({"run": run, "source": g["source"].iloc[0], "model": g["model"].iloc[0],
                     "ablation": g["ablation"].iloc[0], "n_layers": int(g["n_layers"].iloc[0]),
                     "n_heads": len(g), "frac_repaired_late": float(repaired.mean()) if len(pos) else np.nan,
                     "self_repair_late": late["self_repair"].mean(),
                     "self_repair_early": g.loc[g["rel_layer"] < 0.5, "self_repair"].mean(),
                     "repaired_share_late": pos["self_repair"].sum() / de if de > 0 else np.nan,
                     "norm_share_late": pos["from_norm"].sum() / de if de > 0 else np.nan,
                     "block_norm_share_late": pos["from_block_norms"].sum() / de if de > 0 else np.nan,
                     "corr_de_dlogit": g["direct_effect"].corr(g["delta_logit"])})
    return pd.DataFrame(rows)


def _range(values: pd.Series, fmt: str) -> str:
    v = values.dropna()
    return "n/a" if v.empty else f"{format(v.min(), fmt)} to {format(v.max(), fmt)}"


def comparison_markdown(table: pd.DataFrame, current: str | None = None) -> str:
    """The computed comparison: each claim, our runs' numbers beside the paper models' range."""
    ours, paper = table[table["source"] != "paper"], table[table["source"] == "paper"]
    if current is not None and (ours["model"] == current).any():
        ours = pd.concat([ours[ours["model"] == current], ours[ours["model"] != current]])
    if ours.empty:
        return "No sweep of this project is cached yet: run chapter 2 (or `selfrepair sweep`) first."
    pm = ", ".join(paper["model"]) or "none"
    lines = [f"**Across models.** This project's cached sweeps: {len(ours)} run(s) of "
             f"{ours['model'].nunique()} model(s); the paper's released values: {pm} "
             f"({PAPER_CITATION}). Late = the later half of the layers."]
    claims = [
        ("Many later-layer heads are self-repaired (0 < −Δlogit < DE)", "frac_repaired_late", ".0%",
         lambda v: v > 0.5),
        ("Self-repair is larger in later than in earlier layers", "self_repair_late", "+.3f", None),
        ("Self-repair is imperfect: it restores part, not all, of the direct effect", "repaired_share_late",
         ".0%", lambda v: 0 < v < 1),
        ("The final norm carries a sizeable part of it (§3.2: ≈30% of the direct effect)",
         "norm_share_late", ".0%", lambda v: 0.1 <= v <= 0.5)]
    for text, col, fmt, test in claims:
        parts = []
        for _, r in ours.iterrows():
            ok = (r["self_repair_late"] > r["self_repair_early"]) if test is None else bool(test(r[col]))
            extra = f" vs early {r['self_repair_early']:+.3f}" if test is None else ""
            if col == "norm_share_late" and abs(r["block_norm_share_late"]) > 0:
                extra = f" (plus {r['block_norm_share_late']:.0%} from the sandwich block norms)"
            parts.append(f"{r['run']}: {format(r[col], fmt)}{extra} — {'holds' if ok else 'differs'}")
        lines.append(f"- *{text}.* " + "; ".join(parts)
                     + f". Paper models: {_range(paper[col], fmt)}.")
    return "\n".join(lines)
