"""Chapter 5's measurement (selfrepair.hydra.hydra_effect) with ``remote=True`` against the
in-process NDIF server (tests/ndif_fake.py): no weight here, one request per chunk of prompts for
its effects after requests of ``max_rows`` prompts for the sums over every prompt, every tensor
equal to the local run's to 1e-6, and what comes back exactly the per-prompt effects and those
sums: no activation, no per-prompt ``d_model`` vector."""

from __future__ import annotations

import pytest
import torch

from selfrepair import load_model
from selfrepair.experiment import open_prompts
from selfrepair.hydra import hydra_chunks, hydra_effect

from remote_helpers import FAMILIES, TOL, max_diff, ndif_server, saved_dir, tensor_bytes  # noqa: F401 - a fixture

NOT_RETURNED = ("target", "patch_index", "parallel_residual", "input_ids")  # known here, never measured there
CASES = [("resample", 2, 4), ("mean", 1, 4), ("zero", 1, 4), ("noise", 2, 4),
         ("mean", 1, 64)]  # (ablation, P, max_rows): several chunks each; the last, one chunk


def _requests(prompts, n_patches: int, max_rows: int) -> list[tuple[str, int]]:
    """What :func:`hydra_effect` sends, in order, as (kind, prompts): one request per ``max_rows``
    prompts for the sums over every prompt (the driver's first stage); then one per chunk for its
    effects."""
    sums = [("sums", len(c)) for c in hydra_chunks(prompts, 1, max_rows)]
    return sums + [("effects", len(c)) for c in hydra_chunks(prompts, n_patches, max_rows)]


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_true_hydra_equals_the_local_run_and_brings_back_only_per_prompt_effects(tmp_path, family,
                                                                                        ndif_server):
    path = saved_dir(tmp_path, family, d_head=32)  # d_model 128: one write per prompt dwarfs its effects
    log = ndif_server(path)
    here, there = load_model(path), load_model(path, remote=True)
    assert not there.weights_here
    prompts = open_prompts(here, None, 6, 0)
    L, d = here.n_layers, here.d_model
    for ablation, P, max_rows in CASES:
        log.clear()
        kw = dict(ablation=ablation, n_patches=P, max_rows=max_rows, seed=1, progress=False,
                  noise_scale=2.0 if ablation == "noise" else None)
        a, b = hydra_effect(here, prompts, **kw), hydra_effect(there, prompts, **kw)
        case = (ablation, max_rows)
        assert a.tensors().keys() == b.tensors().keys()
        for k, v in a.tensors().items():
            assert max_diff(v, b.tensors()[k]) <= TOL, (case, k)
        if ablation != "zero":  # not vacuous: the ablation moved the logit
            assert a.delta_logit.abs().max() > 1e-3, case
        expected = _requests(prompts, P, max_rows)
        n_effects = sum(kind == "effects" for kind, _ in expected)
        assert (n_effects == 1) == (max_rows == 64), case  # both paths: several chunks and one
        assert len(log) == len(expected), case
        # per prompt, every measured field's bytes, computed from the result (all but the
        # prompts' own records): less than one d_model vector of the model's dtype
        per_prompt = sum(t[0].numel() * t.element_size() for k, t in a.tensors().items() if k not in NOT_RETURNED)
        assert per_prompt < d * 4, (case, per_prompt)
        for r, (kind, rows) in zip(log, expected):
            bound = 2 * L * (d + 1) * 8 if kind == "sums" else rows * per_prompt  # fp64 sums; the chunk's prompts
            assert tensor_bytes(r.saved) == bound, (case, kind)  # nothing else comes back
            assert r.down <= 1.5 * bound + 16_000, (case, kind, r.down, bound)  # pickle framing only
    assert {p.device.type for p in there.hf.parameters()} == {"meta"}  # nothing materialized here


def test_remote_true_noise_draws_do_not_depend_on_the_chunking(tmp_path, ndif_server):
    """Each chunk draws its prompts' noise on the server (seeded by seed and prompt) with σ from the
    sums over every prompt: three chunks there give the numbers of one chunk here (to fp32
    rounding: the batches differ)."""
    path = saved_dir(tmp_path, "llama", d_head=32)
    ndif_server(path)
    here, there = load_model(path), load_model(path, remote=True)
    prompts = open_prompts(here, None, 6, 0)
    kw = dict(ablation="noise", n_patches=2, noise_scale=1.5, seed=4, progress=False)
    one = hydra_effect(here, prompts, max_rows=64, **kw)
    three = hydra_effect(there, prompts, max_rows=4, **kw)
    for k, v in one.tensors().items():
        assert max_diff(v, three.tensors()[k]) <= 1e-5, k
    assert len(hydra_chunks(prompts, 2, 4)) == 3
    assert (one.ablated_de - one.clean_de[:, None, None]).abs().max() > 1e-3  # the noise moved it
