"""Regressions of the Hydra measurement (McGrath et al. 2023, §4.2, §6; Fig 7, 8) and the erasure
map (§2.5.2), over the tidy frames of :mod:`selfrepair.hydra` (:func:`~selfrepair.hydra.effects_frame`).

Signs as there: ``compensatory_effect`` (eq. 33) = Σ ΔDE of the components downstream of the
ablated one; ``delta_direct_effect`` = the ablated component's own ΔDE (``-`` the direct effect
the ablation removes).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .hydra import HydraResult, component_label
from .structure import span


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept`` and R² (NaN when x or y is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return np.nan, np.nan, np.nan
    slope, intercept = np.polyfit(x, y, 1)
    ss = ((y - y.mean()) ** 2).sum()
    r2 = 1 - ((y - slope * x - intercept) ** 2).sum() / ss if ss > 0 else np.nan
    return float(slope), float(intercept), float(r2)


def pooled_slope(effects: pd.DataFrame, layers, kind: str = "attn") -> float:
    """Within-layer slope of compensation on direct effect pooled over ``layers`` (Σ cov / Σ var):
    each layer keeps its own intercept (its indirect breakage), layers whose direct effect varies
    more weigh more."""
    g = effects[(effects["kind"] == kind) & effects["layer"].isin(list(layers))]
    g = g.assign(x=g.groupby("layer")["direct_effect"].transform(lambda v: v - v.mean()))
    var = (g["x"] ** 2).sum()
    return float((g["x"] * g["compensatory_effect"]).sum() / var) if var > 0 else float("nan")


def restored_share(effects: pd.DataFrame, layers, kind: str = "attn") -> float:
    """The Hydra paper's "restore approximately 70% of the reduction in token logits" (§6): the
    compensation as a share of the logit reduction an ablation would cause without it, Σ CE /
    Σ (−ΔDE of the ablated layer), over every prompt of the ablated ``layers``."""
    g = effects[(effects["kind"] == kind) & effects["layer"].isin(list(layers))]
    lost = -g["delta_direct_effect"].sum()
    return float(g["compensatory_effect"].sum() / lost) if lost > 0 else float("nan")


def regression(effects: pd.DataFrame) -> pd.DataFrame:
    """Hydra Fig 7d / 8: per ablated (kind, layer), the regression of the compensatory effect
    (and its attention / MLP parts) on the direct effect across prompts; ``restored`` = mean CE /
    mean lost direct effect (``-delta_direct_effect``)."""
    rows = []
    for (kind, layer), g in effects.groupby(["kind", "layer"], sort=True):
        slope, intercept, r2 = fit_line(g["direct_effect"], g["compensatory_effect"])
        lost = -g["delta_direct_effect"].mean()
        rows.append({"kind": kind, "layer": layer, "label": component_label(kind, layer),
                     "n": len(g), "slope": slope, "intercept": intercept, "r2": r2,
                     "slope_attn": fit_line(g["direct_effect"], g["ce_attn"])[0],
                     "slope_mlp": fit_line(g["direct_effect"], g["ce_mlp"])[0],
                     "mean_direct_effect": g["direct_effect"].mean(),
                     "restored": g["compensatory_effect"].mean() / lost if lost > 0 else np.nan})
    return pd.DataFrame(rows)


def late_mlp_layers(n_layers: int) -> list[int]:
    """The "late MLPs" of the erasure claim: :func:`selfrepair.structure.span` ``"last_quarter"``."""
    return list(span(n_layers, "last_quarter"))


def erasure(res: HydraResult) -> pd.DataFrame:
    """Hydra §2.5.2: per (ablated attention layer, MLP layer) the MLP's mean clean DE and its mean
    ΔDE after the ablation (0 where the MLP is not downstream)."""
    L = res.n_layers
    dde = res.delta_de.mean((0, 2))[0::2, 1::2]  # [attn ablated, mlp readout]
    clean = res.clean_de[:, 1::2].mean(0)
    late = set(late_mlp_layers(L))
    return pd.DataFrame([{"ablated_layer": a, "mlp_layer": l, "label": component_label("mlp", l),
                          "clean_direct_effect": float(clean[l]), "delta_direct_effect": float(dde[a, l]),
                          "late": l in late} for a in range(L) for l in range(L)])


