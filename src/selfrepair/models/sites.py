"""Where each site of a block lives in one family, and how a trace reads and replaces it.

:func:`selfrepair.intervene.run` names sites; this module maps them onto a family's modules
through its :class:`~selfrepair.models.adapters.Adapter`, including the mechanisms that are more
than a module path: a write to the residual that is a multiple of a module's output (granite's
``residual_multiplier``), an MLP run over flattened positions (OPT), a block that returns a tuple,
attention whose pattern is the module's second output, and one norm shared by attention and MLP
(an edit of what attention reads then goes into attention only).

=============  ================================================================================
``attn_in``    what the heads read before their norm: the input of the norm in front of
               attention (the residual stream; with no such norm, the attention module's input).
               An edit reaches attention only, even when the MLP shares that norm.
``pattern``    the attention probabilities ``[.., n_heads, query, key]`` (read only)
``z``          input of the attention output projection ``[.., n_heads * d_head]``
``attn``       output of the attention output projection (the sum of heads plus ``b_O``)
``attn_write`` what the attention adds to the residual: ``attn``, its post-norm (sandwich and
               output-norm models) or ``attn`` times the family's write scale (granite)
``mlp_in``     what the MLP reads before its norm (read only)
``neurons``    input of the MLP down projection (the hidden activations; not in MoE models)
``mlp``        output of the MLP (OPT: of fc2)
``mlp_write``  what the MLP adds to the residual (as ``attn_write``)
``block``      output of the block (the residual stream after it)
=============  ================================================================================
"""

from __future__ import annotations

import sys

import torch

SITES = ("attn_in", "pattern", "z", "attn", "attn_write", "mlp_in", "neurons", "mlp", "mlp_write",
         "block")
READ_ONLY = ("pattern", "mlp_in")
ATTENTION_CALL = "attention_interface_1"  # the `attention_interface(self, q, k, v, mask, ...)` call


def aliases(model) -> dict[str, str]:
    """Write sites that are the very tensor of another site (no post-norm, no write scale)."""
    if model.sandwich or model.write_scale != 1.0:
        return {}
    return {"attn_write": "attn", "mlp_write": "mlp"}


def canonical(model, site: str) -> str:
    """The site a name stands for: where a block writes the raw attention / MLP output (no
    post-norm, no write scale), ``attn_write`` / ``mlp_write`` are ``attn`` / ``mlp``."""
    return aliases(model).get(site, site)


def norm_path(model, site: str) -> str:
    """The block norm whose output is a write site (sandwich models)."""
    return model.adapter.post_attn_norm if site == "attn_write" else model.adapter.post_mlp_norm


def order(model, sites) -> list[str]:
    """``sites`` in the order a block of this family computes them."""
    out = list(SITES)
    if model.adapter.pattern != "interface":  # read off the module after its projection ran
        out.remove("pattern")
        out.insert(out.index("attn") + 1, "pattern")
    return [s for s in out if s in sites]


def shared_norm(model) -> bool:
    """Attention and MLP read the output of one norm (GPT-J, Phi, Cohere, Falcon-7B)."""
    a = model.adapter
    return a.attn_norm is not None and a.attn_norm == a.mlp_norm


# site -> (the adapter fields that may name its module, the first one set wins; what it is of it)
_WHERE = {
    "attn_in": (("attn_norm", "attn"), "input"),
    "pattern": (("attn",), "weights"),
    "z": (("attn_out",), "input"),
    "attn": (("attn_out",), "output"),
    "attn_write": (("post_attn_norm", "attn_out"), "output"),
    "mlp_in": (("mlp_norm", "mlp"), "input"),
    "neurons": (("mlp_out",), "input"),
    "mlp": (("mlp",), "output"),
    "mlp_write": (("post_mlp_norm", "mlp"), "output"),
}


def envoy(model, site: str, layer: int):
    """``(envoy, "input" | "output")`` holding ``site`` of block ``layer`` (before any scale)."""
    a = model.adapter
    if site == "block":
        return model.envoy(a.blocks)[layer], "output"
    if site not in _WHERE:
        raise ValueError(f"unknown site {site!r}; sites: {SITES}")
    names, slot = _WHERE[site]
    path = next((getattr(a, n) for n in names if getattr(a, n)), None)
    if path is None:
        raise ValueError(f"{model.name} has mixture-of-experts MLPs: no neurons of one down "
                         "projection to read")
    return model.envoy(path, layer), slot


def _flat(model, site: str) -> bool:
    return model.adapter.flat_mlp and site in ("mlp_in", "neurons", "mlp", "mlp_write")


def _scale(model, site: str) -> float:
    return model.write_scale if site in ("attn_write", "mlp_write") and not model.sandwich else 1.0


def get(model, site: str, layer: int, rows: tuple[int, int]):
    """The value of ``site`` in block ``layer`` of a trace over ``rows = (batch, pos)`` tokens."""
    if site == "pattern":
        return pattern(model, layer)
    env, slot = envoy(model, site, layer)
    value = env.input if slot == "input" else env.output
    if site == "block" and model.adapter.block_tuple:
        value = value[0]
    if model.adapter.mlp_inplace and site in ("mlp", "mlp_write"):
        value = value.clone()  # the block adds the attention's output into this very tensor
    if _flat(model, site):
        value = value.view(*rows, value.shape[-1])
    scale = _scale(model, site)
    return value * scale if scale != 1.0 else value


def put(model, site: str, layer: int, value) -> None:
    """Replace ``site`` of block ``layer`` by ``value`` (as :func:`get` returns it)."""
    if site in READ_ONLY:
        raise ValueError(f"the {site} site is read only")
    scale = _scale(model, site)
    if scale != 1.0:
        value = value / scale
    if _flat(model, site):
        value = value.reshape(-1, value.shape[-1])
    if site == "attn_in" and shared_norm(model):  # the shared norm's output, into attention only
        norm = model.module(model.adapter.attn_norm, layer)
        x = value.to(model.device)
        normed = model.frozen_norm(norm, x, model.norm_scale(norm, x))
        model.envoy(model.adapter.attn, layer).input = normed.to(value.device)
        return
    env, slot = envoy(model, site, layer)
    if site == "block" and model.adapter.block_tuple:
        value = (value,) + tuple(env.output[1:])
    if slot == "input":
        env.input = value
    else:
        env.output = value


INSIDE = {"attn": "z", "mlp": "neurons"}  # a skippable site -> the site inside its module


def skippable(model, site: str) -> bool:
    """Whether ``site`` is a whole module's output that a pass may replace without running the
    module (nnsight ``skip``): the attention output projection (``attn``) or the MLP (``mlp``),
    unless the output is reshaped (OPT's flattened MLP) or the block adds into it in place. The
    caller checks that the pass touches nothing inside the module (:data:`INSIDE`) at that layer."""
    return site == "attn" or (site == "mlp" and not model.adapter.flat_mlp and not model.adapter.mlp_inplace)


def skip(model, site: str, layer: int, value) -> None:
    """The module of a :func:`skippable` ``site`` in block ``layer`` does not run; its output is
    ``value`` (as :func:`get` returns it)."""
    env, slot = envoy(model, site, layer)
    if slot != "output" or not skippable(model, site):
        raise ValueError(f"the {site} site of {model.name} is not a module's output that can be skipped")
    env.skip(value)


def skip_block(model, layer: int, resume) -> None:
    """Block ``layer`` does not run; its output is ``resume`` (the family's output form)."""
    block = model.envoy(model.adapter.blocks)[layer]
    block.skip((resume, None) if model.adapter.block_tuple else resume)


def pattern(model, layer: int):
    """The ``pattern`` site: the attention module's second output (families with their own eager
    attention, run with ``output_attentions``) or :func:`eager_pattern` of the inputs of its
    ``attention_interface`` call (nnsight ``.source``, which instruments the module's forward the
    first time; a trace that reads no pattern never touches it)."""
    env = model.envoy(model.adapter.attn, layer)
    if model.adapter.pattern == "output":
        return env.output[1]
    if model.adapter.pattern.startswith("sdpa:"):
        args, kwargs = getattr(env.source, model.adapter.pattern[5:]).inputs
        return sdpa_pattern(args, kwargs)
    args, kwargs = getattr(env.source, ATTENTION_CALL).inputs
    return eager_pattern(args, kwargs)


def sdpa_pattern(args: tuple, kwargs: dict) -> torch.Tensor:
    """The probabilities of one ``scaled_dot_product_attention(q, k, v, attn_mask=, is_causal=,
    scale=)`` call, from its inputs: ``softmax(q k^T * scale + mask)`` (keys broadcast over heads)."""
    query, key = args[0], args[1]
    scale = kwargs.get("scale") or query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    if mask is None and kwargs.get("is_causal"):
        mask = None  # additive_mask builds the causal one
    mask = additive_mask(mask, scores.shape[-2], scores.shape[-1], scores.dtype, scores.device)
    return torch.softmax(scores + mask.to(scores.dtype), -1).to(query.dtype)


def eager_pattern(args: tuple, kwargs: dict) -> torch.Tensor:
    """The attention probabilities ``[batch, n_heads, query, key]`` of one ``attention_interface``
    call, from its inputs ``(module, query, key, value, mask, ...)``: what the model family's own
    ``eager_attention_forward`` returns (its softmax dtype, GQA key repeat, soft-capping), fed the
    additive float mask eager attention gets (:func:`additive_mask`), without dropout."""
    module, query, key, value, mask = args[:5]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    mask = additive_mask(mask, query.shape[-2], key.shape[-2], query.dtype, query.device)
    return eager(module, query, key, value, mask, *args[5:], **{**kwargs, "dropout": 0.0})[1]


def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The mask as eager attention adds it: ``0`` where a query may attend, the dtype's minimum
    where not. Under ``sdpa`` Hugging Face passes ``None`` for a purely causal layer (the query
    positions are the last ``q_len`` keys) or a boolean mask (``True``: attend, e.g. a sliding
    window); a float mask is already additive."""
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
