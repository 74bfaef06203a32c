"""Chapter 04 (iterative inference): a head's direct effect after its own output is added to its input."""

import numpy as np
import pytest
import torch

from selfrepair import iterative, load_model
from selfrepair.config import RunConfig
from selfrepair.direct_effect import direct_effects, readout, top_percent_mask
from selfrepair.errors import InputError
from selfrepair.heads import clean_pass

from reference import FAMILY, _mod, _norm_parts, capture

FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma3"]
ATTN_NORM = {"gpt2": "ln_1", "gpt_neox": "input_layernorm", "llama": "input_layernorm",
             "gemma3": "input_layernorm"}


@pytest.fixture(scope="module", params=FAMILIES)
def model64(request):
    return load_model("tiny-" + request.param, dtype="float64")


def tokens_for(model, batch=3, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (batch, seq), generator=g)


def reference_new_de(hf, family, tokens, layer, head, alpha):
    """Plain PyTorch: a forward pre-hook on the attention pre-norm adds alpha x the head's clean
    residual write; the head's new output is read at the output projection's input and its DE is
    computed by hand at the clean final (and sandwich) scales."""
    blocks, o_proj, _, final, kind, conv1d, pan, _ = FAMILY[family]
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    block = _mod(hf, blocks)[layer]
    clean = capture(hf, family, tokens)
    w = _mod(block, o_proj).weight.double()
    w = (w if conv1d else w.T)[head * d_head:(head + 1) * d_head]

    def head_out(z):
        return z[..., head * d_head:(head + 1) * d_head] @ w

    scale = 1.0
    if pan is not None:  # sandwich: the head writes g * out / s, s the clean post-attention rms
        bn = _mod(block, pan)
        s = torch.sqrt((clean["attn"][layer] ** 2).mean(-1) + bn.eps)
        scale = (bn.weight.double() + 1) / s[..., None]
    write = head_out(clean["z"][layer]) * scale
    got = {}
    hooks = [
        _mod(block, ATTN_NORM[family]).register_forward_pre_hook(
            lambda m, args: (args[0] + alpha * write.to(args[0].dtype),) + args[1:]),
        _mod(block, o_proj).register_forward_pre_hook(
            lambda m, args: got.__setitem__("z", args[0].detach().double())),
    ]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in hooks:
            h.remove()
    norm = _mod(hf, final)
    W_U = hf.get_output_embeddings().weight.double()
    u = W_U[tokens[:, 1:]] - W_U.mean(0)
    S, _ = _norm_parts(norm, kind, clean["resid"][:, :-1])
    vec = (head_out(got["z"]) * scale)[:, :-1]
    if kind == "ln":
        nv = (vec - vec.mean(-1, keepdim=True)) * norm.weight.double()
    else:
        _, nv = _norm_parts(norm, kind, vec)
    return (u * nv).sum(-1) / S


def test_matches_plain_pytorch_reference(model64):
    m, tok = model64, tokens_for(model64)
    family = m.adapter.family
    clean = clean_pass(m, tok)
    ro = readout(m, tok, clean)
    for layer in range(m.n_layers):
        heads = [0, 3] if layer == 0 else [1]
        new = iterative.amplified_effects(m, tok, clean, ro, layer, heads, (1.0, 3.0))
        for i, h in enumerate(heads):
            for j, alpha in enumerate((1.0, 3.0)):
                want = reference_new_de(m.hf, family, tok, layer, h, alpha)
                torch.testing.assert_close(new[i, j].double(), want, atol=1e-5, rtol=0)
                assert (want - new[i, j]).abs().max() < 1e-5


def test_alpha_zero_gives_the_original_direct_effect(model64):
    m, tok = model64, tokens_for(model64)
    clean = clean_pass(m, tok)
    ro = readout(m, tok, clean)
    de = direct_effects(m, tok, clean, ro).heads
    for layer in range(m.n_layers):
        new = iterative.amplified_effects(m, tok, clean, ro, layer, [0, 2], (0.0, 2.0))
        # equal to rounding: the stacked pass batches rows differently from the clean pass
        torch.testing.assert_close(new[:, 0], de[layer, [0, 2]], atol=1e-12, rtol=0)
        assert not torch.allclose(new[:, 1], de[layer, [0, 2]])


def test_control_is_norm_matched_and_seeded():
    m = load_model("tiny-llama", dtype="float64")
    tok = tokens_for(m)
    clean = clean_pass(m, tok)
    ro = readout(m, tok, clean)
    a = iterative.amplified_effects(m, tok, clean, ro, 1, [0, 1], (1.0, 2.0), torch.Generator().manual_seed(3))
    b = iterative.amplified_effects(m, tok, clean, ro, 1, [0, 1], (1.0, 2.0), torch.Generator().manual_seed(3))
    plain = iterative.amplified_effects(m, tok, clean, ro, 1, [0, 1], (1.0, 2.0))
    assert a.shape == (2, 3, 3, 9) and torch.equal(a, b)
    torch.testing.assert_close(a[:, :2], plain)
    w = iterative.head_writes(m, clean, 1)[0]
    r = iterative._random_like(w, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.norm(dim=-1), w.norm(dim=-1))


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_streaming_matches_one_batch_and_top_k_is_exact(family):
    m = load_model("tiny-" + family, dtype="float64")
    tok = tokens_for(m, batch=6, seq=9)
    a = iterative.measure_iterative(m, tok, [1, 3], top_percent=20, batch_size=2, control=False,
                                    progress=False)
    b = iterative.measure_iterative(m, tok, [1, 3], top_percent=20, batch_size=6, control=False,
                                    progress=False)
    clean = clean_pass(m, tok)
    de = direct_effects(m, tok, clean, readout(m, tok, clean)).heads
    for i, (l, h) in enumerate(a.heads):
        want = top_percent_mask(de[l, h], 20).flatten().nonzero().flatten()
        assert sorted(a.data["instance"][i].tolist()) == sorted(want.tolist())
        oa, ob = a.data["instance"][i].argsort(), b.data["instance"][i].argsort()
        torch.testing.assert_close(a.data["new_direct_effect"][i][oa], b.data["new_direct_effect"][i][ob])
    torch.testing.assert_close(a.data["sum_new"], b.data["sum_new"])
    torch.testing.assert_close(a.data["sum_de"], de.sum((2, 3)).flatten(), atol=1e-10, rtol=0)


def synthetic(rel, de=(1.0, 1.0, 1.0, 1.0, 0.01), alphas=(1.0, 3.0, 5.0)):
    """A result whose head i has DE ``de[i]`` on every top token and new DE ``de * (1 + rel[i][j])``."""
    n, k = len(de), 4
    de_t = torch.tensor(de).repeat_interleave(k).view(n, k)
    rel_t = torch.tensor(rel, dtype=torch.float32)
    new = de_t[..., None] * (1 + rel_t[:, None, :])
    data = {"instance": torch.arange(k).repeat(n, 1), "direct_effect": de_t, "new_direct_effect": new,
            "sum_de": de_t.sum(1), "sum_new": new.sum(1), "n_all": torch.tensor(k),
            "control_direct_effect": de_t * 0.9, "sum_control": de_t.sum(1) * 0.9}
    heads = [(i // 2, i % 2) for i in range(n)]
    return iterative.IterativeResult(heads, alphas, data, {"seq_len": 3, "n_layers": 3,
                                                           "model": "synthetic", "top_percent": 2.0,
                                                           "k": k})


def test_classification():
    res = synthetic([[-0.2, -0.5, -1.3], [0.05, 0.2, 0.4], [0.02, -0.01, 0.05], [0.3, -0.1, -0.4],
                     [-0.9, -0.9, -0.9]])
    c = iterative.classify(res, threshold=0.1)
    assert list(c["class"]) == ["self-repressing", "self-reinforcing", "neutral", "self-repressing", "weak"]
    assert list(c["monotone"]) == [True, True, False, False, True]
    assert list(c["flips"]) == [True, False, False, False, False]
    assert list(c["specific"]) == [True, True, False, True, False]  # control: -10% for every head
    np.testing.assert_allclose(c["control_change"], -0.1, atol=1e-6)
    np.testing.assert_allclose(c["relative_change_all"], c["relative_change"], atol=1e-6)
    slope = (1 * -0.2 + 3 * -0.5 + 5 * -1.3) / 35
    assert abs(c["slope"].iloc[0] - slope) < 1e-6
    assert iterative.featured(c, 2) == ["L0H0", "L0H1"]
    assert iterative.featured(c, 3) == ["L0H0", "L1H1", "L0H1"]
    assert iterative.featured(c, 3, chosen=("L2H0",)) == ["L2H0"]
    r = iterative.response(res, c)
    assert len(r) == 5 * 4 and (r[r["alpha"] == 0]["relative_change"] == 0).all()
    assert set(r["class"]) == set(c["class"])
    t = iterative.token_frame(res, ["L0H0"])
    assert len(t) == 3 * 4 and set(t["alpha"]) == {1.0, 3.0, 5.0}
    with pytest.raises(InputError):
        iterative.token_frame(res, ["L9H9"])
    text = iterative.on_this_model(res, c)
    assert "2 self-repressing, 1 self-reinforcing, 1 neutral and 1 weak" in text
    assert "L0H0 (-130%)" in text and "random push" in text
    assert "2 of the 2 self-repressing and 1 of the 1 self-reinforcing" in text


def test_alpha_parsing():
    assert iterative.check_alphas("1,3,5") == (1.0, 3.0, 5.0)
    assert iterative.check_alphas("[1, 3]") == (1.0, 3.0)
    assert iterative.check_alphas(2) == (2.0,)
    for bad in ("one", [], [float("nan")]):
        with pytest.raises(InputError):
            iterative.check_alphas(bad)


def test_amplification_sweep_is_cached(tmp_path):
    cfg = RunConfig.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=256, seq_len=32,
                                batch_size=4, top_percent=10, cache_dir=str(tmp_path), alphas=[1, 2])
    a = iterative.amplification_sweep(cfg, progress=False)
    assert a.alphas == (1.0, 2.0) and len(a.heads) == 8
    assert len(list(tmp_path.rglob("iterative-*.safetensors"))) == 1
    b = iterative.amplification_sweep(cfg, progress=False)
    assert all(torch.equal(a.data[key], b.data[key]) for key in a.data)
