"""Invariants of direct effects and self-repair on tiny random models of every family."""

import pytest
import torch

from selfrepair import load_model
from selfrepair.direct_effect import direct_effects, readout
from selfrepair.intervene import run
from selfrepair.heads import QUANTITIES, self_repair

from reference import reference_self_repair

from families import CORE as FAMILIES
ABLATIONS = ["resample", "mean", "zero"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return load_model("tiny-" + request.param)


@pytest.fixture(scope="module", params=FAMILIES)
def model64(request):
    return load_model("tiny-" + request.param, dtype="float64")


def tokens_for(model, batch=3, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (batch, seq), generator=g)


def centered_logit(model, tokens):
    with torch.no_grad():
        logits = model.hf(tokens).logits.double()
    return (logits - logits.mean(-1, keepdim=True))[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def test_direct_effects_sum_to_centered_logit(model):
    tok = tokens_for(model)
    p = run(model, tok, read=("z", "attn", "mlp", "neurons"), read_embed=True,
            read_layers={"neurons": [model.n_layers - 1]})
    ro = readout(model, tok, p)
    de = direct_effects(model, tok, p, ro, neuron_layers=(model.n_layers - 1,))
    target = centered_logit(model, tok)
    assert target.abs().mean() > 0.05  # the check is not vacuous
    torch.testing.assert_close(de.total().double(), target, atol=1e-4, rtol=0)
    torch.testing.assert_close(ro.logit.double(), target, atol=1e-4, rtol=0)
    last = model.n_layers - 1
    torch.testing.assert_close(de.neurons[last].sum(0) + de.mlp_bias[last], de.mlps[last],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_eq2_sums_to_eq1(model, ablation):
    r = self_repair(model, tokens_for(model), ablation=ablation, progress=False)
    parts = r.from_heads + r.from_mlps + r.from_norm + r.from_block_norms
    assert r.self_repair.abs().mean() > 1e-3
    torch.testing.assert_close(parts, r.self_repair, atol=2e-5, rtol=1e-4)
    if not model.sandwich:
        assert torch.all(r.from_block_norms == 0)


def test_identity_resample_changes_nothing(model):
    tok = tokens_for(model)
    r = self_repair(model, tok, ablation="resample", corrupt_tokens=tok, progress=False)
    for q in ("delta_logit", "self_repair", "from_heads", "from_mlps", "from_norm", "from_block_norms"):
        assert torch.all(getattr(r, q).abs() < 1e-6), q
    torch.testing.assert_close(r.direct_effect, r.ablated_direct_effect)


def test_last_layer_parallel_residual_appendix_b():
    model = load_model("tiny-gpt_neox", dtype="float64")
    assert model.parallel_residual
    tok = tokens_for(model, batch=4)
    last = model.n_layers - 1
    for ablation in ABLATIONS:
        r = self_repair(model, tok, ablation=ablation, heads=[(last, h) for h in range(model.n_heads)],
                        progress=False)
        p = run(model, tok, read=("z", "attn", "mlp"))
        ro = readout(model, tok, p)
        assert torch.all(r.from_heads[last] == 0) and torch.all(r.from_mlps[last] == 0)
        ratio = r.scale_clean / r.scale_ablated[last]
        scaled_logit = ro.logit - ro.bias  # the part of the logit that the scale multiplies
        closed = (ratio - 1) * scaled_logit + ratio * (r.ablated_direct_effect[last] - r.direct_effect[last])
        torch.testing.assert_close(r.delta_logit[last], closed, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_matches_plain_pytorch_reference(model64, ablation):
    family = model64.adapter.family
    tok = tokens_for(model64, batch=3, seq=10, seed=1)
    corrupt = tokens_for(model64, batch=3, seq=10, seed=7)  # explicit sources, as the book passes them
    heads = [(0, 1), (model64.n_layers - 1, 2)]
    r = self_repair(model64, tok, ablation=ablation, corrupt_tokens=corrupt, heads=heads,
                    batch_size=2, progress=False)  # mean over all rows, whatever the batch size
    tol = 1e-5 if family == "gemma3" else 1e-9  # HF computes Gemma norms in float32
    for layer, head in heads:
        ref = reference_self_repair(model64.hf, tok, corrupt, layer, head, ablation=ablation)
        for q, want in ref.items():
            got = getattr(r, q)[layer, head].double()
            torch.testing.assert_close(got, want.double(), atol=tol, rtol=tol, msg=f"{family} {q}")


def test_unlisted_heads_are_nan(model):
    r = self_repair(model, tokens_for(model), heads=[(1, 0)], progress=False)
    for q in QUANTITIES:
        t = getattr(r, q)
        assert torch.isfinite(t[1, 0]).all() and torch.isnan(t[0]).all() and torch.isnan(t[1, 1:]).all()


def test_batch_equals_rows_one_by_one(model):
    tok = tokens_for(model, batch=4)
    whole = self_repair(model, tok, ablation="zero", progress=False)
    single = self_repair(model, tok, ablation="zero", batch_size=1, progress=False)
    for q in QUANTITIES:
        torch.testing.assert_close(getattr(single, q), getattr(whole, q), atol=2e-5, rtol=1e-4)


def test_stacked_heads_equal_one_head_per_pass(model):
    tok = tokens_for(model)
    stacked = self_repair(model, tok, ablation="mean", progress=False)
    one = self_repair(model, tok, ablation="mean", max_rows=1, progress=False)
    for q in QUANTITIES:
        torch.testing.assert_close(getattr(one, q), getattr(stacked, q), atol=2e-5, rtol=1e-4)


def test_mean_ablation_is_global_across_batches(model):
    tok = tokens_for(model, batch=4)
    whole = self_repair(model, tok, ablation="mean", progress=False)
    split = self_repair(model, tok, ablation="mean", batch_size=2, progress=False)
    torch.testing.assert_close(split.delta_logit, whole.delta_logit, atol=2e-5, rtol=1e-4)


def test_saved_result_keeps_only_listed_heads_and_loads_back(tmp_path):
    from selfrepair.results import SelfRepairResult

    model = load_model("tiny-gemma3")
    tok = torch.randint(0, model.d_vocab, (3, 10), generator=torch.Generator().manual_seed(5))
    r = self_repair(model, tok, ablation="zero", heads=[(1, 2), (0, 1)], progress=False)
    path = r.save(tmp_path / "two-heads.safetensors")
    back = SelfRepairResult.load(path)
    assert back.heads == r.heads and back.ablation == "zero" and "head_grid" not in back.meta
    for name in QUANTITIES + ("scale_clean", "logit", "tokens", "corrupt_tokens"):
        torch.testing.assert_close(getattr(back, name), getattr(r, name), equal_nan=True, rtol=0, atol=0)
    everything = self_repair(model, tok, ablation="zero", progress=False)
    all_path = everything.save(tmp_path / "all-heads.safetensors")
    assert path.stat().st_size < all_path.stat().st_size / 2  # 2 of the grid's heads, not all of them
