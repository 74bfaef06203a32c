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

*Imperfect* means the repaired heads' mean ``delta_logit`` is not 0: heads are selected as repaired
on one half of the documents and their ``delta_logit`` is read on the other (a head picked because
its mean fell below 0 would otherwise be tested on the noise that picked it). *Noisy* means the
per-token spread within a head is wide compared with its mean.

**Uncertainty** (:mod:`selfrepair.uncertainty`): :func:`evidence` turns a sweep into per-cluster
sums (the rows of one document together); each statistic below is a function of their
weighted totals, ``[replicate, layer, head, column]``, so a bootstrap replicate recomputes every
head's means and classification before it counts heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .results import head_label
from .structure import late_start
from .sweep_batch import ROW_COLUMNS
from .uncertainty import Bootstrap, Clusters, pearson, ratio, share

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


# -- what every verdict of chapter 1 resamples: per-cluster sums (selfrepair.uncertainty) ---------
WHOLE = ("n",) + ROW_COLUMNS  # every token: count, then the sums of ROW_COLUMNS
TOP = ("n", "direct_effect", "delta_logit", "self_repair")  # each head's top-k% tokens


@dataclass
class Evidence:
    """Per-cluster sums of an all-heads sweep, ``[cluster, layer, head, column]``: the
    sufficient statistics of every chapter-1 statistic. ``whole`` over every token (columns
    :data:`WHOLE`), ``top`` over each head's top-k% tokens (:data:`TOP`), ``sample`` the moments
    of (DE, Δlogit) on the uniform sample (:data:`selfrepair.uncertainty.MOMENTS`)."""

    clusters: Clusters
    whole: np.ndarray
    top: np.ndarray
    sample: np.ndarray

    @property
    def n_layers(self) -> int:
        return self.whole.shape[1]


def clusters_of(sweep) -> Clusters:
    """The units of independence of a sweep's rows: the rows of one document
    (:meth:`Clusters.documents`), each row its own where no document is known."""
    if sweep.main_document is None:
        return Clusters.rows(len(sweep.sum_row))
    return Clusters.documents(sweep.main_document.numpy())


def evidence(sweep) -> Evidence:
    """:class:`Evidence` of a :class:`~selfrepair.sweep.Sweep` (which keeps per-row sums)."""
    if sweep.sum_row is None:
        raise ValueError("this sweep has no per-row sums (written before they were kept): "
                         "delete the cached entry so it is measured again")
    clusters, (L, H) = clusters_of(sweep), sweep.sum_all.shape[:2]
    rows = sweep.sum_row.double().numpy()
    count = np.full(rows.shape[:3] + (1,), float(sweep.seq1))
    top, sample = sweep.tokens_frame("top"), sweep.tokens_frame("sample")
    return Evidence(clusters, clusters.sum_rows(np.concatenate([count, rows], -1)),
                    clusters.head_sums(top, TOP[1:], L, H),
                    clusters.head_sums(sample, (), L, H, moments_of=("direct_effect", "delta_logit")))


def mean_of(totals: np.ndarray, table: tuple[str, ...], name: str) -> np.ndarray:
    """Per head, the mean of ``name`` from totals ``[..., table]`` (NaN over no token)."""
    return ratio(totals[..., table.index(name)], totals[..., 0])


def in_band(de: np.ndarray, dl: np.ndarray) -> np.ndarray:
    """Fig 2's repaired region for DE > 0: ``-DE < Δlogit < 0``."""
    return (de > 0) & (dl < 0) & (dl > -de)


def share_self_repaired(top: np.ndarray, first: int) -> np.ndarray:
    """Per replicate: the share of heads in layers ``first ..`` whose top-k% mean self-repair is > 0."""
    sr = mean_of(top, TOP, "self_repair")[:, first:]
    return share(sr > 0, within=np.isfinite(sr))


def share_in_band(whole: np.ndarray) -> np.ndarray:
    """Per replicate: the share of heads with a positive whole-set DE that lie in the band."""
    de, dl = mean_of(whole, WHOLE, "direct_effect"), mean_of(whole, WHOLE, "delta_logit")
    return share(in_band(de, dl), within=de > 0)


def band_margin(whole: np.ndarray) -> np.ndarray:
    """Per head, how far inside the band its whole-set means lie: ``min(-Δlogit, Δlogit + DE)``
    (> 0 inside, < 0 outside; NaN for DE <= 0)."""
    de, dl = mean_of(whole, WHOLE, "direct_effect"), mean_of(whole, WHOLE, "delta_logit")
    return np.where(de > 0, np.minimum(-dl, dl + de), np.nan)


def share_losing(whole: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Per replicate: the share of the ``selected`` heads whose whole-set mean Δlogit is < 0."""
    dl = mean_of(whole, WHOLE, "delta_logit")
    return share(dl < 0, within=selected & np.isfinite(dl))


def lost_fraction(whole: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Per replicate: the ``selected`` heads' summed −Δlogit over their summed DE (whole-set means):
    the share of their direct effect that is not repaired (0: perfect repair)."""
    de, dl = mean_of(whole, WHOLE, "direct_effect"), mean_of(whole, WHOLE, "delta_logit")
    axes = tuple(range(1, de.ndim))
    return ratio(np.where(selected, -dl, 0).sum(axes), np.where(selected, de, 0).sum(axes))


def share_uncorrelated(top: np.ndarray, sample: np.ndarray, first: int, clear: float) -> np.ndarray:
    """Per replicate: among heads in layers ``first ..`` with a top-k% DE at least their median,
    the share whose per-token correlation of DE and Δlogit on the sample is not clear (r > ``clear``)."""
    de = mean_of(top, TOP, "direct_effect")[:, first:]
    big = de >= np.nanmedian(de, axis=(1, 2), keepdims=True)
    r = pearson(sample[:, first:])
    return share(r > clear, within=big & np.isfinite(r))


def head_intervals(ev: Evidence, n_boot: int, seed: int) -> pd.DataFrame:
    """Per head, its whole-set means of Δlogit (``mean``, ``lo``/``hi``) and DE (``de``,
    ``de_lo``/``de_hi``) with 95% cluster-bootstrap intervals (Fig 2's points and their intervals),
    ``n`` tokens and the ``clusters`` resampled."""
    boot = Bootstrap.over(ev.clusters, n_boot, seed)
    dl = boot.intervals(lambda t: mean_of(t, WHOLE, "delta_logit"), ev.whole)
    de = boot.intervals(lambda t: mean_of(t, WHOLE, "direct_effect"), ev.whole)
    L, H = ev.whole.shape[1:3]
    layer, head = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    out = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
    out["label"] = [head_label(l, h) for l, h in zip(out["layer"], out["head"])]
    out["column"], out["n"] = "delta_logit", ev.whole.sum(0)[..., 0].ravel().astype(int)
    out["mean"], out["lo"], out["hi"] = (a.ravel() for a in dl)
    out["de"], out["de_lo"], out["de_hi"] = (a.ravel() for a in de)
    out["clusters"], out["cluster_unit"] = ev.clusters.n, ev.clusters.unit
    return out


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


def imperfection_summary(per_head: pd.DataFrame) -> pd.DataFrame:
    """One row per layer group ("early" = first half of the layers, "late", "all"): head counts
    per region, mean self-repair, the share of heads with negative self-repair, and for the repaired
    heads the mean fraction of direct effect lost (``-delta_logit / DE``). Descriptive: the
    chapter's verdict on "imperfect" selects and tests on disjoint halves of the documents."""
    heads = classify_heads(per_head)
    first = late_start(int(heads["layer"].max()) + 1)
    groups = {"early": heads[heads["layer"] < first], "late": heads[heads["layer"] >= first],
              "all": heads}
    rows = []
    for name, g in groups.items():
        rep = g[g["category"] == "repaired"]
        positive = g[g["direct_effect"] > 0]
        row = {"group": name, "layers": (f"0–{first - 1}" if name == "early" else
                                         f"{first}–{int(heads['layer'].max())}" if name == "late"
                                         else f"0–{int(heads['layer'].max())}"),
               "n_heads": len(g), "n_positive_de": len(positive),
               "mean_self_repair": g["self_repair"].mean(),
               "share_negative_self_repair": float((g["self_repair"] < 0).mean()) if len(g) else np.nan,
               "share_repaired": len(rep) / len(positive) if len(positive) else np.nan,
               "mean_lost_fraction": float((-rep["delta_logit"] / rep["direct_effect"]).mean())
               if len(rep) else np.nan}
        for c in CATEGORIES:
            row[f"n_{c}"] = int((g["category"] == c).sum())
        rows.append(row)
    return pd.DataFrame(rows)
