"""Chapters 3 (anti-erasure neurons) and 7 (attribution patching) under ``remote=True`` against
the in-process NDIF server (tests/ndif_fake.py): one request per batch, no weight here, only the
reductions brought back, and the results equal to the local run's to 1e-6."""

import pytest
import torch

from selfrepair.atp import attribution_patching
from selfrepair.intervene import run
from selfrepair.neurons import (SCALARS, SELECTIONS, entrants, keep_top, kth_best, last_upstream_layer,
                                measure_neurons)

from remote_helpers import (FAMILIES, TOL, max_diff, ndif_server,  # noqa: F401 - a fixture
                            here_and_there, saved_dir, tensor_bytes)


def _models(tmp_path, family, serve):
    """``family``'s tiny model here (weights loaded) and under ``remote=True`` (none), and the log
    of the requests the fake server (``serve``, the ``ndif_server`` fixture) answers."""
    path = saved_dir(tmp_path, family, d_head=16)  # d_model 64: activations dwarf reductions
    log = serve(path)
    here, there = here_and_there(path, log)
    assert not there.weights_here
    return here, there, log


def _no_weights_here(model) -> None:
    assert {p.device.type for p in model.hf.parameters()} == {"meta"}


def _equal(a, b) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert max_diff(ta[k], tb[k]) <= TOL, k


def _activation_bytes(model, tok) -> int:
    """Bytes of one batch's clean ``z`` and MLP output: what a per-token readout would bring back."""
    z = run(model, tok, read=("z", "mlp")).reads
    return tensor_bytes(z)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_attribution_patching_remote_true_is_one_request_per_batch_of_sums(tmp_path, family, ablation,
                                                                           ndif_server):
    here, there, log = _models(tmp_path, family, ndif_server)
    tok = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))
    a = attribution_patching(here, tok, ablation, batch_size=4, progress=False)
    assert not log
    b = attribution_patching(there, tok, ablation, batch_size=4, progress=False)
    _no_weights_here(there)
    _equal(a, b)
    n_batches, L, H = 2, here.n_layers, here.n_heads
    mean = n_batches if ablation == "mean" else 0  # the mean z first, one request per batch
    assert len(log) == mean + n_batches
    for r in log[:mean]:  # each batch's z sums [layer, n_heads * d_head] in fp64
        assert tensor_bytes(r.saved) == L * H * here.d_head * 8
    for r, rows in zip(log[mean:], (4, 2)):  # each row's three [layer, head] sums, fp64: nothing per token
        assert tensor_bytes(r.saved) == rows * 3 * L * H * 8
        assert 10 * r.down < _activation_bytes(here, tok[:4])
    assert b.seconds_atp > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_measure_neurons_remote_true_brings_back_only_the_rows_that_can_enter_the_top_k(
        tmp_path, family, ablation, ndif_server):
    here, there, log = _models(tmp_path, family, ndif_server)
    tok = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(4))
    heads = [(0, 1), (0, 3), (last_upstream_layer(here), 2)]
    kw = dict(ablation=ablation, top_percent=2.0, batch_size=4, progress=False)
    a = measure_neurons(here, tok, heads, **kw)
    assert not log
    b = measure_neurons(there, tok, heads, **kw)
    _no_weights_here(there)
    assert a.data.keys() == b.data.keys() and a.heads == b.heads
    for key in a.data:
        assert max_diff(a.data[key], b.data[key]) <= TOL, key
    assert torch.equal(a.get("self_repair", "instance"), b.get("self_repair", "instance"))
    n_batches, per_batch, k = 2, 4 * 15, a.meta["k"]
    assert k < per_batch  # the running top-k is full after the first batch
    mean = n_batches if ablation == "mean" else 0
    assert len(log) == mean + n_batches
    d_mlp, scalar = here.d_mlp, torch.empty((), dtype=here.effect_dtype).element_size()
    row = 2 * d_mlp * scalar + len(SCALARS) * scalar + 8  # clean, delta; the scalars; the instance
    for r in log[mean:]:
        got = r.saved["out"]
        assert got.keys() == set(SELECTIONS)
        m = {sel: got[sel]["delta"].shape[1] for sel in SELECTIONS}
        assert all(m[sel] <= k < per_batch for sel in SELECTIONS), m  # never every instance's rows
        assert tensor_bytes(r.saved) == sum(len(heads) * m[sel] * row for sel in SELECTIONS)
        assert r.down <= 1.5 * tensor_bytes(r.saved) + 16_000  # pickle framing only
        every_row = len(heads) * per_batch * row  # one selection's rows of every instance
        assert 3 * r.down < every_row, (r.down, every_row)


def _rows(g, heads: int, n: int, d: int, start: int) -> dict:
    """Random rows ``[heads, n, ...]`` of instances ``start .. start + n`` (distinct scores)."""
    return {"score": torch.randn(heads, n, generator=g, dtype=torch.float64),
            "vec": torch.randn(heads, n, d, generator=g),
            "instance": torch.arange(start, start + n).expand(heads, -1)}


@pytest.mark.parametrize("k", [1, 5, 40])
def test_entrants_merge_to_the_running_top_k_of_every_row(k):
    """Merging only the entrants (per head the rows at least its k-th best so far) gives the very
    top-k that merging every row gives, batch after batch; and no fewer rows would."""
    g = torch.Generator().manual_seed(k)
    full = few = None
    for i in range(6):
        new = _rows(g, 3, 25, 4, 25 * i)
        floor = kth_best(few, k, 3)
        sub = entrants(new, new["score"], floor, k)
        reach = (new["score"] >= floor[:, None]).sum(1)
        assert sub["score"].shape[1] == min(k, int(reach.max()))  # the fewest rows that suffice
        full, few = keep_top(full, new, k), keep_top(few, sub, k)
        assert full.keys() == few.keys()
        for key in full:
            assert torch.equal(full[key], few[key]), (i, key)
    assert sub["score"].shape[1] < 25 or k >= 25  # once the top-k is full, fewer than all rows leave
