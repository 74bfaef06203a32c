"""Direct effects with the final norm frozen at the clean scale (paper §2.1, App. E).

Position ``p`` predicts token ``p + 1``; every per-token quantity has ``pos - 1`` entries.
Logits are centered over the vocabulary, i.e. read out with ``u = W_U[t] - mean_v W_U[v]``.
The final norm is ``norm(x) = n(x) / S + b`` with ``n`` linear; freezing ``S`` at the clean
run makes the logit a sum over residual-stream components, each component ``c`` contributing
``DE(c) = u . n(c) / S = dir . c``. In sandwich-norm models (Gemma-2/3) a block writes
``g * a / s``; ``s`` is frozen at its clean value too, so ``DE(head) = (dir * g / s) . head``.

The components — every head, the attention output biases, every MLP layer (bias included),
the embeddings, the final-norm bias and the unembedding bias — sum to the centered clean logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import check_finite
from .intervene import Pass
from .models import Model
from .terms import block_scales, write_direction


@dataclass
class Readout:
    """The frozen final norm and unembedding directions for one batch of tokens."""

    targets: torch.Tensor  # [batch, pos-1] the next tokens
    u: torch.Tensor  # [batch, pos-1, d_model] centered unembedding rows
    d: torch.Tensor  # [batch, pos-1, d_model] with u . n(x) = d . x
    scale: torch.Tensor  # [batch, pos-1] S, the clean final-norm scale
    logit: torch.Tensor  # [batch, pos-1] centered clean logit of the target (real norm output)
    bias: torch.Tensor  # [batch, pos-1] final-norm bias + unembedding bias (constant terms)
    attn_scale: torch.Tensor | None = None  # [layer, batch, pos-1] clean post-attention norm s
    mlp_scale: torch.Tensor | None = None  # [layer, batch, pos-1] clean post-feedforward norm s

    @property
    def dir(self) -> torch.Tensor:
        """``d / S``: ``DE(c) = dir . c`` for a residual-stream component ``c``."""
        return self.d / self.scale[..., None]

    def write_dir(self, model: Model, kind: str, layer: int) -> torch.Tensor:
        """Direction for the raw output of a block's attention (``kind="attn"``) or MLP: in
        sandwich models ``dir * g / s`` with the block norm's clean scale; otherwise ``dir``
        (times the family's write scale, granite's ``residual_multiplier``)."""
        return write_direction(model, kind, layer, self.dir, self.block_scale(kind, layer))

    def block_scale(self, kind: str, layer: int) -> torch.Tensor | None:
        """The clean scale ``s`` of block ``layer``'s ``kind`` norm (``None`` without sandwich norms)."""
        scales = self.attn_scale if kind == "attn" else self.mlp_scale
        return None if scales is None else scales[layer]


def targets_of(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 1:]


def readout(model: Model, tokens: torch.Tensor, clean: Pass) -> Readout:
    """Frozen-scale readout of a clean pass (needs reads ``attn`` and ``mlp`` for sandwich models)."""
    targets = targets_of(tokens).to(model.device)
    norm = model.module(model.adapter.final_norm)
    u = model.centered_unembed(targets)
    resid = model.acc(clean.final_resid[:, :-1])
    scale = model.norm_scale(norm, resid)
    d = model.readout(norm, u)
    b = model.norm_bias(norm)
    bias = model.centered_unembed_bias(targets) + (0.0 if b is None else u @ b)
    logit = (u * model.acc(clean.final_normed[:, :-1])).sum(-1) + model.centered_unembed_bias(targets)
    check_finite({"final-norm scale": scale, "clean logit": logit}, "reading the clean run",
                 model.name, model.dtype)
    out = Readout(targets, u, d, scale, logit, bias)
    if model.sandwich:
        out.attn_scale = block_scales(model, "attn", clean.reads["attn"][:, :, :-1])
        out.mlp_scale = block_scales(model, "mlp", clean.reads["mlp"][:, :, :-1])
    return out


def at_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [..., batch, seq, ...]`` (batch at dim -3 or 0) at each row's position ``pos [batch]``."""
    rows = torch.arange(len(pos), device=x.device)
    return x[rows, pos.to(x.device)] if x.dim() == 3 else x[:, rows, pos.to(x.device)]


def last_readout(model: Model, clean: Pass, pos: torch.Tensor,
                 targets: torch.Tensor | None = None) -> Readout:
    """Frozen-norm readout at each row's position ``pos [batch]`` (a prompt's last real token) of
    ``targets``, default the clean run's maximum-likelihood token there (Hydra §2.3.1: the real
    unembedding applied to the real final-norm output). Every tensor is ``[batch, ...]``, one
    position per row; sandwich models get the clean block scales ``[layer, batch]`` (reads
    ``attn`` and ``mlp`` needed)."""
    norm = model.module(model.adapter.final_norm)
    normed = at_positions(clean.final_normed, pos)
    if targets is None:
        with torch.no_grad():
            targets = model.module(model.adapter.unembed)(normed).argmax(-1)
    targets = targets.to(model.device)
    u = model.centered_unembed(targets)
    b, cb = model.norm_bias(norm), model.centered_unembed_bias(targets)
    out = Readout(targets=targets, u=u, d=model.readout(norm, u),
                  scale=model.norm_scale(norm, at_positions(clean.final_resid, pos)),
                  logit=(u * model.acc(normed)).sum(-1) + cb, bias=cb + (0.0 if b is None else u @ b))
    check_finite({"final-norm scale": out.scale, "clean logit": out.logit}, "reading the clean run",
                 model.name, model.dtype)
    if model.sandwich:
        out.attn_scale = block_scales(model, "attn", at_positions(clean.reads["attn"], pos)[:, :, None])[..., 0]
        out.mlp_scale = block_scales(model, "mlp", at_positions(clean.reads["mlp"], pos)[:, :, None])[..., 0]
    return out


def head_effects(model: Model, z: torch.Tensor, direction: torch.Tensor, layer: int) -> torch.Tensor:
    """``direction . (z_h @ W_O[h])`` for every head: z ``[.., pos-1, n_heads*d_head]``,
    direction ``[.., pos-1, d_model]`` -> ``[n_heads, .., pos-1]``."""
    w = model.head_out_weight(layer)  # [head, d_head, d_model]
    proj = torch.einsum("...d,hkd->...hk", direction, w)  # [.., head, d_head]
    zh = model.acc(z).unflatten(-1, (model.n_heads, model.d_head))
    return (zh * proj).sum(-1).movedim(-1, 0)


def neuron_effects(model: Model, acts: torch.Tensor, direction: torch.Tensor, layer: int) -> torch.Tensor:
    """``direction . (act_n * W_out[n])`` per neuron -> ``[d_mlp, .., pos-1]``."""
    proj = direction @ model.neuron_out_weight(layer).T  # [.., d_mlp]
    return (model.acc(acts) * proj).movedim(-1, 0)


@dataclass
class DirectEffects:
    """Every component's direct effect on the centered logit of the next token."""

    heads: torch.Tensor  # [layer, head, batch, pos-1]
    attn_bias: torch.Tensor  # [layer, batch, pos-1] output-projection biases b_O
    mlps: torch.Tensor  # [layer, batch, pos-1] whole MLP layers (their output bias included)
    embed: torch.Tensor  # [batch, pos-1] token (+ position) embeddings
    constant: torch.Tensor  # [batch, pos-1] final-norm bias + unembedding bias
    logit: torch.Tensor  # [batch, pos-1] the centered clean logit they sum to
    neurons: dict[int, torch.Tensor]  # layer -> [d_mlp, batch, pos-1]
    mlp_bias: dict[int, torch.Tensor]  # layer -> [batch, pos-1] (with neurons: sums to mlps[l])

    def total(self) -> torch.Tensor:
        return (self.heads.sum((0, 1)) + self.attn_bias.sum(0) + self.mlps.sum(0) + self.embed
                + self.constant)


def direct_effects(model: Model, tokens: torch.Tensor, clean: Pass, ro: Readout,
                   neuron_layers: tuple[int, ...] = ()) -> DirectEffects:
    """Direct effects of all components from a clean pass read with ``z``, ``attn``, ``mlp``
    (and ``neurons`` for ``neuron_layers``) and ``read_embed=True``."""
    heads, attn_bias, mlps = [], [], []
    neurons, mlp_bias = {}, {}
    for layer in range(model.n_layers):
        da = ro.write_dir(model, "attn", layer)
        heads.append(head_effects(model, clean.reads["z"][layer][:, :-1], da, layer))
        b = model.attn_out_bias(layer)
        attn_bias.append(torch.zeros_like(ro.logit) if b is None else da @ b)
        dm = ro.write_dir(model, "mlp", layer)
        mlps.append((model.acc(clean.reads["mlp"][layer][:, :-1]) * dm).sum(-1))
        if layer in neuron_layers:
            i = sorted(neuron_layers).index(layer)
            neurons[layer] = neuron_effects(model, clean.reads["neurons"][i][:, :-1], dm, layer)
            mb = model.mlp_out_bias(layer)
            mlp_bias[layer] = torch.zeros_like(ro.logit) if mb is None else dm @ mb
    embed = (model.acc(clean.embed[:, :-1]) * ro.dir).sum(-1)
    return DirectEffects(torch.stack(heads), torch.stack(attn_bias), torch.stack(mlps), embed,
                         ro.bias, ro.logit, neurons, mlp_bias)


def top_percent_mask(values: torch.Tensor, percent: float) -> torch.Tensor:
    """Per leading index, mark the :func:`~selfrepair.structure.top_k` largest of the last two dims
    (``batch, pos``) — the paper's top-2% tokens by clean direct effect. NaNs never selected."""
    from .structure import top_k

    flat = values.flatten(-2)
    k = top_k(flat.shape[-1], percent)
    filled = torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    idx = filled.topk(k, dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(values.shape)
