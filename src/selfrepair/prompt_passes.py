"""Patched passes read at one position per prompt (the IOI chapter's end position), each one
:func:`selfrepair.intervene.run` call starting from a :class:`~selfrepair.batch.CleanBatch`
(the passes of the corpus chapters are in :mod:`selfrepair.passes`).

- :func:`ablate_heads_at` — replace several heads' outputs (their ``z`` slices, in any layers,
  all in one pass) at each row's position ``pos`` and read every head's and MLP layer's new
  direct effect there, the real change of the readout and the norms' terms (eq. 1 and 2 of the
  self-repair paper for a group of heads).
- :func:`attention_from` — every head's attention probabilities from each row's position ``pos``
  (a clean pass of its own, under the model's own attention implementation: the `pattern` site).
- :func:`moved_residual_de` — run layer ``target``'s attention on the residual stream that
  entered layer ``source`` (every attention and MLP layer in between skipped, which is zero-
  ablating all of them) and read its heads' direct effects at ``pos``.

Direct effects use the batch's readout (``batch.readout``: its direction may be any linear
readout, e.g. ``u_IO − u_S``) at the clean scales; eq. 2's terms are computed in
:mod:`selfrepair.terms`, so that ``delta_logit = delta_de + from_heads + from_mlps + from_norm +
from_block_norms`` is an identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ablation import head_slice
from .batch import CleanBatch
from .direct_effect import at_positions, head_effects
from .errors import check_finite
from .intervene import run
from .passes import PIECES
from .terms import Terms, component_terms, final_terms, sum_terms


def _resid_entering(batch: CleanBatch, layer: int) -> torch.Tensor:
    """The clean residual stream entering block ``layer`` (the embeddings for layer 0)."""
    return batch.clean.embed if layer == 0 else batch.clean.reads["block"][layer - 1]


@dataclass
class GroupAblation(Terms):
    """:func:`ablate_heads_at`'s result per row ``[b]``: eq. 2's terms (``delta_de``: the ablated
    heads' own ΔDEs summed) and every head's and MLP layer's direct effect after the ablation."""

    head_de: torch.Tensor  # [layer, head, b] (clean values for layers before the first ablated one)
    mlp_de: torch.Tensor  # [layer, b]


def ablate_heads_at(batch: CleanBatch, pos: torch.Tensor, heads: list[tuple[int, int]],
                    repl: dict[int, torch.Tensor]) -> GroupAblation:
    """Ablate ``heads`` (``(layer, head)`` pairs) at each row's position ``pos [b]``, together.

    ``repl[layer]`` is that layer's replacement ``z`` at ``pos``, ``[b or 1, n_heads*d_head]``
    (only the ablated heads' slices are used). The batch needs the reads ``z``, ``attn``, ``mlp``,
    ``block`` and ``embed`` (``clean_batch`` has them)."""
    model, ro = batch.model, batch.readout
    if not heads:
        raise ValueError("ablate_heads_at needs at least one head")
    b = batch.rows
    rows = torch.arange(b, device=model.device)
    pos = pos.to(model.device)
    first = min(layer for layer, _ in heads)
    clean_normed = model.acc(at_positions(batch.clean.final_normed, pos))

    def watch(site: str, j: int, value: torch.Tensor) -> dict:
        v = model.acc(value[rows, pos])  # [b, ...] the end position only
        if site == "z":
            return {"heads": head_effects(model, v, ro.write_dir(model, "attn", j), j)}
        own = site == "attn" and j == first  # every change there is an ablated head's own
        return component_terms(model, site, j, v, ro.dir, ro.block_scale(site, j),
                               None if own else model.acc(at_positions(batch.clean.reads[site][j], pos)),
                               absolute=site == "mlp")

    def final(resid: torch.Tensor, normed: torch.Tensor) -> dict[str, torch.Tensor]:
        return final_terms(model, ro.u, ro.d, ro.scale, model.acc(resid[rows, pos]),
                           model.acc(normed[rows, pos]), clean_normed)

    p = run(model, batch.tokens, start_layer=first,
            resume=batch.clean.reads["block"][first - 1] if first > 0 else None,
            watch=watch, watch_sites=("z", "attn", "mlp"), final=final,
            edits={("z", layer): _patch_at(batch, pos, layer, [h for l, h in heads if l == layer], repl[layer])
                   for layer in sorted({l for l, _ in heads})})
    clean_heads = clean_head_de(batch, pos)
    head_de, mlp_de = clean_heads.clone(), clean_mlp_de(batch, pos)
    for (site, j), terms in p.watched.items():  # in the order the pass met them
        if "heads" in terms:
            head_de[j] = terms["heads"]
        if "de" in terms:
            mlp_de[j] = terms["de"]
    own = torch.stack([head_de[l, h] - clean_heads[l, h] for l, h in heads])  # [head, b]
    later = torch.tensor([l > first for l, _ in heads], device=own.device)  # inside their layer's attention change
    terms = sum_terms(p.watched, torch.zeros(b, device=model.device, dtype=model.effect_dtype), PIECES)
    out = GroupAblation(delta_logit=p.final["delta_logit"], delta_de=own.sum(0),
                        from_heads=terms["from_heads"] - own[later].sum(0), from_mlps=terms["from_mlps"],
                        from_norm=p.final["from_norm"], from_block_norms=terms["from_block_norms"],
                        head_de=head_de, mlp_de=mlp_de)
    check_finite(out.tensors(), f"ablating heads {heads} at the end position", model.name, model.dtype)
    return out


def _patch_at(batch: CleanBatch, pos: torch.Tensor, layer: int, heads: list[int], repl: torch.Tensor):
    """The edit of ``layer``'s ``z`` replacing ``heads``' slices at each row's ``pos`` by ``repl``."""
    model, b = batch.model, batch.rows
    rows = torch.arange(b, device=model.device)

    def edit(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        r = repl.to(z.device, z.dtype).expand(b, -1)
        for h in heads:
            sl = head_slice(model, h)
            z[rows, pos, sl] = r[:, sl]
        return z
    return edit


def clean_head_de(batch: CleanBatch, pos: torch.Tensor) -> torch.Tensor:
    """Every head's clean direct effect at ``pos`` ``[layer, head, b]``."""
    model, ro = batch.model, batch.readout
    return torch.stack([head_effects(model, at_positions(batch.clean.reads["z"][j], pos),
                                     ro.write_dir(model, "attn", j), j) for j in range(model.n_layers)])


def clean_mlp_de(batch: CleanBatch, pos: torch.Tensor) -> torch.Tensor:
    """Every MLP layer's clean direct effect at ``pos`` ``[layer, b]`` (its output bias included)."""
    model, ro = batch.model, batch.readout
    return torch.stack([(model.acc(at_positions(batch.clean.reads["mlp"][j], pos))
                         * ro.write_dir(model, "mlp", j)).sum(-1) for j in range(model.n_layers)])


def attention_from(batch: CleanBatch, pos: torch.Tensor) -> torch.Tensor:
    """Every head's attention from each row's position ``pos`` to every key ``[layer, b, head, key]``
    (clean run, a pass of its own that stops after the last layer's pattern; the probabilities are
    the model family's eager ones, whose softmax runs in fp32 even in fp64 models). A clean pass
    can watch the same (:func:`end_pattern`, then :func:`watched_pattern`)."""
    model = batch.model
    p = run(model, batch.tokens, watch=end_pattern(model, pos), watch_sites=("pattern",),
            stop_after=("pattern", model.n_layers - 1))
    return watched_pattern(model, p.watched)


def end_pattern(model, pos: torch.Tensor):
    """A ``watch`` for the ``pattern`` site keeping only each row's query position ``pos [b]``:
    ``[b, head, key]`` per layer, so a trace never brings the whole pattern back."""
    pos = pos.to(model.device)
    rows = torch.arange(len(pos), device=model.device)

    def watch(site: str, layer: int, value: torch.Tensor) -> torch.Tensor:
        return model.acc(value[rows, :, pos])
    return watch


def watched_pattern(model, watched: dict) -> torch.Tensor:
    """The patterns :func:`end_pattern` kept in a pass, stacked ``[layer, b, head, key]``."""
    return torch.stack([watched[("pattern", layer)] for layer in range(model.n_layers)])


def moved_residual_de(batch: CleanBatch, pos: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """The direct effects ``[head, b]`` at ``pos`` of layer ``target``'s heads when that layer reads
    the clean residual stream that entered layer ``source <= target`` (nnsight ``skip`` of every
    block before ``target``; the pass stops at ``target``'s ``z``). ``source == target`` is the
    clean run."""
    model, ro = batch.model, batch.readout
    if not 0 <= source <= target < model.n_layers:
        raise ValueError(f"need 0 <= source <= target < {model.n_layers}, got {source}, {target}")
    if target == 0:
        p = run(model, batch.tokens, read=("z",), read_layers={"z": [0]}, stop_after=("z", 0))
    else:
        p = run(model, batch.tokens, start_layer=target, resume=_resid_entering(batch, source),
                read=("z",), read_layers={"z": [target]}, stop_after=("z", target))
    z = at_positions(p.reads["z"][0], pos.to(model.device))
    return head_effects(model, z, ro.write_dir(model, "attn", target), target)


__all__ = ["GroupAblation", "ablate_heads_at", "attention_from", "clean_head_de", "clean_mlp_de", "end_pattern",
           "moved_residual_de", "watched_pattern"]
