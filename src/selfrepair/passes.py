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

Every pass returns eq. 2's terms as a typed :class:`~selfrepair.terms.Terms` (:class:`HeadAblation`,
:class:`WriteAblation`), each term computed in :mod:`selfrepair.terms` (signs ``delta = ablated -
clean``; direct effects at the clean scales; the norms' terms computed directly, never as
remainders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .ablation import patch_heads
from .batch import CleanBatch
from .direct_effect import head_effects
from .errors import InputError, check_finite
from .intervene import Replace, run
from .structure import reads
from .terms import Terms, block_scales, component_terms, final_terms, sum_terms

WRITE_SITES = ("attn_write", "mlp_write")
CAPPED = "delta_logit_capped"  # Δlogit after a soft-capped model's final cap (Gemma-2)
# What ``ablate_heads(freeze=...)`` holds at the clean run (None: nothing, the live ablation):
FREEZE = ("norms", "final_norm", "components")


def _resume(batch: CleanBatch, layer: int, copies: int) -> torch.Tensor | None:
    """The clean residual entering block ``layer``, repeated for ``copies`` stacked copies."""
    return batch.clean.reads["block"][layer - 1].repeat(copies, 1, 1) if layer > 0 else None


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
                    plan["edits"][(kind, j)] = Replace(  # repeated when the pass reaches it, not before
                        lambda x=clean.reads[kind][j]: x.repeat(k, 1, 1))
    return plan


@dataclass
class HeadAblation(Terms):
    """:func:`ablate_heads`' result: eq. 2's :class:`~selfrepair.terms.Terms` (``delta_de``: the
    head's own ΔDE) and the head's clean and ablated direct effects, every tensor ``[head, batch,
    pos-1]``; ``neurons [head, batch, pos-1, d_mlp]`` when asked for."""

    direct_effect: torch.Tensor  # the head's clean direct effect
    ablated_direct_effect: torch.Tensor  # its direct effect with its output replaced
    scale_ablated: torch.Tensor  # the final-norm scale of the ablated residual (what a live norm divides by)
    neurons: torch.Tensor | None = None  # the ablated neuron activations of ``neuron_layer``
    delta_logit_capped: torch.Tensor | None = None  # soft-capped models (Gemma-2): Δlogit after the cap


# Which watched piece of :func:`selfrepair.terms.component_terms` is which term of eq. 2.
PIECES = {("attn", "delta"): "from_heads", ("mlp", "delta"): "from_mlps",
          ("attn", "block"): "from_block_norms", ("mlp", "block"): "from_block_norms"}


def ablate_heads(batch: CleanBatch, layer: int, heads: Sequence[int], repl: torch.Tensor, *,
                 neuron_layer: int | None = None, freeze: str | None = None) -> HeadAblation:
    """Ablate ``heads`` of ``layer`` (one stacked pass); every quantity ``[head, batch, pos-1]``.

    ``repl`` is the replacement ``z`` of this layer (``[batch or 1, pos or 1, n_heads*d_head]``).
    With ``neuron_layer`` the ablated neuron activations of that MLP layer are returned too.

    ``freeze`` (:data:`FREEZE`, see :func:`_freeze_plan`) holds part of the model at the clean run
    while the heads are ablated; ``delta_logit`` is then read from that pass's own final-norm
    output, and the frozen parts' terms of eq. 2 are zero by construction: ``"norms"`` and
    ``"final_norm"`` give ``from_norm = 0`` (``"norms"`` also ``from_block_norms = 0``),
    ``"components"`` gives ``from_heads = from_mlps = 0`` (computed, not set). So in every mode
    ``self_repair = from_heads + from_mlps + from_norm + from_block_norms``. ``scale_ablated`` is
    always the final-norm scale of the ablated residual (what a live norm would divide by).
    A soft-capped model (Gemma-2) also gets ``delta_logit_capped``: the change of the centered
    logit after its final cap (``delta_logit`` is before it, the linear quantity eq. 2 sums to).
    """
    check_freeze(freeze)
    model, ro, clean = batch.model, batch.readout, batch.clean
    heads = list(heads)
    k, b = len(heads), batch.rows
    clean_normed = model.acc(clean.final_normed[:, :-1])
    plan = _freeze_plan(batch, layer, k, freeze)
    frozen_final = "freeze_final" in plan

    def final(resid: torch.Tensor, normed: torch.Tensor) -> dict[str, torch.Tensor]:
        stacked = [model.acc(x[:, :-1]).unflatten(0, (k, b)) for x in (resid, normed)]
        out = final_terms(model, ro.u, ro.d, ro.scale, *stacked, clean_normed, frozen=frozen_final)
        if model.logit_softcap is not None:  # the same change after the final soft-cap
            out[CAPPED] = (model.capped_logit(stacked[1], ro.targets.expand(k, -1, -1))
                           - model.capped_logit(clean_normed, ro.targets))
        return out

    sites = ("attn", "mlp") + (("neurons",) if neuron_layer is not None else ())
    p = run(model, batch.tokens.repeat(k, 1), start_layer=layer, resume=_resume(batch, layer, k),
            watch=_head_watch(batch, layer, k, neuron_layer, block_norms=freeze != "norms"),
            watch_sites=sites, final=final, freeze=plan.get("freeze"), freeze_final=plan.get("freeze_final"),
            edits={("z", layer): lambda z: patch_heads(model, z, heads, repl, b), **plan["edits"]})
    zero = torch.zeros(k, b, batch.seq1, device=model.device, dtype=model.effect_dtype)
    de_clean = batch.head_de(layer)[heads]
    de_new = head_effects(model, repl.expand_as(clean.reads["z"][layer])[:, :-1],
                          ro.write_dir(model, "attn", layer), layer)[heads]
    out = HeadAblation(delta_logit=p.final["delta_logit"], delta_de=de_new - de_clean,
                       **sum_terms(p.watched, zero, PIECES), from_norm=p.final["from_norm"],
                       direct_effect=de_clean, ablated_direct_effect=de_new,
                       scale_ablated=p.final["scale"],
                       neurons=p.watched.get(("neurons", neuron_layer), {}).get("neurons"),
                       delta_logit_capped=p.final.get(CAPPED))
    check_finite(out.tensors(), f"ablating L{layer} heads {heads}", model.name, model.dtype)
    return out


def _head_watch(batch: CleanBatch, layer: int, k: int, neuron_layer: int | None, block_norms: bool):
    """:func:`ablate_heads`' ``watch``: each downstream component's terms (the ablated layer's own
    attention change is the heads' ΔDE, not ``from_heads``), the neurons of ``neuron_layer``. It
    runs inside the trace and returns per-token reductions, which are all that comes back."""
    model, ro, clean, b = batch.model, batch.readout, batch.clean, batch.rows

    def watch(site: str, j: int, value: torch.Tensor) -> dict | None:
        if site == "neurons":
            return {"neurons": value[:, :-1].unflatten(0, (k, b))} if j == neuron_layer else None
        if site == "mlp" and not reads(model.parallel_residual, "attn", layer, "mlp", j):
            return None
        v = model.acc(value[:, :-1]).unflatten(0, (k, b))
        before = None if site == "attn" and j == layer else model.acc(clean.reads[site][j][:, :-1])
        return component_terms(model, site, j, v, ro.dir, ro.block_scale(site, j), before,
                               block_norms=block_norms)
    return watch


def head_writes(batch: CleanBatch, layer: int) -> torch.Tensor:
    """Each head's clean write to the residual stream ``[head, batch, pos, d_model]``: ``z_h @ W_O[h]``
    (value bias included, ``b_O`` not); in sandwich models ``g * (z_h @ W_O[h]) / s`` with the
    clean post-attention scale ``s``, times the write scale in granite — the head's share of the
    block's write."""
    model, clean = batch.model, batch.clean
    zh = model.acc(clean.reads["z"][layer]).unflatten(-1, (model.n_heads, model.d_head))
    w = torch.einsum("bphk,hkd->hbpd", zh, model.head_out_weight(layer))
    if model.sandwich:
        norm = model.module(model.adapter.post_attn_norm, layer)
        s = block_scales(model, "attn", clean.reads["attn"][layer][None], range(layer, layer + 1))[0]
        w = w * model.norm_gain(norm) / s[..., None]
    return w * model.write_scale if model.write_scale != 1.0 else w


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


@dataclass
class WriteAblation(Terms):
    """:func:`ablate_writes`' result per (patch, row) ``[P * batch]``: eq. 2's terms (``delta_de``:
    the replaced write's own ΔDE) and ``direct_effect [.., C]``, every component's direct effect
    at the clean scales after the patch (``clean_de`` for those the pass does not run; in sandwich
    models a block's raw output read through its clean block-norm scale, so the block norms'
    scale changes are ``from_block_norms``, not in it)."""

    direct_effect: torch.Tensor


def ablate_writes(batch: CleanBatch, pos: torch.Tensor, component: int, repl: torch.Tensor,
                  clean_de: torch.Tensor) -> WriteAblation:
    """Replace component ``component``'s write (``c = 2 * layer + (0 attention, 1 MLP)``) at each
    row's position ``pos`` by ``repl [P * batch, d_model]`` (``P`` patches, patch-major rows) and
    read every later component's direct effect there. ``clean_de [batch, C]``: every component's
    clean direct effect."""
    model, ro, clean, b = batch.model, batch.readout, batch.clean, batch.rows
    layer, kind = divmod(component, 2)
    P = len(repl) // b
    rows = torch.arange(len(repl), device=model.device)
    pos = pos.repeat(P).to(model.device)
    dr = ro.dir.repeat(P, 1)
    clean_normed = model.acc(clean.final_normed[rows % b, pos])

    # Both run inside the trace and return each row's terms at its patched position, which are
    # all that comes back.
    def watch(site: str, j: int, value: torch.Tensor) -> dict | None:
        if 2 * j + (site == "mlp") <= component:  # the replaced write itself, or unchanged
            return None
        scale = ro.block_scale(site, j)
        return component_terms(model, site, j, model.acc(value[rows, pos]), dr,
                               None if scale is None else scale.repeat(P),
                               model.acc(clean.reads[site][j][rows % b, pos]), absolute=True)

    def final(resid: torch.Tensor, normed: torch.Tensor) -> dict[str, torch.Tensor]:
        return final_terms(model, ro.u.repeat(P, 1), ro.d.repeat(P, 1), ro.scale.repeat(P),
                           model.acc(resid[rows, pos]), model.acc(normed[rows, pos]), clean_normed)

    def edit(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[rows, pos] = repl.to(value.dtype)
        return value

    a = run(model, batch.tokens.repeat(P, 1), start_layer=layer, resume=_resume(batch, layer, P),
            watch=watch, watch_sites=("attn", "mlp"), final=final,
            edits={(WRITE_SITES[kind], layer): edit})
    de = clean_de.to(model.device).repeat(P, 1)
    for (site, j), terms in a.watched.items():  # in the order the pass met them
        de[:, 2 * j + (site == "mlp")] = terms["de"]
    de[:, component] = (model.acc(repl) * dr).sum(-1)
    zero = torch.zeros(len(repl), device=model.device, dtype=model.effect_dtype)
    out = WriteAblation(delta_logit=a.final["delta_logit"],
                        delta_de=de[:, component] - clean_de[:, component].to(de).repeat(P),
                        **sum_terms(a.watched, zero, PIECES), from_norm=a.final["from_norm"],
                        direct_effect=de)
    check_finite(out.tensors(), f"ablating component {component}", model.name, model.dtype)
    return out
