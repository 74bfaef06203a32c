"""An independent plain-PyTorch recomputation of self-repair, for comparison with the library.

No nnsight and no library arithmetic: forward hooks capture activations, a pre-hook patches the
head's slice of the output projection's input, logits come from the model's own full-vocabulary
output (centered in float64), and every direct effect is computed head by head from the weights
(``z_h @ W_O[h]``) and the hand-written norm formulas below.
"""

from __future__ import annotations

import torch

FAMILY = {
    # blocks, o_proj, mlp, final norm, norm kind, conv1d, post-attn norm, post-mlp norm
    "gpt2": ("transformer.h", "attn.c_proj", "mlp", "transformer.ln_f", "ln", True, None, None),
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp", "gpt_neox.final_layer_norm", "ln", False, None, None),
    "llama": ("model.layers", "self_attn.o_proj", "mlp", "model.norm", "rms", False, None, None),
    "gemma3": ("model.layers", "self_attn.o_proj", "mlp", "model.norm", "gemma", False,
               "post_attention_layernorm", "post_feedforward_layernorm"),
}


def _mod(root, path):
    for p in path.split("."):
        root = getattr(root, p)
    return root


def _norm_parts(norm, kind, x):
    """(scale S, linear part n(x)) of a final norm, by hand."""
    x = x.double()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    if kind == "ln":
        c = x - x.mean(-1, keepdim=True)
        return torch.sqrt((c ** 2).mean(-1) + eps), c * norm.weight.double()
    gain = norm.weight.double() + (1.0 if kind == "gemma" else 0.0)
    return torch.sqrt((x ** 2).mean(-1) + eps), x * gain


def capture(model, family, tokens, patch=None, outputs=()):
    """Run ``model`` with hooks; ``patch = (layer, head, d_head, z_replacement)``; ``outputs``:
    ``(module, f)`` pairs whose output is replaced by ``f(input, output)`` (registered first)."""
    blocks, o_proj, mlp, final, *_ = FAMILY[family]
    n_layers = len(_mod(model, blocks))
    got = {"z": {}, "mlp": {}, "attn": {}}
    hooks = [m.register_forward_hook(lambda mod, a, o, f=f: f(a[0], o)) for m, f in outputs]
    for l in range(n_layers):
        blk = _mod(model, blocks)[l]

        def pre(mod, args, l=l):
            z = args[0]
            if patch is not None and patch[0] == l:
                _, h, dh, repl = patch
                z = z.clone()
                z[..., h * dh:(h + 1) * dh] = repl[..., h * dh:(h + 1) * dh]
            got["z"][l] = z.detach().double()
            return (z,) + args[1:]

        hooks.append(_mod(blk, o_proj).register_forward_pre_hook(pre))
        hooks.append(_mod(blk, o_proj).register_forward_hook(
            lambda m, a, o, l=l: got["attn"].__setitem__(l, o.detach().double())))
        hooks.append(_mod(blk, mlp).register_forward_hook(
            lambda m, a, o, l=l: got["mlp"].__setitem__(l, o.detach().double())))
    hooks.append(_mod(model, final).register_forward_hook(
        lambda m, a, o: got.__setitem__("resid", a[0].detach().double())))
    try:
        with torch.no_grad():
            logits = model(tokens).logits.double()
    finally:
        for h in hooks:
            h.remove()
    got["logits"] = logits - logits.mean(-1, keepdim=True)
    return got


def reference_self_repair(model, family, tokens, corrupt, layer, head, *, parallel, ablation="resample"):
    """Eq. 1 / eq. 2 quantities ``[batch, pos-1]`` for one head ablated by ``ablation``: resample
    from ``corrupt``, mean (the head's clean z averaged over every row and position of ``tokens``)
    or zero."""
    blocks, o_proj, mlp, final, kind, conv1d, pan, pmn = FAMILY[family]
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_layers = cfg.num_hidden_layers
    clean = capture(model, family, tokens)
    if ablation == "resample":
        repl = capture(model, family, corrupt)["z"][layer]
    elif ablation == "mean":
        repl = clean["z"][layer].mean((0, 1), keepdim=True).expand_as(clean["z"][layer])
    else:
        repl = torch.zeros_like(clean["z"][layer])
    abl = capture(model, family, tokens, patch=(layer, head, d_head, repl.to(model.dtype)))
    norm = _mod(model, final)
    tgt = tokens[:, 1:]
    W_U = model.get_output_embeddings().weight.double()
    u = W_U[tgt] - W_U.mean(0)
    S, _ = _norm_parts(norm, kind, clean["resid"][:, :-1])
    S2, n2 = _norm_parts(norm, kind, abl["resid"][:, :-1])

    def de(vec, l=None, which=None):
        """Direct effect of a residual component at the clean final (and block) scales."""
        vec = vec[:, :-1]
        if which is not None:  # sandwich: the block writes g * a / s with s frozen (clean)
            bn = _mod(_mod(model, blocks)[l], which)
            a_clean = clean["attn" if which == pan else "mlp"][l][:, :-1]
            s = torch.sqrt((a_clean ** 2).mean(-1) + bn.eps)
            vec = vec * (bn.weight.double() + 1) / s[..., None]
        _, nv = _norm_parts(norm, kind, vec)
        if kind == "ln":  # n is linear: centering of a component is its own centering
            nv = (vec - vec.mean(-1, keepdim=True)) * norm.weight.double()
        return (u * nv).sum(-1) / S

    def head_out(z, l, h):
        w = _mod(_mod(model, blocks)[l], o_proj).weight.double()
        w = w if conv1d else w.T
        return z[..., h * d_head:(h + 1) * d_head] @ w[h * d_head:(h + 1) * d_head]

    out = {}
    out["delta_logit"] = (abl["logits"][:, :-1].gather(-1, tgt[..., None])
                          - clean["logits"][:, :-1].gather(-1, tgt[..., None]))[..., 0]
    out["direct_effect"] = de(head_out(clean["z"][layer], layer, head), layer, pan)
    out["ablated_direct_effect"] = de(head_out(abl["z"][layer], layer, head), layer, pan)
    zero = torch.zeros_like(S)
    out["from_heads"] = sum((de(head_out(abl["z"][l], l, h), l, pan) - de(head_out(clean["z"][l], l, h), l, pan)
                             for l in range(layer + 1, n_layers) for h in range(n_heads)), zero)
    first_mlp = layer + 1 if parallel else layer
    out["from_mlps"] = sum((de(abl["mlp"][l], l, pmn) - de(clean["mlp"][l], l, pmn)
                            for l in range(first_mlp, n_layers)), zero)
    out["from_norm"] = (u * n2).sum(-1) * (1 / S2 - 1 / S)
    out["scale_ablated"] = S2
    if pan is not None:
        terms = []
        for l in range(layer, n_layers):
            for site, which in (("attn", pan), ("mlp", pmn)):
                bn = _mod(_mod(model, blocks)[l], which)
                a_new, a_old = abl[site][l][:, :-1], clean[site][l][:, :-1]
                s_new = torch.sqrt((a_new ** 2).mean(-1) + bn.eps)
                s_old = torch.sqrt((a_old ** 2).mean(-1) + bn.eps)
                write = a_new * (bn.weight.double() + 1)
                _, nv = _norm_parts(norm, kind, write)
                terms.append((u * nv).sum(-1) / S * (1 / s_new - 1 / s_old))
        out["from_block_norms"] = sum(terms)
    else:
        out["from_block_norms"] = torch.zeros_like(out["from_norm"])
    out["self_repair"] = out["delta_logit"] - (out["ablated_direct_effect"] - out["direct_effect"])
    return out


def reference_atp(model, family, tokens, corrupt):
    """AtP per head ``[layer, head]``, summed over every predicting position: ``sum_p (z'_h - z_h) .
    dM/dz_h`` with ``M`` the sum of the centered logits of the next tokens from the model's own
    full-vocabulary output (float64), gradients by plain autograd through forward pre-hooks that
    keep each out-projection input (no nnsight, no library code). ``z'`` is the head's ``z`` on
    ``corrupt`` (resample ablation)."""
    blocks, o_proj, *_ = FAMILY[family]
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_layers = cfg.num_hidden_layers
    repl = capture(model, family, corrupt)["z"]
    zs, hooks = {}, []
    for l in range(n_layers):
        def pre(mod, args, l=l):
            args[0].retain_grad()
            zs[l] = args[0]
        hooks.append(_mod(_mod(model, blocks)[l], o_proj).register_forward_pre_hook(pre))
    emb = model.get_input_embeddings()
    # gradients with respect to activations: make the embedding output a leaf that requires grad
    hooks.append(emb.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)))
    try:
        with torch.enable_grad():
            logits = model(tokens).logits.double()
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


def reference_frozen(model, family, tokens, corrupt, layer, head, *, parallel, freeze):
    """``delta_logit`` and ``self_repair`` ``[batch, pos-1]`` of one head resample-ablated with
    ``freeze = "norms"`` (forward hooks make the final norm and, for Gemma, every block norm of
    layers >= ``layer`` divide by the clean run's scale, by hand) or ``"components"`` (hooks put
    the clean output on every downstream attention output projection and MLP)."""
    blocks, o_proj, mlp, final, kind, conv1d, pan, pmn = FAMILY[family]
    cfg = model.config
    n_heads, n_layers = cfg.num_attention_heads, cfg.num_hidden_layers
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    clean = capture(model, family, tokens)
    repl = capture(model, family, corrupt)["z"][layer]
    norm = _mod(model, final)
    blk = _mod(model, blocks)
    outputs = []
    if freeze == "norms":
        S, _ = _norm_parts(norm, kind, clean["resid"])

        def final_frozen(x, o, S=S):
            _, nx = _norm_parts(norm, kind, x)
            b = norm.bias.double() if getattr(norm, "bias", None) is not None else 0.0
            return (nx / S[..., None] + b).to(o.dtype)

        outputs.append((norm, final_frozen))
        if pan is not None:
            for l in range(layer, n_layers):
                for site, which in (("attn", pan), ("mlp", pmn)):
                    bn = _mod(blk[l], which)
                    s = torch.sqrt((clean[site][l] ** 2).mean(-1) + bn.eps)
                    outputs.append((bn, lambda x, o, bn=bn, s=s: (
                        x.double() * (bn.weight.double() + 1) / s[..., None]).to(o.dtype)))
    elif freeze == "components":
        for l in range(layer, n_layers):
            if l > layer:
                outputs.append((_mod(blk[l], o_proj), lambda x, o, l=l: clean["attn"][l].to(o.dtype)))
            if l > layer or not parallel:
                outputs.append((_mod(blk[l], mlp), lambda x, o, l=l: clean["mlp"][l].to(o.dtype)))
    else:
        raise ValueError(freeze)
    abl = capture(model, family, tokens, patch=(layer, head, d_head, repl.to(model.dtype)), outputs=outputs)
    tgt = tokens[:, 1:]
    W_U = model.get_output_embeddings().weight.double()
    u = W_U[tgt] - W_U.mean(0)
    S, _ = _norm_parts(norm, kind, clean["resid"][:, :-1])
    w = _mod(blk[layer], o_proj).weight.double()
    w = (w if conv1d else w.T)[head * d_head:(head + 1) * d_head]
    change = (abl["z"][layer] - clean["z"][layer])[:, :-1, head * d_head:(head + 1) * d_head] @ w
    if pan is not None:  # the head's share of its block's write, at the clean block scale
        bn = _mod(blk[layer], pan)
        s = torch.sqrt((clean["attn"][layer][:, :-1] ** 2).mean(-1) + bn.eps)
        change = change * (bn.weight.double() + 1) / s[..., None]
    if kind == "ln":
        change = (change - change.mean(-1, keepdim=True)) * norm.weight.double()
    else:
        change = change * (norm.weight.double() + (1.0 if kind == "gemma" else 0.0))
    d_de = (u * change).sum(-1) / S
    delta_logit = (abl["logits"][:, :-1].gather(-1, tgt[..., None])
                   - clean["logits"][:, :-1].gather(-1, tgt[..., None]))[..., 0]
    return {"delta_logit": delta_logit, "self_repair": delta_logit - d_de}
