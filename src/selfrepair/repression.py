"""Self-repression, resampled: chapter 4's evidence as per-cluster sums of an
:class:`~selfrepair.iterative.IterativeResult` (self-repair paper App. F, G; Fig 18, 19).

Per head, over its top-k% tokens by clean direct effect, each cluster (the rows of one document)
keeps ``n``, ``Σ DE``, ``Σ DE'`` at every alpha and ``Σ DE'`` under the control (a random push of
the same norm at the largest alpha): :data:`COLUMNS`. Every statistic below is a function of the
totals, so a bootstrap replicate recomputes each head's relative changes and its class.

A head **self-represses** when, at the largest alpha, its mean direct effect falls by more than
``tau`` of itself *and* falls by more than ``tau`` beyond what the random push does to it:
:func:`repression` is the weaker of the two falls, ``max(rel, rel − rel_control)`` (below
``-tau`` for a self-repressing head). Heads whose mean top-token direct effect is under
``min_effect`` of the median head's are **weak** and not classified (a relative change of a tiny
direct effect is noise), as in :func:`selfrepair.iterative.classify`.
"""

from __future__ import annotations

import warnings

import numpy as np

from .uncertainty import Clusters, mean_finite, ratio

MIN_EFFECT = 0.25  # weak heads: mean top-token DE under a quarter of the median head's


def sums(res, clusters: Clusters) -> np.ndarray:
    """``[cluster, head, 2 + n_alpha + 1]``: count, ``Σ DE``, ``Σ DE'`` per alpha and ``Σ DE'`` of
    the control (NaN where the result has no control: nothing then self-represses beyond it) over
    each head's kept tokens."""
    seq1 = res.meta["seq_len"] - 1
    d = res.data
    ctrl = d.get("control_direct_effect")
    parts = []
    for i in range(len(res.heads)):
        de = d["direct_effect"][i].double().numpy()
        values = np.c_[de, d["new_direct_effect"][i].double().numpy(),
                       np.full(len(de), np.nan) if ctrl is None else ctrl[i].double().numpy()]
        parts.append(clusters.sum_tokens((d["instance"][i] // seq1).numpy(), values)[:, 0])
    return np.stack(parts, 1)


# -- statistics of totals [replicate, head, column] --------------------------------------------------
def relative(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rel [R, head, alpha], rel_control [R, head])``: relative changes of each head's mean
    top-token DE under its own output at each alpha, and under the random push."""
    de = t[..., 1:2]
    rel = ratio(t[..., 2:-1] - de, np.abs(de))
    return rel, ratio(t[..., -1] - t[..., 1], np.abs(t[..., 1]))


def weak(t: np.ndarray) -> np.ndarray:
    """``[R, head]``: heads whose mean top-token DE is under :data:`MIN_EFFECT` of the median head's."""
    mean = ratio(t[..., 1], t[..., 0])
    with warnings.catch_warnings():  # a replicate without any token: every head NaN, none weak
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(mean, axis=-1, keepdims=True)
    return mean < MIN_EFFECT * median


def repression(t: np.ndarray) -> np.ndarray:
    """``[R, head]``: the weaker of a head's fall under its own output (largest alpha) and its fall
    beyond the control, ``max(rel, rel − rel_control)``; NaN for weak heads."""
    rel, ctrl = relative(t)
    last = rel[..., -1]
    return np.where(weak(t), np.nan, np.maximum(last, last - ctrl))


def share_repressing(t: np.ndarray, tau: float) -> np.ndarray:
    """Per replicate, the share of the classified (not weak) heads that self-repress (module docstring)."""
    s = repression(t)
    return ratio(((s <= -tau) & np.isfinite(s)).sum(-1).astype(float), np.isfinite(s).sum(-1).astype(float))


def dose_line(t: np.ndarray, heads: np.ndarray, alphas) -> tuple[np.ndarray, np.ndarray]:
    """``(slope, intercept / mean y)`` per replicate of the least-squares line of the repression
    ``y(alpha) = −mean over heads of rel(alpha)`` on alpha (the measured alphas, not 0)."""
    rel, _ = relative(t)
    y = -mean_finite(rel[:, heads], axis=1)  # [R, alpha]
    a = np.asarray(alphas, dtype=float)
    da = a - a.mean()
    slope = (y * da).sum(-1) / (da ** 2).sum()
    intercept = y.mean(-1) - slope * a.mean()
    return slope, ratio(intercept, y.mean(-1))


__all__ = ["MIN_EFFECT", "dose_line", "relative", "repression", "share_repressing", "sums", "weak"]
