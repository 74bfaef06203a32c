"""Fail fast or finish (the rule a long-running research tool keeps): every combination of
parameters either raises InputError before the first forward pass, or runs to a result."""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from selfrepair.chapters import check, existence, hydra, iterative, layernorm, neurons
from selfrepair.errors import InputError
from selfrepair.experiment import open_model

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


class Forwards:
    """Counts forward passes of the tiny models (a pre-hook on every loaded model)."""

    def __init__(self):
        self.n = 0

    def watch(self, model):
        if not getattr(model.hf, "_counted", False):
            model.hf.register_forward_pre_hook(lambda *a, **k: setattr(self, "n", self.n + 1))
            model.hf._counted = True


FORWARDS = Forwards()


def attempt(chapter, params: dict):
    """Validate, check and measure; return "rejected" or the chapter's result, asserting that a
    rejection came before any forward pass."""
    with tempfile.TemporaryDirectory() as cache:
        try:
            cfg = chapter.Config.from_params(**params, cache_dir=cache)
            FORWARDS.watch(open_model(cfg))
            before = FORWARDS.n
            check(cfg)
        except InputError:
            event("rejected before running")
            return "rejected"
        assert FORWARDS.n == before, "check() ran the model"
        event("ran to a result")
        try:
            return chapter.measure(cfg, progress=False)
        except InputError as e:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{chapter.__name__} rejected {params} only after {FORWARDS.n - before} "
                        f"forward passes: {e}")


@st.composite
def mostly(draw, good, bad):
    """Valid values about three times out of four (a plain one_of would lean on its first, simplest
    branch while generating)."""
    return draw(bad) if draw(st.integers(0, 3)) == 3 else draw(good)


# A run's cost is its number of batches (rows / batch_size, each a few traced passes): up to 256
# tokens keeps every path (one row, a row per batch, rows of two tokens, too few rows for
# resample sources, sequences longer than the model's context) at a third of the passes of 700.
GOOD = {"n_tokens": st.integers(64, 256), "seq_len": st.integers(2, 40),
        "batch_size": st.integers(1, 9), "top_percent": st.floats(5, 100)}
ANY = {"n_tokens": st.integers(-2, 256), "seq_len": st.integers(0, 140),
       "batch_size": st.integers(-1, 9), "top_percent": st.floats(-5, 120, allow_nan=False)}


@st.composite
def corpus_params(draw):
    """Half of the examples plausible run parameters, half anything (edges and nonsense included)."""
    pick = GOOD if draw(st.booleans()) else ANY
    return {"model": draw(st.sampled_from(["tiny-gpt_neox", "tiny-gpt2"])), "dataset": "tiny",
            **{k: draw(v) for k, v in pick.items()}}


corpus = corpus_params()


@settings(max_examples=30, **SETTINGS)
@given(corpus, st.sampled_from(["resample", "mean", "zero", "resample", "noise"]),
       mostly(st.integers(10, 40), st.integers(-5, 9)),
       st.sampled_from([None, None, ["L1H0"], ["L0H3", "L1H1"], ["L5H0"], ["L1H9"]]))
def test_chapter_1_fails_fast_or_finishes(params, ablation, n_boot, heads):
    out = attempt(existence, {**params, "ablation": ablation, "n_boot": n_boot, "featured_heads": heads})
    if out != "rejected":
        assert len(out.top) and len(out.verdicts) == len(existence.CLAIMS)


@settings(max_examples=12, **SETTINGS)
@given(corpus, st.sampled_from([None, None, "L1H0", "L3H0", "bad"]))
def test_chapter_2_fails_fast_or_finishes(params, head):
    out = attempt(layernorm, {**params, "ratio_head": head})
    if out != "rejected":
        assert len(out.tokens) and len(out.check_table)


@settings(max_examples=12, **SETTINGS)
@given(corpus, st.sampled_from([None, None, "L0H1", "L1H0"]), mostly(st.integers(1, 5), st.integers(-1, 0)))
def test_chapter_3_fails_fast_or_finishes(params, fig7, n_featured):
    out = attempt(neurons, {**params, "fig7_head": fig7, "n_featured": n_featured})
    if out != "rejected":
        assert len(out.summary)


@settings(max_examples=12, **SETTINGS)
@given(corpus, st.sampled_from([[1, 3, 5], [2], [1, 3, 5], [], "x", [0.5, float("inf")]]),
       mostly(st.floats(0.01, 2), st.floats(-1, 0)))
def test_chapter_4_fails_fast_or_finishes(params, alphas, threshold):
    out = attempt(iterative, {**params, "alphas": alphas, "threshold": threshold})
    if out != "rejected":
        assert len(out.classes)


@settings(max_examples=12, **SETTINGS)
@given(st.sampled_from(["resample", "mean", "zero"]), st.sampled_from([1, 2, 3, 9, 30]),
       mostly(st.integers(1, 4), st.integers(-1, 40)), st.sampled_from([None, None, 0, 1, -1, 2]))
def test_chapter_5_fails_fast_or_finishes(ablation, n_prompts, n_patches, layer):
    out = attempt(hydra, {"model": "tiny-gpt_neox", "ablation": ablation, "n_prompts": n_prompts,
                          "n_patches": n_patches, "featured_layer": layer})
    if out != "rejected":
        assert len(out.effects) and len(out.verdicts) == len(hydra.CLAIMS)
