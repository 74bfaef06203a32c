"""The small cases the exercises' checks run a reader's function on.

A :class:`Case` is what a hook-based activation cache of one clean and one ablated forward pass
would hold, for a few rows of random tokens on a tiny random-weight model: every layer's per-head
``z`` (the *input* of the attention output projection), the projection's output, the final
residual stream, the final norm's scale, the full logits and the last MLP layer's neurons — plus
the weights needed to read them out. The ablated pass replaces one head's ``z`` by its value on
other rows (resample ablation, as everywhere in the book). Tensors come from the library's own
traced passes (:func:`selfrepair.intervene.run`), so a reader's function that agrees with the
reference here computes what the book computes.

Conventions (as in the book): position ``p`` predicts token ``p + 1``, so per-token answers have
``pos - 1`` positions; logits are centred over the vocabulary; the final norm is frozen at the
**clean** run's scale ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from ..intervene import run
from ..models import load_model

ROWS, SEQ = 3, 12  # a case: 3 rows of 12 tokens (11 predicted positions each)


@dataclass(frozen=True)
class Run:
    """One cached forward pass (every tensor detached, float32)."""

    z: torch.Tensor  # [layer, batch, pos, n_heads, d_head] input of each layer's output projection
    attn_out: torch.Tensor  # [layer, batch, pos, d_model] output of the projection (heads summed, + b_O)
    resid_final: torch.Tensor  # [batch, pos, d_model] the residual stream entering the final norm
    scale: torch.Tensor  # [batch, pos] this run's final-norm scale S (std or RMS of resid_final)
    logits: torch.Tensor  # [batch, pos, d_vocab] the model's logits (not centred)
    neurons: torch.Tensor  # [batch, pos, d_mlp] the last MLP layer's activations (input of its down projection)


@dataclass(frozen=True)
class Case:
    """A clean and an ablated run of a tiny model, with the weights to read them out."""

    name: str  # e.g. "tiny-gpt2 (LayerNorm, sequential blocks)"
    tokens: torch.Tensor  # [batch, pos]
    targets: torch.Tensor  # [batch, pos-1] the next token at each predicted position
    head: tuple[int, int]  # (layer, head) ablated in ``ablated``
    clean: Run
    ablated: Run
    W_O: torch.Tensor  # [layer, n_heads, d_head, d_model] each head's rows of the output projection
    W_U: torch.Tensor  # [d_vocab, d_model] unembedding
    b_U: torch.Tensor  # [d_vocab] unembedding bias (zeros if the model has none)
    W_out: torch.Tensor  # [d_mlp, d_model] each last-layer neuron's output direction
    gain: torch.Tensor  # [d_model] the final norm's gain
    norm_bias: torch.Tensor  # [d_model] the final norm's bias (zeros for RMSNorm)
    layernorm: bool  # LayerNorm (subtracts the mean over d_model) or RMSNorm
    parallel_residual: bool
    n_heads: int
    d_head: int

    def norm_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm without its division by ``S`` and without its bias: ``n(x)``, linear in
        ``x`` (LayerNorm: centre over ``d_model``, then the gain; RMSNorm: the gain)."""
        if self.layernorm:
            x = x - x.mean(-1, keepdim=True)
        return x * self.gain

    @cached_property  # every check of eq. 1 reads it: computed once per case
    def delta_direct_effect(self) -> torch.Tensor:
        """``[batch, pos-1]`` ΔDE of the ablated head (ablated − clean, both at the clean scale)."""
        from .answers import direct_effect

        layer, h = self.head
        return direct_effect(self, self.ablated, layer, h) - direct_effect(self, self.clean, layer, h)


def _run(model, tokens: torch.Tensor, edits=None) -> Run:
    last = model.n_layers - 1
    p = run(model, tokens, read=("z", "attn", "neurons"), read_layers={"neurons": [last]}, edits=edits)
    f32 = lambda t: t.detach().float().cpu()  # noqa: E731 - local cast
    norm = model.module(model.adapter.final_norm)
    logits = model.logits(p.final_normed)
    return Run(z=f32(p.reads["z"]).unflatten(-1, (model.n_heads, model.d_head)),
               attn_out=f32(p.reads["attn"]), resid_final=f32(p.final_resid),
               scale=f32(model.norm_scale(norm, p.final_resid)), logits=f32(logits),
               neurons=f32(p.reads["neurons"][0]))


@lru_cache(maxsize=8)
def make_case(family: str = "gpt2", head: tuple[int, int] | None = None, seed: int = 0) -> Case:
    """A case on ``tiny-<family>`` (2 layers, 4 heads of 8, d_model 32) with ``head`` (default
    head 1 of layer 0, so the last layer is downstream of it) resample-ablated: its ``z`` replaced
    by its ``z`` on the rows rolled by one. Cached: the checks build each case once."""
    model = load_model(f"tiny-{family}", dtype="float32")
    layer, h = head if head is not None else (0, 1)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (ROWS, SEQ), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id
    source = run(model, tokens.roll(1, 0), read=("z",)).reads["z"][layer]
    sl = slice(h * model.d_head, (h + 1) * model.d_head)

    def patch(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[..., sl] = source[..., sl]
        return z

    clean, ablated = _run(model, tokens), _run(model, tokens, edits={("z", layer): patch})
    norm = model.module(model.adapter.final_norm)
    b_U = model.unembed_bias
    nb = model.norm_bias(norm)
    kind = "LayerNorm" if model.adapter.norm == "layernorm" else "RMSNorm"
    blocks = "parallel" if model.parallel_residual else "sequential"
    return Case(
        name=f"tiny-{family} ({kind}, {blocks} blocks; L{layer}H{h} ablated)",
        tokens=tokens, targets=tokens[:, 1:], head=(layer, h), clean=clean, ablated=ablated,
        W_O=torch.stack([model.head_out_weight(l) for l in range(model.n_layers)]).float(),
        W_U=model.unembed_weight.detach().float(),
        b_U=torch.zeros(model.d_vocab) if b_U is None else b_U.detach().float(),
        W_out=model.neuron_out_weight(model.n_layers - 1).detach().float(),
        gain=model.norm_gain(norm).detach().float(),
        norm_bias=torch.zeros(model.d_model) if nb is None else nb.detach().float(),
        layernorm=model.adapter.norm == "layernorm", parallel_residual=model.parallel_residual,
        n_heads=model.n_heads, d_head=model.d_head)





@dataclass(frozen=True)
class HydraCase:
    """Whole-layer ablations (Hydra §2.4) on a few random prompts of a tiny model, means over
    two resample sources per prompt. Components ``c = 2 * layer + (0 attention, 1 MLP)``."""

    name: str
    delta_de: torch.Tensor  # [n, C ablated, C readout] ΔDE of every component after each ablation
    total_effect: torch.Tensor  # [n, C ablated] Δ_ablate: the change of the readout token's centred logit
    from_norm: torch.Tensor  # [n, C ablated] the final norm's rescaling term
    parallel: bool


@lru_cache(maxsize=4)
def make_hydra_case(family: str = "gpt2", seed: int = 0) -> HydraCase:
    from ..batch import PromptSet
    from ..hydra import hydra_effect

    model = load_model(f"tiny-{family}", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (6, 10), generator=g)
    ids[:, 0] = model.tokenizer.bos_token_id
    last = torch.tensor([9, 7, 8, 9, 6, 9])
    prompts = PromptSet(ids, last, target_ids=ids[:, 1])
    res = hydra_effect(model, prompts, n_patches=2, seed=seed, progress=False)
    blocks = "parallel" if model.parallel_residual else "sequential"
    return HydraCase(name=f"tiny-{family} ({blocks} blocks)", delta_de=res.delta_de.mean(2).float(),
                     total_effect=res.delta_logit.mean(2).float(), from_norm=res.from_norm.mean(2).float(),
                     parallel=model.parallel_residual)


@dataclass(frozen=True)
class IoiCase:
    """IOI prompts run through a tiny model: the full logits and where each prompt ends."""

    name: str
    logits: torch.Tensor  # [n, pos, d_vocab] the model's raw logits (prompts right-padded)
    end_pos: torch.Tensor  # [n] each prompt's last token (it predicts the answer)
    io: torch.Tensor  # [n] the indirect object's token
    s: torch.Tensor  # [n] the subject's token


@lru_cache(maxsize=4)
def make_ioi_case(family: str = "gpt2", n_prompts: int = 8, seed: int = 0) -> IoiCase:
    """Chapter 8's prompts (one-letter names: the byte tokenizer keeps them whole) on a tiny model."""
    from ..ioi import ioi_prompts

    model = load_model(f"tiny-{family}", dtype="float32")
    data = ioi_prompts(model.tokenizer, n_prompts, seed=seed, names=list("ABCDEFGH"))
    with torch.no_grad():
        logits = model.hf(data.input_ids).logits.float()
    return IoiCase(name=f"tiny-{family}, {n_prompts} IOI prompts of {len(set(data.end_pos.tolist()))} lengths",
                   logits=logits, end_pos=data.end_pos, io=data.io_token, s=data.s_token)


__all__ = ["Case", "HydraCase", "IoiCase", "Run", "make_case", "make_hydra_case", "make_ioi_case"]
