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
from selfrepair.intervene import gradients, run
from selfrepair.measure import Cache
from selfrepair.passes import ablate_heads
from selfrepair.sweep import run_sweep

from reference import reference_atp

from families import CORE as FAMILIES


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
    want = reference_atp(model64.hf, tok, corrupt)
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
        s = {k: v.sum((1, 2)).double() for k, v in out.tensors().items()}
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
    with pytest.raises(TypeError, match="backward"):  # the backward pass is intervene.gradients
        run(model, tokens_for(model), edits={("z", 0): lambda z: z}, backward=lambda r, n: n.sum())
    with pytest.raises(TypeError, match="edits"):  # which takes no edits: a clean pass only
        gradients(model, tokens_for(model), lambda r, n: n.sum(), edits={("z", 0): lambda z: z})
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


def test_per_row_sums_add_up_and_do_not_depend_on_the_batch():
    """Each row's AtP (a bootstrap's unit) sums to the totals and is the same whatever rows share
    its batch: rows of a batch do not interact."""
    model = load_model("tiny-gpt_neox", dtype="float64")
    tok = tokens_for(model, batch=5, seq=9, seed=2)
    a = attribution_patching(model, tok, batch_size=2, progress=False)
    b = attribution_patching(model, tok, batch_size=5, progress=False)
    assert a.row.shape == (5, model.n_layers, model.n_heads, 3)
    torch.testing.assert_close(a.row, b.row)
    for i, name in enumerate(("atp", "atp_frozen", "delta_direct_effect")):
        torch.testing.assert_close(a.row[..., i].sum(0), getattr(a, name))


# -- the chapter's verdicts on the uncertainty layer ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chapter(tmp_path_factory):
    from selfrepair.chapters import atp as chapter
    from selfrepair.experiment import head_sweep

    cfg = chapter.Config.from_params(model="tiny-gpt_neox", dataset="tiny", n_tokens=2048, seq_len=32,
                                     batch_size=8, top_percent=10, top_heads=3, n_boot=200,
                                     cache_dir=str(tmp_path_factory.mktemp("atp")))
    return cfg, chapter.measure(cfg, progress=False), head_sweep(cfg, cfg.ablation, progress=False)


def _by_hand(sweep, atp_rows, docs):
    """Per head (pandas), whole-set means over the rows of the documents ``docs`` (repeats count):
    exact Δlogit, self-repair, AtP and AtP's self-repair."""
    import numpy as np
    import pandas as pd

    from selfrepair.sweep_batch import ROW_COLUMNS

    doc = np.unique(sweep.main_document.numpy(), return_inverse=True)[1]
    rows = np.concatenate([np.flatnonzero(doc == d) for d in docs])
    s, a = sweep.sum_row.double().numpy()[rows].sum(0), atp_rows.double().numpy()[rows].sum(0)
    n = len(rows) * sweep.seq1
    L, H = s.shape[:2]
    return pd.DataFrame({"exact": (s[..., ROW_COLUMNS.index("delta_logit")] / n).ravel(),
                         "self_repair": (s[..., ROW_COLUMNS.index("self_repair")] / n).ravel(),
                         "atp": (a[..., 0] / n).ravel(), "atp_sr": ((a[..., 0] - a[..., 2]) / n).ravel()})


def _top(values, k):
    import numpy as np
    return set(np.argsort(-np.asarray(values), kind="stable")[:k])


def test_verdicts_against_pandas_by_hand(tiny_chapter):
    import numpy as np

    from selfrepair.chapters import atp as chapter

    cfg, ch, sweep = tiny_chapter
    ev = ch.evidence
    n_docs = ev.clusters.n
    assert n_docs >= 4 and ev.clusters.unit == "documents"
    every = _by_hand(sweep, ch.result.row, range(n_docs))
    v = {x.claim.key: x for x in ch.verdicts}
    rho = every["exact"].abs().rank().corr(every["atp"].abs().rank())
    assert v["ranks"].value == pytest.approx(rho) == pytest.approx(ch.ranks["spearman"])
    miss = ((every["self_repair"] - every["atp_sr"]) ** 2).sum() / (every["self_repair"] ** 2).sum()
    assert v["blind"].value == pytest.approx(miss, rel=1e-9)
    select, test = ev.clusters.halves(cfg.seed)
    assert set(select).isdisjoint(test) and len(select) + len(test) == n_docs
    k = ch.ranks["k"]
    chosen = _top(_by_hand(sweep, ch.result.row, select)["exact"].abs(), k)
    tested = _by_hand(sweep, ch.result.row, test)
    assert v["top"].value == pytest.approx(len(chosen & _top(tested["atp"].abs(), k)) / k)
    assert v["top"].n == k and v["top"].estimate.clusters == len(test)
    assert v["ranks"].estimate.clusters == n_docs and v["ranks"].estimate.n_boot == 200
    _, _, mask = chapter.chosen_on_half(ev, k, cfg.seed)
    assert set(np.flatnonzero(mask)) == chosen


def test_the_top_heads_are_chosen_blind_to_the_test_half(tiny_chapter):
    import numpy as np

    from selfrepair.chapters import atp as chapter

    cfg, ch, _ = tiny_chapter
    ev = ch.evidence
    select, test, chosen = chapter.chosen_on_half(ev, ch.ranks["k"], cfg.seed)
    noisy = ev.sums.copy()
    noisy[test] = np.random.default_rng(0).normal(size=noisy[test].shape) * 100
    again = chapter.chosen_on_half(chapter.Evidence(ev.clusters, noisy), ch.ranks["k"], cfg.seed)[2]
    assert (again == chosen).all()


def test_replicates_recompute_ranks_overlap_and_miss_on_resampled_documents(tiny_chapter):
    import numpy as np

    from selfrepair.chapters import atp as chapter
    from selfrepair.uncertainty import Bootstrap

    cfg, ch, sweep = tiny_chapter
    ev, k = ch.evidence, ch.ranks["k"]
    boot = Bootstrap.over(ev.clusters, 30, 5)
    rho = boot.replicates(chapter.spearman, ev.sums)
    miss = boot.replicates(chapter.missed, ev.sums)
    chosen = np.zeros(len(ch.heads), bool)
    chosen[:k] = True
    kept = boot.replicates(lambda t: chapter.kept(t, chosen), ev.sums)
    for i in (0, 7, 22):
        docs = np.repeat(np.arange(ev.clusters.n), boot.weights[i].astype(int))
        h = _by_hand(sweep, ch.result.row, docs)
        assert rho[i] == pytest.approx(h["exact"].abs().rank(method="first").corr(h["atp"].abs().rank(method="first")))
        assert miss[i] == pytest.approx(((h["self_repair"] - h["atp_sr"]) ** 2).sum() / (h["self_repair"] ** 2).sum())
        assert kept[i] == pytest.approx(len(set(range(k)) & _top(h["atp"].abs(), k)) / k)
    assert np.unique(rho[1:]).size > 1


def test_the_norms_share_over_every_head_is_folded(tiny_chapter):
    """Issue 25 (read3 #19): the verdict's "43% is the final norm's part" (every head) beside Solution
    7.1's top-10 split (48%): the verdict folds its number, saying which heads each is over."""
    _, ch, _ = tiny_chapter
    detail = next(x for x in ch.verdicts if x.claim.key == "blind").detail
    if detail:  # a run whose AtP has no error has no split to give
        assert detail.startswith("<details><summary>Which part of AtP's error is the final norm's, over all ")
        assert "Exercise 7.1" in detail and detail.endswith("</details>")
