"""An independent plain-PyTorch recomputation of self-repair, for comparison with the library.

No nnsight and no library arithmetic: forward hooks capture activations, a pre-hook patches the
head's slice of the output projection's input, logits come from the model's own full-vocabulary
output (centered in float64; a soft-capped model's cap undone, ``x = c atanh(l / c)``), and every
direct effect is computed head by head from the weights (``z_h @ W_O[h]``) and the hand-written
norm formulas below.

What a family *is* comes from the adapter registry as data only (:func:`spec`: module paths and
the names of its mechanisms: norm kind and gain, post-norms, parallel residual, write multiplier,
logit scale and cap, project-out); every formula applying them is written out here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrepair.models.adapters import adapter_for


@dataclass
class Spec:
    blocks: str
    o_proj: str
    mlp: str
    final: str
    kind: str  # "ln" | "rms"
    gain: str  # "w" | "1+w" | "none"
    eps: float | None
    conv1d: bool
    pan: str | None  # post-attention norm (sandwich / output norms)
    pmn: str | None  # post-MLP norm
    parallel: bool
    flat: bool  # the MLP runs on [batch * pos, d]
    m: float  # what every write to the residual is multiplied by
    logit_scale: float
    softcap: float | None
    unembed_in: str | None


def spec(model) -> Spec:
    cfg = model.config
    a = adapter_for(cfg.model_type).resolve(cfg)
    scale = 1.0
    if a.logit_scale:
        name = a.logit_scale.removeprefix("1/")
        scale = float(getattr(cfg, name)) ** (-1 if a.logit_scale.startswith("1/") else 1)
    cap = getattr(cfg, a.logit_softcap, None) if a.logit_softcap else None
    parallel = bool(getattr(cfg, a.parallel, False)) if isinstance(a.parallel, str) else a.parallel
    return Spec(a.blocks, a.attn_out, a.mlp, a.final_norm, "ln" if a.norm == "layernorm" else "rms",
                a.gain, a.eps, a.conv1d, a.post_attn_norm, a.post_mlp_norm, parallel, a.flat_mlp,
                float(getattr(cfg, a.write_scale)) if a.write_scale else 1.0, scale,
                float(cap) if cap else None, a.unembed_in)


def value_biases(model, layer):
    """``b_V`` of every query head of ``layer``, ``[n_heads, d_head]`` float64, sliced by hand from
    the module and layout the registry names (zeros where the family has none). Under grouped- or
    multi-query attention query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``
    (Hugging Face's ``repeat_kv``)."""
    a = adapter_for(model.config.model_type).resolve(model.config)
    n_heads = model.config.num_attention_heads
    d_head = d_head_of(model, spec(model))
    bias = getattr(_mod(_mod(model, a.blocks)[layer], a.value), "bias", None)
    if bias is None:
        return torch.zeros(n_heads, d_head, dtype=torch.float64)
    rows = bias.double().view(-1, d_head)  # one row per q, k or v head of d_head
    if a.value_layout == "separate":  # the value projection's own bias: every row is a kv head's
        v = rows
    elif a.value_layout == "qkv":  # [q (n_heads rows) | k (n_kv) | v (n_kv)]
        v = rows[n_heads + (len(rows) - n_heads) // 2:]
    elif a.value_layout == "per_head":  # [q k v] per head
        v = rows.view(n_heads, 3, d_head)[:, 2]
    else:  # "grouped": per kv head [q .. q k v]
        n_kv = (len(rows) - n_heads) // 2
        v = rows.view(n_kv, -1, d_head)[:, -1]
    return v.repeat_interleave(n_heads // len(v), 0)


def _mod(root, path):
    for p in path.split("."):
        root = getattr(root, p)
    return root


def _eps(norm, sp: Spec) -> float:
    e = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    return e if e is not None else sp.eps


def _gain(norm, sp: Spec):
    if sp.gain == "none":
        return 1.0
    return norm.weight.double() + (1.0 if sp.gain == "1+w" else 0.0)


def _norm_parts(norm, sp: Spec, x, kind=None):
    """(scale S, linear part n(x)) of a norm, by hand."""
    x = x.double()
    if (kind or sp.kind) == "ln":
        c = x - x.mean(-1, keepdim=True)
        return torch.sqrt((c ** 2).mean(-1) + _eps(norm, sp)), c * _gain(norm, sp)
    return torch.sqrt((x ** 2).mean(-1) + _eps(norm, sp)), x * _gain(norm, sp)


def _rms(norm, sp: Spec, x):
    """The scale of a block's post-norm (RMS) on its raw input."""
    return torch.sqrt((x.double() ** 2).mean(-1) + _eps(norm, sp))


def d_head_of(model, sp: Spec) -> int:
    w = _mod(_mod(model, sp.blocks)[0], sp.o_proj).weight
    return w.shape[0 if sp.conv1d else 1] // model.config.num_attention_heads


def _logits(model, sp: Spec, tokens):
    """The model's own logits ``[batch, pos, vocab]`` in float64, before any soft-cap."""
    logits = model(tokens).logits.double()
    if sp.softcap is not None:
        logits = sp.softcap * torch.atanh(logits / sp.softcap)
    return logits


def unembed(model, sp: Spec):
    """``[vocab, d_model]``: logits = final norm output @ this.T (+ bias), in float64."""
    w = model.get_output_embeddings().weight.double()
    if sp.unembed_in is not None and _mod(model, sp.unembed_in) is not None:
        w = w @ _mod(model, sp.unembed_in).weight.double()
    return w * sp.logit_scale


def capture(model, tokens, patch=None, outputs=()):
    """Run ``model`` with hooks; ``patch = (layer, head, d_head, z_replacement)``; ``outputs``:
    ``(module, f)`` pairs whose output is replaced by ``f(input, output)`` (registered first)."""
    sp = spec(model)
    shape = tokens.shape
    n_layers = len(_mod(model, sp.blocks))
    got = {"z": {}, "mlp": {}, "attn": {}}
    hooks = [m.register_forward_hook(lambda mod, a, o, f=f: f(a[0], o)) for m, f in outputs]
    for l in range(n_layers):
        blk = _mod(model, sp.blocks)[l]

        def pre(mod, args, l=l):
            z = args[0]
            if patch is not None and patch[0] == l:
                _, h, dh, repl = patch
                z = z.clone()
                z[..., h * dh:(h + 1) * dh] = repl[..., h * dh:(h + 1) * dh]
            got["z"][l] = z.detach().double()
            return (z,) + args[1:]

        hooks.append(_mod(blk, sp.o_proj).register_forward_pre_hook(pre))
        hooks.append(_mod(blk, sp.o_proj).register_forward_hook(
            lambda m, a, o, l=l: got["attn"].__setitem__(l, o.detach().double())))
        hooks.append(_mod(blk, sp.mlp).register_forward_hook(  # cloned: falcon adds into it in place
            lambda m, a, o, l=l: got["mlp"].__setitem__(l, o.detach().double().clone().view(*shape, -1))))
    hooks.append(_mod(model, sp.final).register_forward_hook(
        lambda m, a, o: got.__setitem__("resid", a[0].detach().double())))
    try:
        with torch.no_grad():
            logits = _logits(model, sp, tokens)
    finally:
        for h in hooks:
            h.remove()
    got["logits"] = logits - logits.mean(-1, keepdim=True)
    return got


def _write_scale(model, sp: Spec, l, which, raw):
    """What block ``l`` multiplies a raw output by before adding it (sandwich: ``g / s`` with
    ``s`` the post-norm ``which``'s scale on the clean raw output ``raw``; otherwise the family's
    write multiplier)."""
    if which is None:
        return sp.m
    bn = _mod(_mod(model, sp.blocks)[l], which)
    return _gain(bn, sp) / _rms(bn, sp, raw)[..., None]


def reference_self_repair(model, tokens, corrupt, layer, head, *, ablation="resample", clean=None,
                          source=None, fold_value_biases=False):
    """Eq. 1 / eq. 2 quantities ``[batch, pos-1]`` for one head ablated by ``ablation``: resample
    from ``corrupt``, mean (the head's clean z averaged over every row and position of ``tokens``)
    or zero. ``clean`` / ``source``: :func:`capture` of ``tokens`` / ``corrupt`` when already run.

    ``fold_value_biases``: TransformerLens's folded convention computed on the *unfolded* model.
    There a head's ``z`` excludes its value bias (``z_h - b_V[h]``: attention rows sum to 1), so its
    output and direct effect exclude ``b_V[h] @ W_O[h]``, and zeroing that ``z`` leaves the term
    in the layer's bias, i.e. the unfolded model's ``z_h`` becomes ``b_V[h]``. The model's weights
    are not changed."""
    sp = spec(model)
    n_heads, n_layers = model.config.num_attention_heads, model.config.num_hidden_layers
    d_head = d_head_of(model, sp)
    b_v = {l: value_biases(model, l) if fold_value_biases else torch.zeros(n_heads, d_head, dtype=torch.float64)
           for l in range(n_layers)}
    clean = capture(model, tokens) if clean is None else clean
    if ablation == "resample":
        repl = (capture(model, corrupt) if source is None else source)["z"][layer]
    elif ablation == "mean":
        repl = clean["z"][layer].mean((0, 1), keepdim=True).expand_as(clean["z"][layer])
    else:  # the folded z is zeroed: the unfolded one keeps the value bias
        repl = b_v[layer].flatten().expand_as(clean["z"][layer])
    abl = capture(model, tokens, patch=(layer, head, d_head, repl.to(model.dtype)))
    norm = _mod(model, sp.final)
    tgt = tokens[:, 1:]
    W_U = unembed(model, sp)
    u = W_U[tgt] - W_U.mean(0)
    S, _ = _norm_parts(norm, sp, clean["resid"][:, :-1])
    S2, n2 = _norm_parts(norm, sp, abl["resid"][:, :-1])

    def de(vec, l, which):
        """Direct effect of a raw output at the clean final (and block) scales."""
        raw = clean["attn" if which == sp.pan else "mlp"][l][:, :-1]
        vec = vec[:, :-1] * _write_scale(model, sp, l, which, raw)
        _, nv = _norm_parts(norm, sp, vec)  # n is linear: centering a component is its own centering
        return (u * nv).sum(-1) / S

    def head_out(z, l, h):
        w = _mod(_mod(model, sp.blocks)[l], sp.o_proj).weight.double()
        w = w if sp.conv1d else w.T
        return (z[..., h * d_head:(h + 1) * d_head] - b_v[l][h]) @ w[h * d_head:(h + 1) * d_head]

    out = {}
    out["delta_logit"] = (abl["logits"][:, :-1].gather(-1, tgt[..., None])
                          - clean["logits"][:, :-1].gather(-1, tgt[..., None]))[..., 0]
    out["direct_effect"] = de(head_out(clean["z"][layer], layer, head), layer, sp.pan)
    out["ablated_direct_effect"] = de(head_out(abl["z"][layer], layer, head), layer, sp.pan)
    zero = torch.zeros_like(S)
    out["from_heads"] = sum((de(head_out(abl["z"][l], l, h), l, sp.pan) - de(head_out(clean["z"][l], l, h), l, sp.pan)
                             for l in range(layer + 1, n_layers) for h in range(n_heads)), zero)
    first_mlp = layer + 1 if sp.parallel else layer
    out["from_mlps"] = sum((de(abl["mlp"][l], l, sp.pmn) - de(clean["mlp"][l], l, sp.pmn)
                            for l in range(first_mlp, n_layers)), zero)
    out["from_norm"] = (u * n2).sum(-1) * (1 / S2 - 1 / S)
    out["scale_ablated"] = S2
    out["from_block_norms"] = torch.zeros_like(out["from_norm"])
    if sp.pan is not None:
        for l in range(layer, n_layers):
            for site, which in (("attn", sp.pan), ("mlp", sp.pmn)):
                bn = _mod(_mod(model, sp.blocks)[l], which)
                a_new, a_old = abl[site][l][:, :-1], clean[site][l][:, :-1]
                _, nv = _norm_parts(norm, sp, a_new * _gain(bn, sp))
                out["from_block_norms"] = out["from_block_norms"] + (u * nv).sum(-1) / S * (
                    1 / _rms(bn, sp, a_new) - 1 / _rms(bn, sp, a_old))
    out["self_repair"] = out["delta_logit"] - (out["ablated_direct_effect"] - out["direct_effect"])
    return out


def reference_atp(model, tokens, corrupt):
    """AtP per head ``[layer, head]``, summed over every predicting position: ``sum_p (z'_h - z_h) .
    dM/dz_h`` with ``M`` the sum of the centered logits of the next tokens from the model's own
    full-vocabulary output (float64, before any soft-cap), gradients by plain autograd through
    forward pre-hooks that keep each out-projection input (no nnsight, no library code). ``z'`` is
    the head's ``z`` on ``corrupt`` (resample ablation)."""
    sp = spec(model)
    n_heads, n_layers = model.config.num_attention_heads, model.config.num_hidden_layers
    d_head = d_head_of(model, sp)
    repl = capture(model, corrupt)["z"]
    zs, hooks = {}, []
    for l in range(n_layers):
        def pre(mod, args, l=l):
            args[0].retain_grad()
            zs[l] = args[0]
        hooks.append(_mod(_mod(model, sp.blocks)[l], sp.o_proj).register_forward_pre_hook(pre))
    emb = model.get_input_embeddings()
    # gradients with respect to activations: make the embedding output a leaf that requires grad
    hooks.append(emb.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)))
    try:
        with torch.enable_grad():
            logits = _logits(model, sp, tokens)
            logits = logits - logits.mean(-1, keepdim=True)
            logits[:, :-1].gather(-1, tokens[:, 1:, None]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for l in range(n_layers):
        dz = (repl[l] - zs[l].detach().double()) * zs[l].grad.double()
        out[l] = dz.unflatten(-1, (n_heads, d_head)).sum((0, 1, 3))
    return out


def _frozen_outputs(model, sp: Spec, clean, layer, freeze):
    """``(module, f)`` output replacements holding part of the model at the clean run."""
    n_layers = model.config.num_hidden_layers
    norm, blk, outputs = _mod(model, sp.final), _mod(model, sp.blocks), []
    if freeze == "norms":
        S, _ = _norm_parts(norm, sp, clean["resid"])

        def final_frozen(x, o, S=S):
            _, nx = _norm_parts(norm, sp, x)
            b = norm.bias.double() if getattr(norm, "bias", None) is not None else 0.0
            return (nx / S[..., None] + b).to(o.dtype)

        outputs.append((norm, final_frozen))
        if sp.pan is not None:
            for l in range(layer, n_layers):
                for site, which in (("attn", sp.pan), ("mlp", sp.pmn)):
                    bn = _mod(blk[l], which)
                    s = _rms(bn, sp, clean[site][l])
                    outputs.append((bn, lambda x, o, bn=bn, s=s: (
                        x.double() * _gain(bn, sp) / s[..., None]).to(o.dtype)))
    elif freeze == "components":
        for l in range(layer, n_layers):
            if l > layer:
                outputs.append((_mod(blk[l], sp.o_proj), lambda x, o, l=l: clean["attn"][l].to(o.dtype)))
            if l > layer or not sp.parallel:
                outputs.append((_mod(blk[l], sp.mlp),
                                lambda x, o, l=l: clean["mlp"][l].reshape(o.shape).to(o.dtype)))
    else:
        raise ValueError(freeze)
    return outputs


def reference_frozen(model, tokens, corrupt, layer, head, *, freeze):
    """``delta_logit`` and ``self_repair`` ``[batch, pos-1]`` of one head resample-ablated with
    ``freeze = "norms"`` (forward hooks make the final norm and, in sandwich models, every block
    norm of layers >= ``layer`` divide by the clean run's scale, by hand) or ``"components"``
    (hooks put the clean output on every downstream attention output projection and MLP)."""
    sp = spec(model)
    d_head = d_head_of(model, sp)
    clean = capture(model, tokens)
    repl = capture(model, corrupt)["z"][layer]
    outputs = _frozen_outputs(model, sp, clean, layer, freeze)
    abl = capture(model, tokens, patch=(layer, head, d_head, repl.to(model.dtype)), outputs=outputs)
    tgt = tokens[:, 1:]
    W_U = unembed(model, sp)
    u = W_U[tgt] - W_U.mean(0)
    norm, blk = _mod(model, sp.final), _mod(model, sp.blocks)
    S, _ = _norm_parts(norm, sp, clean["resid"][:, :-1])
    w = _mod(blk[layer], sp.o_proj).weight.double()
    w = (w if sp.conv1d else w.T)[head * d_head:(head + 1) * d_head]
    change = (abl["z"][layer] - clean["z"][layer])[:, :-1, head * d_head:(head + 1) * d_head] @ w
    change = change * _write_scale(model, sp, layer, sp.pan, clean["attn"][layer][:, :-1])  # its share
    _, n_change = _norm_parts(norm, sp, change)
    d_de = (u * n_change).sum(-1) / S
    delta_logit = (abl["logits"][:, :-1].gather(-1, tgt[..., None])
                   - clean["logits"][:, :-1].gather(-1, tgt[..., None]))[..., 0]
    return {"delta_logit": delta_logit, "self_repair": delta_logit - d_de}
