"""The one place that says which layers are "late", how many tokens "the top k%" is, and which
components are downstream of which (self-repair paper §2.1-2.2, eq. 2; Hydra eq. 33).

- **Layer regions.** *Early* = the first half of the layers, *late* = the second half
  (``layer >= n_layers // 2``); *middle* = the middle half (Hydra's "intermediate layers");
  *last quarter* = the Hydra paper's "late MLP layers". Models of different depth are compared at
  the same relative depth ``layer / (n_layers - 1)``.
- **Top-k%.** ``ceil(percent / 100 * n)`` of ``n`` instances, at least one (the paper's top 2% of
  tokens by clean direct effect).
- **Downstream.** A component reads another's output if it sits in a later layer; inside one block
  the MLP reads the attention output in a sequential block (GPT-2, Llama, Gemma) but not in a
  parallel-residual one (GPT-NeoX/Pythia, GPT-J), where both read the same residual stream.
"""

from __future__ import annotations

import math

KINDS = ("attn", "mlp")  # the two writers of a block, in execution order


def late_start(n_layers: int) -> int:
    """The first late layer: ``n_layers // 2``."""
    return n_layers // 2


def region(layer: int, n_layers: int) -> str:
    """``"early"`` or ``"late"``."""
    return "late" if layer >= late_start(n_layers) else "early"


def span(n_layers: int, which: str) -> range:
    """The layers of a region: ``"early"``, ``"late"``, ``"middle"`` (the middle half) or
    ``"last_quarter"`` (at least one layer)."""
    if which == "early":
        return range(0, late_start(n_layers))
    if which == "late":
        return range(late_start(n_layers), n_layers)
    if which == "middle":
        lo = round(n_layers / 4)
        return range(lo, max(lo + 1, round(3 * n_layers / 4)))
    if which == "last_quarter":
        return range(n_layers - max(1, n_layers // 4), n_layers)
    raise ValueError(f"unknown region {which!r}")


def relative_depth(layer, n_layers):
    """``layer / (n_layers - 1)`` (0 = first layer, 1 = last); works on scalars and arrays."""
    import numpy as np

    return layer / np.maximum(1, n_layers - 1)


def is_late(layer, n_layers):
    """Whether ``layer`` is in the later half (``layer >= n_layers // 2``); scalars or arrays."""
    return layer >= n_layers // 2


def top_k(n: int, percent: float) -> int:
    """How many of ``n`` instances the top ``percent``% are: ``ceil(percent/100 * n)``, >= 1."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    return max(1, math.ceil(percent / 100 * n - 1e-9))


def reads(parallel_residual: bool, src_kind: str, src_layer: int, dst_kind: str,
          dst_layer: int) -> bool:
    """Whether component ``(dst_kind, dst_layer)`` reads the output of ``(src_kind, src_layer)``
    (kinds ``"attn"`` / ``"mlp"``): it is in a later layer, or it is the same block's MLP reading
    its attention in a sequential block."""
    if dst_layer != src_layer:
        return dst_layer > src_layer
    return src_kind == "attn" and dst_kind == "mlp" and not parallel_residual


def component_reads(parallel_residual: bool, n_layers: int):
    """``[ablated, readout]`` bool matrix over components ``c = 2 * layer + (0 attn, 1 mlp)``:
    whether the readout component is downstream of the ablated one."""
    import torch

    c = torch.arange(2 * n_layers)
    layer, kind = c // 2, c % 2
    later = layer[None, :] > layer[:, None]
    same_block = (layer[None, :] == layer[:, None]) & (kind[:, None] == 0) & (kind[None, :] == 1)
    return later | (same_block & (not parallel_residual))


def architecture(model) -> dict:
    """What the model that ran is made of, as the chapters' prose needs it: ``parallel`` (attention
    and MLP read the same residual), ``sandwich`` (each block's writes are normalized:
    post-attention / post-feedforward norms), ``norm`` ("LayerNorm" or "RMSNorm"), ``gqa`` (fewer
    key/value heads than query heads)."""
    cfg = model.hf.config
    kv = getattr(cfg, "num_key_value_heads", None) or model.n_heads
    a = model.adapter
    return {"name": model.name, "family": a.family, "n_layers": model.n_layers,
            "n_heads": model.n_heads, "parallel": bool(model.parallel_residual),
            "sandwich": bool(model.sandwich), "output_norms": a.post_attn_norm is not None and a.attn_norm is None,
            "norm": "LayerNorm" if a.norm == "layernorm" else "RMSNorm", "gqa": kv < model.n_heads,
            "write_scale": model.write_scale, "logit_scale": model.logit_scale,
            "softcap": model.logit_softcap, "experts": a.moe}


def architecture_markdown(model) -> str:
    """One paragraph on the model that ran: its blocks, its norms and what they mean for what is
    downstream of a head — computed from the model, never assumed."""
    a = architecture(model)
    blocks = ("**parallel-residual**: attention and the MLP read the same residual stream, so a layer's "
              "MLP is *not* downstream of that layer's heads, and a last-layer head has nothing "
              "downstream but the final norm" if a["parallel"] else
              "**sequential**: the MLP reads the attention's output, so a layer's MLP *is* downstream of "
              "that layer's heads, and even a last-layer head is followed by one MLP")
    norm = ("LayerNorm (it subtracts the mean and divides by the standard deviation)" if a["norm"] == "LayerNorm"
            else "RMSNorm (it divides by the root mean square, without centering)")
    text = (f"**The model that ran:** `{a['name']}`, {a['n_layers']} layers of {a['n_heads']} attention "
            f"heads. Its blocks are {blocks}. Its norms are {norm}.")
    if a["sandwich"]:
        text += (" Each block also normalizes what its attention and its MLP write before adding it to "
                 "the residual stream (post-attention and post-feedforward norms, often called "
                 "*sandwich* norms). Their scales are frozen at the clean run like the final norm's, "
                 "and their change under an ablation is one more term of eq. 2, the block norms' term.")
    if a["output_norms"]:
        text += (" It has no norm in front of attention or the MLP: both read the residual stream "
                 "itself, and only what they write is normalized.")
    if a["write_scale"] != 1.0:
        text += (f" Every write to the residual stream is multiplied by {a['write_scale']:g} (and the "
                 "embedding by its own multiplier): a head's direct effect includes that factor.")
    if a["logit_scale"] != 1.0:
        text += (f" Its logits are the unembedding's output times {a['logit_scale']:g}; every logit and "
                 "direct effect here includes that factor.")
    if a["softcap"] is not None:
        text += (f" It soft-caps its final logits, `{a['softcap']:g} tanh(x / {a['softcap']:g})`: the "
                 "logit measured here is `x`, the centered logit before the cap — the linear quantity "
                 "the direct effects sum to (the Δlogit after the cap is reported beside it).")
    if a["experts"]:
        text += (" Its MLPs are mixtures of experts: each MLP's write is taken whole (which experts a "
                 "token uses can change under an ablation), and it has no neurons of one MLP.")
    if a["gqa"]:
        text += (" Several query heads share one key/value head, so a head is ablated through its slice "
                 "of the attention output's input, never through the shared values.")
    return text
