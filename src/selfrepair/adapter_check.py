"""The load-time check: does the adapter read what the model computes?

``load_model`` runs :func:`check_adapter` on every model it wraps: one clean pass over a few
tokens (and one more reading only what each MLP reads), compared piece by piece with what the
model itself computed —

- ``heads``: the heads' outputs ``z_h @ W_O[h]`` plus ``b_O`` sum to the attention output;
- ``writes``: each block's output is its input plus its attention and MLP writes (post-norms,
  write multipliers);
- ``mlp input``: the MLP reads the block's input (parallel) or that plus the attention's write;
- ``block norms`` (sandwich / output-norm models) and ``final norm``: the linearised norm
  (kind, gain, epsilon, bias) at the norm's own scale is the norm's output;
- ``logits``: the final norm's output through the unembedding (and the family's logit scale,
  soft-cap, project-out) is the model's own output at the last position;
- ``direct effects``: every component's direct effect plus the biases sums to the centered logit.

A failing piece is named in one :class:`~selfrepair.errors.UnsupportedArchitectureError`
instead of numbers that would be silently wrong. Under ``remote=True`` the check runs on the
server as one small request (:func:`selfrepair.remote.in_session`): only the errors come back.
"""

from __future__ import annotations

import torch

from .direct_effect import direct_effects, readout
from .errors import UnsupportedArchitectureError, check_finite
from .intervene import run
from .models import Model
from .remote import in_session

CHECK_TOKENS = 8
# relative tolerance per model dtype: a wrong adapter misses by O(1); rounding by far less
# (float64 models still run Hugging Face's RMSNorm in float32: ~1e-7)
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
HALF_TOLERANCE = 0.1
HINTS = {
    "heads": "the output projection's input is not the heads' z, or its weight orientation "
             "(conv1d) or head size differs",
    "writes": "the attention and MLP writes (output projection, MLP module, post-norms, write "
              "multiplier) do not add up to the block's output",
    "mlp input": "the MLP does not read what the adapter says (parallel residual flag, or the "
                 "norm in front of the MLP)",
    "block norms": "the norm on a block's write is not the kind or gain the adapter says",
    "final norm": "the final norm is not the kind, gain or epsilon the adapter says",
    "logits": "the unembedding (its bias, the map from the final norm, the logit scale or "
              "soft-cap) is not what the model applies",
    "direct effects": "the components' direct effects and biases do not sum to the logit "
                      "(the embedding read, or a bias)",
}


def check_tokens(model: Model) -> torch.Tensor:
    """A fixed row of a few distinct token ids below the vocabulary size (no bos needed)."""
    return (torch.arange(1, CHECK_TOKENS + 1) * 7919 % min(model.d_vocab, 50_000))[None]


def _gap(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[max |x - ref|, max |ref|]`` in float64."""
    x, ref = x.double(), ref.double()
    return torch.stack([(x - ref).abs().max(), ref.abs().max()])


def check_errors(model: Model, tokens: torch.Tensor) -> dict:
    """Each piece's ``[layer, (max error, max reference)]`` on ``tokens``, or why it could not be
    computed (a string: the adapter's shapes do not fit the model). Runs in one session."""
    tokens = tokens.to(model.device)
    reads = ("z", "attn", "attn_write", "mlp", "mlp_write", "block")
    p = run(model, tokens, read=reads, read_embed=True, last_logits=True)
    r = {k: model.acc(v) for k, v in p.reads.items()}
    prev = torch.cat([model.acc(p.embed)[None], r["block"][:-1]])
    mlp_in = run(model, tokens, read=("mlp_in",), stop_after=("mlp_in", model.n_layers - 1)).reads["mlp_in"]
    pieces = {"heads": _heads, "writes": _writes, "mlp input": _mlp_input, "block norms": _block_norms,
              "final norm": _final_norm, "logits": _logits, "direct effects": _direct_effects}
    out = {}
    for name, piece in pieces.items():
        try:
            gaps = piece(model, tokens, p, r, prev, model.acc(mlp_in))
        except (RuntimeError, ValueError, IndexError, AttributeError, TypeError) as e:
            out[name] = f"{type(e).__name__}: {e}"
            continue
        if gaps:
            out[name] = torch.stack(gaps).cpu()  # [layer, 2]
    return out


def _heads(model, tokens, p, r, prev, mlp_in):
    gaps = []
    for layer in range(model.n_layers):
        zh = r["z"][layer].unflatten(-1, (model.n_heads, model.d_head))
        heads = torch.einsum("bphk,hkd->bpd", zh, model.head_out_weight(layer))
        b = model.attn_out_bias(layer)
        gaps.append(_gap(heads if b is None else heads + b, r["attn"][layer]))
    return gaps


def _writes(model, tokens, p, r, prev, mlp_in):
    return [_gap(prev[l] + r["attn_write"][l] + r["mlp_write"][l], r["block"][l])
            for l in range(model.n_layers)]


def _mlp_input(model, tokens, p, r, prev, mlp_in):
    return [_gap(prev[l] + (0.0 if model.parallel_residual else r["attn_write"][l]), mlp_in[l])
            for l in range(model.n_layers)]


def _block_norms(model, tokens, p, r, prev, mlp_in):
    if not model.sandwich:
        return []
    gaps = []
    for layer in range(model.n_layers):
        for raw, write, path in ((r["attn"], r["attn_write"], model.adapter.post_attn_norm),
                                 (r["mlp"], r["mlp_write"], model.adapter.post_mlp_norm)):
            norm = model.module(path, layer)
            s = model.norm_scale(norm, raw[layer], kind="rms")
            gaps.append(_gap(model.frozen_norm(norm, raw[layer], s, kind="rms"), write[layer]))
    return gaps


def _final_norm(model, tokens, p, r, prev, mlp_in):
    final = model.module(model.adapter.final_norm)
    resid, normed = model.acc(p.final_resid), model.acc(p.final_normed)
    return [_gap(model.frozen_norm(final, resid, model.norm_scale(final, resid)), normed)]


def _logits(model, tokens, p, r, prev, mlp_in):
    logits = model.logits(model.acc(p.final_normed)[:, -1])
    if model.logit_softcap is not None:
        logits = model.logit_softcap * torch.tanh(logits / model.logit_softcap)
    return [_gap(logits, model.acc(p.last_logits))]


def _direct_effects(model, tokens, p, r, prev, mlp_in):
    de = direct_effects(model, tokens, p, readout(model, tokens, p))
    return [_gap(de.total(), de.logit)]


def check_adapter(model: Model) -> None:
    """Refuse ``model`` (one :class:`UnsupportedArchitectureError` naming the first failing piece
    and layer) unless its adapter reproduces what the model computes on a few tokens."""
    errors = in_session(model, check_errors, check_tokens(model))
    # the model's own values overflowing (half precision) is a numerical problem, not the adapter's
    check_finite({piece: g[:, 1] for piece, g in errors.items() if not isinstance(g, str)},
                 "checking the adapter at load", model.name, model.dtype)
    tol = TOLERANCE.get(model.dtype, HALF_TOLERANCE)
    for piece, gaps in errors.items():
        if isinstance(gaps, str):
            raise UnsupportedArchitectureError(
                f"the load-time check of {model.name} with the {model.adapter.family!r} adapter failed: "
                f"{piece} could not be computed ({gaps.splitlines()[0]}): {HINTS[piece]}.")
        err, ref = gaps[:, 0], gaps[:, 1]
        bad = (err > tol * ref.clamp_min(1.0)) | ~torch.isfinite(err)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            where = f" (layer {i // 2 if piece == 'block norms' else i})" if len(gaps) > 1 else ""
            raise UnsupportedArchitectureError(
                f"the load-time check of {model.name} with the {model.adapter.family!r} adapter failed: "
                f"{piece}{where} differ from what the model computes by {float(err[i]):.3g} (largest "
                f"value {float(ref[i]):.3g}, tolerance {tol:g} of it): {HINTS[piece]}. The adapter "
                "does not read this model correctly, so its measurements would be wrong.")
