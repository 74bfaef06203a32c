"""Value biases folded into the output bias: the TransformerLens convention the paper's code used.

A head's output is ``z_h @ W_O[h]`` with ``z_h = Σ_j A[p, j] (x_j W_V[h] + b_V[h])``. Attention
rows sum to 1, so ``z_h = Σ_j A[p, j] x_j W_V[h] + b_V[h]``: the value bias adds the same vector
``b_V[h] @ W_O[h]`` at every position, whatever the head attends to. TransformerLens's
``HookedTransformer.from_pretrained`` moves it out of the head by default
(``fold_value_biases=True``: ``b_O ← b_O + Σ_h b_V[h] @ W_O[h]``, ``b_V ← 0``), and the paper's
code loads its models that way. Then

- a head's direct effect excludes ``b_V[h] @ W_O[h]`` (it now belongs to the layer's bias term);
- zero ablation leaves that term in (only the folded ``z_h`` is zeroed);
- resample and mean ablation are unchanged: the replacement's ``z_h`` and the clean one shift by the
  same ``b_V[h]``, so every change (Δlogit, ΔDE, self-repair and its parts) is the same;
- the difference in a head's DE, ``u · n(b_V[h] @ W_O[h]) / S``, is **not** a constant per head:
  it is divided by each token's final-norm scale ``S`` (and, in sandwich models, the block's ``s``).

:func:`fold_value_biases` does this on the loaded weights, so every measurement of the library
reads the folded convention with no other change: ``v``'s bias is set to zero and the output
projection's bias takes ``Σ_h b_V[h] @ W_O[h]`` (a bias is added to an output projection that has
none, e.g. Qwen2's). Under grouped- or multi-query attention each query head ``h`` reads key/value
head ``h // (n_heads / n_kv_heads)`` (Hugging Face's ``repeat_kv``), so its ``b_V`` is its group's.
Where the bias lives is the adapter's declaration (:attr:`Adapter.value`,
:attr:`Adapter.value_layout`), nothing per family here; :func:`check_fold` runs the model before
and after on a few tokens and refuses a fold that moves the logits (a wrong declaration would).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError, ModelLoadError

LAYOUTS = ("separate", "qkv", "per_head", "grouped")


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def value_index(layout: str, size: int, n_heads: int, d_head: int) -> tuple[torch.Tensor, int]:
    """Indices of ``b_V`` (``[n_kv_heads * d_head]``, key/value head major) in a bias of ``size``
    laid out as ``layout``, and ``n_kv_heads`` (what the bias holds besides the queries' ``n_heads``
    rows is keys and values, one each per kv head): ``"separate"`` (the value projection's own
    bias), ``"qkv"`` (one fused projection ``[q | k | v]``, v last: GPT-2, Phi-3, multi-query
    Falcon and GPTBigCode), ``"per_head"`` (fused per head ``[q k v]`` blocks of ``d_head``:
    GPT-NeoX, BLOOM), ``"grouped"`` (per kv head ``[q .. q k v]``: Falcon's new decoder)."""
    rows = size // d_head
    n_kv = rows if layout == "separate" else (rows - n_heads) // 2
    if layout == "separate":
        idx = torch.arange(size)
    elif layout == "qkv":
        idx = torch.arange(size - n_kv * d_head, size)
    elif layout == "per_head":
        idx = (torch.arange(n_heads)[:, None] * 3 * d_head + 2 * d_head + torch.arange(d_head)).flatten()
    elif layout == "grouped":
        per = n_heads // max(n_kv, 1) + 2  # rows of one kv head's group: its queries, k, v
        idx = (torch.arange(n_kv)[:, None] * per * d_head + (per - 1) * d_head + torch.arange(d_head)).flatten()
    else:
        raise InputError(f"unknown value_layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if size % d_head or n_kv < 1 or n_heads % n_kv or (layout == "per_head" and n_kv != n_heads):
        raise ModelLoadError(f"a bias of {size} entries cannot hold the value bias of {n_heads} heads "
                             f"of {d_head} laid out {layout!r}: the adapter's value_layout is wrong")
    return idx, n_kv


def fold_value_biases(hf: torch.nn.Module, adapter: Any) -> int:
    """Move every layer's ``b_V @ W_O`` into the output projection's bias, in place; returns the
    number of layers that had a value bias (0: nothing to fold, e.g. Llama or Gemma-3)."""
    adapter = adapter.resolve(hf.config)
    if adapter.value is None:
        return 0
    n_heads = hf.config.num_attention_heads
    folded = 0
    for block in _get(hf, adapter.blocks):
        v = getattr(_get(block, adapter.value), "bias", None)
        if v is None:
            continue
        o = _get(block, adapter.attn_out)
        w = o.weight.detach().double()  # Conv1D [in, out]; Linear [out, in]
        w_o = (w if adapter.conv1d else w.T).view(n_heads, -1, w.shape[1 if adapter.conv1d else 0])
        d_head = w_o.shape[1]  # [head, d_head, d_model]
        idx, n_kv = value_index(adapter.value_layout, v.numel(), n_heads, d_head)
        idx = idx.to(v.device)
        b_v = v.detach().double()[idx].view(n_kv, d_head).repeat_interleave(n_heads // n_kv, 0)
        moved = torch.einsum("hk,hkd->d", b_v.to(w.device), w_o)
        with torch.no_grad():
            if getattr(o, "bias", None) is None:  # e.g. Qwen2: v has a bias, o_proj none
                o.bias = torch.nn.Parameter(torch.zeros(w_o.shape[-1], dtype=o.weight.dtype,
                                                        device=o.weight.device), requires_grad=False)
            o.bias.copy_((o.bias.double() + moved.to(o.bias.device)).to(o.bias.dtype))
            v[idx] = 0
        folded += 1
    return folded


def probe_tokens(hf: torch.nn.Module, n: int = 12) -> torch.Tensor:
    """A few seeded token ids within the vocabulary, on the input embedding's device."""
    emb = hf.get_input_embeddings()
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, emb.weight.shape[0], (1, n), generator=g).to(emb.weight.device)


def logits(hf: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = hf(tokens).logits.double()
    return out - out.mean(-1, keepdim=True)


def check_fold(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """The fold is exact in real arithmetic (attention rows sum to 1): the centered logits of the
    probe tokens must agree to the dtype's rounding, else the adapter declares the wrong bias."""
    # float64: 1e-6, as BLOOM takes its softmax in float32 (attention rows sum to 1 within ~6e-8)
    tol = {torch.float64: 1e-6, torch.float32: 2e-4}.get(dtype, 5e-2)
    err = float((after - before).abs().max())
    if not err <= tol * (1.0 + float(before.abs().max())):
        raise ModelLoadError(f"folding the value biases of {name} changed its logits by {err:.3g}: "
                             "the adapter's value / value_layout do not describe where this family "
                             "keeps b_V. Load it with fold_value_biases=False, or fix the adapter.")
