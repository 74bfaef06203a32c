"""One batch of the all-heads sweep (:mod:`selfrepair.sweep`), as functions that return only
what the sweep keeps: per-head sums and the selected per-token rows, never activations.

On the remote path each runs as one request (:func:`selfrepair.remote.in_session`): the clean
pass, the resample source pass and every ablated pass of the batch run on the server, the
readouts (frozen final norm, unembedding, ``W_O``) with them, and only the returned reductions
come back. Locally they are plain calls. Neither changes outside state (a server would change
its own copy only): the caller folds what they return.

- :func:`clean_summary` (pass 1): every head's clean direct effect per token (``[layer, head,
  tokens]`` scalars, from which the caller keeps each head's running top-k), each token's
  ``competitor_gap`` and, for mean ablation, the ``z`` sums.
- :func:`ablated_sums` (pass 2): every head ablated; per head the sums of every column over all
  tokens and over its top instances, their count, the sums of :data:`ROW_COLUMNS` per row (what a
  cluster bootstrap of the whole-set means resamples), and the rows of its top / sampled instances.
"""

from __future__ import annotations

import torch

from .batch import clean_batch
from .models import Model
from .passes import ablate_heads
from .results import HEAD_QUANTITIES

COLUMNS = HEAD_QUANTITIES + ("scale_clean", "logit", "competitor_gap")
KIND_TOP, KIND_SAMPLE = 1, 2
# per row and head, the sums the whole-set means need (their cluster bootstrap: selfrepair.uncertainty)
ROW_COLUMNS = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair")
ROW_INDEX = [COLUMNS.index(q) for q in ROW_COLUMNS]


def competitor(model: Model, normed: torch.Tensor, targets: torch.Tensor,
               chunk: int = 32768) -> torch.Tensor:
    """The highest-scoring token other than the target on the clean run, ``[batch, pos-1]`` ids,
    from final-norm outputs ``normed [batch, pos-1, d_model]`` (the vocabulary in chunks, so
    262k-token vocabularies never hold all logits at once)."""
    w, b = model.unembed_weight, model.unembed_bias
    x = model.acc(normed)
    best = torch.full(targets.shape, -float("inf"), device=x.device, dtype=x.dtype)
    best_i = torch.zeros(targets.shape, device=x.device, dtype=torch.long)
    for start in range(0, w.shape[0], chunk):
        logits = x @ model.acc(w[start:start + chunk]).T
        if b is not None:
            logits = logits + model.acc(b[start:start + chunk])
        inside = (targets >= start) & (targets < start + chunk)
        if inside.any():  # the target itself does not compete
            logits[inside, (targets[inside] - start)] = -float("inf")
        top = logits.max(-1)
        better = top.values > best
        best = torch.where(better, top.values, best)
        best_i = torch.where(better, top.indices + start, best_i)
    return best_i


def competitor_gap(model: Model, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logit_A - logit_B`` of the target A and its strongest competitor B (:func:`competitor`) in
    the part the final norm's scale multiplies, ``(W_U[A] - W_U[B]) . (normed - b)`` with ``b`` the
    final norm's bias (App. H: the norm's rescaling moves A against B by ``(S/S' - 1)`` times this;
    the biases are not rescaled)."""
    x = model.acc(normed)
    b = model.norm_bias(model.module(model.adapter.final_norm))
    if b is not None:
        x = x - b
    w = model.unembed_weight
    diff = model.acc(w[targets]) - model.acc(w[competitor(model, normed, targets)])
    return (diff * x).sum(-1)


def clean_summary(model: Model, rows: dict, with_mean_z: bool) -> dict:
    """Pass 1 on a batch's ``rows`` (the driver's: ``tokens``, ``start``): ``de [layer, head, b *
    (seq-1)]`` (fp32, CPU), their ``instances``, ``competitor_gap [b * (seq-1)]`` and
    (``with_mean_z``) ``z_sum`` ``[layer, n_heads * d_head]`` (fp64) over the batch's tokens."""
    batch = clean_batch(model, rows["tokens"], start=rows["start"])
    out = {"de": batch.all_head_de().flatten(2).cpu().float(), "instances": batch.instances(),
           "competitor_gap": competitor_gap(model, batch.clean.final_normed[:, :-1],
                                            batch.readout.targets).flatten().cpu().float()}
    if with_mean_z:
        out["z_sum"] = batch.clean.reads["z"].double().sum((1, 2)).cpu()
    return out


def ablated_sums(model: Model, rows: dict, ablation: str, mean_z: torch.Tensor | None,
                 top_idx: torch.Tensor, sample: torch.Tensor) -> dict:
    """Pass 2 on a batch's ``rows`` (the driver's: ``tokens``, their resample sources ``corrupt``,
    ``start``, ``max_rows`` and ``gap``, the ``competitor_gap`` of its instances ``[b, seq-1]``):
    every head ablated, ``max_rows`` rows of heads x batch per pass. Returns ``sum_all`` /
    ``sum_top`` ``[layer, head, column]`` (fp64) over all tokens / each head's top instances
    ``top_idx``, ``n_top [layer, head]``, ``sum_row [row, layer, head, ROW_COLUMNS]`` (fp32, each
    row's sums over its ``seq - 1`` tokens), and the per-token ``index`` (layer, head, instance,
    kind) and ``values`` rows of the top instances and of the ``sample`` (lists of tensors, in the
    order measured)."""
    batch = clean_batch(model, rows["tokens"], rows["corrupt"], start=rows["start"])
    gap, max_rows = rows["gap"], rows["max_rows"]
    repl = batch.replacement(ablation, mean_z)
    L, H, C = model.n_layers, model.n_heads, len(COLUMNS)
    out = {"sum_all": torch.zeros(L, H, C, dtype=torch.float64),
           "sum_top": torch.zeros(L, H, C, dtype=torch.float64),
           "n_top": torch.zeros(L, H, dtype=torch.long), "index": [], "values": []}
    b, inst = batch.rows, batch.instances()
    out["sum_row"] = torch.zeros(b, L, H, len(ROW_COLUMNS))
    in_sample = torch.isin(inst, sample)
    per = max(1, max_rows // b)
    for layer in range(L):
        for j in range(0, H, per):
            heads = list(range(j, min(H, j + per)))
            res = ablate_heads(batch, layer, heads, repl[layer])
            shape = res.delta_logit.shape
            cols = torch.stack([getattr(res, q) for q in HEAD_QUANTITIES]
                               + [batch.readout.scale.expand(shape), batch.readout.logit.expand(shape),
                                  gap.view(b, -1).to(res.delta_logit).expand(shape)], -1).cpu()
            cols = cols.flatten(1, 2)  # [head, instance, column]
            for k, h in enumerate(heads):
                out["sum_all"][layer, h] = cols[k].double().sum(0)
                per_row = cols[k][:, ROW_INDEX].double().view(b, -1, len(ROW_INDEX))
                out["sum_row"][:, layer, h] = per_row.sum(1).float()
                top = torch.isin(inst, top_idx[layer, h])
                out["sum_top"][layer, h] = cols[k][top].double().sum(0)
                out["n_top"][layer, h] = int(top.sum())
                for mask, kind in ((top, KIND_TOP), (in_sample, KIND_SAMPLE)):
                    n = int(mask.sum())
                    if n:
                        out["index"].append(torch.stack([torch.full((n,), layer), torch.full((n,), h),
                                                         inst[mask], torch.full((n,), kind)], 1))
                        out["values"].append(cols[k][mask].float())
    return out


__all__ = ["COLUMNS", "KIND_SAMPLE", "KIND_TOP", "ROW_COLUMNS", "ablated_sums", "clean_summary", "competitor",
           "competitor_gap"]
