"""Controls and panels of the Hydra measurement (McGrath et al. 2023, §2.5.2, §4.2, App. A).

Analyses over :class:`~selfrepair.hydra.HydraResult` s (no forward pass of their own):

- :func:`own_effects` — the ablated layer's own direct effect in the ablated run against its
  clean one (§2.5.2: "Resample ablations successfully reduce Δ_unembed of the ablated layer to
  approximately zero when averaged across patches, although there is substantial variance between
  the effect of each patch"), for each measured ablation and for those whose own DE is known
  without a pass: resample over *every* other prompt (the limit of eq. 39), mean (the DE of the
  mean write) and zero (exactly 0). The own DE is linear in the replacement, so the every-source
  resample average and the mean ablation differ only by the prompt's own write (weight ``1/n``).
- :func:`ablation_comparison` — per layer, what an ablation does (its total effect, the direct
  effect it removes, the compensation, and the per-patch slope of compensation on the removed
  direct effect), side by side for several ablations (noise beside resample).
- :func:`localisation` / :func:`localisation_summary` — §2.5.2 "Downstream effects of ablation on
  attention layers are localised": every readout component's mean |ΔDE| after each ablation, and
  which later layers carry it (share of the downstream total in the top 1 / top 2).
- :func:`best_layer_points` (Fig 7b) and :func:`layer_panels` (Fig 8): the regression of
  compensation on direct effect at the attention layer with the highest R², and the attention /
  MLP parts of compensation at evenly spaced ablated attention layers (:func:`panel_layers`).

Signs as in :mod:`selfrepair.hydra`: ``ΔDE = ablated - clean``, ``lost = -ΔDE`` of the ablated
component, compensation (eq. 33) = Σ ΔDE of the components downstream of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .hydra import HydraResult, component_label
from .hydra_regression import fit_line
from .structure import KINDS


def own_direct_effects(results: dict[str, HydraResult]) -> dict[str, torch.Tensor]:
    """``[n, C, P]`` per ablation: each component's own direct effect when it is the one ablated.
    Measured for every result in ``results`` (keyed by ablation); from the first result's clean
    pass: ``"resample (every source)"`` (P = 1), ``"mean"`` and ``"zero"`` where not measured."""
    out = {}
    for name, res in results.items():
        C = res.clean_de.shape[1]
        out[name] = res.ablated_de[:, torch.arange(C), :, torch.arange(C)].permute(1, 0, 2)  # [n, C, P]
    first = next(iter(results.values()))
    out["resample (every source)"] = first.source_mean_de[..., None]
    out.setdefault("mean", first.mean_write_de[..., None])
    out.setdefault("zero", torch.zeros_like(first.clean_de)[..., None])
    return out


def own_sizes(res: HydraResult) -> tuple[np.ndarray, np.ndarray]:
    """``[n, L]`` each: |own direct effect| of every ablated attention layer in its ablated run
    (patch-averaged) and |clean direct effect|."""
    own = own_direct_effects({"ablated": res})["ablated"].mean(2)
    return own[:, 0::2].abs().numpy(), res.clean_de[:, 0::2].abs().numpy()


def own_effects(results: dict[str, HydraResult]) -> pd.DataFrame:
    """Per (ablation, ablated component): the mean |clean DE| over prompts, the mean |own DE| in
    the ablated run (patch-averaged per prompt: ``abs_ablated``; per single patch: ``abs_patch``),
    their ratios to the clean one, and the mean own DE beside the mean clean DE."""
    clean = next(iter(results.values())).clean_de
    rows = []
    for name, own in own_direct_effects(results).items():
        for c in range(clean.shape[1]):
            ref = float(clean[:, c].abs().mean())
            avg, per = own[:, c].mean(1), own[:, c]
            rows.append({"ablation": name, "layer": c // 2, "kind": KINDS[c % 2],
                         "label": component_label(KINDS[c % 2], c // 2), "n_patches": own.shape[2],
                         "abs_clean": ref, "abs_ablated": float(avg.abs().mean()),
                         "abs_patch": float(per.abs().mean()),
                         "ratio": float(avg.abs().mean()) / ref if ref > 0 else np.nan,
                         "patch_ratio": float(per.abs().mean()) / ref if ref > 0 else np.nan,
                         "mean_clean": float(clean[:, c].mean()), "mean_ablated": float(avg.mean())})
    return pd.DataFrame(rows)


def own_summary(own: pd.DataFrame, kind: str = "attn") -> pd.DataFrame:
    """Per ablation, over the ``kind`` layers: Σ mean |own DE| / Σ mean |clean DE| (patch-averaged
    and per patch) and the mean own and clean DE."""
    g = own[own["kind"] == kind]
    out = g.groupby("ablation", sort=False).agg(n_patches=("n_patches", "first"), abs_clean=("abs_clean", "sum"),
                                                abs_ablated=("abs_ablated", "sum"), abs_patch=("abs_patch", "sum"),
                                                mean_clean=("mean_clean", "mean"),
                                                mean_ablated=("mean_ablated", "mean")).reset_index()
    out["ratio"] = out["abs_ablated"] / out["abs_clean"]
    out["patch_ratio"] = out["abs_patch"] / out["abs_clean"]
    return out


def _per_patch(res: HydraResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, C, P]`` per patch: the lost direct effect ``-ΔDE`` of the ablated component, the
    compensation (eq. 33) and the total effect."""
    dde = res.delta_de
    C = dde.shape[1]
    own = dde[:, torch.arange(C), :, torch.arange(C)].permute(1, 0, 2)
    ce = (dde * res.downstream()[None, :, None, :]).sum(-1)
    return -own, ce, res.delta_logit


def ablation_comparison(results: dict[str, HydraResult]) -> pd.DataFrame:
    """Per (ablation, ablated component): the mean total effect, mean |total effect| per patch,
    the mean lost direct effect and compensation, and the slope and R² of compensation on the lost
    direct effect over every (prompt, patch) — "how much of a removed logit is given back"."""
    rows = []
    for name, res in results.items():
        lost, ce, total = _per_patch(res)
        for c in range(lost.shape[1]):
            slope, _, r2 = fit_line(lost[:, c].reshape(-1), ce[:, c].reshape(-1))
            rows.append({"ablation": name, "layer": c // 2, "kind": KINDS[c % 2],
                         "label": component_label(KINDS[c % 2], c // 2),
                         "total_effect": float(total[:, c].mean()), "abs_total_effect": float(total[:, c].abs().mean()),
                         "lost": float(lost[:, c].mean()), "abs_lost": float(lost[:, c].abs().mean()),
                         "compensation": float(ce[:, c].mean()), "slope": slope, "r2": r2})
    return pd.DataFrame(rows)


def localisation(res: HydraResult) -> pd.DataFrame:
    """Per (ablated component, readout component), over prompts, of the patch-averaged ΔDE: mean
    |ΔDE| and mean ΔDE, with whether the readout is downstream (``position``: "upstream", "self",
    "downstream"; components not downstream, the same layer's MLP of a parallel-residual block
    included, are "upstream")."""
    dde = res.delta_de.mean(2)  # [n, ablated, readout]
    C = dde.shape[1]
    down = res.downstream()
    absd, mean = dde.abs().mean(0), dde.mean(0)
    rows = []
    for m in range(C):
        for c in range(C):
            rows.append({"ablated_layer": m // 2, "ablated_kind": KINDS[m % 2],
                         "ablated": component_label(KINDS[m % 2], m // 2),
                         "readout_layer": c // 2, "readout_kind": KINDS[c % 2],
                         "readout": component_label(KINDS[c % 2], c // 2),
                         "position": "self" if c == m else "downstream" if bool(down[m, c]) else "upstream",
                         "abs_delta_de": float(absd[m, c]), "mean_delta_de": float(mean[m, c])})
    return pd.DataFrame(rows)


def _top_shares(values: np.ndarray) -> tuple[int, float, float]:
    """Index of the largest of ``values`` (>= 0) and the shares of their sum in the top 1 and 2."""
    total = values.sum()
    if len(values) == 0 or total <= 0:
        return -1, np.nan, np.nan
    order = np.argsort(-values, kind="mergesort")
    return int(order[0]), float(values[order[0]] / total), float(values[order[:2]].sum() / total)


def localisation_summary(loc: pd.DataFrame) -> pd.DataFrame:
    """Per ablated component and readout kind ("attn", "mlp", "all"): the downstream components'
    total mean |ΔDE|, the one that changes most and the shares of the total in the top 1 / top 2
    (``uniform``: the top-1 share if every downstream component changed alike; ``first``: the
    first downstream component of that kind)."""
    rows = []
    d = loc[loc["position"] == "downstream"]
    for (layer, kind), g in d.groupby(["ablated_layer", "ablated_kind"], sort=True):
        for readout in ("attn", "mlp", "all"):
            h = g if readout == "all" else g[g["readout_kind"] == readout]
            i, top1, top2 = _top_shares(h["abs_delta_de"].to_numpy())
            rows.append({"ablated_layer": layer, "ablated_kind": kind, "ablated": component_label(kind, layer),
                         "readout_kind": readout, "n_downstream": len(h),
                         "total_abs_delta_de": float(h["abs_delta_de"].sum()),
                         "top": h["readout"].iloc[i] if i >= 0 else "", "share_top1": top1, "share_top2": top2,
                         "first": h["readout"].iloc[0] if len(h) else "",
                         "uniform": 1 / len(h) if len(h) else np.nan})
    return pd.DataFrame(rows)


def prompt_top_parts(res: HydraResult, kind: str = "attn",
                     min_downstream: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top [n, m], total [n, m], k [m])`` for the ``m`` ablated attention layers with at least
    ``min_downstream`` later ``kind`` layers: per prompt, the largest |ΔDE| (patch-averaged) among
    those later layers, their summed |ΔDE|, and how many there are (``k``)."""
    dde = res.delta_de.mean(2).abs()
    down, C = res.downstream(), dde.shape[1]
    want = KINDS.index(kind)
    tops, totals, ks = [], [], []
    for m in range(0, C, 2):
        cols = [c for c in range(C) if down[m, c] and c % 2 == want]
        if len(cols) < min_downstream:
            continue
        v = dde[:, m][:, cols]
        tops.append(v.max(1).values.numpy())
        totals.append(v.sum(1).numpy())
        ks.append(len(cols))
    n = dde.shape[0]
    if not ks:
        return np.zeros((n, 0)), np.zeros((n, 0)), np.zeros(0, int)
    return np.stack(tops, 1), np.stack(totals, 1), np.array(ks)


def prompt_top_share(res: HydraResult, kind: str = "attn",
                     min_downstream: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per (prompt, ablated attention layer with at least ``min_downstream`` later ``kind``
    layers): the share of the later ``kind`` layers' Σ |ΔDE| (patch-averaged) carried by the
    largest, and ``1 / k`` (the share if all ``k`` of them changed alike). Cases where nothing
    later changes are left out (:func:`prompt_top_parts`)."""
    top, total, k = prompt_top_parts(res, kind, min_downstream)
    top, total = top.T, total.T  # ablated layer by ablated layer, prompts within
    ok = total > 0
    uniform = np.broadcast_to(1 / np.maximum(k, 1)[:, None], total.shape)
    return top[ok] / total[ok], uniform[ok]


def panel_layers(n_layers: int, k: int = 4) -> list[int]:
    """Fig 8's selection: ``k`` evenly spaced attention layers from 0 to ``n_layers - 2`` (the last
    attention layer has no later attention layer to compensate), rounded, duplicates dropped."""
    top = max(0, n_layers - 2)
    return sorted({int(round(x)) for x in np.linspace(0, top, k)})


def best_layer_points(effects: pd.DataFrame, reg: pd.DataFrame) -> pd.DataFrame:
    """Fig 7b: the (prompt) rows of the attention layer with the highest R² of compensation on
    direct effect, with that fit (``slope``, ``intercept``, ``r2``, ``fit`` = the line at each x)."""
    attn = reg[(reg["kind"] == "attn") & reg["r2"].notna()]
    if not len(attn):
        return pd.DataFrame(columns=["prompt", "layer", "label", "direct_effect", "compensatory_effect",
                                     "slope", "intercept", "r2", "fit"])
    best = attn.loc[attn["r2"].idxmax()]
    g = effects[(effects["kind"] == "attn") & (effects["layer"] == best["layer"])]
    g = g[["prompt", "layer", "label", "direct_effect", "compensatory_effect", "ce_attn", "ce_mlp"]]
    return g.assign(slope=best["slope"], intercept=best["intercept"], r2=best["r2"],
                    fit=best["slope"] * g["direct_effect"] + best["intercept"])


def layer_panels(effects: pd.DataFrame, layers: list[int]) -> pd.DataFrame:
    """Fig 8: per selected ablated attention layer and prompt, ΔDE of the downstream attention
    layers and of the downstream MLP layers against the ablated layer's direct effect (long: one
    row per part), with each (layer, part)'s least-squares ``slope``, ``r2`` and ``fit``."""
    g = effects[(effects["kind"] == "attn") & effects["layer"].isin(layers)]
    parts = []
    for part, col in (("attention", "ce_attn"), ("MLP", "ce_mlp")):
        parts.append(g[["prompt", "layer", "label", "direct_effect"]].assign(part=part, delta_de=g[col].to_numpy()))
    out = pd.concat(parts, ignore_index=True)
    fits = {}
    for (layer, part), h in out.groupby(["layer", "part"]):
        fits[layer, part] = fit_line(h["direct_effect"], h["delta_de"])
    out["slope"] = [fits[k][0] for k in zip(out["layer"], out["part"])]
    out["intercept"] = [fits[k][1] for k in zip(out["layer"], out["part"])]
    out["r2"] = [fits[k][2] for k in zip(out["layer"], out["part"])]
    out["fit"] = out["slope"] * out["direct_effect"] + out["intercept"]
    return out
