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

Speed: the pass for layer ``l`` starts at block ``l`` from the clean residual (nnsight ``skip``),
ablates several heads at once stacked along the batch, and stops at the final norm (no
full-vocabulary logits: the target's centered unembedding row is gathered instead).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .ablation import check_ablation, default_corrupt_tokens, patch_heads, replacement_z
from .direct_effect import Readout, block_scales, head_effects, readout
from .errors import InputError, check_finite
from .intervene import Pass, run
from .models import Model
from .results import SelfRepairResult

QUANTITIES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair",
              "from_heads", "from_mlps", "from_norm", "from_block_norms", "scale_ablated")
CLEAN_READS = ("z", "attn", "mlp", "block")


def check_tokens(model: Model, tokens: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    """A ``[batch, seq]`` integer tensor of valid ids, ``2 <= seq <= n_ctx``; else one clear error."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InputError(f"{name} must be an integer tensor [batch, seq], got {shape}; tokenize "
                         "with selfrepair.data.pack_tokens or model.tokenizer(..., return_tensors='pt')")
    if tokens.shape[1] < 2:
        raise InputError(f"{name} needs at least 2 positions (position p predicts token p+1)")
    if tokens.shape[1] > model.n_ctx:
        raise InputError(f"{name} has {tokens.shape[1]} positions but {model.name} has a context of "
                         f"{model.n_ctx}: use seq_len <= {model.n_ctx}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab):
        raise InputError(f"{name} holds ids outside [0, {model.d_vocab}): were they made with "
                         "another model's tokenizer?")
    return tokens.to(model.device)


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


def clean_pass(model: Model, tokens: torch.Tensor, **kw) -> Pass:
    return run(model, tokens, read=CLEAN_READS, read_embed=True, **kw)


def ablate_heads(model: Model, tokens: torch.Tensor, clean: Pass, ro: Readout, layer: int,
                 heads: Sequence[int], repl: torch.Tensor, *,
                 neuron_layer: int | None = None) -> dict[str, torch.Tensor]:
    """Ablate ``heads`` of ``layer`` (one stacked pass); every quantity as ``[head, batch, pos-1]``.

    ``repl`` is the replacement ``z`` of this layer (``[batch or 1, pos or 1, n_heads*d_head]``).
    With ``neuron_layer`` the ablated neuron activations of that MLP layer are returned too.
    """
    k, b = len(heads), tokens.shape[0]
    acc = defaultdict(lambda: torch.zeros(k, b, tokens.shape[1] - 1, device=model.device,
                                          dtype=model.effect_dtype))
    saved = {}
    clean_attn, clean_mlp = clean.reads["attn"], clean.reads["mlp"]

    def downstream_mlp(j: int) -> bool:
        return j > layer or (j == layer and not model.parallel_residual)

    def watch(site: str, j: int, value: torch.Tensor) -> None:
        if site == "neurons":
            if j == neuron_layer:
                saved["neurons"] = value[:, :-1].unflatten(0, (k, b))
            return
        kind = site  # "attn" | "mlp"
        if kind == "mlp" and not downstream_mlp(j):
            return
        v = model.acc(value[:, :-1]).unflatten(0, (k, b))
        clean_v = model.acc((clean_attn if kind == "attn" else clean_mlp)[j][:, :-1])
        if kind == "mlp" or j > layer:  # the ablated layer's own change is the head's ΔDE
            acc["from_heads" if kind == "attn" else "from_mlps"] += (
                (v - clean_v) * ro.write_dir(model, kind, j)).sum(-1)
        if model.sandwich:
            norm_path = model.adapter.post_attn_norm if kind == "attn" else model.adapter.post_mlp_norm
            norm = model.module(norm_path, j)
            s_new = block_scales(model, kind, v[None], range(j, j + 1))[0]
            s_old = (ro.attn_scale if kind == "attn" else ro.mlp_scale)[j]
            acc["from_block_norms"] += ((v * ro.dir * model.norm_gain(norm)).sum(-1)
                                        * (1 / s_new - 1 / s_old))

    sites = ("attn", "mlp") + (("neurons",) if neuron_layer is not None else ())
    resume = clean.reads["block"][layer - 1].repeat(k, 1, 1) if layer > 0 else None
    p = run(model, tokens.repeat(k, 1), start_layer=layer, resume=resume, watch=watch,
            watch_sites=sites,
            edits={("z", layer): lambda z: patch_heads(model, z, list(heads), repl, b)})
    norm = model.module(model.adapter.final_norm)
    resid = model.acc(p.final_resid[:, :-1]).unflatten(0, (k, b))
    scale_new = model.norm_scale(norm, resid)
    normed = model.acc(p.final_normed[:, :-1]).unflatten(0, (k, b))
    da = ro.write_dir(model, "attn", layer)
    z_clean = clean.reads["z"][layer][:, :-1]
    de_clean = head_effects(model, z_clean, da, layer)[list(heads)]
    de_new = head_effects(model, repl.expand_as(clean.reads["z"][layer])[:, :-1], da, layer)[list(heads)]
    out = {
        "direct_effect": de_clean,
        "ablated_direct_effect": de_new,
        "delta_logit": (ro.u * (normed - model.acc(clean.final_normed[:, :-1]))).sum(-1),
        "from_heads": acc["from_heads"],
        "from_mlps": acc["from_mlps"],
        "from_norm": (ro.d * resid).sum(-1) * (1 / scale_new - 1 / ro.scale),
        "from_block_norms": acc["from_block_norms"],
        "scale_ablated": scale_new,
    }
    out["self_repair"] = out["delta_logit"] - (de_new - de_clean)
    check_finite(out, f"ablating L{layer} heads {list(heads)}", model.name, model.dtype)
    if "neurons" in saved:
        out["neurons"] = saved["neurons"]
    return out


def self_repair(model: Model, tokens: torch.Tensor, ablation: str = "resample",
                corrupt_tokens: torch.Tensor | None = None,
                heads: Iterable[tuple[int, int]] | None = None, *, batch_size: int | None = None,
                max_rows: int = 64, progress: bool = True) -> SelfRepairResult:
    """Self-repair of every (or each listed) head on ``tokens [batch, seq]``.

    Returns per-head, per-token quantities ``[n_layers, n_heads, batch, seq-1]`` (NaN for heads
    not listed) plus the clean and ablated final-norm scales. ``batch_size`` rows are processed
    at a time; up to ``max_rows`` rows (heads x batch) share one ablated forward. The default
    resample source is all of ``tokens`` rolled by one, whatever ``batch_size`` is
    (:func:`selfrepair.sweep.run_sweep` rolls each batch instead: call this per batch to match).
    """
    check_ablation(ablation)
    tokens = check_tokens(model, tokens)
    if ablation == "resample":
        corrupt_tokens = (default_corrupt_tokens(tokens) if corrupt_tokens is None
                          else check_tokens(model, corrupt_tokens, "corrupt_tokens"))
        if corrupt_tokens.shape != tokens.shape:
            raise InputError(f"corrupt_tokens has shape {tuple(corrupt_tokens.shape)} but tokens has "
                             f"{tuple(tokens.shape)}: resampling patches the same positions, so "
                             "they must match")
    pairs = check_heads(model, heads)
    n, seq = tokens.shape
    shape = (model.n_layers, model.n_heads, n, seq - 1)
    result = {q: torch.full(shape, float("nan"), dtype=model.effect_dtype) for q in QUANTITIES}
    scale_clean = torch.empty(n, seq - 1, dtype=model.effect_dtype)
    logit = torch.empty(n, seq - 1, dtype=model.effect_dtype)
    by_layer = defaultdict(list)
    for layer, head in pairs:
        by_layer[layer].append(head)
    batch_size = batch_size or n
    mean_z = None
    if ablation == "mean" and batch_size < n:  # the mean is over the whole batch, not a slice
        mean_z = torch.stack([model.acc(clean_pass(model, tokens[i:i + batch_size]).reads["z"])
                              .sum((1, 2)) for i in range(0, n, batch_size)]).sum(0)
        mean_z = (mean_z / (n * seq))[:, None, None].to(model.dtype)
    chunks = [(i, layer, hs[j:j + max(1, max_rows // min(batch_size, n))])
              for i in range(0, n, batch_size) for layer, hs in sorted(by_layer.items())
              for j in range(0, len(hs), max(1, max_rows // min(batch_size, n)))]
    bar = tqdm(total=len(chunks), desc="self-repair", unit="pass", disable=not progress)
    current = None
    for start, layer, hs in chunks:
        rows = slice(start, start + batch_size)
        if current != start:
            tok = tokens[rows]
            clean = clean_pass(model, tok)
            ro = readout(model, tok, clean)
            corrupt_z = (run(model, corrupt_tokens[rows], read=("z",)).reads["z"]
                         if ablation == "resample" else None)
            repl_all = mean_z if mean_z is not None else replacement_z(
                model, ablation, clean.reads["z"], corrupt_z)
            scale_clean[rows], logit[rows] = ro.scale.cpu(), ro.logit.cpu()
            current = start
        out = ablate_heads(model, tok, clean, ro, layer, hs, repl_all[layer])
        for q in QUANTITIES:
            result[q][layer, hs, rows] = out[q].cpu()
        bar.update()
    bar.close()
    return SelfRepairResult(**result, scale_clean=scale_clean, logit=logit, ablation=ablation,
                            heads=pairs, meta={**model.describe(), "ablation": ablation})
