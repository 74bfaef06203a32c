"""Self-repair exists, but imperfectly and noisily (paper §2.2-2.3, Fig 1-3, App. I).

Plain pandas/numpy over an all-heads sweep (:class:`selfrepair.sweep.Sweep`): ``per_head`` holds
each head's means over its top-k% instances by clean direct effect (``<q>``) and over all tokens
(``<q>_all``); ``top`` / ``sample`` hold per-token rows (each head's top instances / a fixed random
sample of instances, the same for every head).

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

from .config import parse_head
from .errors import InputError
from .results import head_label

KEYS = ["layer", "head", "label"]
CATEGORIES = ("repaired", "overcorrected", "broken", "no direct effect")
FEATURED_RULE = ("the {n} heads with the largest mean top-k% direct effect in the second half of "
                 "the layers (layer >= {first}); ties broken by layer, then head")


def sweep_frames(sweep) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(per_head, top, sample)`` frames of a :class:`~selfrepair.sweep.Sweep`."""
    import torch

    with torch.no_grad():  # a freshly computed sweep may still carry autograd history
        for name in ("sum_all", "sum_top", "tok_values"):
            setattr(sweep, name, getattr(sweep, name).detach())
        return sweep.per_head(), sweep.tokens("top"), sweep.tokens("sample")


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


def featured_heads(per_head: pd.DataFrame, n: int = 4, override=None) -> pd.DataFrame:
    """The heads Fig 3 shows: ``override`` labels (``cfg.featured_heads``) if given, else the rule
    :data:`FEATURED_RULE`. Deterministic: sorting is stable and ties go to the lower layer/head."""
    if override:
        pairs = [parse_head(s) for s in override]
        known = set(zip(per_head["layer"], per_head["head"]))
        missing = [head_label(*p) for p in pairs if p not in known]
        if missing:
            raise InputError(f"featured_heads {missing} are not heads of this model: labels run "
                             f"L0H0 .. {per_head['label'].iloc[-1]}")
        keep = per_head.set_index(["layer", "head"]).loc[pairs].reset_index()
        return keep[KEYS + ["direct_effect"]].assign(reason="chosen by featured_heads")
    first = int(per_head["layer"].max() + 1) // 2
    late = per_head[per_head["layer"] >= first]
    ranked = late.sort_values(["direct_effect", "layer", "head"], ascending=[False, True, True],
                              kind="mergesort")
    rule = FEATURED_RULE.format(n=n, first=first)
    return ranked.head(n)[KEYS + ["direct_effect"]].reset_index(drop=True).assign(reason=rule)


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
    """Per head, how noisy self-repair is across its tokens: quantiles of ``self_repair``, the
    spread relative to the mean direct effect, the share of tokens in each region and the Pearson
    correlation of DE with ``delta_logit`` (-1 for a head that is never repaired)."""
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
    first = int(heads["layer"].max() + 1) // 2
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


# -- the chapter in one call ----------------------------------------------------------------------
class Existence:
    """Everything chapter 01 shows, from one sweep: the frames above, computed once."""

    def __init__(self, per_head: pd.DataFrame, top: pd.DataFrame, sample: pd.DataFrame,
                 featured_override=None, n_boot: int = 1000, seed: int = 0, meta: dict | None = None):
        self.per_head = classify_heads(per_head)
        self.top, self.sample, self.meta = top, sample, meta or {}
        self.featured = featured_heads(per_head, override=featured_override)
        self.boot = bootstrap_means(top, "delta_logit", n_boot=n_boot, seed=seed)
        self.boot_self_repair = bootstrap_means(top, "self_repair", n_boot=n_boot, seed=seed)
        self.spread = token_spread(top)
        self.summary = imperfection_summary(per_head, self.boot)
        self.layers = layer_means(per_head)


def measure(cfg, n_boot: int = 1000, progress: bool = True) -> Existence:
    """Chapter 01 from the (cached) all-heads sweep of ``cfg``."""
    from .experiment import head_sweep

    sweep = head_sweep(cfg, progress=progress)
    per_head, top, sample = sweep_frames(sweep)
    return Existence(per_head, top, sample, cfg.featured_heads, n_boot=n_boot, seed=cfg.seed,
                     meta=sweep.meta)


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def on_this_model(ex: Existence, model: str = "this model") -> str:
    """The "On this model" paragraph: the paper's §2 claims re-tested, numbers interpolated.

    Verdict rules (stated in the text): *many later-layer heads self-repair* holds when the late
    layers' mean self-repair is positive and at least a third of their heads with positive direct
    effect lie in the repaired region; *early layers often negative* holds when at least a third of
    early-layer heads have negative mean self-repair, more than in the late layers; *imperfect*
    holds when repaired heads lose on average more than 5% of their direct effect and at least half
    of them have a bootstrap interval of mean delta_logit entirely below 0; *noisy* holds when the
    median late-layer head's inter-quartile range of per-token self-repair is at least half its mean
    direct effect (late layers: early heads' top-k% direct effects are often tiny, which would
    inflate the ratio).
    """
    s = ex.summary.set_index("group")
    early, late, all_ = s.loc["early"], s.loc["late"], s.loc["all"]
    k = ex.meta.get("top_percent", "k")
    many = late["mean_self_repair"] > 0 and late["share_repaired"] >= 1 / 3
    negative = (early["share_negative_self_repair"] >= 1 / 3
                and early["share_negative_self_repair"] > late["share_negative_self_repair"])
    n_rep = int(all_["n_repaired"])
    ci = int(all_.get("n_repaired_ci_below_0", 0))
    imperfect = n_rep > 0 and all_["mean_lost_fraction"] > 0.05 and ci >= n_rep / 2
    first = int(ex.per_head["layer"].max() + 1) // 2
    late_spread = ex.spread[ex.spread["layer"] >= first]  # heads whose direct effect is sizeable
    iqr = float(late_spread["iqr_over_de"].median())
    over = float(late_spread["share_overcorrecting"].median())
    noisy = np.isfinite(iqr) and iqr >= 0.5
    verdict = {True: "**holds**", False: "**differs**"}
    feat = ex.spread.merge(ex.featured[["layer", "head"]], on=["layer", "head"])
    feat_txt = ", ".join(f"{r.label} (r = {r.corr_de_delta_logit:+.2f})" for r in feat.itertuples())
    return (
        f"**On {model}** (top {k}% tokens per head, {ex.meta.get('ablation', 'resample')} ablation). "
        f"*Many later-layer heads self-repair* {verdict[bool(many)]}: in layers {late['layers']} the "
        f"mean self-repair is {late['mean_self_repair']:+.3f} logits and {_pct(late['share_repaired'])} "
        f"of the {int(late['n_positive_de'])} heads with positive direct effect lie between y = −x and "
        f"the x-axis ({_pct(early['share_repaired'])} in layers {early['layers']}). "
        f"*Early layers often negative* {verdict[bool(negative)]}: "
        f"{_pct(early['share_negative_self_repair'])} of early-layer heads have negative mean "
        f"self-repair, against {_pct(late['share_negative_self_repair'])} of late-layer heads. "
        f"*Imperfect* {verdict[bool(imperfect)]}: the {n_rep} repaired heads still lose on average "
        f"{_pct(all_['mean_lost_fraction'])} of their direct effect, and {ci} of them have a 95% "
        f"bootstrap interval of mean Δlogit entirely below 0. *Noisy* {verdict[bool(noisy)]}: for the "
        f"median late-layer head the inter-quartile range of per-token self-repair is {_pct(iqr)} of its mean "
        f"direct effect, and on a median {_pct(over)} of the tokens where the ablation removes direct "
        f"effect the logit goes up instead (overcorrection). Featured heads, with the per-token "
        f"correlation of DE and Δlogit (−1 = no repair at all): {feat_txt}. "
        f"(Verdict rules: late mean self-repair > 0 and ≥ 1/3 of late heads repaired; ≥ 1/3 of "
        f"early heads negative and more than late; repaired heads lose > 5% of DE and ≥ half have "
        f"intervals below 0; median late-layer IQR ≥ 50% of DE.)")
