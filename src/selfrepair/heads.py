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
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .ablation import check_ablation
from .batch import TokenSet, clean_batch, mean_z
from .errors import InputError
from .measure import RunOptions, Spec
from .models import Model
from .passes import ablate_heads
from .remote import in_session
from .results import HEAD_QUANTITIES, SelfRepairResult

QUANTITIES = HEAD_QUANTITIES


def check_tokens(model: Model, tokens: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    """A ``[batch, seq]`` integer tensor of valid ids, ``2 <= seq <= n_ctx``; else one clear error."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InputError(f"{name} must be an integer tensor [batch, seq], got {shape}; tokenize "
                         "with selfrepair.data.pack_tokens or model.tokenizer(..., return_tensors='pt')")
    if tokens.shape[0] < 1:
        raise InputError(f"{name} holds no rows: pass at least one row of tokens")
    if tokens.shape[1] < 2:
        raise InputError(f"{name} needs at least 2 positions (position p predicts token p+1)")
    if tokens.shape[1] > model.n_ctx:
        raise InputError(f"{name} has {tokens.shape[1]} positions but {model.name} has a context of "
                         f"{model.n_ctx}: use seq_len <= {model.n_ctx}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab):
        raise InputError(f"{name} holds ids outside [0, {model.d_vocab}): were they made with "
                         "another model's tokenizer?")
    return tokens.to(model.device)


def token_set(model: Model, tokens: torch.Tensor | TokenSet,
              corrupt_tokens: torch.Tensor | None = None) -> TokenSet:
    """``tokens`` as a :class:`TokenSet`: a set as it is, a tensor checked (:func:`check_tokens`)
    and wrapped with its resample sources ``corrupt_tokens`` (default its rows rolled by one)."""
    if isinstance(tokens, TokenSet):
        return tokens
    return TokenSet.from_tensor(check_tokens(model, tokens).cpu(), corrupt_tokens)


def check_token_set(model: Model, data: TokenSet, ablation: str) -> None:
    """``data``'s rows (and, for resample ablation, their sources: valid ids, the rows' own shape),
    checked before the first forward pass."""
    check_tokens(model, data.tokens)
    if ablation == "resample":
        check_tokens(model, data.corrupt_tokens, "corrupt_tokens")
        if data.corrupt_tokens.shape != data.tokens.shape:
            raise InputError(f"corrupt_tokens has shape {tuple(data.corrupt_tokens.shape)} but tokens "
                             f"has {tuple(data.tokens.shape)}: resampling patches the same positions, "
                             "so they must match")


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
    check_token_set(model, data, ablation)
    pairs = check_heads(model, heads)
    n, seq = data.tokens.shape
    batch_size = min(n, batch_size or n)
    if batch_size < 1 or max_rows < 1:
        raise InputError(f"batch_size and max_rows must be positive, got {batch_size}, {max_rows}")
    shape = (model.n_layers, model.n_heads, n, seq - 1)
    result = {q: torch.full(shape, float("nan"), dtype=model.effect_dtype) for q in QUANTITIES}
    scale_clean = torch.empty(n, seq - 1, dtype=model.effect_dtype)
    logit = torch.empty(n, seq - 1, dtype=model.effect_dtype)
    by_layer = defaultdict(list)
    for layer, head in pairs:
        by_layer[layer].append(head)
    mz = mean_z(model, data, batch_size) if ablation == "mean" else None
    per = max(1, max_rows // batch_size)
    groups = [(layer, hs[j:j + per]) for layer, hs in sorted(by_layer.items())
              for j in range(0, len(hs), per)]
    bar = tqdm(total=-(-n // batch_size) * len(groups), desc="self-repair", unit="pass",
               disable=not progress)
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        corrupt = data.corrupt_tokens[rows] if ablation == "resample" else None
        # one request per batch on the remote path: only the per-token quantities come back
        got = in_session(model, _batch_heads, data.tokens[rows], corrupt, start, ablation, mz, groups)
        scale_clean[rows], logit[rows] = got["scale_clean"], got["logit"]
        for (layer, hs), out in zip(groups, got["groups"]):
            for q in QUANTITIES:
                result[q][layer, hs, rows] = out[q]
        bar.update(len(groups))
    bar.close()
    rec = data.record()
    return SelfRepairResult(**result, scale_clean=scale_clean, logit=logit, tokens=rec["tokens"],
                            corrupt_tokens=rec.get("corrupt_tokens"), ablation=ablation, heads=pairs,
                            meta={**model.describe(), "ablation": ablation})


def _batch_heads(model: Model, tokens: torch.Tensor, corrupt: torch.Tensor | None, start: int,
                 ablation: str, mz: torch.Tensor | None, groups: list) -> dict:
    """One batch of :func:`self_repair`: the clean scale and logit ``[b, seq-1]`` and, per group
    ``(layer, heads)`` (one stacked pass each), every quantity ``[head, b, seq-1]`` (on the CPU)."""
    batch = clean_batch(model, tokens, corrupt, start=start)
    repl = batch.replacement(ablation, mz)
    out = {"scale_clean": batch.readout.scale.cpu(), "logit": batch.readout.logit.cpu(), "groups": []}
    for layer, hs in groups:
        res = ablate_heads(batch, layer, hs, repl[layer])
        out["groups"].append({q: res[q].cpu() for q in QUANTITIES})
    return out


@dataclass(frozen=True)
class HeadsSpec(Spec):
    """Listed heads ablated on every token of a token set (:func:`self_repair` as a cached spec)."""

    kind = "heads"
    result = SelfRepairResult

    heads: tuple[tuple[int, int], ...]  # the (layer, head) pairs ablated, one at a time
    ablation: str = "resample"

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> SelfRepairResult:
        return self_repair(model, data, self.ablation, heads=list(self.heads),
                           batch_size=options.batch_size, max_rows=options.max_rows,
                           progress=options.progress)
