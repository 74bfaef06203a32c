"""Property tests (hypothesis) over random small configs: the invariants hold for any shape."""

import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from selfrepair.direct_effect import direct_effects, readout, top_percent_mask
from selfrepair.intervene import run
from selfrepair.models import Model, adapter_for, tiny_model
from selfrepair.heads import self_repair

configs = st.fixed_dictionaries({
    "family": st.sampled_from(["gpt2", "gpt_neox", "llama", "gemma3"]),
    "n_layers": st.integers(1, 3),
    "n_heads": st.sampled_from([1, 2, 4]),
    "d_head": st.sampled_from([4, 8]),
    "d_mlp": st.sampled_from([16, 48]),
    "parallel_residual": st.booleans(),
    "seed": st.integers(0, 2**16),
    "batch": st.integers(2, 3),
    "seq": st.integers(2, 9),
})
SETTINGS = dict(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(c):
    kw = {k: c[k] for k in ("n_layers", "n_heads", "d_head", "d_mlp", "parallel_residual")}
    if c["family"] in ("llama", "gemma3"):
        kw["n_kv_heads"] = 1
    hf = tiny_model(c["family"], seed=c["seed"], dtype=torch.float64, **kw)
    model = Model(hf, adapter_for(hf.config.model_type))
    g = torch.Generator().manual_seed(c["seed"])
    tokens = torch.randint(0, model.d_vocab, (c["batch"], c["seq"]), generator=g)
    return model, tokens


@settings(**SETTINGS)
@given(configs)
def test_effects_sum_to_logit(c):
    model, tok = build(c)
    p = run(model, tok, read=("z", "attn", "mlp"), read_embed=True)
    ro = readout(model, tok, p)
    de = direct_effects(model, tok, p, ro)
    with torch.no_grad():
        logits = model.hf(tok).logits.double()
    want = (logits - logits.mean(-1, keepdim=True))[:, :-1].gather(-1, tok[:, 1:, None])[..., 0]
    torch.testing.assert_close(de.total(), want, atol=1e-6, rtol=1e-6)


@settings(**SETTINGS)
@given(configs, st.sampled_from(["resample", "mean", "zero"]))
def test_eq2_closes_and_nothing_upstream_moves(c, ablation):
    model, tok = build(c)
    r = self_repair(model, tok, ablation=ablation, progress=False)
    parts = r.from_heads + r.from_mlps + r.from_norm + r.from_block_norms
    torch.testing.assert_close(parts, r.self_repair, atol=1e-6, rtol=1e-6)
    last = model.n_layers - 1
    assert torch.all(r.from_heads[last] == 0)  # no heads downstream of the last layer
    if model.parallel_residual:  # the same layer's MLP is not downstream: nothing downstream
        assert torch.all(r.from_mlps[last] == 0)


@settings(**SETTINGS)
@given(configs)
def test_identity_ablation_is_exactly_zero(c):
    model, tok = build(c)
    r = self_repair(model, tok, ablation="resample", corrupt_tokens=tok, progress=False)
    assert torch.all(r.delta_logit.abs() < 1e-10) and torch.all(r.self_repair.abs() < 1e-10)


@settings(**SETTINGS)
@given(configs)
def test_batch_equals_rows_one_by_one(c):
    model, tok = build(c)
    whole = self_repair(model, tok, ablation="zero", progress=False)
    rows = [self_repair(model, tok[i:i + 1], ablation="zero", progress=False) for i in range(len(tok))]
    torch.testing.assert_close(torch.cat([r.self_repair for r in rows], 2), whole.self_repair,
                               atol=1e-8, rtol=1e-8)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 7),
       st.floats(0.5, 100), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_top_percent_selects_ceil_and_dominates(a, b, p, percent, seed):
    values = torch.randn(a, b, p, generator=torch.Generator().manual_seed(seed))
    mask = top_percent_mask(values, percent)
    k = max(1, math.ceil(percent / 100 * b * p))
    assert torch.all(mask.flatten(1).sum(1) == k)
    for i in range(a):
        chosen, rest = values[i][mask[i]], values[i][~mask[i]]
        if len(rest):
            assert chosen.min() >= rest.max()


@settings(**SETTINGS)
@given(configs)
@example({"family": "gemma3", "n_layers": 1, "n_heads": 1, "d_head": 4, "d_mlp": 16,  # terms ~2e4
          "parallel_residual": False, "seed": 311, "batch": 2, "seq": 3})
def test_frozen_norm_ablation_closes_eq2_in_both_passes(c):
    """Norms frozen: what is left is the components' reaction; norms only: the norms' terms; and
    without sandwich norms, freezing removes exactly the live ``from_norm``."""
    from selfrepair.batch import TokenSet
    from selfrepair.frozen_norm import frozen_norm_ablation

    model, tok = build(c)
    heads = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    fr = frozen_norm_ablation(model, TokenSet.from_tensor(tok), heads, progress=False)
    live = self_repair(model, tok, ablation="resample", progress=False)
    f, o = fr.frozen, fr.norms_only
    # HF computes RMSNorm (and Gemma's norms) in float32 even in a float64 model: its noise is
    # relative to the terms' size (random Gemma weights give terms up to ~1e4: 3e-5 off at 2e4)
    size = max(1.0, *(t.abs().max().item() for t in (*f.values(), *o.values()) if torch.is_tensor(t)))
    atol = 1e-10 if model.adapter.norm == "layernorm" else 2e-6 * size
    torch.testing.assert_close(f["self_repair"], f["from_heads"] + f["from_mlps"], atol=atol, rtol=0)
    torch.testing.assert_close(o["self_repair"], o["from_norm"] + o["from_block_norms"], atol=atol, rtol=0)
    if not model.sandwich:
        flat = lambda t: t.flatten(0, 1)  # noqa: E731 - [layer, head] -> the result's head order
        torch.testing.assert_close(flat(live.self_repair) - f["self_repair"], flat(live.from_norm),
                                   atol=atol, rtol=0)
