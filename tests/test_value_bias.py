"""``load_model(..., fold_value_biases=True)``: TransformerLens's folded convention, which the
paper's code used (b_V · W_O moved into the layer's output bias)."""

import dataclasses

import pytest
import torch

from selfrepair import load_model, self_repair
from selfrepair.errors import InputError, ModelLoadError
from selfrepair.heads import QUANTITIES
from selfrepair.measure import Cache
from selfrepair.models import Model, folded

from reference import reference_self_repair

ABLATIONS = ["resample", "mean", "zero"]
UNCHANGED = ("delta_logit", "self_repair", "from_heads", "from_mlps", "from_norm", "from_block_norms",
             "scale_ablated")  # resample and mean: every change is the same in both conventions


def qwen2(dtype=torch.float64):
    """A tiny Qwen2 (grouped-query attention, 2 KV heads for 4 query heads, q/k/v biases and no
    o_proj bias) with random biases: the fold must add an output bias and read b_V per KV group."""
    import transformers as T

    cfg = T.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                        intermediate_size=64, vocab_size=259, max_position_embeddings=64,
                        initializer_range=0.15)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = T.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return hf.to(dtype).eval()


def tokens(n_vocab=259, batch=3, seq=10, seed=1):
    return torch.randint(0, n_vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def pair(family):
    """(unfolded, folded) float64 models of ``family`` ("qwen2": the GQA model above)."""
    if family == "qwen2":
        hf = qwen2()
        return load_model(hf), load_model(hf, fold_value_biases=True)
    return (load_model(f"tiny-{family}", dtype="float64"),
            load_model(f"tiny-{family}", dtype="float64", fold_value_biases=True))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2", "llama", "gemma3"])
def test_fold_keeps_the_logits(family):
    plain, fold = pair(family)
    tok = tokens()
    with torch.no_grad():
        before, after = plain.hf(tok).logits, fold.hf(tok).logits
    torch.testing.assert_close(after, before, atol=1e-10, rtol=0)
    assert fold.meta["fold_value_biases"] and "fold_value_biases" not in plain.meta
    v = fold.adapter.value
    biased = [getattr(fold.module(v, l), "bias", None) for l in range(fold.n_layers)]
    if family in ("llama", "gemma3"):  # no value bias: nothing to fold, nothing changes
        assert all(b is None for b in biased)
        return
    had = [plain.module(fold.adapter.value, l).bias for l in range(plain.n_layers)]
    assert all(b.abs().max() > 0.1 for b in had), "the unfolded model keeps its biases (not vacuous)"
    if family == "qwen2":
        assert plain.module("self_attn.o_proj", 0).bias is None  # the caller's model is not changed
        assert fold.module("self_attn.o_proj", 0).bias is not None
        assert all(b.abs().max() == 0 for b in biased)
    else:  # fused q/k/v: only b_V is zeroed
        assert all(0 < (b == 0).sum() < b.numel() for b in biased)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_folded_self_repair_matches_the_reference(family, ablation):
    """Every field of self_repair on the folded model equals an independent plain-PyTorch
    computation of TransformerLens's convention on the *unfolded* weights."""
    plain, fold = pair(family)
    tok, corrupt = tokens(seed=1), tokens(seed=7)
    heads = [(0, 1), (fold.n_layers - 1, 2)]
    r = self_repair(fold, tok, ablation=ablation, corrupt_tokens=corrupt, heads=heads, batch_size=2,
                    progress=False)
    for layer, head in heads:
        ref = reference_self_repair(plain.hf, tok, corrupt, layer, head, ablation=ablation,
                                    fold_value_biases=True)
        for q, want in ref.items():
            torch.testing.assert_close(getattr(r, q)[layer, head].double(), want, atol=1e-9, rtol=1e-9,
                                       msg=f"{family} {ablation} {q}")
        unfolded = reference_self_repair(plain.hf, tok, corrupt, layer, head, ablation=ablation)
        gap = (ref["direct_effect"] - unfolded["direct_effect"]).abs()
        assert gap.min() > 1e-3, "the conventions differ on every token (not vacuous)"
        assert gap.std() > 1e-4, "…and not by a constant: b_V's term is divided by each token's S"


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
def test_resample_and_mean_unchanged_zero_changed(family):
    plain, fold = pair(family)
    tok, corrupt = tokens(seed=2), tokens(seed=5)
    for ablation in ABLATIONS:
        a, b = (self_repair(m, tok, ablation=ablation, corrupt_tokens=corrupt, progress=False)
                for m in (plain, fold))
        assert not torch.allclose(a.direct_effect, b.direct_effect, atol=1e-3)
        if ablation == "zero":
            assert not torch.allclose(a.delta_logit, b.delta_logit, atol=1e-3)
            continue
        for q in UNCHANGED:
            torch.testing.assert_close(getattr(b, q), getattr(a, q), atol=1e-9, rtol=1e-9,
                                       msg=f"{family} {ablation} {q}")
    assert set(UNCHANGED) < set(QUANTITIES) | {"scale_ablated"}


def test_the_option_is_part_of_the_cache_key(tmp_path):
    from selfrepair.batch import TokenSet
    from selfrepair.heads import HeadsSpec

    plain, fold = pair("gpt2")
    data = TokenSet.from_tensor(tokens())
    spec = HeadsSpec(heads=((0, 0),), ablation="zero")
    cache = Cache(tmp_path)
    assert cache.path(spec, plain, data) != cache.path(spec, fold, data)
    assert cache.key(spec, fold, data)["model"]["fold_value_biases"] is True
    assert "fold_value_biases" not in cache.key(spec, plain, data)["model"]


def test_remote_true_cannot_fold():
    with pytest.raises(InputError, match="remote='local'"):
        load_model("tiny-gpt2", remote=True, fold_value_biases=True)


@pytest.mark.parametrize("family,layout,error", [("gpt2", "separate", "cannot hold the value bias"),
                                                  ("gpt_neox", "qkv", "changed its logits")])
def test_a_wrong_declaration_is_refused(family, layout, error):
    """A family whose adapter misplaces b_V fails at load: by the bias's size, or because the
    fold would move the logits."""
    plain = load_model(f"tiny-{family}")
    wrong = Model(plain.hf, dataclasses.replace(plain.adapter, value_layout=layout),
                  tokenizer=plain.tokenizer, name=plain.name)
    with pytest.raises(ModelLoadError, match=error):
        folded(wrong, copy=True)
