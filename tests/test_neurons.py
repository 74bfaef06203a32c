"""Chapter 03 (anti-erasure neurons): per-neuron direct effects under a head ablation."""

import math

import pandas as pd
import pytest
import torch

from selfrepair import load_model, neurons
from selfrepair.ablation import default_corrupt_tokens, patch_heads
from selfrepair.config import RunConfig
from selfrepair.direct_effect import direct_effects, neuron_effects, readout, top_percent_mask
from selfrepair.errors import InputError
from selfrepair.intervene import run
from selfrepair.heads import CLEAN_READS, ablate_heads

FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def model64(request):
    return load_model("tiny-" + request.param, dtype="float64")


def tokens_for(model, batch=4, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (batch, seq), generator=g)


def some_heads(model):
    last = model.n_layers - 1
    return [(0, 1), (0, 3)] + ([] if model.parallel_residual else [(last, 2)])


def test_neurons_and_bias_sum_to_the_layer_de_clean_and_ablated(model64):
    m, tok = model64, tokens_for(model64)
    L = m.n_layers - 1
    clean = run(m, tok, read=CLEAN_READS + ("neurons",), read_embed=True, read_layers={"neurons": [L]})
    ro = readout(m, tok, clean)
    de = direct_effects(m, tok, clean, ro, neuron_layers=(L,))
    torch.testing.assert_close(de.neurons[L].sum(0) + de.mlp_bias[L], de.mlps[L], atol=1e-10, rtol=0)
    dm = ro.write_dir(m, "mlp", L)
    bias = de.mlp_bias[L]
    corrupt_z = run(m, default_corrupt_tokens(tok), read=("z",)).reads["z"]
    res = neurons.measure_neurons(m, tok, some_heads(m), top_percent=100, batch_size=len(tok),
                                  progress=False)
    for f, (layer, head) in enumerate(res.heads):
        # independent: patch the head in a plain pass and read the MLP layer's whole output
        p = run(m, tok, read=("mlp",), read_layers={"mlp": [L]},
                edits={("z", layer): lambda z: patch_heads(m, z, [head], corrupt_z[layer], len(tok))})
        layer_abl = (m.acc(p.reads["mlp"][0][:, :-1]) * dm).sum(-1)
        out = ablate_heads(m, tok, clean, ro, layer, [head], corrupt_z[layer], neuron_layer=L)
        abl_n = neuron_effects(m, out["neurons"][0], dm, L)
        torch.testing.assert_close(abl_n.sum(0) + bias, layer_abl, atol=1e-9, rtol=0)
        # the streamed result, instance by instance
        inst = res.get("direct_effect", "instance")[f]
        want_delta = (layer_abl - de.mlps[L]).flatten()[inst]
        torch.testing.assert_close(res.get("direct_effect", "layer_delta")[f], want_delta.cpu(),
                                   atol=1e-9, rtol=0)
        torch.testing.assert_close(res.get("direct_effect", "delta")[f].sum(-1), want_delta.cpu(),
                                   atol=1e-9, rtol=0)
        torch.testing.assert_close(res.get("direct_effect", "clean")[f],
                                   de.neurons[L].flatten(1).T[inst].cpu(), atol=1e-12, rtol=0)


def test_identity_resample_gives_zero_neuron_change(model64):
    row = tokens_for(model64, batch=1)
    tok = row.repeat(3, 1)  # every row equal: the rolled batch is the batch itself
    res = neurons.measure_neurons(model64, tok, some_heads(model64), top_percent=50, batch_size=3,
                                  progress=False)
    for sel in neurons.SELECTIONS:
        # zero to rounding (the stacked ablated pass batches rows differently from the clean one)
        assert res.get(sel, "delta").abs().max() < 1e-12
        assert res.get(sel, "layer_delta").abs().max() < 1e-12
        assert res.get(sel, "self_repair").abs().max() < 1e-9


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_streamed_top_k_is_exact_and_batch_independent(family):
    m = load_model("tiny-" + family, dtype="float64")
    tok = tokens_for(m, batch=6, seq=9)
    heads = [(0, 0), (1, 2)]
    a = neurons.measure_neurons(m, tok, heads, ablation="zero", top_percent=20, batch_size=2,
                                progress=False)
    b = neurons.measure_neurons(m, tok, heads, ablation="zero", top_percent=20, batch_size=6,
                                progress=False)
    clean = run(m, tok, read=("z", "attn", "mlp"), read_embed=True)
    de = direct_effects(m, tok, clean, readout(m, tok, clean)).heads
    k = math.ceil(0.2 * tok.shape[0] * (tok.shape[1] - 1))
    for f, (l, h) in enumerate(heads):
        want = top_percent_mask(de[l, h], 20).flatten().nonzero().flatten()
        for res in (a, b):
            inst = res.get("direct_effect", "instance")[f]
            assert len(inst) == k
            assert sorted(inst.tolist()) == sorted(want.tolist())
        for sel in neurons.SELECTIONS:
            order_a = a.get(sel, "instance")[f].argsort()
            order_b = b.get(sel, "instance")[f].argsort()
            torch.testing.assert_close(a.get(sel, "delta")[f][order_a], b.get(sel, "delta")[f][order_b])


def test_other_neuron_layer():
    m = load_model("tiny-gpt2", dtype="float64")  # sequential: layer 0's MLP is downstream of L0 heads
    tok = tokens_for(m)
    res = neurons.measure_neurons(m, tok, [(0, 1)], neuron_layer=0, top_percent=100,
                                  batch_size=len(tok), progress=False)
    clean = run(m, tok, read=("z", "attn", "mlp", "neurons"), read_embed=True,
                read_layers={"neurons": [0]})
    de = direct_effects(m, tok, clean, readout(m, tok, clean), neuron_layers=(0,))
    inst = res.get("direct_effect", "instance")[0]
    torch.testing.assert_close(res.get("direct_effect", "clean")[0], de.neurons[0].flatten(1).T[inst])
    torch.testing.assert_close(res.get("direct_effect", "layer_clean")[0], de.mlps[0].flatten()[inst])
    ro = readout(m, tok, clean)
    corrupt_z = run(m, default_corrupt_tokens(tok), read=("z",)).reads["z"]
    p = run(m, tok, read=("mlp",), read_layers={"mlp": [0]},
            edits={("z", 0): lambda z: patch_heads(m, z, [1], corrupt_z[0], len(tok))})
    layer_abl = (m.acc(p.reads["mlp"][0][:, :-1]) * ro.write_dir(m, "mlp", 0)).sum(-1)
    torch.testing.assert_close(res.get("direct_effect", "layer_delta")[0],
                               (layer_abl - de.mlps[0]).flatten()[inst])


def test_heads_must_be_upstream_and_featured_heads_respect_it():
    m = load_model("tiny-gpt_neox")  # parallel residual: last-layer heads do not feed the last MLP
    assert m.parallel_residual
    with pytest.raises(InputError, match="not upstream"):
        neurons.measure_neurons(m, tokens_for(m), [(1, 0)], progress=False)
    per_head = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                             "self_repair": [0.1, 0.3, 0.9, 0.8]})
    assert neurons.featured_heads(per_head, m, n=2) == [(0, 1), (0, 0)]
    seq = load_model("tiny-llama")
    assert neurons.featured_heads(per_head, seq, n=2) == [(1, 0), (1, 1)]


@pytest.fixture(scope="module")
def result():
    m = load_model("tiny-gemma3", dtype="float64")
    return neurons.measure_neurons(m, tokens_for(m, batch=8, seq=12), [(0, 0), (0, 2), (1, 1)],
                                   top_percent=25, batch_size=4, progress=False)


def test_frames(result):
    d_mlp, k = result.meta["d_mlp"], result.meta["k"]
    inst = neurons.instances(result, "mlp_repair")
    assert len(inst) == 3 * k and set(inst["label"]) == {"L0H0", "L0H2", "L1H1"}
    delta = inst["neuron_ablated_de"] - inst["neuron_clean_de"]
    top = result.get("mlp_repair", "delta").max(-1).values.flatten().numpy()
    assert (abs(delta.to_numpy() - top) < 1e-9).all()

    sp = neurons.sparsity(result)
    nth = sp[sp["kind"] == "nth"].pivot_table(index=["label", "percent"], columns="rank", values="share")
    assert (nth.diff(axis=1).fillna(0) <= 1e-12).all().all()  # the N-th neuron repairs less as N grows
    by_pct = sp.pivot_table(index=["label", "kind", "rank"], columns="percent", values="share")
    assert (by_pct.diff(axis=1).fillna(0) <= 1e-12).all().all()  # a larger bar is met less often

    cum = neurons.cumulative(result)
    for _, g in cum.groupby("label"):
        assert g["cumulative_share"].is_monotonic_increasing
        assert g["rank"].iloc[-1] == d_mlp and abs(g["cumulative_share"].iloc[-1] - 1) < 1e-9
    n50 = neurons.neurons_for_share(result, 0.5)
    for f, n in enumerate(n50):
        absd = result.get("direct_effect", "delta")[f].abs().sum(0).sort(descending=True).values
        assert absd[:n].sum() >= 0.5 * absd.sum() - 1e-12 > absd[:n - 1].sum()

    freq = neurons.top_frequency(result, top=10, keep=d_mlp)
    assert all(abs(g["frequency"].sum() - 10) < 1e-9 for _, g in freq.groupby("label"))

    s = neurons.summary(result)
    assert list(s["label"]) == ["L0H0", "L0H2", "L1H1"]
    for col in ("erasure_top", "negative_baseline", "erasure_repair_share", "layer_positive",
                "fig7_anti_erasure", "max_top_frequency"):
        assert s[col].between(0, 1).all(), col
    text = neurons.on_this_model(result, s)
    assert "L1H1" in text and "16%" in text and f"{d_mlp} neurons" in text


def test_neuron_sweep_is_cached(tmp_path):
    cfg = RunConfig.from_params(model="tiny-llama", dataset="tiny", n_tokens=256, seq_len=32,
                                batch_size=4, top_percent=10, cache_dir=str(tmp_path),
                                featured_heads=["L1H0", "L0H3"])
    a = neurons.neuron_sweep(cfg, progress=False)
    files = list(tmp_path.rglob("neurons-*.safetensors"))
    assert len(files) == 1
    b = neurons.neuron_sweep(cfg, progress=False)
    assert a.heads == b.heads == [(0, 3), (1, 0)]
    assert all(torch.equal(a.data[key], b.data[key]) for key in a.data)


def test_instances_are_capped_and_said_so():
    m = load_model("tiny-gpt2")
    res = neurons.measure_neurons(m, tokens_for(m, batch=4, seq=10), [(0, 0)], top_percent=50,
                                  batch_size=4, max_instances=5, progress=False)
    assert res.get("direct_effect", "instance").shape == (1, 5) and res.meta["capped"]
    assert "capped by max_instances" in neurons.on_this_model(res)
