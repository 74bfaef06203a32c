"""Models placed with a ``device_map`` (accelerate): results equal the single-device run, every
family. On a CPU-only machine every module sits on the CPU, but behind accelerate's hooks on
every module (``force_hooks``), so the dispatched code path is the one measured; two GPUs are
tested in tests/test_gpu.py."""

import pytest
import torch

from selfrepair import load_model, run_sweep, self_repair
from selfrepair.errors import InputError

from families import CORE as FAMILIES


def per_module_map(model) -> dict:
    """Every module that holds parameters, on the CPU: one accelerate hook each."""
    return {name.rsplit(".", 1)[0]: "cpu" for name, _ in model.hf.named_parameters(remove_duplicate=False)}


def rows(model, n=4, seq=10):
    return torch.randint(0, model.d_vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_dispatched_model_equals_the_single_device_run(family):
    one = load_model("tiny-" + family)
    spread = load_model("tiny-" + family, device_map=per_module_map(one))
    hooked = [spread.module(spread.adapter.attn_out, l) for l in range(spread.n_layers)]
    assert all(hasattr(m, "_hf_hook") for m in hooked)  # accelerate's hooks are in the path
    tok = rows(one)
    for ablation in ("resample", "mean"):
        a = self_repair(one, tok, ablation=ablation, progress=False)
        b = self_repair(spread, tok, ablation=ablation, progress=False)
        for q in ("direct_effect", "delta_logit", "self_repair", "from_norm", "scale_ablated"):
            torch.testing.assert_close(getattr(b, q), getattr(a, q), atol=1e-6, rtol=1e-6, msg=q)
    auto = load_model("tiny-" + family, device_map="auto")  # on a CPU-only machine: {"": "cpu"}
    torch.testing.assert_close(self_repair(auto, tok, progress=False).self_repair,
                               self_repair(one, tok, progress=False).self_repair, atol=1e-6, rtol=1e-6)
    sa = run_sweep(one, tok, batch_size=2, top_percent=20, progress=False)
    sb = run_sweep(spread, tok, batch_size=2, top_percent=20, progress=False)
    for k, v in sa.tensors().items():
        torch.testing.assert_close(sb.tensors()[k], v, atol=1e-6, rtol=1e-6, msg=k)


def test_auto_device_map_from_a_directory(tmp_path):
    one = load_model("tiny-llama")
    one.hf.save_pretrained(tmp_path / "m")
    one.tokenizer.save_pretrained(tmp_path / "m")
    auto = load_model(str(tmp_path / "m"), device_map="auto")
    assert auto.hf.hf_device_map  # placed by from_pretrained
    tok = rows(one)
    torch.testing.assert_close(self_repair(auto, tok, progress=False).self_repair,
                               self_repair(one, tok, progress=False).self_repair, atol=1e-6, rtol=1e-6)


def test_offloading_device_maps_are_refused():
    one = load_model("tiny-gpt2")
    bad = {**per_module_map(one), "transformer.h.1.mlp.c_fc": "disk"}
    with pytest.raises(InputError, match="offloading"):
        load_model("tiny-gpt2", device_map=bad)
    with pytest.raises(InputError, match="device_map must be"):
        load_model("tiny-gpt2", device_map="balanced-ish")
