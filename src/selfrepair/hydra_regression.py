"""Regressions of the Hydra measurement (McGrath et al. 2023, §4.2, §6; Fig 7, 8) and the erasure
map (§2.5.2), over the tidy frames of :mod:`selfrepair.hydra` (:func:`~selfrepair.hydra.effects_frame`).

Signs as there: ``compensatory_effect`` (eq. 33) = Σ ΔDE of the components downstream of the
ablated one; ``delta_direct_effect`` = the ablated component's own ΔDE (``-`` the direct effect
the ablation removes). ``scale`` picks the reading of σ (:mod:`selfrepair.hydra_scale`): the clean
run's (default) or each ablation run's own (``"ablated"``, its columns added by
``hydra_scale.with_ablated_scale``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .hydra import HydraResult, component_label
from .hydra_scale import column
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


def pooled_slope(effects: pd.DataFrame, layers, kind: str = "attn", scale: str = "clean") -> float:
    """Within-layer slope of compensation on direct effect pooled over ``layers`` (Σ cov / Σ var):
    each layer keeps its own intercept (its indirect breakage), layers whose direct effect varies
    more weigh more."""
    g = effects[(effects["kind"] == kind) & effects["layer"].isin(list(layers))]
    g = g.assign(x=g.groupby("layer")["direct_effect"].transform(lambda v: v - v.mean()))
    var = (g["x"] ** 2).sum()
    ce = g[column("compensatory_effect", scale)]
    return float((g["x"] * ce).sum() / var) if var > 0 else float("nan")


def restored_share(effects: pd.DataFrame, layers, kind: str = "attn", scale: str = "clean") -> float:
    """The Hydra paper's "restore approximately 70% of the reduction in token logits" (§6): the
    compensation as a share of the logit reduction an ablation would cause without it, Σ CE /
    Σ (−ΔDE of the ablated layer), over every prompt of the ablated ``layers``."""
    g = effects[(effects["kind"] == kind) & effects["layer"].isin(list(layers))]
    lost = -g[column("delta_direct_effect", scale)].sum()
    return float(g[column("compensatory_effect", scale)].sum() / lost) if lost > 0 else float("nan")


def regression(effects: pd.DataFrame, scale: str = "clean") -> pd.DataFrame:
    """Hydra Fig 7d / 8: per ablated (kind, layer), the regression of the compensatory effect
    (and its attention / MLP parts) on the direct effect across prompts; ``restored`` = mean CE /
    mean lost direct effect (``-delta_direct_effect``), all under ``scale``."""
    ce, dde = column("compensatory_effect", scale), column("delta_direct_effect", scale)
    rows = []
    for (kind, layer), g in effects.groupby(["kind", "layer"], sort=True):
        slope, intercept, r2 = fit_line(g["direct_effect"], g[ce])
        lost = -g[dde].mean()
        rows.append({"kind": kind, "layer": layer, "label": component_label(kind, layer),
                     "n": len(g), "slope": slope, "intercept": intercept, "r2": r2,
                     "slope_attn": fit_line(g["direct_effect"], g[column("ce_attn", scale)])[0],
                     "slope_mlp": fit_line(g["direct_effect"], g[column("ce_mlp", scale)])[0],
                     "mean_direct_effect": g["direct_effect"].mean(),
                     "restored": g[ce].mean() / lost if lost > 0 else np.nan})
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


def erasure_cases(res: HydraResult) -> pd.DataFrame:
    """Hydra §2.5.2's erasure, case by case: per (prompt, attention layer ablated before the late
    MLPs), ``x`` = the ablated layer's own ΔDE and ``y`` = the late MLPs' summed ΔDE (patch
    means, clean scale), and ``lost`` = −x, the direct effect the ablation removed. Erasure MLPs
    "attenuate with the attention layer they counter": they push the token up when the layer's
    push is removed, so ``y`` falls as ``x`` rises — a negative slope of ``y`` on ``x``."""
    late = late_mlp_layers(res.n_layers)
    dde = res.delta_de.mean(2)  # [n, C, C]
    layers = list(range(late[0]))
    x = dde[:, [2 * m for m in layers], [2 * m for m in layers]]  # [n, layers]
    y = dde[:, [2 * m for m in layers]][:, :, [2 * l + 1 for l in late]].sum(-1)
    n = len(x)
    return pd.DataFrame({"prompt": np.repeat(np.arange(n), len(layers)),
                         "layer": np.tile(layers, n), "x": x.reshape(-1).numpy(),
                         "y": y.reshape(-1).numpy(), "lost": -x.reshape(-1).numpy()})


def erasure_fit(cases: pd.DataFrame, large: float = 0.75) -> dict:
    """The erasure test that weighs each case by what it removed, rather than a sign count over
    every layer: the slope, intercept and R² of the late MLPs' ΔDE on the ablated layer's ΔDE over
    all cases (erasure: slope < 0), and the share of opposite signs among the cases in the top
    ``1 - large`` of the removed direct effect (``lost`` at or above its ``large`` quantile), with
    ``n`` and ``n_large``."""
    slope, intercept, r2 = fit_line(cases["x"], cases["y"])
    big = cases[cases["lost"] >= cases["lost"].quantile(large)] if len(cases) else cases
    return {"slope": slope, "intercept": intercept, "r2": r2, "n": len(cases),
            "opposite_large": float((big["x"] * big["y"] < 0).mean()) if len(big) else float("nan"),
            "n_large": len(big), "large_quantile": large}

