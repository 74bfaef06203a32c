"""Chapter 04 (iterative inference): a head's direct effect after its own output is added to its
input, and the chapter's classes, featured heads and verdicts."""

import numpy as np
import pytest
import torch

from selfrepair import iterative, load_model
from selfrepair.batch import TokenSet, clean_batch
from selfrepair.chapters import iterative as ci
from selfrepair.direct_effect import direct_effects, top_percent_mask
from selfrepair.errors import InputError
from selfrepair.passes import amplify_heads, head_writes, random_like

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


def all_head_de(m, tok):
    b = clean_batch(m, tok)
    return direct_effects(m, tok, b.clean, b.readout).heads


# -- the pass --------------------------------------------------------------------------------------
def test_matches_plain_pytorch_reference(model64):
    m, tok = model64, tokens_for(model64)
    batch = clean_batch(m, tok)
    for layer in range(m.n_layers):
        heads = [0, 3] if layer == 0 else [1]
        new = amplify_heads(batch, layer, heads, (1.0, 3.0))
        assert new.shape == (len(heads), 2, tok.shape[0], tok.shape[1] - 1)
        for i, h in enumerate(heads):
            for j, alpha in enumerate((1.0, 3.0)):
                want = reference_new_de(m.hf, m.adapter.family, tok, layer, h, alpha)
                torch.testing.assert_close(new[i, j].double().cpu(), want, atol=1e-5, rtol=0)


def test_alpha_zero_gives_the_original_direct_effect(model64):
    m, tok = model64, tokens_for(model64)
    batch = clean_batch(m, tok)
    de = all_head_de(m, tok)
    for layer in range(m.n_layers):
        new = amplify_heads(batch, layer, [0, 2], (0.0, 2.0))
        # equal to rounding: the stacked pass batches rows differently from the clean pass
        torch.testing.assert_close(new[:, 0], de[layer, [0, 2]], atol=1e-12, rtol=0)
        assert not torch.allclose(new[:, 1], de[layer, [0, 2]])


def test_head_writes_sum_to_the_attention_output():
    """Without sandwich norms the heads' writes plus b_O are the attention output."""
    for family in ("gpt2", "llama"):
        m = load_model("tiny-" + family, dtype="float64")
        tok = tokens_for(m)
        batch = clean_batch(m, tok)
        attn = capture(m.hf, family, tok)["attn"]
        for layer in range(m.n_layers):
            b = m.attn_out_bias(layer)
            total = head_writes(batch, layer).sum(0) + (0.0 if b is None else b)
            torch.testing.assert_close(total.cpu(), attn[layer], atol=1e-10, rtol=0)


def test_control_is_norm_matched_and_seeded():
    m = load_model("tiny-llama", dtype="float64")
    tok = tokens_for(m)
    batch = clean_batch(m, tok)
    a = amplify_heads(batch, 1, [0, 1], (1.0, 2.0), 3)
    b = amplify_heads(batch, 1, [0, 1], (1.0, 2.0), 3)
    c = amplify_heads(batch, 1, [0, 1], (1.0, 2.0), 4)
    plain = amplify_heads(batch, 1, [0, 1], (1.0, 2.0))
    assert a.shape == (2, 3, 3, 9) and torch.equal(a, b) and not torch.allclose(a[:, 2], c[:, 2])
    torch.testing.assert_close(a[:, :2], plain)
    assert not torch.allclose(a[:, 2], plain[:, 1])  # a random push is not the head's own output
    w = head_writes(batch, 1)[0]
    r = random_like(w, 0, 1, 0, start=0)
    torch.testing.assert_close(r.norm(dim=-1), w.norm(dim=-1))
    # a row's direction depends on its own index, not on the rows around it
    torch.testing.assert_close(random_like(w[1:], 0, 1, 0, start=1)[0] / w[1].norm(dim=-1, keepdim=True),
                               r[1] / w[1].norm(dim=-1, keepdim=True))


# -- the streamed measurement -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_streaming_matches_one_batch_and_top_k_is_exact(family):
    m = load_model("tiny-" + family, dtype="float64")
    tok = tokens_for(m, batch=6, seq=9)
    a = iterative.measure_iterative(m, tok, [1, 3], top_percent=20, batch_size=2, control=False,
                                    progress=False)
    b = iterative.measure_iterative(m, tok, [1, 3], top_percent=20, batch_size=6, control=False,
                                    progress=False)
    assert a.heads == [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]
    assert "control_direct_effect" not in a.data
    de = all_head_de(m, tok)
    batch = clean_batch(m, tok)
    for i, (l, h) in enumerate(a.heads):
        want = top_percent_mask(de[l, h], 20).flatten().nonzero().flatten()
        assert sorted(a.data["instance"][i].tolist()) == sorted(want.tolist())
        oa, ob = a.data["instance"][i].argsort(), b.data["instance"][i].argsort()
        torch.testing.assert_close(a.data["new_direct_effect"][i][oa], b.data["new_direct_effect"][i][ob])
        # the kept values are the full pass's values at the kept instances
        full = amplify_heads(batch, l, [h], (1.0, 3.0))[0].flatten(1).T  # [instance, alpha]
        torch.testing.assert_close(a.data["new_direct_effect"][i], full[a.data["instance"][i]],
                                   atol=1e-10, rtol=0)
        torch.testing.assert_close(a.data["sum_new"][i], full.sum(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(a.data["sum_new"], b.data["sum_new"])
    torch.testing.assert_close(a.data["sum_de"], de.sum((2, 3)).flatten(), atol=1e-10, rtol=0)
    assert int(a.data["n_all"]) == 6 * 8 and a.meta["k"] == int(np.ceil(0.2 * 48))


def test_token_set_and_listed_heads():
    m = load_model("tiny-llama", dtype="float64")
    tok = tokens_for(m, batch=4)
    kw = dict(top_percent=25, batch_size=2, progress=False)
    every = iterative.measure_iterative(m, tok, (1.0, 2.0), **kw)
    ts = iterative.measure_iterative(m, TokenSet.from_tensor(tok), (1.0, 2.0), **kw)
    assert all(torch.equal(every.data[k], ts.data[k]) for k in every.data)
    some = iterative.measure_iterative(m, tok, (1.0, 2.0), heads=[(1, 3), (0, 2)], control=False, **kw)
    assert some.heads == [(0, 2), (1, 3)]
    for i, pair in enumerate(some.heads):
        j = every.heads.index(pair)
        for key in ("instance", "direct_effect", "new_direct_effect", "sum_de", "sum_new"):
            torch.testing.assert_close(some.data[key][i], every.data[key][j])
    with pytest.raises(InputError):
        iterative.measure_iterative(m, tok, (1.0,), heads=[(5, 0)], progress=False)


def test_control_does_not_depend_on_batch_size():
    """Each row's random direction has its own seed (seed, layer, head, row): batch_size, a speed
    knob that is not in the cache key, cannot change the control."""
    m = load_model("tiny-llama", dtype="float64")
    tok = tokens_for(m, batch=6, seq=9)
    a = iterative.measure_iterative(m, tok, [1, 3], top_percent=20, batch_size=2, progress=False)
    b = iterative.measure_iterative(m, tok, [1, 3], top_percent=20, batch_size=6, progress=False)
    torch.testing.assert_close(a.data["sum_control"], b.data["sum_control"])


# -- classes, featured heads and frames on a synthetic result ---------------------------------------
def synthetic(rel, de=(1.0, 1.0, 1.0, 1.0, 0.01), alphas=(1.0, 3.0, 5.0), control=0.9):
    """A result whose head i has DE ``de[i]`` on every top token and new DE ``de * (1 + rel[i][j])``;
    the random push leaves ``control`` (one number, or one per head) x the DE."""
    n, k = len(de), 4
    de_t = torch.tensor(de).repeat_interleave(k).view(n, k)
    control = torch.as_tensor(control, dtype=torch.float32).expand(n)[:, None]
    rel_t = torch.tensor(rel, dtype=torch.float32)
    new = de_t[..., None] * (1 + rel_t[:, None, :])
    data = {"instance": torch.arange(k).repeat(n, 1), "direct_effect": de_t, "new_direct_effect": new,
            "sum_de": de_t.sum(1), "sum_new": new.sum(1), "n_all": torch.tensor(k),
            "control_direct_effect": de_t * control, "sum_control": de_t.sum(1) * control}
    heads = [(i // 2, i % 2) for i in range(n)]
    return iterative.IterativeResult(heads, alphas, data, meta={"seq_len": 3, "n_layers": 3,
                                                                "model": "synthetic",
                                                                "top_percent": 2.0, "k": k})


REL = [[-0.2, -0.5, -1.3], [0.05, 0.2, 0.4], [0.02, -0.01, 0.05], [0.3, -0.1, -0.4], [-0.9, -0.9, -0.9]]


def test_classification():
    res = synthetic(REL)
    c = iterative.classify(res, threshold=0.1)
    assert list(c["class"]) == ["self-repressing", "self-reinforcing", "neutral", "self-repressing", "weak"]
    assert list(c["monotone"]) == [True, True, False, False, True]
    assert list(c["flips"]) == [True, False, False, False, False]
    assert list(c["specific"]) == [True, True, False, True, False]  # control: -10% for every head
    np.testing.assert_allclose(c["control_change"], -0.1, atol=1e-6)
    np.testing.assert_allclose(c["relative_change_all"], c["relative_change"], atol=1e-6)
    np.testing.assert_allclose(c["relative_change"], [r[-1] for r in REL], atol=1e-6)
    slope = (1 * -0.2 + 3 * -0.5 + 5 * -1.3) / 35
    assert abs(c["slope"].iloc[0] - slope) < 1e-6
    # a control that moves as much as the head's own output makes nothing specific
    same = iterative.classify(synthetic(REL, control=1 - 1.3), threshold=0.1)
    assert not same["specific"].iloc[0]
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


def test_chapter_verdicts_on_a_synthetic_result():
    # head 3's own output (-40%) moves it little more than a random push does (-35%): not specific
    control = [0.9, 0.9, 0.9, 0.65, 0.9]
    res = synthetic(REL, control=control)
    classes = iterative.classify(res, 0.1)
    ch = ci.IterativeChapter(res, classes, iterative.featured(classes, 2), ci.FEATURED_RULE, [], dict(res.meta))
    ch.verdicts = ci.verdicts(ch)
    v = {x.claim.key: x for x in ch.verdicts}
    # written out from REL: heads 0 and 3 self-repress (-130%, -40%); beyond their control push
    # (-10%, -35%) only head 0 by the threshold
    repressing = [i for i, r in enumerate(REL[:4]) if r[-1] <= -0.1]
    specific = [i for i in repressing if REL[i][-1] - (control[i] - 1) <= -0.1]
    falling = [bool((np.diff([0.0] + REL[i]) <= 0).all()) for i in repressing]
    assert len(repressing) == 2 and specific == [0]
    assert v["repressing"].value == len(specific) and v["repressing"].n == 4
    assert v["proportional"].value == pytest.approx(np.mean(falling)) and v["proportional"].n == 2
    text = ci.on_this_model(ch, 0.1)
    assert text.count("\n- ") == len(ch.verdicts)  # one bullet per claim


def test_alpha_parsing():
    assert iterative.check_alphas("1,3,5") == (1.0, 3.0, 5.0)
    assert iterative.check_alphas("[1, 3]") == (1.0, 3.0)
    assert iterative.check_alphas(2) == (2.0,)
    for bad in ("one", [], [float("nan")]):
        with pytest.raises(InputError):
            iterative.check_alphas(bad)


# -- the chapter ------------------------------------------------------------------------------------
def config(**kw):
    return ci.Config.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=256, seq_len=32,
                                 batch_size=4, top_percent=10, **kw)


def test_chapter_measure_is_cached(tmp_path):
    cfg = config(cache_dir=str(tmp_path), alphas=[1, 2], featured_heads=["L1H2"])
    a = ci.measure(cfg, progress=False)
    assert a.result.alphas == (1.0, 2.0) and len(a.result.heads) == 8
    assert a.featured == ["L1H2"] and a.reason == "pinned by featured_heads"
    assert set(a.tokens["label"]) == {"L1H2"}
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("iterative-")
    b = ci.measure(cfg, progress=False)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    assert all(torch.equal(a.result.data[key], b.result.data[key]) for key in a.result.data)
    with pytest.raises(InputError, match="L5H0"):
        ci.measure(config(cache_dir=str(tmp_path), featured_heads=["L5H0"]), progress=False)


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    cfg = config(dtype="float64", cache_dir=str(tmp_path_factory.mktemp("iterative")))
    return cfg, ci.measure(cfg, progress=False)


def test_chapter_verdicts_recomputed_independently(chapter):
    cfg, ch = chapter
    res = ch.result
    a = list(res.alphas)
    j = a.index(max(a))
    de = res.data["direct_effect"].double().mean(1)  # [head] top-token means
    new = res.data["new_direct_effect"].double().mean(1)  # [head, alpha]
    ctrl = res.data["control_direct_effect"].double().mean(1)
    rel = (new[:, j] - de) / de.abs()
    ctrl_rel = (ctrl - de) / de.abs()
    weak = de < 0.25 * torch.quantile(de, 0.5)  # below a quarter of the median head's DE
    repress = ~weak & (rel <= -cfg.threshold)
    reinforce = ~weak & (rel >= cfg.threshold)
    specific = repress & (rel - ctrl_rel <= -cfg.threshold)
    np.testing.assert_allclose(ch.classes["relative_change"], rel.numpy(), atol=1e-12)
    assert list(ch.classes["class"] == "self-repressing") == repress.tolist()
    assert list(ch.classes["class"] == "self-reinforcing") == reinforce.tolist()
    v = {x.claim.key: x for x in ch.verdicts}
    assert v["repressing"].value == int(specific.sum())
    assert v["repressing"].n == int((~weak).sum())
    order = np.argsort(a)
    falling = [bool((np.diff(np.r_[float(de[i]), new[i].numpy()[order]]) <= 0).all())
               for i in torch.nonzero(repress).flatten().tolist()]
    assert v["proportional"].n == len(falling)
    if falling:
        assert v["proportional"].value == pytest.approx(np.mean(falling))
    else:
        assert np.isnan(v["proportional"].value)
    # the featured heads: the most self-repressing / reinforcing among the large classified heads
    big = ~weak & (de >= torch.quantile(de, 0.5))
    labels = list(ch.classes["label"])
    down = sorted((float(rel[i]), labels[i]) for i in range(len(labels)) if big[i] and rel[i] < 0)
    up = sorted(((-float(rel[i]), labels[i]) for i in range(len(labels)) if big[i] and rel[i] > 0))
    n_down = min(len(down), max(cfg.n_featured - len(up), cfg.n_featured // 2 + cfg.n_featured % 2))
    assert ch.featured == [l for _, l in down[:n_down]] + [l for _, l in up[:cfg.n_featured - n_down]]
    assert ch.reason == ci.FEATURED_RULE
