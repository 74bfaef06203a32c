"""Reference answers of the "implement it" exercises, and the mistakes the checks recognise.

Each reference is written out in plain torch from a :class:`~selfrepair.exercises.cases.Case`
(no call into the measurement code), and ``tests/test_exercises.py`` holds every one of them
against the library's own measurement of the same quantity. Each mistake is a function with the
reference's inputs that computes what a typical wrong answer computes; a check that finds the
reader's output equal to a mistake's (and not to the reference) names that mistake.
"""

from __future__ import annotations

import math

import torch

from .cases import Case, Run


# -- helpers ------------------------------------------------------------------------------------
def _centered_target(case: Case, logits: torch.Tensor) -> torch.Tensor:
    """``[batch, pos-1]`` centred logit of each next token from full logits ``[batch, pos(-1), vocab]``."""
    logits = logits[:, : case.targets.shape[1]]
    logits = logits - logits.mean(-1, keepdim=True)
    return logits.gather(-1, case.targets[..., None])[..., 0]


def _target_logit(case: Case, logits: torch.Tensor) -> torch.Tensor:
    """Uncentred: the raw logit of each next token."""
    return logits[:, : case.targets.shape[1]].gather(-1, case.targets[..., None])[..., 0]


def _readout(case: Case, write: torch.Tensor, scale: torch.Tensor, *, center: bool = True,
             norm: bool = True) -> torch.Tensor:
    """``write [..., batch, pos-1, d_model]`` through the final norm at ``scale [batch, pos-1]``,
    then the logit of each next token (centred over the vocabulary unless ``center=False``)."""
    x = (case.norm_linear(write) if norm else write) / scale[..., None]
    logits = x @ case.W_U.T
    if center:
        logits = logits - logits.mean(-1, keepdim=True)
    idx = case.targets.expand(*logits.shape[:-1])[..., None]
    return logits.gather(-1, idx)[..., 0]


# -- chapter 0: a head's direct effect -------------------------------------------------------------
def head_write(case: Case, run: Run, layer: int, head: int) -> torch.Tensor:
    """What the head adds to the residual stream at the predicting positions: ``z_h @ W_O[h]``."""
    return run.z[layer][:, :-1, head] @ case.W_O[layer, head]


def direct_effect(case: Case, run: Run, layer: int, head: int) -> torch.Tensor:
    """DE of head ``(layer, head)`` in ``run``: its write through the final norm frozen at the
    **clean** scale, read out as the centred logit of the next token. ``[batch, pos-1]``."""
    return _readout(case, head_write(case, run, layer, head), case.clean.scale[:, :-1])


def de_uncentered(case, run, layer, head):
    return _readout(case, head_write(case, run, layer, head), case.clean.scale[:, :-1], center=False)


def de_own_scale(case, run, layer, head):
    return _readout(case, head_write(case, run, layer, head), run.scale[:, :-1])


def de_after_o_proj(case, run, layer, head):
    """Slicing the *output* of the projection as if it were split by head."""
    sliced = run.attn_out[layer][:, :-1].unflatten(-1, (case.n_heads, -1))[..., head, :]
    if sliced.shape[-1] != case.d_head:
        raise ValueError("d_model is not n_heads * d_head")
    return _readout(case, sliced @ case.W_O[layer, head], case.clean.scale[:, :-1])


def de_no_norm(case, run, layer, head):
    return _readout(case, head_write(case, run, layer, head), case.clean.scale[:, :-1], norm=False)


# -- chapter 1: Δlogit and eq. 1 -------------------------------------------------------------------
def self_repair(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta_logit, self_repair)`` of the case's ablated head: Δlogit = centred logit of the next
    token ablated − clean (the model's real logits); self-repair = Δlogit − ΔDE (eq. 1)."""
    dl = _centered_target(case, case.ablated.logits) - _centered_target(case, case.clean.logits)
    return dl, dl - case.delta_direct_effect


def sr_uncentered(case):
    dl = _target_logit(case, case.ablated.logits) - _target_logit(case, case.clean.logits)
    return dl, dl - case.delta_direct_effect


def sr_clean_minus_ablated(case):
    dl, _ = self_repair(case)
    return -dl, -dl - case.delta_direct_effect


def sr_flipped(case):
    dl, sr = self_repair(case)
    return dl, -sr


def sr_plus(case):
    dl, _ = self_repair(case)
    return dl, dl + case.delta_direct_effect


def sr_clean_de(case):
    dl, _ = self_repair(case)
    layer, h = case.head
    return dl, dl - direct_effect(case, case.clean, layer, h)


# -- chapter 2: App. B's closed form and the norm share ---------------------------------------------
def closed_form(ratio: torch.Tensor, logit: torch.Tensor, delta_de: torch.Tensor) -> torch.Tensor:
    """App. B: ``Δlogit = (S/S' − 1)·logit + (S/S')·ΔDE`` with ``ratio = S/S'``."""
    return (ratio - 1) * logit + ratio * delta_de


def cf_inverted(ratio, logit, delta_de):
    return closed_form(1 / ratio, logit, delta_de)


def cf_no_first_term(ratio, logit, delta_de):
    return ratio * delta_de


def cf_no_ratio(ratio, logit, delta_de):
    return (ratio - 1) * logit + delta_de


def closed_form_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S/S', logit, ΔDE)`` of the case's head: ``logit`` is the part of the centred clean logit
    the final norm's scale multiplies, ``u · n(r) / S`` (the norm's and unembedding's biases left out)."""
    ratio = case.clean.scale[:, :-1] / case.ablated.scale[:, :-1]
    logit = _readout(case, case.clean.resid_final[:, :-1], case.clean.scale[:, :-1])
    return ratio, logit, case.delta_direct_effect


def norm_term(case: Case) -> torch.Tensor:
    """eq. 2's norm term computed directly: ``u · n(r') · (1/S' − 1/S)`` ``[batch, pos-1]``."""
    r = case.ablated.resid_final[:, :-1]
    s, s2 = case.clean.scale[:, :-1], case.ablated.scale[:, :-1]
    return _readout(case, r, torch.ones_like(s)) * (1 / s2 - 1 / s)


def norm_share(from_norm: torch.Tensor, direct_effect: torch.Tensor) -> float:
    """§3.2 / App. A: the mean over tokens of ``from_norm / direct_effect`` clipped to [0, 1],
    tokens with ``direct_effect == 0`` left out."""
    keep = direct_effect != 0
    return float((from_norm[keep] / direct_effect[keep]).clamp(0, 1).mean())


def ns_unclipped(from_norm, direct_effect):
    keep = direct_effect != 0
    return float((from_norm[keep] / direct_effect[keep]).mean())


def ns_ratio_of_means(from_norm, direct_effect):
    return float(min(1.0, max(0.0, float(from_norm.mean() / direct_effect.mean()))))


def ns_zero_kept(from_norm, direct_effect):
    return float((from_norm / direct_effect).clamp(0, 1).mean())


# -- chapter 3: the last MLP layer's neurons --------------------------------------------------------
def neuron_delta_de(case: Case) -> torch.Tensor:
    """``[d_mlp, batch, pos-1]`` ΔDE of every neuron of the last MLP layer (ablated − clean), each
    neuron's write ``act_n · W_out[n]`` read out at the clean scale."""
    d_act = case.ablated.neurons[:, :-1] - case.clean.neurons[:, :-1]  # [batch, pos-1, d_mlp]
    per = _readout(case, case.W_out[:, None, None, :], case.clean.scale[:, :-1])  # [d_mlp, batch, pos-1]
    return d_act.movedim(-1, 0) * per


def nd_own_scale(case):
    per = lambda run: run.neurons[:, :-1].movedim(-1, 0) * _readout(  # noqa: E731
        case, case.W_out[:, None, None, :], run.scale[:, :-1])
    return per(case.ablated) - per(case.clean)


def nd_uncentered(case):
    d_act = case.ablated.neurons[:, :-1] - case.clean.neurons[:, :-1]
    return d_act.movedim(-1, 0) * _readout(case, case.W_out[:, None, None, :],
                                           case.clean.scale[:, :-1], center=False)


def nd_flipped(case):
    return -neuron_delta_de(case)


def nd_clean_only(case):
    return case.clean.neurons[:, :-1].movedim(-1, 0) * _readout(
        case, case.W_out[:, None, None, :], case.clean.scale[:, :-1])


# -- chapter 4: relative change of the top-token DE ---------------------------------------------
def relative_change(clean_de: torch.Tensor, new_de: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Per head ``[n_heads]``: ``(mean new DE − mean clean DE) / |mean clean DE|`` over the head's
    top tokens (``top`` bool ``[n_heads, n]``)."""
    n = top.sum(-1)
    old = (clean_de * top).sum(-1) / n
    new = (new_de * top).sum(-1) / n
    return (new - old) / old.abs()


def rc_signed(clean_de, new_de, top):
    n = top.sum(-1)
    old, new = (clean_de * top).sum(-1) / n, (new_de * top).sum(-1) / n
    return (new - old) / old


def rc_all_tokens(clean_de, new_de, top):
    return relative_change(clean_de, new_de, torch.ones_like(top))


def rc_difference(clean_de, new_de, top):
    n = top.sum(-1)
    return ((new_de - clean_de) * top).sum(-1) / n


def rc_mean_of_ratios(clean_de, new_de, top):
    r = (new_de - clean_de) / clean_de.abs()
    return (r * top).sum(-1) / top.sum(-1)


def relative_change_inputs(seed: int = 0):
    """Per-token DEs of four heads (one with a negative mean top-token DE) before and after an
    amplification, and each head's top 10% tokens by clean DE (absolute value for the negative
    head, as for a self-repressing writer)."""
    from ..direct_effect import top_percent_mask

    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(4, 200, generator=g) + torch.tensor([1.0, 2.0, -1.5, 0.5])[:, None]
    new = clean * torch.tensor([1.3, 0.8, 1.1, 1.0])[:, None] + 0.2 * torch.randn(4, 200, generator=g)
    top = top_percent_mask(clean.abs()[:, None, :], 10.0)[:, 0]
    return clean, new, top


# -- chapter 5: Hydra's compensatory effect ---------------------------------------------------------
def downstream(ablated: int, n_components: int, parallel: bool) -> torch.Tensor:
    """``[C]`` bool: components ``c = 2·layer + (0 attn, 1 mlp)`` that read the ablated one's
    write — every later layer, and the same block's MLP after its attention in a sequential block."""
    c = torch.arange(n_components)
    later = c // 2 > ablated // 2
    same_block_mlp = (c // 2 == ablated // 2) & (c % 2 == 1) & (ablated % 2 == 0) & (not parallel)
    return later | same_block_mlp


def compensation(delta_de: torch.Tensor, total_effect: torch.Tensor, ablated: int,
                 parallel: bool) -> torch.Tensor:
    """eq. 33: ``CE = Σ_{c downstream of m} ΔDE_c`` per prompt ``[n]`` (``delta_de [n, C]``)."""
    return (delta_de * downstream(ablated, delta_de.shape[-1], parallel)).sum(-1)


def ce_remainder(delta_de, total_effect, ablated, parallel):
    return total_effect - delta_de[:, ablated]


def ce_with_self(delta_de, total_effect, ablated, parallel):
    mask = downstream(ablated, delta_de.shape[-1], parallel)
    mask[ablated] = True
    return (delta_de * mask).sum(-1)


def ce_later_layers_only(delta_de, total_effect, ablated, parallel):
    c = torch.arange(delta_de.shape[-1])
    return (delta_de * (c // 2 > ablated // 2)).sum(-1)


# -- chapter 6: the top-k% tokens --------------------------------------------------------------------
def top_percent(values: torch.Tensor, percent: float) -> torch.Tensor:
    """Bool mask of ``values [batch, pos]``: the ``ceil(percent/100 · N)`` largest of all N."""
    flat = values.flatten()
    k = max(1, math.ceil(percent / 100 * flat.numel() - 1e-9))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(k).indices] = True
    return mask.view(values.shape)


def tp_floor(values, percent):
    flat = values.flatten()
    k = max(1, int(percent / 100 * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(k).indices] = True
    return mask.view(values.shape)


def tp_per_row(values, percent):
    k = max(1, math.ceil(percent / 100 * values.shape[-1] - 1e-9))
    mask = torch.zeros_like(values, dtype=torch.bool)
    return mask.scatter(-1, values.topk(k, dim=-1).indices, True)


def tp_bottom(values, percent):
    return top_percent(-values, percent)


def tp_fraction(values, percent):
    return top_percent(values, min(100.0, percent * 100))


# -- chapter 8: the IOI metric -----------------------------------------------------------------------
def ioi_metrics(logits, end_pos, io, s):
    """``(logit(IO) − logit(S) at each prompt's end [n], the share of prompts where it is > 0)``."""
    rows = torch.arange(len(end_pos))
    diff = logits[rows, end_pos, io] - logits[rows, end_pos, s]
    return diff, (diff > 0).float().mean()


def ioi_flipped(logits, end_pos, io, s):
    return ioi_metrics(logits, end_pos, s, io)


def ioi_last_column(logits, end_pos, io, s):
    return ioi_metrics(logits, torch.full_like(end_pos, logits.shape[1] - 1), io, s)


def ioi_probabilities(logits, end_pos, io, s):
    return ioi_metrics(logits.softmax(-1), end_pos, io, s)
