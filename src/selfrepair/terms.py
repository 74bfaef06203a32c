"""Eq. 1 and eq. 2 of the self-repair paper for one patched pass, computed in one place.

Every patched pass (:mod:`selfrepair.passes`, :mod:`selfrepair.prompt_passes`) returns a
:class:`Terms` (or a subclass adding what that pass also measures), per row and position:

- ``delta_logit``: the readout's real change, ``u . (n(r') - n(r))`` of the final norm's outputs
  (:func:`final_terms`, one formula for every pass; the unembedding's bias cancels);
- ``delta_de``: the change of the ablated component's own direct effect (the heads, a layer's
  write), so ``self_repair = delta_logit - delta_de`` (eq. 1);
- ``from_heads``, ``from_mlps``: the change of every downstream attention layer's and MLP layer's
  direct effect at the clean scales, ``(a' - a) . w`` (:func:`component_terms`);
- ``from_norm = d . r' (1/S' - 1/S)``: the final norm's scale change (zero when it is frozen);
- ``from_block_norms = (dir * g) . a' (1/s' - 1/s)``: the downstream block norms' scale changes
  in sandwich models (zero otherwise, or when they are frozen).

``delta_logit = delta_de + from_heads + from_mlps + from_norm + from_block_norms`` is an
identity (eq. 2): each term is computed directly, never as a remainder, so the tests can hold the
sum against the real change. Signs: ``delta = ablated - clean``. Direction ``dir = d / S``;
a block's raw attention or MLP output ``a`` is read through ``w = dir * g / s`` in sandwich models
(:func:`write_direction`), ``dir`` otherwise.

Inside a trace the pieces run as ``watch`` / ``final`` reductions (:func:`component_terms`,
:func:`final_terms`) returning plain dicts of per-token tensors; :func:`sum_terms` adds a pass's
watched pieces in the order the pass met them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .models import Model


@dataclass
class Terms:
    """Eq. 2 of one patched pass: every tensor has the pass's per-instance shape."""

    delta_logit: torch.Tensor  # the readout's real change
    delta_de: torch.Tensor  # the change of the ablated component's own direct effect
    from_heads: torch.Tensor  # downstream attention layers' direct effects, changed
    from_mlps: torch.Tensor  # downstream MLP layers' direct effects, changed
    from_norm: torch.Tensor  # the final norm's scale change
    from_block_norms: torch.Tensor  # the downstream block norms' scale changes (sandwich models)

    @property
    def self_repair(self) -> torch.Tensor:
        """Eq. 1: ``delta_logit - delta_de``."""
        return self.delta_logit - self.delta_de

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field that is set, then ``self_repair``, by name."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {**out, "self_repair": self.self_repair}


def write_direction(model: Model, kind: str, layer: int, direction: torch.Tensor,
                    scale: torch.Tensor | None) -> torch.Tensor:
    """The direction a block's raw attention (``kind="attn"``) or MLP output is read through: in
    sandwich models ``direction * g / s`` with the block norm's clean scale ``scale``; otherwise
    ``direction`` times the family's write scale (granite's ``residual_multiplier``: the block
    adds ``m * a`` to the residual)."""
    if not model.sandwich:
        return direction * model.write_scale if model.write_scale != 1.0 else direction
    norm = model.module(model.adapter.post_attn_norm if kind == "attn" else model.adapter.post_mlp_norm, layer)
    return direction * model.norm_gain(norm) / scale[..., None]


def block_scales(model: Model, kind: str, raw: torch.Tensor, layers: range | None = None) -> torch.Tensor:
    """RMS scale ``s`` of each sandwich norm on raw block outputs ``[layer, batch, pos, d]``."""
    path = model.adapter.post_attn_norm if kind == "attn" else model.adapter.post_mlp_norm
    layers = layers if layers is not None else range(raw.shape[0])
    return torch.stack([model.norm_scale(model.module(path, l), raw[i], kind="rms")
                        for i, l in enumerate(layers)])


def block_norm_term(model: Model, kind: str, layer: int, raw: torch.Tensor, direction: torch.Tensor,
                    clean_scale: torch.Tensor) -> torch.Tensor:
    """``(direction * g) . a' (1/s' - 1/s)`` of block ``layer``'s ``kind`` norm for raw outputs
    ``a' = raw [..., d]``, ``s`` its clean scale."""
    norm_path = model.adapter.post_attn_norm if kind == "attn" else model.adapter.post_mlp_norm
    s_new = block_scales(model, kind, raw[None], range(layer, layer + 1))[0]
    gain = model.norm_gain(model.module(norm_path, layer))
    return (raw * direction * gain).sum(-1) * (1 / s_new - 1 / clean_scale)


def component_terms(model: Model, kind: str, layer: int, new: torch.Tensor, direction: torch.Tensor,
                    scale: torch.Tensor | None, clean: torch.Tensor | None = None, *,
                    absolute: bool = False, block_norms: bool = True) -> dict[str, torch.Tensor]:
    """One downstream component of a patched pass: block ``layer``'s raw ``kind`` output ``new``
    ``[..., d]`` (what the pass computed), read through the clean ``direction`` (``dir``) and
    block-norm scale ``scale``. Returns ``delta``, its direct effect's change against ``clean``
    (when given), ``de``, its new direct effect (with ``absolute``), and ``block``, its block
    norm's term (sandwich models, unless ``block_norms`` is off: a frozen norm has none)."""
    w = write_direction(model, kind, layer, direction, scale)
    out = {}
    if clean is not None:
        out["delta"] = ((new - clean) * w).sum(-1)
    if absolute:
        out["de"] = (new * w).sum(-1)
    if model.sandwich and block_norms:
        out["block"] = block_norm_term(model, kind, layer, new, direction, scale)
    return out


def final_terms(model: Model, u: torch.Tensor, d: torch.Tensor, scale: torch.Tensor,
                resid: torch.Tensor, normed: torch.Tensor, clean_normed: torch.Tensor, *,
                frozen: bool = False) -> dict[str, torch.Tensor]:
    """The final norm's part of a patched pass from its input ``resid`` and output ``normed``
    ``[..., d]``: ``delta_logit = u . (normed - clean_normed)``, ``from_norm = d . resid (1/S' -
    1/S)`` (zero when the norm was ``frozen`` at ``scale``) and ``scale``, the live scale ``S'``
    of ``resid``."""
    scale_new = model.norm_scale(model.module(model.adapter.final_norm), resid)
    from_norm = torch.zeros_like(scale_new) if frozen else (d * resid).sum(-1) * (1 / scale_new - 1 / scale)
    return {"delta_logit": (u * (normed - clean_normed)).sum(-1), "from_norm": from_norm,
            "scale": scale_new}


def sum_terms(watched: dict, zero: torch.Tensor, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A pass's watched :func:`component_terms` ``{(site, layer): {piece: tensor}}`` added in the
    order the pass met them (as a running sum would), each piece under ``names[(site, piece)]``
    (e.g. ``("attn", "delta") -> "from_heads"``); pieces without a name are left out. Every name
    starts at ``zero``."""
    out = {name: zero for name in dict.fromkeys(names.values())}
    for (site, _), pieces in watched.items():
        for piece, value in (pieces or {}).items():
            name = names.get((site, piece))
            if name is not None:
                out[name] = out[name] + value
    return out


__all__ = ["Terms", "block_norm_term", "block_scales", "component_terms", "final_terms", "sum_terms", "write_direction"]
