"""Uncertainty of every verdict: a cluster bootstrap over the units of independence, on
per-cluster sufficient statistics, and the seeded split that keeps selection and test apart.

**The unit.** Tokens of one row share a forward pass, and rows cut from one document share its
text, so neither is an independent draw from the distribution. The unit resampled is a *cluster*:
for a token set, the rows of one document (:meth:`Clusters.documents`: each row goes with the
document that holds most of its tokens, :mod:`selfrepair.packing`) — with ``packing="document"``,
the corpus chapters' default, every row is a window of its own document, so every row is its own
cluster; with ``"concatenate"`` (the paper's code) a few documents hold many rows; each row on its
own where no document is known (:meth:`Clusters.rows`); each prompt for a prompt set. A row's
resample source is part of the treatment (fixed for the whole token set), not a second draw.

**Sufficient statistics.** A measurement keeps, per cluster, the sums a statistic needs (per
cluster x head: a count and the sums of each quantity; for a correlation or a regression the
sums of x, y, x², y², xy — :func:`moments`). A replicate draws multinomial counts over the
clusters; its totals are the counts times the per-cluster sums (one matrix product for every
replicate and every head at once), and the statistic is a function of those totals. So each
replicate recomputes the *whole* statistic a verdict reads, per-head means and the
classification of heads included: a share across heads carries each head's sampling error.

**The interval** is the percentile interval of the replicates, *expanded* for few clusters
(Hesterberg 2015, "What teachers should know about the bootstrap", §4.1): its tails are read at
Φ(−√(n/(n−1)) · t₀.₉₇₅,ₙ₋₁) instead of 2.5%, which undoes the bootstrap's narrowness bias for a
mean of n clusters (the bootstrap variance is (n−1)/n of the unbiased one and the normal
quantile is not the t one). Percentile rather than BCa: the verdicts read shares of classified
heads, step functions of the data, where BCa's bias correction (the share of replicates below the
estimate) and its jackknife acceleration are unstable; the percentile interval stays inside the
statistic's range ([0, 1] for a share). With fewer than :data:`MIN_CLUSTERS` clusters no
interval is reliable: the estimate says why, and its verdict cannot tell.

**Selection and test** on disjoint halves (:meth:`Clusters.halves`): where heads are selected by
the statistic that is then tested, select on one half of the clusters and test on the other.

Seeds: the bootstrap of seed ``s`` draws from ``numpy.random.default_rng([s, BOOT_STREAM])``, the
split from ``default_rng([s, SPLIT_STREAM])``: the same seed gives the same interval and split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import numpy as np

MIN_CLUSTERS = 10  # fewer: no interval is reliable (tests/test_uncertainty.py measures coverage)
N_BOOT = 1000  # replicates by default (a few ms per verdict on CPU)
BOOT_STREAM, SPLIT_STREAM = 0, 1
LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile by its Cornish-Fisher expansion in 1/df (Abramowitz & Stegun 26.7.5;
    error below 5e-4 for df >= 5 and 1e-4 for df >= 9, the fewest clusters decided on)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def tail(n_clusters: int, level: float = LEVEL) -> float:
    """The lower tail probability at which the expanded percentile interval of ``n_clusters``
    clusters reads its lower end (the upper end at ``1 - tail``); ``(1 - level) / 2`` as n grows."""
    a = (1 - level) / 2
    if n_clusters < 3:
        return a
    return NormalDist().cdf(-math.sqrt(n_clusters / (n_clusters - 1)) * t_quantile(1 - a, n_clusters - 1))


@dataclass(frozen=True)
class Clusters:
    """Which cluster (unit of independence) each row belongs to: ``of_row[i]`` in ``0 .. n-1``."""

    of_row: np.ndarray
    unit: str = "rows"  # what one cluster is, in words: "documents", "rows", "prompts"

    @classmethod
    def rows(cls, n_rows: int, unit: str = "rows") -> "Clusters":
        """Each row (or prompt: ``unit="prompts"``) its own cluster."""
        return cls(np.arange(int(n_rows)), unit)

    @classmethod
    def documents(cls, main_document) -> "Clusters":
        """Rows grouped by the document that holds most of their tokens (``main_document[i]``,
        :mod:`selfrepair.packing`): one cluster per document. Grouping every pair of
        rows that share *some* document would chain a packed token set into one cluster (each row
        boundary cuts a document), so a row's minority piece of its neighbour's document is left
        with the row."""
        doc = np.asarray(main_document, dtype=np.int64)
        if doc.ndim != 1:
            raise ValueError(f"main_document must be 1-d, one document per row, got shape {doc.shape}")
        return cls(np.unique(doc, return_inverse=True)[1].reshape(-1), "documents")

    @classmethod
    def of_tokens(cls, main_document, n_rows: int) -> "Clusters":
        """A token set's clusters: :meth:`documents` where each row's main document is known
        (``main_document`` not None), else each row its own (:meth:`rows`)."""
        if main_document is None:
            return cls.rows(n_rows)
        return cls.documents(np.asarray(main_document))

    @property
    def n(self) -> int:
        return int(self.of_row.max()) + 1 if len(self.of_row) else 0

    def __len__(self) -> int:
        return self.n

    def sum_rows(self, per_row) -> np.ndarray:
        """``[rows, ...]`` -> ``[n, ...]``: each cluster's sum of its rows (float64)."""
        x = np.asarray(per_row, dtype=np.float64)
        out = np.zeros((self.n,) + x.shape[1:])
        np.add.at(out, self.of_row, x)
        return out

    def sum_tokens(self, row, values, group=None, n_groups: int = 1) -> np.ndarray:
        """Per-token ``values [m, c]`` of rows ``row [m]`` (and groups ``group [m]``, e.g. a head's
        flat index) -> ``[n, n_groups, 1 + c]``: each cluster's token count and sums per group."""
        v = np.asarray(values, dtype=np.float64).reshape(len(row), -1)
        g = np.zeros(len(v), np.int64) if group is None else np.asarray(group, np.int64)
        out = np.zeros((self.n, n_groups, 1 + v.shape[1]))
        np.add.at(out, (self.of_row[np.asarray(row, np.int64)], g), np.c_[np.ones(len(v)), v])
        return out

    def head_sums(self, tokens, columns=(), n_layers: int = 1, n_heads: int = 1,
                  moments_of: tuple[str, str] | None = None) -> np.ndarray:
        """Per-token rows of a frame (``layer, head, row`` and ``columns``) -> ``[n, layer, head,
        1 + c]``: each cluster's token count and sums per head; with ``moments_of = (x, y)`` the
        :data:`MOMENTS` of x and y instead (a correlation or a regression per head)."""
        values = (moments(tokens[moments_of[0]], tokens[moments_of[1]]) if moments_of
                  else tokens[list(columns)].to_numpy(float))
        group = tokens["layer"].to_numpy() * n_heads + tokens["head"].to_numpy()
        out = self.sum_tokens(tokens["row"].to_numpy(), values, group, n_layers * n_heads)
        return out.reshape(self.n, n_layers, n_heads, -1)

    def halves(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A seeded split of the clusters into two disjoint halves ``(select, test)`` (cluster
        indices, sorted; the test half gets the odd one)."""
        order = np.random.default_rng([int(seed), SPLIT_STREAM]).permutation(self.n)
        k = self.n // 2
        return np.sort(order[:k]), np.sort(order[k:])

    def rows_of(self, clusters) -> np.ndarray:
        """A boolean mask over rows: the rows of the given cluster indices."""
        return np.isin(self.of_row, np.asarray(clusters))


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% interval and what it rests on."""

    value: float
    lo: float
    hi: float
    n: int | None  # how many units the statistic is over (heads, tokens, prompts), at the estimate
    unit: str  # what ``n`` counts
    clusters: int  # independent units resampled
    cluster_unit: str  # what one of them is ("documents", "rows", "prompts")
    seed: int
    n_boot: int
    why: str = ""  # set: the interval is not reliable (few clusters, undefined replicates), and why

    @property
    def reliable(self) -> bool:
        return not self.why and all(math.isfinite(x) for x in (self.value, self.lo, self.hi))

    def prose(self, fmt: str, thresholds=()) -> str:
        """The estimate in a sentence: its value and 95% interval, or why it has none; a value or
        end near one of ``thresholds`` (a rule's bounds it is compared with) prints on its side of
        it (:func:`~selfrepair.rules.against`)."""
        if not math.isfinite(self.value):
            return "n/a"
        from .rules import against, interval_words  # rules formats numbers; it imports nothing from here

        if not self.reliable:
            return f"{against(self.value, fmt, thresholds)} (no reliable interval: {self.why or 'undefined'})"
        return f"{against(self.value, fmt, thresholds)} ({interval_words(self.lo, self.hi, fmt, thresholds)})"

    def describe(self) -> str:
        """How the interval was made, for a verdict's sentence."""
        return (f"cluster bootstrap over {self.clusters:,} {self.cluster_unit}, {self.n_boot:,} "
                f"replicates, seed {self.seed}")


class Bootstrap:
    """Replicate weights over ``n_clusters`` clusters: row 0 all ones (the estimate itself), then
    ``n_boot`` multinomial draws (clusters resampled with replacement), seeded."""

    def __init__(self, n_clusters: int, n_boot: int = N_BOOT, seed: int = 0, unit: str = "rows"):
        if n_boot < 1:
            raise ValueError(f"n_boot must be positive, got {n_boot}")
        self.n_clusters, self.n_boot, self.seed, self.unit = int(n_clusters), int(n_boot), int(seed), unit
        rng = np.random.default_rng([self.seed, BOOT_STREAM])
        k = max(self.n_clusters, 1)
        draws = rng.multinomial(self.n_clusters, np.full(k, 1 / k), size=self.n_boot)
        self.weights = np.vstack([np.ones((1, k)), draws]).astype(np.float64)[:, :self.n_clusters]

    @classmethod
    def over(cls, clusters: Clusters, n_boot: int = N_BOOT, seed: int = 0) -> "Bootstrap":
        return cls(clusters.n, n_boot, seed, clusters.unit)

    def totals(self, sums) -> np.ndarray:
        """``[n_clusters, ...]`` per-cluster sums -> ``[1 + n_boot, ...]`` totals per replicate."""
        s = np.asarray(sums, dtype=np.float64)
        if s.shape[0] != self.n_clusters:
            raise ValueError(f"sums have {s.shape[0]} clusters, the bootstrap {self.n_clusters}")
        return np.tensordot(self.weights, s, axes=(1, 0))

    def replicates(self, statistic: Callable[..., np.ndarray], *sums) -> np.ndarray:
        """``statistic(*totals)`` with a leading replicate axis: row 0 the estimate, then every
        replicate (NaN where a replicate leaves the statistic undefined)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(statistic(*(self.totals(s) for s in sums)), dtype=np.float64)

    def estimate(self, statistic: Callable[..., np.ndarray], *sums, n: int | None = None,
                 unit: str = "") -> Estimate:
        """A scalar statistic of the per-cluster ``sums``: its value, its 95% interval, ``n``
        ``unit`` (what the statistic is over) and this bootstrap's clusters and seed."""
        reps = self.replicates(statistic, *sums)
        value, lo, hi, why = self._interval(reps.reshape(len(reps), -1)[:, 0])
        return Estimate(value, lo, hi, n, unit, self.n_clusters, self.unit, self.seed, self.n_boot, why)

    def of_weights(self, statistic: Callable[[np.ndarray], np.ndarray], *, n: int | None = None,
                   unit: str = "") -> Estimate:
        """A scalar statistic that is not a function of per-cluster sums (a threshold or a top-k set
        that itself moves with the resample): ``statistic(weights)`` with this bootstrap's
        ``weights [1 + n_boot, n_clusters]`` (row 0 all ones: the estimate; each later row how
        many times each cluster is drawn), one value per row."""
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = np.asarray(statistic(self.weights), dtype=np.float64)
        value, lo, hi, why = self._interval(reps.reshape(len(reps), -1)[:, 0])
        return Estimate(value, lo, hi, n, unit, self.n_clusters, self.unit, self.seed, self.n_boot, why)

    def intervals(self, statistic: Callable[..., np.ndarray], *sums) -> tuple[np.ndarray, ...]:
        """A vector statistic (e.g. one value per head): ``(value, lo, hi)`` arrays of its shape
        (NaN bounds where the interval is not reliable)."""
        reps = self.replicates(statistic, *sums)
        flat = reps.reshape(len(reps), -1)
        nan = float("nan")
        rows = [self._interval(flat[:, j]) for j in range(flat.shape[1])]
        out = np.array([(v, lo, hi) if not why else (v, nan, nan) for v, lo, hi, why in rows]).reshape(-1, 3)
        return tuple(out[:, i].reshape(reps.shape[1:]) for i in range(3))

    def _interval(self, reps: np.ndarray) -> tuple[float, float, float, str]:
        value, boots = float(reps[0]), reps[1:]
        nan = float("nan")
        if self.n_clusters < MIN_CLUSTERS:
            why = (f"only {self.n_clusters} independent {self.unit}; a cluster bootstrap needs at "
                   f"least {MIN_CLUSTERS} for a reliable interval")
            return (value, *self._bounds(boots), why) if self.n_clusters >= 2 else (value, nan, nan, why)
        finite = boots[np.isfinite(boots)]
        if len(finite) < 0.9 * len(boots):
            return value, nan, nan, (f"the statistic is undefined in {1 - len(finite) / len(boots):.0%} "
                                     "of the bootstrap replicates")
        return (value, *self._bounds(finite), "")

    def _bounds(self, boots: np.ndarray) -> tuple[float, float]:
        boots = boots[np.isfinite(boots)]
        if not len(boots):
            return float("nan"), float("nan")
        a = tail(self.n_clusters)
        lo, hi = np.quantile(boots, [a, 1 - a])
        return float(lo), float(hi)


# -- statistics of totals (a leading replicate axis, then whatever the sums had) -----------------
def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0 (a mean over no tokens is undefined)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1), np.nan)


def share(flags: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """Per replicate, the share of ``flags`` that hold among the entries ``within`` (default all),
    over every axis after the first; NaN where none is within."""
    f = np.asarray(flags, bool)
    w = np.ones_like(f) if within is None else np.asarray(within, bool)
    axes = tuple(range(1, f.ndim))
    return ratio((f & w).sum(axes).astype(float), w.sum(axes).astype(float))


def mean_finite(x: np.ndarray, axis=-1) -> np.ndarray:
    """The mean over ``axis`` of the finite entries of ``x`` (e.g. heads whose mean is defined in a
    replicate); NaN, without a warning, where none is."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return ratio(np.where(ok, x, 0).sum(axis), ok.sum(axis).astype(float))


MOMENTS = ("n", "x", "y", "xx", "yy", "xy")


def moments(x, y) -> np.ndarray:
    """Per-token columns whose sums make a correlation or a regression: ``[m, 5]`` = x, y, x², y²,
    xy (:meth:`Clusters.sum_tokens` adds the count in front: :data:`MOMENTS`)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.c_[x, y, x * x, y * y, x * y]


def pearson(t: np.ndarray) -> np.ndarray:
    """Pearson's r from totals ``t[..., MOMENTS]``; NaN where either variable is constant."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(t, -1, 0)
    cov, vx, vy = sxy - sx * sy / n, sxx - sx ** 2 / n, syy - sy ** 2 / n
    ok = (vx > 1e-12 * np.maximum(sxx, 1e-300)) & (vy > 1e-12 * np.maximum(syy, 1e-300))
    return np.where(ok, ratio(cov, np.sqrt(np.abs(vx * vy))), np.nan)


def least_squares(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(slope, intercept)`` of the least-squares line y = slope·x + intercept from totals
    ``t[..., MOMENTS]`` (NaN where x is constant)."""
    n, sx, sy, sxx, _, sxy = np.moveaxis(t, -1, 0)
    slope = ratio(n * sxy - sx * sy, n * sxx - sx ** 2)
    return slope, ratio(sy - slope * sx, n)


__all__ = ["BOOT_STREAM", "Bootstrap", "Clusters", "Estimate", "LEVEL", "MIN_CLUSTERS", "MOMENTS",
           "N_BOOT", "SPLIT_STREAM", "least_squares", "mean_finite", "moments", "pearson", "ratio", "share",
           "tail", "t_quantile"]
