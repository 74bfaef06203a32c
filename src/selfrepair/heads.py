"""Self-repair of attention heads (paper eq. 1) and its decomposition (eq. 2).

For a head ``h`` ablated at layer ``l`` and the next-token position ``p``:

- ``delta_logit = logit' - logit`` (centered, read from the model's own final-norm output);
- ``delta_direct_effect = DE(head') - DE(head)``, both at the clean scales;
- ``self_repair = delta_logit - delta_direct_effect`` (eq. 1);
- ``from_heads`` / ``from_mlps``: the change of the direct effects (clean scales) of all
  downstream heads / MLP layers (later layers; the same layer's MLP too in a sequential block,
  not in a parallel-residual one);
- ``from_norm = u . n(r') (1/S' - 1/S)``, the final norm's scale change, computed directly;
- ``from_block_norms`` (sandwich norms only): ``(dir * g) . a' (1/s' - 1/s)`` summed over the
  ablated block's attention norm and every downstream block norm.

Then ``self_repair = from_heads + from_mlps + from_norm + from_block_norms`` to rounding: an
identity the tests check, since ``delta_logit`` comes from the model's real output.

The patched pass itself is :func:`selfrepair.passes.ablate_heads` (it starts at block ``l`` from
the clean residual, ablates several heads at once stacked along the batch, and stops at the final
norm). :func:`self_repair` runs it for listed heads on every token of a tensor or token set;
:class:`HeadsSpec` is the same measurement as a cached spec (chapter 2's mean and zero ablations).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch

from .ablation import check_ablation
from .batch import TokenSet, check_token_set, check_tokens, clean_batch, token_set  # noqa: F401 - re-exported
from .driver import Driver, Stage, collect
from .errors import InputError
from .measure import RunOptions, Spec
from .models import Model
from .passes import CAPPED, ablate_heads
from .results import HEAD_QUANTITIES, SelfRepairResult

QUANTITIES = HEAD_QUANTITIES


def quantities(model: Model) -> tuple[str, ...]:
    """What :func:`self_repair` returns per head: :data:`QUANTITIES`, and the Δlogit after the
    final cap of a soft-capped model (Gemma-2)."""
    return QUANTITIES + ((CAPPED,) if model.logit_softcap is not None else ())


def check_heads(model: Model, heads: Iterable[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """``None`` -> every head; else validated ``(layer, head)`` pairs (negative layer counts back)."""
    if heads is None:
        return [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    out = []
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise InputError(f"heads must be (layer, head) pairs, got {item!r}") from None
        layer = layer + model.n_layers if layer < 0 else layer
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise InputError(f"head {item!r} is out of range: {model.name} has {model.n_layers} "
                             f"layers x {model.n_heads} heads (L0H0 .. L{model.n_layers - 1}H"
                             f"{model.n_heads - 1})")
        out.append((layer, head))
    return sorted(set(out))


def self_repair(model: Model, tokens: torch.Tensor | TokenSet, ablation: str = "resample",
                corrupt_tokens: torch.Tensor | None = None,
                heads: Iterable[tuple[int, int]] | None = None, *, batch_size: int | None = None,
                max_rows: int = 64, progress: bool = True) -> SelfRepairResult:
    """Self-repair (eq. 1) and its decomposition (eq. 2) of every (or each listed) head on every
    token of ``tokens [batch, seq]``.

    Returns per-head, per-token quantities ``[n_layers, n_heads, batch, seq-1]`` (NaN for heads
    not listed) plus the clean and ablated final-norm scales (:class:`SelfRepairResult`).

    Ablations: ``resample`` patches each head's output on ``corrupt_tokens`` (the same shape as
    ``tokens``; default ``tokens`` rolled by one row — a :class:`~selfrepair.batch.TokenSet` packed
    from a corpus brings its own sources, from other documents); ``mean`` the head's mean output
    over **all** of ``tokens``; ``zero`` nothing. ``batch_size`` rows are processed at a time
    (default all) and up to ``max_rows`` rows (heads x batch) share one ablated forward; neither
    changes the numbers.
    """
    check_ablation(ablation)
    data = token_set(model, tokens, corrupt_tokens)
    spec = HeadsSpec(heads=tuple(check_heads(model, heads)), ablation=ablation)
    n = len(check_tokens(model, data.tokens))
    return spec.compute(model, data, RunOptions(batch_size=min(n, batch_size or n), max_rows=max_rows,
                                                progress=progress))


def head_groups(pairs: list[tuple[int, int]], per: int) -> list[tuple[int, list[int]]]:
    """``(layer, heads)`` groups of ``pairs``: each layer's heads, ``per`` at a time (one stacked
    pass each)."""
    by_layer = defaultdict(list)
    for layer, head in pairs:
        by_layer[layer].append(head)
    return [(layer, hs[j:j + per]) for layer, hs in sorted(by_layer.items()) for j in range(0, len(hs), per)]


def _batch_heads(model: Model, rows: dict, ablation: str, mz: torch.Tensor | None, pairs: list) -> dict:
    """One batch of :func:`self_repair` (inside its request): the clean scale and logit ``[b, seq-1]``
    and every quantity ``[b, head, seq-1]`` of ``pairs`` (in their order; the heads of a layer
    ablated ``max_rows // b`` at a time in one stacked pass), on the CPU."""
    batch = clean_batch(model, rows["tokens"], rows["corrupt"], start=rows["start"])
    repl = batch.replacement(ablation, mz)
    out = {"scale_clean": batch.readout.scale.cpu(), "logit": batch.readout.logit.cpu()}
    got = {}
    for layer, hs in head_groups(pairs, max(1, rows["max_rows"] // batch.rows)):
        res = ablate_heads(batch, layer, hs, repl[layer])
        got.update({(layer, h): {q: getattr(res, q)[i].cpu() for q in quantities(model)}
                     for i, h in enumerate(hs)})
    for q in quantities(model):
        out[q] = torch.stack([got[p][q] for p in pairs], 1)
    return out


def each_head(spec, model: Model, data: TokenSet, options: RunOptions, name: str, batch) -> tuple:
    """The driver's one stage over the rows for a spec that ablates ``spec.heads`` one at a time
    with ``spec.ablation`` (:class:`HeadsSpec`, :class:`~selfrepair.frozen_norm.FrozenNormSpec`):
    ``batch(model, rows, ablation, mean_z, pairs)`` per batch, per-row outputs collected in row
    order. Returns the driver (for its record and meta), the checked pairs and the outputs."""
    check_ablation(spec.ablation)
    pairs = check_heads(model, spec.heads)
    resample = spec.ablation == "resample"
    run = Driver(model, data, options, key=spec.key(), sources=resample)
    mz = run.mean_z() if spec.ablation == "mean" else None
    got = run.run(Stage(name, batch, collect(), args=(spec.ablation, mz, pairs), sources=resample))
    return run, pairs, got


@dataclass(frozen=True)
class HeadsSpec(Spec):
    """Listed heads ablated on every token of a token set (:func:`self_repair` as a cached spec)."""

    kind = "heads"
    result = SelfRepairResult

    heads: tuple[tuple[int, int], ...]  # the (layer, head) pairs ablated, one at a time
    ablation: str = "resample"

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> SelfRepairResult:
        """The driver runs :func:`_batch_heads` on every batch (after the mean ``z`` for mean
        ablation); the per-row outputs come back in row order and are laid out per head."""
        run, pairs, got = each_head(self, model, data, options, "self-repair", _batch_heads)
        n, seq = data.tokens.shape
        shape = (model.n_layers, model.n_heads, n, seq - 1)
        result = {q: torch.full(shape, float("nan"), dtype=model.effect_dtype) for q in quantities(model)}
        layer, head = torch.tensor(pairs, dtype=torch.long).view(-1, 2).unbind(1)
        for q in quantities(model):
            result[q][layer, head] = got[q].transpose(0, 1).to(model.effect_dtype)
        rec = run.record()
        return SelfRepairResult(**result, scale_clean=got["scale_clean"], logit=got["logit"],
                                tokens=rec["tokens"], corrupt_tokens=rec.get("corrupt_tokens"),
                                ablation=self.ablation, heads=pairs, meta=run.meta(ablation=self.ablation))
