"""Hydra's compensation read at either final-norm scale (McGrath et al. 2023, §2.3.1, eq. 13, 33, 34).

The Hydra paper fixes the RMSNorm factor "σ to the value attained in the forward pass" (§2.3.1) and
takes the compensatory effect (eq. 33) from ``ΔDE = DE_ablated − DE`` (eq. 34), where
``DE_ablated`` is the unembedding of a layer's output *in the ablation run* (eq. 13). Two readings:

- **clean scale** (``scale="clean"``, the book's lead and :mod:`selfrepair.hydra`'s columns): every
  direct effect, clean or ablated, divides by the clean run's ``S``. Then a layer that is not
  downstream of the ablation keeps its direct effect exactly — what the paper states right after
  eq. 13 — and the final norm's rescaling is its own term (``from_norm``), as in the self-repair
  paper's eq. 2;
- **ablated scale** (``scale="ablated"``): an ablation run's direct effects divide by that run's
  own ``S′`` ("the value attained in the forward pass" of the run being unembedded). Then
  ``DE_ablated(σ′) = DE_ablated(S) · S/S′`` and the compensation also holds the norm's rescaling
  of what the downstream layers write, while the rescaling of the layers *before* the ablation is
  left over (``upstream_rescale``).

Per (prompt, ablated component ``m``, patch), with ``r = S/S′``::

    ΔDE_m(σ′)     = r · DE′_m − DE_m
    CE(σ′)        = Σ_{c downstream} (r · DE′_c − DE_c) + r · from_block_norms
    upstream      = (r − 1) · (DE_embed + Σ_{c not downstream, c ≠ m} DE_c)
    Δ_ablate      = ΔDE_m(σ′) + CE(σ′) + upstream          (an identity; the tests check it)

``r`` comes from the measured terms by the identity ``from_norm = (u·n(r′)/S)(S/S′ − 1)`` with
``u·n(r′)/S = DE_embed + Σ_c DE′_c + from_block_norms`` (every component's ablated-run direct effect
at the clean scales: upstream ones unchanged), so no cached result needs another pass; a test
checks ``r`` against the ablated run's own scale. In sandwich models the downstream block norms'
rescaling (``from_block_norms``) is part of what downstream layers write, so at ``σ′`` it counts in
the compensation (not split between attention and MLP: ``ce_attn`` and ``ce_mlp`` leave it out).
"""

from __future__ import annotations

import pandas as pd
import torch

from .hydra import HydraResult

SCALES = ("clean", "ablated")
SUFFIX = "_ablated_scale"
READ = ("compensatory_effect", "delta_direct_effect", "ce_attn", "ce_mlp")  # what a reading changes


def column(name: str, scale: str) -> str:
    """The effects-frame column of ``name`` under ``scale`` ("clean": the plain name)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return name if scale == "clean" else name + SUFFIX


def scale_ratio(res: HydraResult) -> torch.Tensor:
    """``[n, C ablated, P]``: ``S/S′``, the clean over the ablated run's final-norm scale."""
    readout = res.embed_de[:, None, None] + res.ablated_de.sum(-1) + res.from_block_norms
    return 1 + res.from_norm / readout


def ablated_scale_terms(res: HydraResult) -> dict[str, torch.Tensor]:
    """``[n, C]`` each (means over patches, eq. 39): the ablated component's ΔDE, the compensation
    and its attention / MLP parts at ``σ′``, and ``upstream_rescale`` (module docstring)."""
    r = scale_ratio(res)[..., None]  # [n, C, P, 1]
    C = res.clean_de.shape[1]
    clean = res.clean_de[:, None, None, :]
    delta = r * res.ablated_de - clean  # [n, C ablated, P, C readout] ΔDE at σ′
    down = res.downstream()[None, :, None, :]
    is_attn = (torch.arange(C) % 2 == 0)[None, None, None]
    eye = torch.arange(C)
    own = delta[:, eye, :, eye].permute(1, 0, 2)  # [n, C, P]
    up = ~down & ~torch.eye(C, dtype=torch.bool)[None, :, None, :]
    upstream = (r[..., 0] - 1) * (res.embed_de[:, None, None] + (clean * up).sum(-1))
    ce_attn, ce_mlp = (delta * down * is_attn).sum(-1), (delta * down * ~is_attn).sum(-1)
    return {"delta_direct_effect": own.mean(2), "ce_attn": ce_attn.mean(2), "ce_mlp": ce_mlp.mean(2),
            "compensatory_effect": (ce_attn + ce_mlp + r[..., 0] * res.from_block_norms).mean(2),
            "upstream_rescale": upstream.mean(2), "scale_ratio": r[..., 0].mean(2)}


def with_ablated_scale(effects: pd.DataFrame, res: HydraResult) -> pd.DataFrame:
    """:func:`selfrepair.hydra.effects_frame` ``effects`` of ``res`` with the ``σ′`` reading's
    columns added (``<name>_ablated_scale`` for :data:`READ`, and ``upstream_rescale``,
    ``scale_ratio``; rows in the frame's (prompt, component) order)."""
    terms = ablated_scale_terms(res)
    out = effects.copy()
    for name, value in terms.items():
        out[column(name, "ablated") if name in READ else name] = value.reshape(-1).numpy()
    return out
