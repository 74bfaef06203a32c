"""The Hydra-effect measurement (selfrepair.hydra) on tiny random models of every family.

Invariants: direct effects + embeddings + biases = the centered logit of the top token; an
identity patch changes nothing; Δ_ablate = ΔDE_ablated + compensatory effect + final-norm term;
components not downstream of the ablated one do not move; right padding and batching change
nothing; and an independent plain-PyTorch recomputation (forward hooks that replace a layer's
output) agrees with the library.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from selfrepair import load_model
from selfrepair.config import RunConfig
from selfrepair.data import load_prompts, prompt_tokens
from selfrepair.errors import InputError
from selfrepair.hydra import (HydraResult, before_after, choose_patches, effects_frame, erasure,
                              fit_line, hydra_effect, hydra_run, impact_summary, regression,
                              summary, summary_markdown)

FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma3"]
# the module whose output a block adds to the residual: attention, MLP (post-norm for Gemma-3)
WRITES = {"gpt2": ("transformer.h", "attn.c_proj", "mlp", "transformer.ln_f", "ln"),
          "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp", "gpt_neox.final_layer_norm", "ln"),
          "llama": ("model.layers", "self_attn.o_proj", "mlp", "model.norm", "rms"),
          "gemma3": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                     "model.norm", "gemma")}


def tol(model) -> float:
    """HF computes RMSNorms in float32 even in a float64 model (Llama, Gemma): ~1e-7 rounding."""
    return 1e-9 if model.adapter.norm == "layernorm" else 2e-6


def _mod(root, path):
    for p in path.split("."):
        root = getattr(root, p)
    return root


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return load_model("tiny-" + family, dtype="float64")


@pytest.fixture(scope="module")
def prompts(model):
    return prompt_tokens(load_prompts().iloc[:6], model.tokenizer)


@pytest.fixture(scope="module")
def result(model, prompts):
    return hydra_effect(model, prompts.input_ids, prompts.last_pos, targets=prompts.target_ids,
                        n_patches=2, max_rows=8, progress=False)


def hf_centered_last(model, prompts, i, hooks=()):
    """Centered full-vocabulary logits (float64) of prompt ``i`` alone, unpadded."""
    tok = prompts.input_ids[i:i + 1, :int(prompts.last_pos[i]) + 1]
    handles = [m.register_forward_hook(f) for m, f in hooks]
    try:
        with torch.no_grad():
            logits = model.hf(tok).logits[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    return logits - logits.mean()


def test_effects_sum_to_centered_logit_of_top_token(model, prompts, result):
    total = result.clean_de.sum(1) + result.embed_de + result.constant
    for i in range(len(result.logit)):
        centered = hf_centered_last(model, prompts, i)
        assert int(result.ml_token[i]) == int(centered.argmax())
        assert abs(float(result.logit[i]) - float(centered.max())) < 1e-6
        assert abs(float(total[i]) - float(centered.max())) < 1e-6
    assert result.logit.abs().mean() > 0.1  # not vacuous


def test_identity_patch_changes_nothing(model, prompts):
    own = torch.arange(len(prompts.last_pos))[:, None]
    r = hydra_effect(model, prompts.input_ids, prompts.last_pos, patch_index=own, progress=False)
    assert r.delta_logit.abs().max() < 1e-6
    assert r.delta_de.abs().max() < 1e-6
    assert r.from_norm.abs().max() < 1e-6


def test_total_effect_decomposes_and_upstream_is_untouched(model, result):
    torch.testing.assert_close(result.delta_logit, result.delta_de.sum(-1) + result.from_norm,
                               atol=tol(model), rtol=0)
    C = result.clean_de.shape[1]
    untouched = ~result.downstream() & ~torch.eye(C, dtype=torch.bool)
    assert (result.delta_de * untouched[None, :, None, :]).abs().max() < tol(model)
    eff = effects_frame(result)
    np.testing.assert_allclose(eff["total_effect"], eff["delta_direct_effect"]
                               + eff["compensatory_effect"] + eff["from_norm"], atol=tol(model))
    np.testing.assert_allclose(eff["compensatory_effect"], eff["ce_attn"] + eff["ce_mlp"], atol=1e-12)
    assert result.delta_logit.abs().mean() > 1e-3


def test_last_mlp_total_effect_is_its_delta_de_plus_norm_term(model, result):
    m = result.clean_de.shape[1] - 1  # the last layer's MLP: nothing downstream but the final norm
    torch.testing.assert_close(result.delta_logit[:, m],
                               result.delta_de[:, m, :, m] + result.from_norm[:, m], atol=tol(model), rtol=0)
    eff = effects_frame(result)
    last = eff[(eff["kind"] == "mlp") & (eff["layer"] == result.n_layers - 1)]
    assert (last["compensatory_effect"] == 0).all()


def test_parallel_residual_same_layer_mlp_not_downstream(model, result):
    d = result.downstream()
    assert bool(d[0, 1]) == (not model.parallel_residual)  # attn 0 -> mlp 0
    assert not d[1, 0] and d[0, 2] and not d[2, 2]


def test_batching_and_padding_change_nothing(model, prompts, result):
    one = hydra_effect(model, prompts.input_ids, prompts.last_pos, targets=prompts.target_ids,
                       patch_index=result.patch_index, max_rows=1, progress=False)
    for name in ("clean_de", "ablated_de", "delta_logit", "from_norm", "logit"):
        torch.testing.assert_close(getattr(one, name), getattr(result, name), atol=tol(model), rtol=0)
    assert torch.equal(one.ml_token, result.ml_token)


def test_matches_plain_pytorch_hooks(family, model, prompts, result):
    """Replace a layer's write at the last position with a forward hook, unembed in float64."""
    blocks, attn, mlp, final, kind = WRITES[family]
    norm = _mod(model.hf, final)
    W_U = model.hf.get_output_embeddings().weight.double()
    i, k = 1, 0
    src = int(result.patch_index[i, k])
    for m in (0, 1, 2 * model.n_layers - 2):
        layer, is_mlp = divmod(m, 2)
        target = _mod(_mod(model.hf, blocks)[layer], mlp if is_mlp else attn)
        got = {}

        def grab(mod, args, out):
            got["w"] = out[0, -1].detach().clone()

        hf_centered_last(model, prompts, src, hooks=[(target, grab)])
        writes, final_in = {}, {}

        def patch(mod, args, out):
            out = out.clone()
            out[0, -1] = got["w"]
            return out

        def keep(l, c):
            return lambda mod, args, out: writes.__setitem__((l, c), out[0, -1].detach().double())

        watch = [(_mod(_mod(model.hf, blocks)[l], p), keep(l, c))
                 for l in range(model.n_layers) for c, p in ((0, attn), (1, mlp))]
        watch.append((norm, lambda mod, args, out: final_in.__setitem__("r", args[0][0, -1].double())))
        clean = hf_centered_last(model, prompts, i)
        ablated = hf_centered_last(model, prompts, i, hooks=[(target, patch)] + watch)
        top = int(clean.argmax())
        assert abs(float(ablated[top] - clean[top]) - float(result.delta_logit[i, m, k])) < 1e-5
        # direct effects after the ablation, clean final-norm scale, by hand
        u = W_U[top] - W_U.mean(0)
        clean_r = {}
        hf_centered_last(model, prompts, i, hooks=[(norm, lambda mod, a, o: clean_r.__setitem__(
            "r", a[0][0, -1].double()))])
        r = clean_r["r"]
        g = norm.weight.double() + (1.0 if kind == "gemma" else 0.0)
        if kind == "ln":
            S = torch.sqrt(r.var(unbiased=False) + norm.eps)
        else:
            S = torch.sqrt((r ** 2).mean() + getattr(norm, "eps", getattr(norm, "variance_epsilon", None)))
        for (l, c), w in writes.items():
            w = w - w.mean() if kind == "ln" else w
            assert abs(float((u * g * w).sum() / S) - float(result.ablated_de[i, m, k, 2 * l + c])) < 1e-5


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_mean_and_zero_ablation(model, prompts, ablation):
    r = hydra_effect(model, prompts.input_ids, prompts.last_pos, ablation=ablation, progress=False)
    assert r.ablated_de.shape[2] == 1 and (r.patch_index == -1).all()
    torch.testing.assert_close(r.delta_logit, r.delta_de.sum(-1) + r.from_norm, atol=tol(model), rtol=0)
    if ablation == "zero":  # the ablated component writes nothing, so its own DE is 0
        C = r.clean_de.shape[1]
        assert r.ablated_de[:, torch.arange(C), 0, torch.arange(C)].abs().max() < 1e-12


def test_choose_patches():
    p = choose_patches(10, 4, seed=3)
    assert p.shape == (10, 4)
    assert not (p == torch.arange(10)[:, None]).any()
    assert all(len(set(row.tolist())) == 4 for row in p)
    assert torch.equal(p, choose_patches(10, 4, seed=3))
    assert not torch.equal(p, choose_patches(10, 4, seed=4))
    with pytest.raises(InputError):
        choose_patches(3, 3)


def test_fit_line_on_synthetic_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    slope, intercept, r2 = fit_line(x, 0.7 * x + 0.2)
    assert slope == pytest.approx(0.7) and intercept == pytest.approx(0.2) and r2 == pytest.approx(1.0)
    slope, _, r2 = fit_line(x, 0.7 * x + rng.normal(scale=0.7, size=500))
    assert slope == pytest.approx(0.7, abs=0.08) and 0.35 < r2 < 0.65
    assert np.isnan(fit_line(np.ones(5), np.arange(5))[0])


def test_regression_recovers_a_known_slope():
    rng = np.random.default_rng(1)
    rows = []
    for layer, true in ((0, 0.2), (1, 0.7)):
        de = rng.uniform(0, 2, 200)
        ce = true * de + rng.normal(scale=0.01, size=200)
        rows.append(pd.DataFrame({"kind": "attn", "layer": layer, "direct_effect": de,
                                  "compensatory_effect": ce, "ce_attn": ce / 2, "ce_mlp": ce / 2,
                                  "delta_direct_effect": -de}))
    reg = regression(pd.concat(rows)).set_index("layer")
    assert reg.loc[0, "slope"] == pytest.approx(0.2, abs=0.01)
    assert reg.loc[1, "slope"] == pytest.approx(0.7, abs=0.01)
    assert reg.loc[1, "slope_attn"] == pytest.approx(0.35, abs=0.01)
    assert reg.loc[1, "restored"] == pytest.approx(0.7, abs=0.01) and reg.loc[1, "r2"] > 0.99


def test_frames_and_markdown(result):
    eff = effects_frame(result)
    n, C = result.clean_de.shape
    assert len(eff) == n * C and {"layer", "kind", "label"} <= set(eff.columns)
    imp = impact_summary(eff)
    assert len(imp) == 2 * C and set(imp["measure"]) == {"unembed", "ablate"}
    ba = before_after(result)
    assert len(ba) == C * (2 + result.ablated_de.shape[2])
    er = erasure(result)
    assert len(er) == result.n_layers ** 2
    assert (er.loc[er["mlp_layer"] < er["ablated_layer"], "delta_direct_effect"].abs() < 1e-5).all()
    s = summary(result)
    assert 0 <= s["n_correct"] <= s["n_prompts"] == n
    md = summary_markdown(result)
    assert f"of {n}" in md and ("holds" in md or "differs" in md) and "nan" not in md.lower()


def test_hydra_run_caches(tmp_path):
    cfg = RunConfig.from_params(model="tiny-llama", dataset="tiny", n_tokens=512, seq_len=32,
                                batch_size=4, top_percent=10, cache_dir=str(tmp_path))
    first = hydra_run(cfg, n_prompts=6, n_patches=2, progress=False)
    files = list(tmp_path.glob("*/hydra-resample-*.safetensors"))
    assert len(files) == 1
    again = HydraResult.load(files[0])
    torch.testing.assert_close(again.ablated_de, first.ablated_de)
    assert again.meta["prompts"] == first.meta["prompts"] and len(first.meta["ml_text"]) == 6
    second = hydra_run(cfg, n_prompts=6, n_patches=2, progress=False)
    torch.testing.assert_close(second.delta_logit, first.delta_logit)
