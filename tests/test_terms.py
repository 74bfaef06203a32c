"""Eq. 2's terms (selfrepair.terms), one typed result for every patched pass: on every family, each
pass's terms close (``delta_logit = delta_de + from_heads + from_mlps + from_norm +
from_block_norms``), ``self_repair = delta_logit - delta_de``, and ``delta_logit`` is the real
change of the centered logit read off the model's own unembedding (an independent computation)."""

from __future__ import annotations

import pytest
import torch

from selfrepair import load_model
from selfrepair.batch import clean_batch
from selfrepair.direct_effect import at_positions
from selfrepair.hydra import WRITE_SITES, last_writes
from selfrepair.intervene import run
from selfrepair.passes import HeadAblation, WriteAblation, ablate_heads, ablate_writes
from selfrepair.prompt_passes import GroupAblation, ablate_heads_at, clean_head_de
from selfrepair.terms import Terms

FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma3"]
TERMS = ("delta_de", "from_heads", "from_mlps", "from_norm", "from_block_norms")


def tol(model) -> float:
    """HF computes RMSNorms in float32 even in a float64 model (Llama, Gemma): ~1e-7 rounding."""
    return 1e-9 if model.adapter.norm == "layernorm" else 2e-6


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    model = load_model("tiny-" + request.param, dtype="float64")
    tok = torch.randint(0, model.d_vocab, (3, 10), generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([9, 6, 8])
    return model, tok, pos, clean_batch(model, tok, torch.roll(tok, 1, 0)), \
        clean_batch(model, tok, last_pos=pos, extra_reads=WRITE_SITES)


def centered_logit(model, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The target's logit less the mean logit, from the unembedding module itself."""
    with torch.no_grad():
        logits = model.module(model.adapter.unembed)(normed).double()
    return logits.gather(-1, targets[..., None])[..., 0] - logits.mean(-1)


def assert_closes(out: Terms, model) -> None:
    assert isinstance(out, Terms)
    parts = sum(getattr(out, t) for t in TERMS)
    torch.testing.assert_close(out.delta_logit, parts, atol=tol(model), rtol=0)
    assert torch.equal(out.self_repair, out.delta_logit - out.delta_de)
    assert out.delta_logit.abs().max() > 1e-4 and out.from_norm.abs().max() > 1e-6  # not vacuous
    if not model.sandwich:
        assert torch.all(out.from_block_norms == 0)


def test_every_pass_closes_eq2(case):
    model, tok, pos, batch, prompts = case
    repl = batch.replacement("resample")
    heads = ablate_heads(batch, 0, [0, 1], repl[0])
    assert isinstance(heads, HeadAblation)
    torch.testing.assert_close(heads.delta_de, heads.ablated_direct_effect - heads.direct_effect, atol=0, rtol=0)
    assert_closes(heads, model)
    w = last_writes(model, prompts.clean, pos)  # [2, layer, b, d]
    clean_de = (w * prompts.readout.dir).sum(-1).permute(2, 1, 0).reshape(len(pos), -1)
    for component in range(2 * model.n_layers):
        kind, layer = component % 2, component // 2
        writes = ablate_writes(prompts, pos, component, w[kind, layer].roll(1, 0).repeat(2, 1), clean_de)
        assert isinstance(writes, WriteAblation) and writes.delta_logit.shape == (2 * len(pos),)
        assert_closes(writes, model)
    zero = torch.zeros(1, model.n_heads * model.d_head, dtype=model.dtype)
    group = ablate_heads_at(prompts, pos, [(0, 1), (1, 0), (1, 2)], {0: zero, 1: zero})
    assert isinstance(group, GroupAblation)
    assert_closes(group, model)
    before = clean_head_de(prompts, pos)
    own = sum(group.head_de[l, h] - before[l, h] for l, h in [(0, 1), (1, 0), (1, 2)])
    torch.testing.assert_close(group.delta_de, own, atol=1e-12, rtol=0)


def test_delta_logit_is_the_real_change_of_the_centered_logit(case):
    """Every pass's Δlogit (one formula, :func:`selfrepair.terms.final_terms`) against the same
    patch run again with the logits read off the unembedding module."""
    model, tok, pos, batch, prompts = case
    targets = batch.readout.targets
    clean = centered_logit(model, batch.clean.final_normed[:, :-1], targets)
    repl = batch.replacement("zero")[1]
    got = ablate_heads(batch, 1, [2], repl).delta_logit[0]
    sl = slice(2 * model.d_head, 3 * model.d_head)
    patched = run(model, tok, edits={("z", 1): lambda z: torch.cat([z[..., :sl.start], 0 * z[..., sl],
                                                                     z[..., sl.stop:]], -1)})
    want = centered_logit(model, patched.final_normed[:, :-1], targets) - clean
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)

    ml = prompts.readout.targets
    zero = torch.zeros(1, model.n_heads * model.d_head, dtype=model.dtype)
    got = ablate_heads_at(prompts, pos, [(0, 3)], {0: zero}).delta_logit
    rows = torch.arange(len(pos))

    def at_end(z):
        z = z.clone()
        z[rows, pos, 3 * model.d_head:4 * model.d_head] = 0
        return z
    patched = run(model, tok, edits={("z", 0): at_end})
    before = centered_logit(model, at_positions(prompts.clean.final_normed, pos), ml)
    want = centered_logit(model, at_positions(patched.final_normed, pos), ml) - before
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
