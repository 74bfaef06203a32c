"""Attribution patching (selfrepair.atp) against the exact ablation on tiny random models.

(a) where everything downstream of the head is linear in its output, AtP equals the exact
Δlogit to rounding; (b) with the final norm live it differs, by a second-order amount: as the
patch is interpolated toward zero, AtP / exact -> 1, and each part of the decomposition is right
to first order; (c) the decomposition of exact − AtP; (d) batch-size invariance; (e) the gradient
against a plain-PyTorch autograd reference (tests/reference.py).
"""

import pytest
import torch

from selfrepair import load_model
from selfrepair.atp import AtpSpec, attribution_patching, compare, rank_agreement
from selfrepair.batch import clean_batch
from selfrepair.errors import InputError
from selfrepair.heads import self_repair
from selfrepair.intervene import run
from selfrepair.measure import Cache
from selfrepair.passes import ablate_heads
from selfrepair.sweep import run_sweep

from reference import reference_atp

FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma3"]


def tokens_for(model, batch=4, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


@pytest.fixture(scope="module", params=FAMILIES)
def model64(request):
    return load_model("tiny-" + request.param, dtype="float64")


def test_gradient_matches_plain_autograd(model64):
    """(e) AtP per head = an independent autograd computation through the model's own logits."""
    tok = tokens_for(model64)
    corrupt = torch.roll(tok, 1, 0)
    got = attribution_patching(model64, tok, corrupt_tokens=corrupt, batch_size=2, progress=False)
    want = reference_atp(model64.hf, model64.adapter.family, tok, corrupt)
    assert want.abs().max() > 1e-2  # not vacuous
    torch.testing.assert_close(got.atp.double(), want, rtol=3e-5, atol=3e-6)


def test_batch_size_invariance(model64):
    """(d) The numbers do not depend on how the rows are cut into batches (1 included)."""
    tok = tokens_for(model64, batch=5)
    a = attribution_patching(model64, tok, batch_size=5, progress=False)
    b = attribution_patching(model64, tok, batch_size=1, progress=False)
    for name in ("atp", "atp_frozen", "delta_direct_effect"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-10)


def _linear_downstream_llama():
    """A 2-layer Llama whose every component downstream of layer 0's heads is linear in their
    output: both MLPs write zero (down_proj = 0), layer 1's attention has a uniform pattern (q = 0)
    and no input norm. Only the final norm is left nonlinear."""
    from selfrepair.models import tiny_model

    hf = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()
        hf.model.layers[1].self_attn.q_proj.weight.zero_()
    hf.model.layers[1].input_layernorm = torch.nn.Identity()
    return load_model(hf)


def test_linear_downstream_frozen_norm_is_exact():
    """(a) Everything downstream linear and the final norm frozen: AtP = exact change to
    rounding, with a downstream head contribution that is not zero; with the norm live they differ."""
    model = _linear_downstream_llama()
    tok = tokens_for(model, batch=4, seq=12)
    r = self_repair(model, tok, heads=[(0, h) for h in range(model.n_heads)], progress=False)
    a = attribution_patching(model, tok, progress=False)
    # the exact change of the frozen-norm readout (from raw activations: HF's Llama norm runs in
    # float32, so delta_logit - from_norm would carry its rounding)
    exact_frozen = (r.ablated_direct_effect - r.direct_effect + r.from_heads + r.from_mlps)[0].sum((1, 2))
    assert r.from_heads[0].abs().sum() > 1e-2  # the downstream heads do react
    torch.testing.assert_close(a.atp_frozen[0], exact_frozen, rtol=1e-9, atol=1e-10)
    live = r.delta_logit[0].sum((1, 2))
    assert (a.atp[0] - live).abs().max() > 1e-4  # the live norm is not linear


def test_last_layer_head_of_parallel_model():
    """(a) A last-layer head of a parallel-residual model has nothing downstream but the final
    norm: frozen-norm AtP = its ΔDE = the exact frozen-norm change; with the live norm the whole
    error is the norm term, and AtP's norm term is the analytic first order of ``from_norm``."""
    model = load_model("tiny-gpt_neox", dtype="float64")
    assert model.parallel_residual
    tok = tokens_for(model)
    last = model.n_layers - 1
    r = self_repair(model, tok, heads=[(last, h) for h in range(model.n_heads)], progress=False)
    a = attribution_patching(model, tok, progress=False)
    ddE = (r.ablated_direct_effect - r.direct_effect)[last].sum((1, 2))
    torch.testing.assert_close(a.atp_frozen[last], ddE, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a.delta_direct_effect[last], ddE, rtol=1e-9, atol=1e-10)
    # analytic first order of the norm term: u . n(r)/S(r) with dS/dr = (r - mean r) / (n S)
    b = clean_batch(model, tok, torch.roll(tok, 1, 0))
    ro = b.readout
    resid = b.clean.final_resid[:, :-1].double()
    c = resid - resid.mean(-1, keepdim=True)
    zh = (b.corrupt_z()[last] - b.clean.reads["z"][last])[:, :-1].unflatten(-1, (model.n_heads, model.d_head))
    dw = torch.einsum("bphk,hkd->hbpd", zh.double(), model.head_out_weight(last))
    coef = -(ro.d * resid).sum(-1) / ro.scale ** 3 / model.d_model
    analytic = (coef * (dw * c).sum(-1)).sum((1, 2))
    torch.testing.assert_close(a.atp[last] - a.atp_frozen[last], analytic, rtol=1e-8, atol=1e-10)
    live = r.delta_logit[last].sum((1, 2))
    assert (a.atp[last] - live).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_interpolated_patch_error_is_second_order(family):
    """(b) Patch z + α (z' − z): AtP(α) = α AtP(1); exact(α) / AtP(α) -> 1 as α -> 0, the error
    shrinking like α², and so do the norm and downstream parts of the error separately."""
    model = load_model("tiny-" + family, dtype="float64")
    tok = tokens_for(model, batch=3, seq=10)
    b = clean_batch(model, tok, torch.roll(tok, 1, 0))
    a = attribution_patching(model, tok, progress=False).to_frame()
    layer, heads = 0, list(range(model.n_heads))
    z, zc = b.clean.reads["z"][layer], b.corrupt_z()[layer]
    rel, parts = {}, {}
    for alpha in (0.1, 0.01):
        out = ablate_heads(b, layer, heads, z + alpha * (zc - z))
        s = {k: v.sum((1, 2)).double() for k, v in out.items()}
        n = b.rows * b.seq1
        atp = alpha * torch.tensor(a[a.layer == layer]["atp"].to_numpy()) * n
        norm = alpha * torch.tensor(a[a.layer == layer]["atp_norm"].to_numpy()) * n
        down = alpha * torch.tensor(a[a.layer == layer]["atp_downstream"].to_numpy()) * n
        rel[alpha] = ((s["delta_logit"] - atp).abs() / atp.abs()).max()
        parts[alpha] = ((s["from_norm"] - norm).abs().max(),
                        (s["from_heads"] + s["from_mlps"] + s["from_block_norms"] - down).abs().max())
    assert rel[0.1] > 1e-4  # the estimate is not exact at a finite patch
    assert rel[0.01] < rel[0.1] / 5  # error / |AtP| shrinks ~ α: AtP / exact -> 1
    for i in range(2):  # each part's error shrinks ~ α² (ratio ~100 for a tenfold smaller α)
        assert parts[0.01][i] < parts[0.1][i] / 30


def test_decomposition_of_the_error(model64):
    """(c) exact − AtP = error_norm + error_downstream + error_direct, with error_direct ≈ 0 (the
    head's own ΔDE is linear in z and both read the same tokens and resample sources)."""
    tok = tokens_for(model64, batch=4)
    sweep = run_sweep(model64, tok, batch_size=2, top_percent=20, progress=False)
    df = compare(sweep.per_head(), attribution_patching(model64, tok, batch_size=3, progress=False))
    assert df["error"].abs().max() > 1e-4
    total = df["error_norm"] + df["error_downstream"] + df["error_direct"]
    torch.testing.assert_close(torch.tensor(total.to_numpy()), torch.tensor(df["error"].to_numpy()),
                               rtol=0, atol=1e-6)  # the sweep keeps float32 sums
    assert df["error_direct"].abs().max() < 1e-6 * max(1.0, df["delta_direct_effect"].abs().max())
    torch.testing.assert_close(torch.tensor((df["delta_direct_effect"] + df["self_repair"]).to_numpy()),
                               torch.tensor(df["exact"].to_numpy()), rtol=0, atol=1e-6)
    last = df[df.layer == model64.n_layers - 1]
    if model64.parallel_residual and not model64.sandwich:  # nothing downstream but the norm
        assert last["error_downstream"].abs().max() < 1e-6


def test_rank_agreement():
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "label": ["L0H0", "L0H1", "L1H0", "L1H1"],
                       "exact": [-3.0, 1.0, 0.5, -2.0], "atp": [-2.5, 0.2, 1.5, -2.0]})
    r = rank_agreement(df, 2)
    assert r["top_exact"] == ["L0H0", "L1H1"] and r["top_atp"] == ["L0H0", "L1H1"] and r["overlap"] == 1
    assert r["spearman"] == pytest.approx(0.8)
    assert rank_agreement(df, 99)["k"] == 4


def test_spec_is_cached_and_backward_refuses_edits(tmp_path):
    from selfrepair.batch import TokenSet

    model = load_model("tiny-gpt2")
    data = TokenSet.from_tensor(tokens_for(model))
    cache = Cache(tmp_path)
    first = cache.get(AtpSpec(), model, data)
    again = cache.get(AtpSpec(), model, data)
    assert cache.path(AtpSpec(), model, data).name.startswith("atp-")
    torch.testing.assert_close(first.atp, again.atp, rtol=0, atol=0)
    assert first.seconds_atp > 0 and "run" in again.meta
    with pytest.raises(ValueError, match="backward"):
        run(model, tokens_for(model), edits={("z", 0): lambda z: z}, backward=lambda r, n: n.sum())
    with pytest.raises(InputError):
        attribution_patching(model, tokens_for(model), ablation="nonsense")


def test_chapter_on_a_new_local_model(tmp_path):
    """The chapter's parameters work on a model saved to a local directory: it shares chapter 1's
    sweep (one cache entry), its verdicts are computed, and bad parameters give one clear error."""
    from selfrepair.chapters import atp as chapter
    from selfrepair.chapters import existence
    from selfrepair.models import tiny_model, tiny_tokenizer

    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    common = dict(model=str(path), dataset="tiny", n_tokens=256, seq_len=16, batch_size=4,
                  top_percent=10, cache_dir=str(tmp_path / "cache"))
    ch = chapter.measure(chapter.Config.from_params(**common), progress=False)
    existence.measure(existence.Config.from_params(**common, n_boot=10), progress=False)
    sweeps = list((tmp_path / "cache").rglob("sweep-*.safetensors"))
    assert len(sweeps) == 1  # chapter 1 reused the sweep chapter 7 made
    assert len(ch.heads) == 2 * 4 and ch.ranks["k"] == 4
    assert ch.heads["error"].abs().max() > 0 and ch.heads["error_direct"].abs().max() < 1e-5
    assert [v.claim.key for v in ch.verdicts] == [c.key for c in chapter.CLAIMS]
    assert all(v.value == v.value for v in ch.verdicts)  # finite metrics, not NaN
    assert ch.cost["wall time (s)"].notna().all()
    assert "L" in chapter.on_this_model(ch) and "agree" in chapter.consistency(ch)
    with pytest.raises(InputError, match="top_heads"):
        chapter.Config.from_params(**common, top_heads=0)
    with pytest.raises(InputError, match="ablation"):
        chapter.Config.from_params(**common, ablation="none")
