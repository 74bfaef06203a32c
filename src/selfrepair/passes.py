"""Every patched forward pass of the library, each starting from a :class:`~selfrepair.batch.CleanBatch`.

- :func:`ablate_heads` — replace heads' outputs (their ``z`` slices) and measure eq. 1 and every
  term of eq. 2 per token (self-repair paper §2.1, §3.2); optionally the neurons of one MLP layer;
  optionally with the norms frozen at their clean scales, or every downstream component frozen
  but the norms (``freeze``: §3's opening experiment, §5.2's "freezing LayerNorm while ablating").
- :func:`amplify_heads` — add each head's own clean write, scaled, to the input of its layer's
  attention and read its new direct effect (App. F/G: self-reinforcing / repressing heads).
- :func:`ablate_writes` — replace a whole attention or MLP layer's write at each prompt's last
  position and read every layer's new direct effect (Hydra §2.4, eq. 33).

Each pass starts at the first edited block from the clean residual (nnsight ``skip``), stacks
several copies (heads, scales, patches) along the batch, and stops at the final norm (no
full-vocabulary logits: the target's centered unembedding row is gathered instead). Every pass is
one call of :func:`selfrepair.intervene.run`, the only function that traces the model.

Signs: ``delta = ablated - clean``; direct effects at the clean scales (final norm ``S``; the
block norms' ``s`` in sandwich models); ``from_norm = u . n(r') (1/S' - 1/S)`` and
``from_block_norms = (dir * g) . a' (1/s' - 1/s)`` computed directly, never as remainders.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .ablation import patch_heads
from .batch import CleanBatch
from .direct_effect import block_scales, head_effects
from .errors import InputError, check_finite
from .intervene import run
from .models import Model
from .structure import reads

WRITE_SITES = ("attn_write", "mlp_write")
# What ``ablate_heads(freeze=...)`` holds at the clean run (None: nothing, the live ablation):
FREEZE = ("norms", "final_norm", "components")


def _resume(batch: CleanBatch, layer: int, copies: int) -> torch.Tensor | None:
    """The clean residual entering block ``layer``, repeated for ``copies`` stacked copies."""
    return batch.clean.reads["block"][layer - 1].repeat(copies, 1, 1) if layer > 0 else None


def _block_norm_term(model: Model, batch: CleanBatch, kind: str, j: int, raw: torch.Tensor,
                     direction: torch.Tensor, clean_scale: torch.Tensor) -> torch.Tensor:
    """``(direction * g) . a' (1/s' - 1/s)`` of block ``j``'s ``kind`` norm for raw outputs ``a'``."""
    norm_path = model.adapter.post_attn_norm if kind == "attn" else model.adapter.post_mlp_norm
    s_new = block_scales(model, kind, raw[None], range(j, j + 1))[0]
    gain = model.norm_gain(model.module(norm_path, j))
    return (raw * direction * gain).sum(-1) * (1 / s_new - 1 / clean_scale)


def check_freeze(freeze: str | None) -> None:
    if freeze is not None and freeze not in FREEZE:
        raise InputError(f"unknown freeze {freeze!r}: use None (a live ablation), "
                         + ", ".join(repr(f) for f in FREEZE))


def _freeze_plan(batch: CleanBatch, layer: int, k: int, freeze: str | None) -> dict:
    """``run`` keywords for ``freeze`` (``k`` stacked copies of the batch):

    - ``"norms"``: the final norm and, in sandwich models, every block norm from the ablated
      layer's post-attention norm on divide by their clean scales (``freeze`` / ``freeze_final``);
    - ``"final_norm"``: the final norm only;
    - ``"components"``: every attention and MLP output downstream of ``layer`` replaced by its
      clean value (``edits`` at sites ``attn`` / ``mlp``); the norms stay live.
    """
    model, clean = batch.model, batch.clean
    plan: dict = {"edits": {}}
    if freeze in ("norms", "final_norm"):
        plan["freeze_final"] = model.norm_scale(model.module(model.adapter.final_norm),
                                                model.acc(clean.final_resid)).repeat(k, 1)
    if freeze == "norms" and model.sandwich:
        plan["freeze"] = {(site, j): block_scales(model, kind, clean.reads[kind][j][None],
                                                  range(j, j + 1))[0].repeat(k, 1)
                          for j in range(layer, model.n_layers)
                          for kind, site in zip(("attn", "mlp"), WRITE_SITES)}
    if freeze == "components":
        for j in range(layer, model.n_layers):
            for kind in ("attn", "mlp"):
                if reads(model.parallel_residual, "attn", layer, kind, j):
                    plan["edits"][(kind, j)] = (  # repeated when the pass reaches it, not before
                        lambda v, x=clean.reads[kind][j]: x.repeat(k, 1, 1).to(v.dtype))
    return plan


def ablate_heads(batch: CleanBatch, layer: int, heads: Sequence[int], repl: torch.Tensor, *,
                 neuron_layer: int | None = None, freeze: str | None = None) -> dict[str, torch.Tensor]:
    """Ablate ``heads`` of ``layer`` (one stacked pass); every quantity ``[head, batch, pos-1]``.

    ``repl`` is the replacement ``z`` of this layer (``[batch or 1, pos or 1, n_heads*d_head]``).
    With ``neuron_layer`` the ablated neuron activations of that MLP layer are returned too
    (``"neurons"``, ``[head, batch, pos-1, d_mlp]``).

    ``freeze`` (:data:`FREEZE`, see :func:`_freeze_plan`) holds part of the model at the clean run
    while the heads are ablated; ``delta_logit`` is then read from that pass's own final-norm
    output, and the frozen parts' terms of eq. 2 are zero by construction: ``"norms"`` and
    ``"final_norm"`` give ``from_norm = 0`` (``"norms"`` also ``from_block_norms = 0``),
    ``"components"`` gives ``from_heads = from_mlps = 0`` (computed, not set). So in every mode
    ``self_repair = from_heads + from_mlps + from_norm + from_block_norms``. ``scale_ablated`` is
    always the final-norm scale of the ablated residual (what a live norm would divide by).
    """
    check_freeze(freeze)
    model, ro, clean = batch.model, batch.readout, batch.clean
    heads = list(heads)
    k, b = len(heads), batch.rows
    clean_normed = model.acc(clean.final_normed[:, :-1])
    plan = _freeze_plan(batch, layer, k, freeze)
    frozen_blocks = freeze == "norms"

    # Both run inside the trace and return per-token reductions, which are all that comes back.
    def watch(site: str, j: int, value: torch.Tensor) -> dict | None:
        if site == "neurons":
            return {"neurons": value[:, :-1].unflatten(0, (k, b))} if j == neuron_layer else None
        kind = site  # "attn" | "mlp"
        if kind == "mlp" and not reads(model.parallel_residual, "attn", layer, "mlp", j):
            return None
        v = model.acc(value[:, :-1]).unflatten(0, (k, b))
        clean_v = model.acc(clean.reads[kind][j][:, :-1])
        terms = {}
        if kind == "mlp" or j > layer:  # the ablated layer's own change is the head's ΔDE
            terms["from_heads" if kind == "attn" else "from_mlps"] = (
                (v - clean_v) * ro.write_dir(model, kind, j)).sum(-1)
        if model.sandwich and not frozen_blocks:
            s_old = (ro.attn_scale if kind == "attn" else ro.mlp_scale)[j]
            terms["from_block_norms"] = _block_norm_term(model, batch, kind, j, v, ro.dir, s_old)
        return terms

    frozen_final = "freeze_final" in plan

    def final(resid: torch.Tensor, normed: torch.Tensor) -> dict[str, torch.Tensor]:
        resid = model.acc(resid[:, :-1]).unflatten(0, (k, b))
        scale_new = model.norm_scale(model.module(model.adapter.final_norm), resid)
        normed = model.acc(normed[:, :-1]).unflatten(0, (k, b))
        from_norm = (torch.zeros_like(scale_new) if frozen_final else
                     (ro.d * resid).sum(-1) * (1 / scale_new - 1 / ro.scale))
        return {"delta_logit": (ro.u * (normed - clean_normed)).sum(-1), "from_norm": from_norm,
                "scale_ablated": scale_new}

    sites = ("attn", "mlp") + (("neurons",) if neuron_layer is not None else ())
    p = run(model, batch.tokens.repeat(k, 1), start_layer=layer, resume=_resume(batch, layer, k),
            watch=watch, watch_sites=sites, final=final, freeze=plan.get("freeze"),
            freeze_final=plan.get("freeze_final"),
            edits={("z", layer): lambda z: patch_heads(model, z, heads, repl, b), **plan["edits"]})
    acc = defaultdict(lambda: torch.zeros(k, b, batch.seq1, device=model.device, dtype=model.effect_dtype))
    saved = {}
    for terms in p.watched.values():  # in the order the pass met them, as a running sum would
        for name, t in terms.items():
            if name == "neurons":
                saved[name] = t
            else:
                acc[name] += t
    da = ro.write_dir(model, "attn", layer)
    de_clean = batch.head_de(layer)[heads]
    de_new = head_effects(model, repl.expand_as(clean.reads["z"][layer])[:, :-1], da, layer)[heads]
    out = {
        "direct_effect": de_clean,
        "ablated_direct_effect": de_new,
        "delta_logit": p.final["delta_logit"],
        "from_heads": acc["from_heads"],
        "from_mlps": acc["from_mlps"],
        "from_norm": p.final["from_norm"],
        "from_block_norms": acc["from_block_norms"],
        "scale_ablated": p.final["scale_ablated"],
    }
    out["self_repair"] = out["delta_logit"] - (de_new - de_clean)
    check_finite(out, f"ablating L{layer} heads {heads}", model.name, model.dtype)
    if "neurons" in saved:
        out["neurons"] = saved["neurons"]
    return out


def head_writes(batch: CleanBatch, layer: int) -> torch.Tensor:
    """Each head's clean write to the residual stream ``[head, batch, pos, d_model]``: ``z_h @ W_O[h]``
    (value bias included, ``b_O`` not); in sandwich models ``g * (z_h @ W_O[h]) / s`` with the
    clean post-attention scale ``s`` — the head's share of the block's write."""
    model, clean = batch.model, batch.clean
    zh = model.acc(clean.reads["z"][layer]).unflatten(-1, (model.n_heads, model.d_head))
    w = torch.einsum("bphk,hkd->hbpd", zh, model.head_out_weight(layer))
    if model.sandwich:
        norm = model.module(model.adapter.post_attn_norm, layer)
        s = block_scales(model, "attn", clean.reads["attn"][layer][None], range(layer, layer + 1))[0]
        w = w * model.norm_gain(norm) / s[..., None]
    return w


def random_like(w: torch.Tensor, seed: int, layer: int, head: int, start: int) -> torch.Tensor:
    """A Gaussian direction with the norm of ``w [batch, pos, d]`` at every position; row ``i`` is
    drawn from its own generator seeded by ``(seed, layer, head, start + i)``, so a row's direction
    does not depend on how the rows are cut into batches."""
    rows = []
    for i in range(w.shape[0]):
        g = torch.Generator().manual_seed(hash((seed, layer, head, start + i)) & (2**63 - 1))
        rows.append(torch.randn(w.shape[1:], generator=g, dtype=torch.float64))
    r = torch.stack(rows).to(w.device, w.dtype)
    return r * (w.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-30))


def amplify_heads(batch: CleanBatch, layer: int, heads: list[int], alphas: tuple[float, ...],
                  control: int | None = None) -> torch.Tensor:
    """New DE ``[head, alpha, batch, pos-1]`` of each of ``heads`` (of ``layer``) after adding
    ``alpha`` x its own clean write (:func:`head_writes`) to the input of the layer's attention
    pre-norm (site ``attn_in``: only this layer's attention reads the edit; the residual stream and
    so every other component are untouched).

    With a ``control`` seed one more entry is appended along the alpha axis: the head's DE after
    adding, at the largest alpha, a random direction with the same norm as its write at each
    position (:func:`random_like`: is the response specific to the head's own output, or any push of
    that size?)."""
    model, b = batch.model, batch.rows
    w = head_writes(batch, layer)
    scaled = []  # (direction, scale) per copy, head-major
    for h in heads:
        scaled += [(w[h], a) for a in alphas]
        if control is not None:
            scaled.append((random_like(w[h], control, layer, h, batch.start), max(alphas)))
    delta = torch.stack([a * v for v, a in scaled]).flatten(0, 1)  # [copy * batch, pos, d]
    per = len(alphas) + (control is not None)
    copies = [(h, j) for h in heads for j in range(per)]
    # only this layer's z is needed: the pass stops there (the rest of the model never runs)
    p = run(model, batch.tokens.repeat(len(copies), 1), start_layer=layer,
            resume=_resume(batch, layer, len(copies)),
            edits={("attn_in", layer): lambda x: x + delta.to(x.dtype)}, read=("z",),
            read_layers={"z": [layer]}, stop_after=("z", layer))
    z = p.reads["z"][0][:, :-1].unflatten(0, (len(copies), b))
    de = head_effects(model, z, batch.readout.write_dir(model, "attn", layer), layer)
    new = torch.stack([de[h, i] for i, (h, _) in enumerate(copies)])
    return new.unflatten(0, (len(heads), per))


def ablate_writes(batch: CleanBatch, pos: torch.Tensor, component: int, repl: torch.Tensor,
                  clean_de: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replace component ``component``'s write (``c = 2 * layer + (0 attention, 1 MLP)``) at each
    row's position ``pos`` by ``repl [P * batch, d_model]`` (``P`` patches, patch-major rows).

    Returns, per ``(patch, row)`` (``[P * batch]`` leading dim): ``direct_effect [.., C]`` of every
    component at the clean scales (``clean_de [batch, C]`` for those the pass does not run), the
    total effect ``delta_logit``, ``from_norm`` and ``from_block_norms`` (sandwich models: the
    downstream block norms' scale changes, which ``direct_effect`` does not contain — it reads each
    block's raw output through its clean block-norm scale)."""
    model, ro = batch.model, batch.readout
    layer, kind = divmod(component, 2)
    P = len(repl) // batch.rows
    rows = torch.arange(len(repl), device=model.device)
    pos = pos.repeat(P).to(model.device)
    dr = ro.dir.repeat(P, 1)
    de = clean_de.to(model.device).repeat(P, 1)
    block = torch.zeros(len(repl), device=model.device, dtype=model.effect_dtype)

    # Both run inside the trace and return only each row's patched position, which is all that
    # comes back.
    def watch(site: str, j: int, value: torch.Tensor) -> dict | None:
        c = 2 * j + (0 if site == "attn" else 1)
        if c <= component:  # the ablated write itself is replaced after its norm; earlier ones unchanged
            return None
        raw = model.acc(value[rows, pos])
        direction, terms = dr, {}
        if model.sandwich:
            scale = (ro.attn_scale if site == "attn" else ro.mlp_scale)[j].repeat(P)
            norm = model.module(model.adapter.post_attn_norm if site == "attn"
                                else model.adapter.post_mlp_norm, j)
            terms["block"] = _block_norm_term(model, batch, site, j, raw, dr, scale)
            direction = dr * model.norm_gain(norm) / scale[:, None]
        terms["de"] = (raw * direction).sum(-1)
        return terms

    def final(resid: torch.Tensor, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.acc(resid[rows, pos]), model.acc(normed[rows, pos])

    def edit(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[rows, pos] = repl.to(value.dtype)
        return value

    a = run(model, batch.tokens.repeat(P, 1), start_layer=layer, resume=_resume(batch, layer, P),
            watch=watch, watch_sites=("attn", "mlp"), final=final,
            edits={(WRITE_SITES[kind], layer): edit})
    for (site, j), terms in a.watched.items():  # in the order the pass met them
        de[:, 2 * j + (0 if site == "attn" else 1)] = terms["de"]
        if "block" in terms:
            block = block + terms["block"]
    de[:, component] = (model.acc(repl) * dr).sum(-1)
    resid, normed = a.final
    scale = model.norm_scale(model.module(model.adapter.final_norm), resid)
    logit = (ro.u.repeat(P, 1) * normed).sum(-1) + model.centered_unembed_bias(ro.targets).repeat(P)
    out = {"direct_effect": de, "delta_logit": logit - ro.logit.repeat(P),
           "from_norm": (ro.d.repeat(P, 1) * resid).sum(-1) * (1 / scale - 1 / ro.scale.repeat(P)),
           "from_block_norms": block}
    check_finite(out, f"ablating component {component}", model.name, model.dtype)
    return out
