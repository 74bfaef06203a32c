"""Self-repair exists, but imperfectly and noisily (paper §2.2-2.3, Fig 1-3, App. I).

Plain pandas/numpy over an all-heads sweep (:class:`selfrepair.sweep.Sweep`), on the token sets the
paper uses for each figure:

- :func:`top_means` — each head's means over its own top-k% tokens by clean DE (Fig 1: "the top 2%
  of tokens filtered by each head's direct effect");
- :func:`whole_set_means` — each head's means over every token (Fig 2: "averaging these values
  across the whole dataset"; App. I Fig 20-22);
- per-token rows of each head's top instances (``top``) and of a uniform random sample of all
  instances, the same for every head (``sample``: Fig 3's "5000 individual tokens").

Signs (stated once, used everywhere):

- ``delta_logit = logit' - logit`` (ablated minus clean, centered logit of the next token);
- ``delta_direct_effect = DE' - DE`` (clean scales), so an ablation *removes* ``-delta_direct_effect``;
- ``self_repair = delta_logit - delta_direct_effect`` (eq. 1).

Regions of the paper's Fig 2/3 (x = clean ``direct_effect`` DE, y = ``delta_logit``), for DE > 0:

- **repaired** (between the line y = -x and the x-axis): ``-DE < delta_logit < 0`` — the logit drops,
  by less than the head's direct effect;
- **overcorrected** (above the x-axis): ``delta_logit >= 0`` — the logit does not drop at all. For a
  token whose ablation removes direct effect (``delta_direct_effect < 0``) this is exactly
  ``self_repair >= -delta_direct_effect``: repair at least as large as the damage;
- **broken** (below y = -x): ``delta_logit <= -DE`` — downstream breakage, not self-repair;
- heads or tokens with ``DE <= 0`` are **no direct effect** and left out of the shares.

*Imperfect* means the repaired heads' mean ``delta_logit`` is not 0: we report the fraction of the
direct effect that is lost (``-delta_logit / DE``) and how many repaired heads have a bootstrap
confidence interval of mean ``delta_logit`` entirely below 0. *Noisy* means the per-token spread
within a head is wide compared with its mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .results import head_label
from .structure import late_start

KEYS = ["layer", "head", "label"]
CATEGORIES = ("repaired", "overcorrected", "broken", "no direct effect")
MEANS = ("direct_effect", "ablated_direct_effect", "delta_direct_effect", "delta_logit",
         "self_repair", "from_heads", "from_mlps", "from_norm", "from_block_norms")


def sweep_frames(sweep) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(per_head, top, sample)`` frames of a :class:`~selfrepair.sweep.Sweep`."""
    return sweep.per_head(), sweep.tokens_frame("top"), sweep.tokens_frame("sample")


def top_means(per_head: pd.DataFrame) -> pd.DataFrame:
    """Per head, means over its top-k% tokens (Fig 1, Fig 4-8), with ``tokens = "top-k%"``."""
    return per_head[KEYS + list(MEANS) + ["n_top"]].rename(columns={"n_top": "n_tokens"}).assign(tokens="top-k%")


def whole_set_means(per_head: pd.DataFrame) -> pd.DataFrame:
    """Per head, means over every token of the run (Fig 2, Fig 20-22), canonical column names,
    with ``tokens = "all"``."""
    out = per_head[KEYS].copy()
    for q in MEANS:
        out[q] = per_head[f"{q}_all"]
    return out.assign(n_tokens=per_head["n_all"], tokens="all")


def region(direct_effect, delta_logit) -> np.ndarray:
    """The Fig 2/3 region of each (DE, delta_logit) pair, one of :data:`CATEGORIES`."""
    de, dl = np.asarray(direct_effect, float), np.asarray(delta_logit, float)
    return np.select([de <= 0, dl >= 0, dl <= -de], ["no direct effect", "overcorrected", "broken"],
                     "repaired").astype(object)


def classify_heads(per_head: pd.DataFrame) -> pd.DataFrame:
    """``per_head`` plus ``category`` (its region) and ``repair_fraction`` = ``self_repair /
    -delta_direct_effect`` (1 = perfect repair, 0 = none, > 1 overcorrection; NaN where the
    ablation removes no direct effect)."""
    out = per_head.copy()
    out["category"] = region(out["direct_effect"], out["delta_logit"])
    removed = -out["delta_direct_effect"]
    out["repair_fraction"] = np.where(removed > 0, out["self_repair"] / removed.where(removed > 0), np.nan)
    return out


def layer_means(per_head: pd.DataFrame, column: str = "self_repair") -> pd.DataFrame:
    """Per layer: mean and count of ``column`` over its heads (the line of Fig 1)."""
    g = per_head.groupby("layer", sort=True)[column]
    return pd.DataFrame({"layer": g.mean().index, column: g.mean().to_numpy(),
                         "n_heads": g.size().to_numpy()})


def bootstrap_means(tokens: pd.DataFrame, column: str = "delta_logit", n_boot: int = 1000,
                    seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Per head: ``mean`` of ``column`` over its rows and a percentile bootstrap interval
    ``lo``/``hi`` (``n_boot`` resamples of the head's rows with replacement). Each head draws from
    its own generator seeded by ``(seed, layer, head)``, so a head's interval does not depend on
    which other heads are in the frame."""
    rows = []
    alpha = (1 - ci) / 2
    for (layer, head), g in tokens.groupby(["layer", "head"], sort=True):
        x = g[column].to_numpy(float)
        rng = np.random.default_rng([seed, int(layer), int(head)])
        boots = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
        lo, hi = np.quantile(boots, [alpha, 1 - alpha])
        rows.append({"layer": layer, "head": head, "label": head_label(layer, head),
                     "column": column, "n": len(x), "mean": x.mean(), "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def token_spread(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per head, how noisy self-repair is across its tokens (a uniform sample of the distribution,
    or each head's top-k% tokens): quantiles of ``self_repair``, the spread relative to the mean
    direct effect, the share of tokens in each region and the Pearson correlation of DE with
    ``delta_logit`` (-1 for a head that is never repaired; near 0 when the loss is unrelated to the
    head's direct effect)."""
    t = tokens.assign(category=region(tokens["direct_effect"], tokens["delta_logit"]))
    rows = []
    for (layer, head), g in t.groupby(["layer", "head"], sort=True):
        sr = g["self_repair"].to_numpy(float)
        q10, q25, q50, q75, q90 = np.quantile(sr, [0.1, 0.25, 0.5, 0.75, 0.9])
        de = g["direct_effect"].to_numpy(float)
        dl = g["delta_logit"].to_numpy(float)
        removed = -g["delta_direct_effect"].to_numpy(float) > 0
        corr = np.corrcoef(de, dl)[0, 1] if len(g) > 2 and de.std() > 0 and dl.std() > 0 else np.nan
        row = {"layer": layer, "head": head, "label": head_label(layer, head), "n": len(g),
               "mean_de": de.mean(), "mean": sr.mean(), "std": sr.std(ddof=1) if len(g) > 1 else 0.0,
               "q10": q10, "q25": q25, "median": q50, "q75": q75, "q90": q90,
               "iqr_over_de": (q75 - q25) / de.mean() if de.mean() > 0 else np.nan,
               "share_overcorrecting": float(np.mean(dl[removed] > 0)) if removed.any() else np.nan,
               "corr_de_delta_logit": corr}
        for c in CATEGORIES[:3]:
            row[f"share_{c}"] = float(np.mean(g["category"] == c))
        rows.append(row)
    return pd.DataFrame(rows)


def imperfection_summary(per_head: pd.DataFrame, boot: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per layer group ("early" = first half of the layers, "late", "all"): head counts
    per region, mean self-repair, the share of heads with negative self-repair, and for the repaired
    heads the mean fraction of direct effect lost (``-delta_logit / DE``); with ``boot`` (bootstrap
    of ``delta_logit``) also how many repaired heads have an interval entirely below 0."""
    heads = classify_heads(per_head)
    if boot is not None:
        heads = heads.merge(boot[["layer", "head", "hi"]], on=["layer", "head"], how="left")
    first = late_start(int(heads["layer"].max()) + 1)
    groups = {"early": heads[heads["layer"] < first], "late": heads[heads["layer"] >= first],
              "all": heads}
    rows = []
    for name, g in groups.items():
        rep = g[g["category"] == "repaired"]
        positive = g[g["direct_effect"] > 0]
        row = {"group": name, "layers": (f"0-{first - 1}" if name == "early" else
                                         f"{first}-{int(heads['layer'].max())}" if name == "late"
                                         else f"0-{int(heads['layer'].max())}"),
               "n_heads": len(g), "n_positive_de": len(positive),
               "mean_self_repair": g["self_repair"].mean(),
               "share_negative_self_repair": float((g["self_repair"] < 0).mean()) if len(g) else np.nan,
               "share_repaired": len(rep) / len(positive) if len(positive) else np.nan,
               "mean_lost_fraction": float((-rep["delta_logit"] / rep["direct_effect"]).mean())
               if len(rep) else np.nan}
        for c in CATEGORIES:
            row[f"n_{c}"] = int((g["category"] == c).sum())
        if boot is not None:
            row["n_repaired_ci_below_0"] = int((rep["hi"] < 0).sum())
        rows.append(row)
    return pd.DataFrame(rows)
