"""The load-time check (selfrepair/adapter_check.py): a deliberately wrong adapter is refused with
the failing piece named; a Llama-like (or Gemma-like) model under a model type the registry does
not know is accepted with the family whose layout it matches and whose check passes; the
registry's refusals (post-LN OPT, mixture-of-experts neurons) are one clear sentence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfrepair import load_model, self_repair
from selfrepair.adapter_check import check_adapter
from selfrepair.errors import InputError, UnsupportedArchitectureError
from selfrepair.models import Model, adapter_for, tiny_model, tiny_tokenizer

WRONG = [  # (tiny model, config overrides, a wrong field of its adapter, the piece that fails)
    ("llama", {}, {"gain": "1+w"}, "final norm"),
    ("gpt2", {}, {"conv1d": False}, "heads"),
    ("gpt_neox", {"parallel_residual": False}, {"parallel": True}, "mlp input"),
    ("granite", {}, {"write_scale": None}, "writes"),
    ("olmo2", {}, {"post_mlp_norm": None}, "writes"),
    ("gemma2", {}, {"logit_softcap": None}, "logits"),
    ("cohere", {}, {"logit_scale": None}, "logits"),
    ("gemma3", {}, {"gain": "w"}, "block norms"),
    ("opt", {}, {"unembed_in": None}, "logits|direct effects"),
]


@pytest.mark.parametrize("family, config, wrong, piece", WRONG, ids=[w[0] for w in WRONG])
def test_a_wrong_adapter_is_refused_naming_the_piece(family, config, wrong, piece):
    hf = tiny_model(family, **config)
    right = adapter_for(hf.config.model_type)
    check_adapter(Model(hf, right))  # the registry's adapter passes
    with pytest.raises(UnsupportedArchitectureError, match=piece):
        check_adapter(Model(hf, dataclasses.replace(right, **wrong)))


def test_load_model_refuses_a_model_its_adapter_misreads(monkeypatch):
    from selfrepair.models import selection

    wrong = dataclasses.replace(adapter_for("llama"), gain="1+w")
    monkeypatch.setattr(selection, "adapter_for", lambda model_type: wrong)
    with pytest.raises(UnsupportedArchitectureError, match="load-time check of .* 'llama' adapter "
                                                           "failed: final norm"):
        load_model(tiny_model("llama"))


def _renamed(family: str, model_type: str):
    hf = tiny_model(family)
    hf.config.model_type = model_type  # a fine-tune saved under a name the registry does not know
    return hf


def test_a_llama_like_model_under_an_unknown_type_loads_with_the_llama_adapter():
    with pytest.warns(UserWarning, match="'my_llama' is not in the registry.*'llama' family"):
        model = load_model(_renamed("llama", "my_llama"))
    assert model.adapter.family == "llama" and "llama" in model.describe()["adapter"]
    ref = load_model(tiny_model("llama"))
    tok = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    a, b = (self_repair(m, tok, ablation="zero", heads=[(0, 1)], progress=False) for m in (model, ref))
    torch.testing.assert_close(a.self_repair, b.self_repair, equal_nan=True)


def test_a_gemma_like_model_is_checked_past_the_llama_layout_it_shares():
    """Gemma's modules sit where Llama's do; only the check tells their norms' gains apart."""
    with pytest.warns(UserWarning, match="'gemma' family"):
        model = load_model(_renamed("gemma", "my_gemma"))
    assert model.adapter.gain == "1+w"


def test_an_unknown_type_whose_check_fails_everywhere_says_so():
    hf = _renamed("gemma", "my_gemma")
    hf.model.norm.forward = lambda x: x  # no final norm: no family's check can pass
    with pytest.raises(UnsupportedArchitectureError, match="'my_gemma' is not supported.*match the "
                                                           "layout of .*llama.*check failed"):
        load_model(hf)


def test_an_unknown_type_from_a_directory_loads(tmp_path):
    """Saved with save_pretrained under a model type of its own, registered with transformers'
    Auto classes as a fine-tune's remote code would be."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class MyConfig(LlamaConfig):
        model_type = "my_llama_dir"

    class MyModel(LlamaForCausalLM):
        config_class = MyConfig

    AutoConfig.register("my_llama_dir", MyConfig, exist_ok=True)
    AutoModelForCausalLM.register(MyConfig, MyModel, exist_ok=True)
    hf = tiny_model("llama")
    mine = MyModel(MyConfig(**{k: v for k, v in hf.config.to_dict().items() if k != "model_type"}))
    mine.load_state_dict(hf.state_dict())
    mine.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="'llama' family"):
        model = load_model(tmp_path)
    assert model.hf.config.model_type == "my_llama_dir" and model.adapter.family == "llama"


def test_post_ln_opt_is_refused_with_the_reason():
    with pytest.raises(UnsupportedArchitectureError, match="post-LN OPT.*no direct effect"):
        load_model(tiny_model("opt", do_layer_norm_before=False))


def test_mixture_of_experts_neurons_are_refused():
    from selfrepair.neurons import measure_neurons

    model = load_model("tiny-mixtral")
    with pytest.raises(InputError, match="mixture-of-experts MLPs.*defines no neurons"):
        measure_neurons(model, torch.randint(0, 256, (2, 8)), [(0, 1)], progress=False)


def test_selfrepair_models_and_the_docs_name_every_supported_model_type(capsys):
    from pathlib import Path

    from selfrepair.cli import main
    from selfrepair.models import SUPPORTED_MODEL_TYPES

    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    docs = {p: (root / p).read_text() for p in ("book/appendix_api.md", "docs/DEVELOPING.md")}
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in listed, model_type
        for path, text in docs.items():
            assert model_type in text, (path, model_type)
    assert "Known limits" in listed and "Post-LN models are refused" in listed
    assert "selfrepair models" in (root / "README.md").read_text()
