"""Frozen-norm ablation (self-repair paper §3 opening, §5.2): ``ablate_heads(freeze=...)`` and
:mod:`selfrepair.frozen_norm`, against the eq. 2 terms the algebra says they equal, App. B's closed
form and a plain-PyTorch recomputation (tests/reference.py), on tiny random models of every family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from reference import reference_frozen
from selfrepair import layernorm
from selfrepair.batch import TokenSet, clean_batch
from selfrepair.data import corrupt_tokens
from selfrepair.errors import InputError, SelfRepairError
from selfrepair.frozen_norm import FrozenNormSpec, frozen_norm_ablation, per_head, summary
from selfrepair.models import Model, adapter_for, tiny_model
from selfrepair.passes import ablate_heads

FAMILIES = [("gpt2", False), ("gpt_neox", True), ("gpt_neox", False), ("llama", False),
            ("gemma3", False)]
IDS = ["gpt2", "neox-parallel", "neox-sequential", "llama", "gemma3"]


def tol(model) -> float:
    """HF computes Llama's and Gemma's RMSNorms in float32 even in a float64 model."""
    return 1e-10 if model.adapter.norm == "layernorm" else 2e-6


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def case(request):
    family, parallel = request.param
    hf = tiny_model(family, dtype=torch.float64, n_layers=3, parallel_residual=parallel)
    model = Model(hf, adapter_for(hf.config.model_type))
    tok = torch.randint(0, model.d_vocab, (4, 12), generator=torch.Generator().manual_seed(1))
    batch = clean_batch(model, tok, corrupt_tokens(tok))
    repl = batch.replacement("resample")
    runs = {}
    for layer in range(model.n_layers):
        heads = list(range(model.n_heads))
        runs[layer] = {f: ablate_heads(batch, layer, heads, repl[layer], freeze=f)
                       for f in (None, "norms", "final_norm", "components")}
    return model, tok, batch, runs


def close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_eq2_closes_in_every_mode_and_frozen_terms_vanish(case):
    model, _, _, runs = case
    for layer, modes in runs.items():
        for freeze, o in modes.items():
            parts = o.from_heads + o.from_mlps + o.from_norm + o.from_block_norms
            close(o.self_repair, parts, tol(model))
        assert torch.all(modes["norms"].from_norm == 0) and torch.all(modes["norms"].from_block_norms == 0)
        assert torch.all(modes["final_norm"].from_norm == 0)
        assert torch.all(modes["components"].from_heads == 0)
        assert torch.all(modes["components"].from_mlps == 0)
        # the live pass's terms are not all zero: the checks above could fail
        live = modes[None]
        assert live.from_norm.abs().max() > 1e-3
        if layer < model.n_layers - 1:
            assert live.from_heads.abs().max() > 1e-3


def test_freezing_the_final_norm_removes_exactly_from_norm(case):
    """Nothing reads the final norm's output but the unembedding, so freezing it changes nothing
    upstream: live - frozen = from_norm per token, in every family (sandwich ones included)."""
    model, _, _, runs = case
    for modes in runs.values():
        live, ff = modes[None], modes["final_norm"]
        close(live.self_repair - ff.self_repair, live.from_norm, tol(model))
        for q in ("from_heads", "from_mlps", "from_block_norms", "scale_ablated"):
            close(getattr(ff, q), getattr(live, q), tol(model))


def test_frozen_norms_without_sandwich_equal_eq2s_component_terms(case):
    model, _, _, runs = case
    for modes in runs.values():
        live, fr = modes[None], modes["norms"]
        if model.sandwich:
            continue
        close(fr.self_repair, live.from_heads + live.from_mlps, tol(model))
        close(live.self_repair - fr.self_repair, live.from_norm, tol(model))


def test_frozen_block_norms_change_what_later_components_read(case):
    """With sandwich norms frozen, eq. 2's component terms are no longer the live ones: only the
    identities of the frozen pass itself hold (the ablated block writes clean + the head's change
    at the clean block scale, so Δlogit = ΔDE_head + from_heads' + from_mlps')."""
    model, _, _, runs = case
    if not model.sandwich:
        pytest.skip("no block norms")
    gaps = []
    for modes in runs.values():
        live, fr = modes[None], modes["norms"]
        d_de = fr.ablated_direct_effect - fr.direct_effect
        close(fr.delta_logit, d_de + fr.from_heads + fr.from_mlps, tol(model))
        gaps.append((live.from_mlps - fr.from_mlps).abs().max())
        removed = live.self_repair - fr.self_repair
        norm_terms = live.from_norm + live.from_block_norms
        gaps.append((removed - norm_terms).abs().max())
    assert max(gaps) > 1e-3  # not the non-sandwich identity


def test_norms_only_is_appendix_b_without_sandwich(case):
    """Every downstream component frozen: the residual is the clean one plus the head's change,
    so App. B's closed form holds for every head, and the self-repair is the final norm's term."""
    model, _, batch, runs = case
    ro = batch.readout
    scaled_logit = ro.logit - ro.bias
    for modes in runs.values():
        co = modes["components"]
        ratio = ro.scale / co.scale_ablated
        d_de = co.ablated_direct_effect - co.direct_effect
        if model.sandwich:  # the ablated layer's own post-attention norm reacts as well
            close(co.self_repair, co.from_norm + co.from_block_norms, tol(model))
            assert co.from_block_norms.abs().max() > 1e-3
        else:
            close(co.delta_logit, layernorm.appendix_b_delta_logit(ratio, scaled_logit, d_de), tol(model))
            close(co.self_repair, co.from_norm, tol(model))
    last = runs[model.n_layers - 1]
    if model.parallel_residual:  # nothing downstream of a last-layer head: the same pass as live
        close(last["components"].delta_logit, last[None].delta_logit, tol(model))


@pytest.mark.parametrize("freeze", ["norms", "components"])
def test_against_a_plain_pytorch_reference(case, freeze):
    model, tok, _, runs = case
    family = model.adapter.family
    for layer in (0, model.n_layers - 1):
        for head in (0, model.n_heads - 1):
            ref = reference_frozen(model.hf, tok, corrupt_tokens(tok), layer, head, freeze=freeze)
            got = runs[layer][freeze]
            assert ref["delta_logit"].abs().max() > 1e-4  # not vacuous
            for q in ("delta_logit", "self_repair"):
                close(getattr(got, q)[head], ref[q], 10 * tol(model))


def test_identity_ablation_changes_nothing(case):
    model, tok, _, _ = case
    batch = clean_batch(model, tok, tok)  # each row its own resample source
    repl = batch.replacement("resample")
    for freeze in ("norms", "components"):
        o = ablate_heads(batch, 1, [0, 1], repl[1], freeze=freeze)
        for q in ("delta_logit", "self_repair", "from_heads", "from_mlps", "from_block_norms"):
            assert getattr(o, q).abs().max() < tol(model), (freeze, q)


def test_batch_size_invariance_and_spec(case, tmp_path):
    from selfrepair.measure import Cache, RunOptions

    model, tok, _, runs = case
    data = TokenSet.from_tensor(tok)
    heads = [(0, 1), (model.n_layers - 1, 0)]
    whole = frozen_norm_ablation(model, data, heads, batch_size=4, progress=False)
    ones = frozen_norm_ablation(model, data, heads, batch_size=1, max_rows=1, progress=False)
    for prefix in ("frozen", "norms_only"):
        for q, t in getattr(whole, prefix).items():
            close(getattr(ones, prefix)[q], t, 1e-8)
    # the same numbers as the pass on the whole batch (rows rolled by one: the same sources)
    close(whole.frozen["self_repair"][0], runs[0]["norms"].self_repair[1], 1e-8)
    close(whole.norms_only["self_repair"][1], runs[model.n_layers - 1]["components"].self_repair[0], 1e-8)
    spec = FrozenNormSpec(heads=tuple(heads))
    cache = Cache(tmp_path)
    first = cache.get(spec, model, data, RunOptions(progress=False))
    again = cache.load(spec, model, data)
    assert again is not None and again.heads == heads
    close(again.frozen["self_repair"], first.frozen["self_repair"], 0)


def test_bad_freeze_and_bad_site_are_one_clear_error(case):
    model, tok, batch, _ = case
    repl = batch.replacement("zero")
    with pytest.raises(InputError, match="unknown freeze"):
        ablate_heads(batch, 0, [0], repl[0], freeze="everything")
    from selfrepair.intervene import run

    with pytest.raises(ValueError, match="cannot freeze site"):
        run(model, tok, freeze={("attn", 0): torch.ones(tok.shape)})


def _top(seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for layer, head in ((1, 0), (1, 1), (2, 0)):
        parts.append(pd.DataFrame({"layer": layer, "head": head, "label": f"L{layer}H{head}",
                                   "row": rng.integers(0, 3, 5), "pos": rng.integers(0, 4, 5)}))
    return pd.concat(parts, ignore_index=True)


def test_per_head_means_and_summary_by_hand():
    from selfrepair.frozen_norm import FrozenNormResult, TERMS

    g = torch.Generator().manual_seed(0)
    heads = [(1, 0), (2, 0)]
    shape = (2, 3, 4)
    rnd = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    res = FrozenNormResult(rnd(), rnd(), {t: rnd() for t in TERMS}, {t: rnd() for t in TERMS}, heads=heads)
    top = _top()
    i = np.array([heads.index(h) if h in heads else -1 for h in zip(top["layer"], top["head"])])
    top = top.assign(direct_effect=[float(res.direct_effect[k, r, p]) if k >= 0 else 9.0
                                    for k, r, p in zip(i, top["row"], top["pos"])])
    for q in ("self_repair", "from_heads", "from_mlps", "from_norm", "from_block_norms"):
        top[q] = np.random.default_rng(len(q)).normal(0, 1, len(top))
    got = per_head(top, res)
    assert list(got["label"]) == ["L1H0", "L2H0"]  # L1H1 is not in the result
    for row in got.itertuples():
        k = heads.index((row.layer, row.head))
        f = top[(top["layer"] == row.layer) & (top["head"] == row.head)]
        frozen = np.mean([float(res.frozen["self_repair"][k, r, p]) for r, p in zip(f["row"], f["pos"])])
        only = np.mean([float(res.norms_only["self_repair"][k, r, p]) for r, p in zip(f["row"], f["pos"])])
        assert row.self_repair_frozen == pytest.approx(frozen)
        assert row.self_repair_norms_only == pytest.approx(only)
        assert row.gap == pytest.approx(f["self_repair"].mean() - frozen
                                        - f["from_norm"].mean() - f["from_block_norms"].mean())
        assert row.n == len(f)
    s = summary(got)
    pos = got[got["self_repair"] > 0]
    assert s["n_positive"] == len(pos)
    assert s["n_halved"] == int((pos["self_repair_frozen"] < 0.5 * pos["self_repair"]).sum())
    assert abs(s["max_gap"]) == pytest.approx(got["gap"].abs().max())
    bad = top.assign(direct_effect=top["direct_effect"] + 1.0)
    with pytest.raises(SelfRepairError, match="different tokens"):
        per_head(bad, res)


def test_chapter_section_on_a_new_local_sandwich_model(tmp_path):
    """Chapter 2's parameters on a model saved to a local directory (a random Gemma-3: sandwich
    norms, sequential blocks), as a reader would bring one: the section measures the late heads,
    and its paragraph takes the sandwich branch with numbers from the result."""
    from selfrepair import load_model
    from selfrepair.chapters import layernorm as cl
    from selfrepair.figures import data_rows, validate_spec
    from selfrepair.figures import layernorm as figs

    src = load_model("tiny-gemma3")
    src.hf.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    cfg = cl.Config.from_params(model=str(tmp_path / "m"), dataset="tiny", n_tokens=256, seq_len=32,
                                batch_size=4, top_percent=10, cache_dir=str(tmp_path / "cache"))
    ch = cl.measure(cfg, progress=False, reference=False)
    f = ch.frozen
    assert list(f["label"]) == [f"L1H{h}" for h in range(ch.model.n_heads)]
    assert f["from_block_norms"].abs().max() > 1e-4  # the sandwich norms react in the live pass
    assert (f["self_repair_frozen"] != f["self_repair"]).all()
    s = summary(f)
    text = cl.frozen_markdown(ch)
    assert "They need not agree here" in text and f"{s['max_gap']:+.3g}" in text
    assert "norms_only" in {v.claim.key for v in ch.verdicts}
    spec = figs.fig_frozen_norm(f).to_dict()
    validate_spec(spec)
    assert data_rows(spec) == 5 * len(f)


def test_frozen_components_are_skipped_not_run(case):
    """``freeze="components"`` replaces every downstream MLP and output projection by its clean value
    without running it (nnsight ``skip``); the live pass runs them. Seen from the weights each pass
    computes with: a torch-function mode records every tensor an operation is given."""
    from torch.overrides import TorchFunctionMode

    from selfrepair.models import sites

    class Used(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.ids = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.ids.update(id(a) for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    model, _, batch, _ = case
    layer = 0
    weights = {(site, j): id(model.module(path, j).weight)
               for j in range(model.n_layers)
               for site, path in (("attn", model.adapter.attn_out), ("mlp", model.adapter.mlp_out))}
    repl = batch.replacement("resample")
    runs = {}
    for freeze in ("components", None):
        with Used() as used:
            ablate_heads(batch, layer, [0], repl[layer], freeze=freeze)
        runs[freeze] = {k for k, w in weights.items() if w in used.ids}
    later = [(s, j) for j in range(layer + 1, model.n_layers) for s in ("attn", "mlp")]
    assert set(later) <= runs[None], runs[None]  # the live pass runs every later component
    skipped = [k for k in later if sites.skippable(model, k[0])]
    assert skipped and not set(skipped) & runs["components"], runs["components"]  # frozen: none runs
    assert ("attn", layer) in runs["components"]  # the ablated layer's own projection reads the edited z
