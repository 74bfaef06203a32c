"""Bad input gets one clear error that says what to do."""

import pytest
import torch

from selfrepair import load_model
from selfrepair.chapters import existence, hydra, intro, ioi, iterative, layernorm, neurons
from selfrepair.errors import (InputError, ModelLoadError, NumericalError,
                               UnsupportedArchitectureError)
from selfrepair.models import Model, adapter_for, tiny_model
from selfrepair.heads import self_repair


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-gpt2")


def tok(model, b=2, s=6):
    return torch.randint(0, model.d_vocab, (b, s), generator=torch.Generator().manual_seed(0))


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError, match="Supported model types: .*gpt2.*gpt_neox.*llama"):
        adapter_for("mamba")


def test_unsupported_in_memory_model_is_rejected():
    from transformers import BertConfig, BertForMaskedLM
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=16, vocab_size=30))
    with pytest.raises(UnsupportedArchitectureError, match="'bert' is not supported"):
        load_model(bert)


def test_hub_id_offline_suggests_embedded(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import by huggingface_hub: patch both
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="gemma-3-270m"):
        load_model("EleutherAI/pythia-160m-does-not-exist")


def test_local_directory_round_trip(tmp_path, model):
    model.hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    assert again.n_layers == model.n_layers and again.tokenizer is not None
    t = tok(model)
    torch.testing.assert_close(self_repair(again, t, progress=False).self_repair,
                               self_repair(model, t, progress=False).self_repair)


def test_corrupt_tokens_shape_mismatch(model):
    with pytest.raises(InputError, match="corrupt_tokens has shape .* must match"):
        self_repair(model, tok(model), corrupt_tokens=tok(model, 3), progress=False)


def test_sequence_longer_than_context(model):
    with pytest.raises(InputError, match="context of 128"):
        self_repair(model, tok(model, 2, 129), progress=False)


def test_unknown_ablation(model):
    with pytest.raises(InputError, match="unknown ablation 'resmaple'.*resample, mean, zero"):
        self_repair(model, tok(model), ablation="resmaple", progress=False)


@pytest.mark.parametrize("heads", [[(2, 0)], [(0, 4)], [(0,)], ["L0H0"]])
def test_out_of_range_or_malformed_head(model, heads):
    with pytest.raises(InputError, match="out of range|pairs"):
        self_repair(model, tok(model), heads=heads, progress=False)


def test_tokens_must_be_integer_matrix(model):
    with pytest.raises(InputError, match="integer tensor"):
        self_repair(model, torch.zeros(2, 5), progress=False)
    with pytest.raises(InputError, match="ids outside"):
        self_repair(model, torch.full((2, 5), 10_000), progress=False)


def test_resample_needs_two_rows(model):
    with pytest.raises(InputError, match="at least 2"):
        self_repair(model, tok(model, 1), progress=False)


def test_unknown_device_and_dtype():
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        load_model("tiny-gpt2", device="gpu0")
    with pytest.raises(InputError, match="unknown dtype"):
        load_model("tiny-gpt2", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            load_model("tiny-gpt2", device="cuda")


@pytest.mark.parametrize("chapter, params, message", [
    (existence, {"n_tokens": "many"}, "n_tokens must be int"),
    (existence, {"seq_len": 1}, "seq_len must be at least 2"),
    (existence, {"top_percent": 0}, r"top_percent must be in \(0, 100\]"),
    (existence, {"ablation": "noise"}, "unknown ablation"),
    (existence, {"featured_heads": ["head 3"]}, "labels like 'L11H2'"),
    (existence, {"model": 3}, "model must be a string"),
    (existence, {"n_tokens": 10, "seq_len": 10, "top_percent": 2}, "fewer than one token in the top"),
    (existence, {"n_boot": -5}, "n_boot must be at least 10"),
    (existence, {"batch_size": 0}, "batch_size must be positive"),
    (existence, {"dtype": "float8"}, "unknown dtype"),
    (layernorm, {"ratio_head": "L1"}, "labels like 'L11H2'"),
    (iterative, {"alphas": "one,two"}, "alphas must be float"),
    (iterative, {"n_featured": 0}, "n_featured must be at least 1"),
    (neurons, {"n_featured": 0}, "n_featured must be at least 1"),
    (hydra, {"n_patches": 0}, "n_patches must be at least 1"),
    (hydra, {"n_prompts": 1}, "n_prompts must be at least 2"),
    (intro, {"demo_positions": 1}, "demo_positions >= 2"),
    (ioi, {"n_prompts": 7}, "even number"),
    (ioi, {"n_name_movers": 0}, "n_name_movers must be at least 1"),
    (ioi, {"name_movers": ["9.9"]}, "labels like 'L11H2'"),
])
def test_parameter_validation(chapter, params, message):
    with pytest.raises(InputError, match=message):
        chapter.Config.from_params(**params)


def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(InputError, match=r"unknown parameter n_tokns.*known parameters are .*n_tokens"):
        existence.Config.from_params(n_tokns=512)
    with pytest.raises(InputError, match="unknown parameter n_tokens.*n_prompts"):
        hydra.Config.from_params(n_tokens=512)  # the Hydra chapter reads prompts, not a corpus


def test_parameters_from_papermill_strings_are_coerced():
    cfg = existence.Config.from_params(n_tokens="512", top_percent="10", seed="3", featured_heads="L1H2")
    assert (cfg.n_tokens, cfg.top_percent, cfg.seed, cfg.featured_heads) == (512, 10.0, 3, ("L1H2",))
    it = iterative.Config.from_params(alphas="1,3,5", featured_heads=None)
    assert it.alphas == (1.0, 3.0, 5.0) and it.featured_heads is None
    assert hydra.Config.from_params(n_prompts="None").n_prompts is None


def test_fp16_overflow_raises_guard():
    hf = tiny_model("gpt2", weight_scale=1.0)
    with torch.no_grad():  # force an overflow in half precision
        hf.transformer.h[0].mlp.c_proj.weight.mul_(1e5)  # weights stay finite, activations do not
    with pytest.raises(NumericalError, match="checking the adapter at load.*dtype='float32' or "
                                             "dtype='bfloat16'"):
        load_model(hf.half())  # the load-time check meets the overflow first
    m = Model(hf.half(), adapter_for("gpt2"))  # unchecked: the measurement's own guard
    with pytest.raises(NumericalError, match="dtype='float32' or dtype='bfloat16'"):
        self_repair(m, tok(m), ablation="zero", progress=False)
