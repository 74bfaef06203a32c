"""Every measurement of the book as a small case for the driver's tests (tests/test_driver.py,
tests/test_distributed.py and its torchrun worker): a spec on tiny-gpt_neox, its data and the
speed knobs that give each stage several batches.

``CASES`` names the eight measurements (heads, frozen-norm, iterative, AtP, neurons, sweep, Hydra,
IOI); ``TIES`` the ones that select top-k% tokens, measured on a token set whose rows repeat (exact
ties across rows) by :func:`tied_tokens`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from selfrepair import load_model
from selfrepair.atp import AtpSpec
from selfrepair.batch import TokenSet
from selfrepair.frozen_norm import FrozenNormSpec
from selfrepair.heads import HeadsSpec
from selfrepair.hydra import HydraSpec
from selfrepair.iterative import AmplifySpec
from selfrepair.measure import RunOptions
from selfrepair.name_movers import IoiSpec
from selfrepair.neurons import NeuronSpec
from selfrepair.sweep import SweepSpec

MODEL = "tiny-gpt_neox"
SPECS = {
    "heads": HeadsSpec(heads=((0, 1), (1, 2), (1, 3)), ablation="mean"),  # the mean z stage too
    "frozen_norm": FrozenNormSpec(heads=((1, 0), (1, 3))),
    "iterative": AmplifySpec(alphas=(1.0, 3.0), top_percent=10.0),
    "atp": AtpSpec(),
    "neurons": NeuronSpec(heads=((0, 1), (0, 2)), top_percent=10.0),
    "sweep": SweepSpec(top_percent=10.0, sample_size=40),
    "hydra": HydraSpec(n_patches=2),
    "ioi": IoiSpec(ablation="resample"),
}
CASES = tuple(SPECS)
TIES = ("iterative", "neurons", "sweep")  # every measurement that selects top-k% tokens
OPTIONS = {"hydra": RunOptions(max_rows=4, progress=False),  # 2 prompts a chunk, 4 a sums request
           "ioi": RunOptions(batch_size=4, progress=False)}
DEFAULT = RunOptions(batch_size=3, max_rows=8, progress=False)


@lru_cache(maxsize=1)
def model():
    return load_model(MODEL)


def tokens(n: int = 10, seq: int = 12, seed: int = 0) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    return TokenSet.from_tensor(torch.randint(0, model().d_vocab, (n, seq), generator=g))


def tied_tokens() -> TokenSet:
    """16 rows of which only 6 differ (each repeated, the copies spread over the set): every
    repeated row's direct effects tie exactly with its copies', so a top-k% selection meets ties
    that straddle its k-th value; the resample sources, rolled by one, repeat with them."""
    g = torch.Generator().manual_seed(5)
    distinct = torch.randint(0, model().d_vocab, (6, 12), generator=g)
    order = torch.tensor([0, 1, 2, 3, 0, 4, 1, 5, 2, 0, 3, 4, 1, 5, 2, 0])
    rows = distinct[order]
    return TokenSet.from_tensor(rows, rows[(torch.arange(16) + 7) % 16])


@lru_cache(maxsize=1)
def _prompts():
    from selfrepair.experiment import open_prompts

    return open_prompts(model(), None, 8, 0)


@lru_cache(maxsize=1)
def _ioi_prompts():
    from selfrepair import ioi

    return ioi.ioi_prompts(model().tokenizer, 8, names=list(ioi.LETTER_NAMES))


def data(name: str, tied: bool = False):
    """The data ``name`` measures: prompts for Hydra and IOI, else a token set."""
    if name == "hydra":
        return _prompts()
    if name == "ioi":
        return _ioi_prompts()
    return tied_tokens() if tied else tokens()


def compute(name: str, data, options: RunOptions):
    """``SPECS[name]`` on ``data`` through the driver. Hydra's spec takes at least 128 rows a pass
    (the book's chunks); :func:`selfrepair.hydra.effects` takes ``options`` as given, so its 8
    prompts make several chunks here."""
    if name == "hydra":
        from selfrepair.hydra import effects

        return effects(SPECS[name], model(), data, options)
    return SPECS[name].compute(model(), data, options)


_REFERENCES: dict = {}


def reference(name: str):
    """``name``'s uninterrupted one-process result with its default options (computed once)."""
    if name not in _REFERENCES:
        _REFERENCES[name] = compute(name, data(name), options(name))
    return _REFERENCES[name]


def options(name: str, **changes) -> RunOptions:
    from dataclasses import replace

    return replace(OPTIONS.get(name, DEFAULT), **changes)


def selections(name: str, result) -> dict[str, torch.Tensor]:
    """The integer tensors that say which tokens a top-k% measurement selected."""
    if name == "sweep":
        return {"tok_index": result.tok_index, "n_top": result.n_top}
    if name == "iterative":
        return {"instance": result.data["instance"]}
    return {k: v for k, v in result.data.items() if k.endswith("/instance")}


def assert_same(a, b, *, exact: bool, tol: float = 1e-5) -> None:
    """Two results of one spec: the same tensors (bit for bit when ``exact``, else to ``tol``;
    integer tensors always exactly) and the same attributes (wall times aside)."""
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        w = tb[k]
        assert v.shape == w.shape and v.dtype == w.dtype, k
        if exact or not v.is_floating_point():
            assert torch.equal(v.nan_to_num(0.0), w.nan_to_num(0.0)) and torch.equal(v.isnan(), w.isnan()), k
        else:
            torch.testing.assert_close(v, w, atol=tol, rtol=0, equal_nan=True, msg=k)
    timeless = lambda d: {k: v for k, v in d.items() if not k.startswith("seconds")}  # noqa: E731
    assert timeless(a.attributes()) == timeless(b.attributes())
