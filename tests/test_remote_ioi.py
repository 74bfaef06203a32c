"""Chapter 8's measurement (:func:`selfrepair.name_movers.ioi_measure`) with ``remote=True``
against the in-process NDIF server (tests/ndif_fake.py): no weight here, two requests per chunk
of prompts (the clean pass with its reductions, then the ablation and residual-moving passes),
every result equal to the local run's, and only per-prompt ``[layer, head]``-sized values (and,
for mean ablation, a ``z`` sum per chunk) brought back."""

import pytest
import torch

from selfrepair import ioi, load_model
from selfrepair.name_movers import ABLATED_KEYS, CLEAN_KEYS, ioi_measure, resample_rows

from remote_helpers import FAMILIES, TOL, ndif_server, saved_dir, tensor_bytes  # noqa: F401 - a fixture

N_PROMPTS, BATCH = 12, 5  # chunks of 5, 5 and 2: the last one's resample sources wrap to the first


def same(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two results' tensors, NaN where both are NaN (``moved_de``)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True
    if not a.numel():
        return 0.0
    return float((a.double().nan_to_num() - b.double().nan_to_num()).abs().max())


def clean_bytes(model, b: int, mean: bool) -> int:
    """What a clean request returns: per prompt three scalars, the top token, ``[layer, head]`` DEs
    and attention to IO, S1, S2, ``[layer]`` MLP and bias DEs; for mean ablation the chunk's ``z``
    sum at the end ``[layer, n_heads * d_head]`` (fp64)."""
    e = torch.empty(0, dtype=model.effect_dtype).element_size()
    L, H = model.n_layers, model.n_heads
    per_prompt = e * (3 + 4 * L * H + 2 * L) + 8
    return b * per_prompt + (L * H * model.d_head * 8 if mean else 0)


def ablated_bytes(model, b: int) -> int:
    """What an ablation request returns: per prompt the ablated head DEs and ``moved_de``
    ``[layer, head]``, the ablated MLP DEs ``[layer]`` and eq. 1's three terms."""
    e = torch.empty(0, dtype=model.effect_dtype).element_size()
    return b * e * (2 * model.n_layers * model.n_heads + model.n_layers + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_ioi_measure_remote_true_equals_the_local_run_and_brings_back_only_reductions(tmp_path, family,
                                                                                     ndif_server):
    path = saved_dir(tmp_path, family, d_head=32)  # d_model 128: an activation dwarfs a reduction
    log = ndif_server(path)
    here, there = load_model(path), load_model(path, remote=True)
    assert there.remote is True and not there.weights_here
    data = ioi.ioi_prompts(here.tokenizer, N_PROMPTS, names=list(ioi.LETTER_NAMES))
    seq = data.input_ids.shape[1]
    sizes = [min(BATCH, N_PROMPTS - i) for i in range(0, N_PROMPTS, BATCH)]
    for ablation in ("mean", "resample", "zero"):
        log.clear()
        a = ioi_measure(here, data, ablation=ablation, batch_size=BATCH, progress=False)
        assert not log, "the local run sent a request"
        b = ioi_measure(there, data, ablation=ablation, batch_size=BATCH, progress=False)
        ta, tb = a.tensors(), b.tensors()
        assert ta.keys() == tb.keys() and set(CLEAN_KEYS + ABLATED_KEYS) <= ta.keys()
        for k in ta:
            assert same(ta[k], tb[k]) <= TOL, (ablation, k)
        assert b.meta["rule_found"] == a.meta["rule_found"]
        assert float(ta["head_de"].abs().sum()) > 0 and not torch.isnan(ta["ablated_head_de"]).any()
        if family != "gemma3":  # tiny Gemma 3's 16-token sliding window ends before IO and S
            assert float(ta["attn_io"].sum()) > 0 and float(ta["attn_s2"].sum()) > 0
        assert len(log) == 2 * len(sizes)  # per chunk: the clean request, then the ablation's
        activation = min(sizes) * seq * here.d_model * 4  # one fp32 activation of the smallest chunk
        for i, r in enumerate(log):
            k = sizes[i % len(sizes)]
            bound = clean_bytes(here, k, ablation == "mean") if i < len(sizes) else ablated_bytes(here, k)
            assert tensor_bytes(r.saved) == bound, (ablation, i)  # nothing else comes back
            assert tensor_bytes(r.saved) < activation, (ablation, i)
    assert {p.device.type for p in there.hf.parameters()} == {"meta"}  # no weight was loaded here


def test_resample_sources_inside_the_chunk_come_from_its_own_pass():
    """Each prompt's source is the prompt two on; those inside the chunk index into it, the rest
    (past its end, wrapping to the first prompts) follow it, and only they are run again."""
    model = load_model("tiny-gpt2")
    data = ioi.ioi_prompts(model.tokenizer, N_PROMPTS, names=list(ioi.LETTER_NAMES))
    idx = torch.arange(10, 12)  # the last chunk: its sources are prompts 0 and 1
    which, tok, pos = resample_rows(data, idx)
    assert which.tolist() == [2, 3]
    torch.testing.assert_close(tok, data.rows(torch.tensor([0, 1]))[0])
    torch.testing.assert_close(pos, data.end_pos[:2])
    which, tok, pos = resample_rows(data, torch.arange(0, 5))  # sources 2, 3, 4 inside; 5, 6 past it
    assert which.tolist() == [2, 3, 4, 5, 6] and pos.tolist() == data.end_pos[5:7].tolist()
    which, tok, pos = resample_rows(data, torch.arange(0, N_PROMPTS))  # one chunk: every source inside
    assert which.tolist() == [(i + 2) % N_PROMPTS for i in range(N_PROMPTS)] and tok is None
