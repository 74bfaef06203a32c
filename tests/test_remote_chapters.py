"""Every chapter with ``remote=True`` against the in-process NDIF server (tests/ndif_fake.py): its
whole notebook as a reader runs it with ``remote="ndif"`` (every cell: the measurement, its
tables, texts, figures and exercises), with no weight here (meta device): every readout runs
inside a request, and the results it cached equal the ordinary local run's to 1e-6.

The notebook and the local run are conftest's ``chapter_runs`` (tests/chapter_runs.py), made once
per test run and shared with tests/test_remote.py and tests/test_prose.py."""

import importlib

import pytest

from selfrepair.chapters import CHAPTERS
from selfrepair.config import RunConfig

from remote_helpers import assert_same_chapter_results

# every chapter that runs a model (the scorecard only reads the others' records: it has no remote)
CHAPTER_NAMES = sorted(n for n in CHAPTERS.values()
                       if issubclass(importlib.import_module(f"selfrepair.chapters.{n}").Config, RunConfig))


@pytest.mark.parametrize("chapter", CHAPTER_NAMES)
def test_every_notebook_runs_remote_true_without_weights_and_equals_the_local_run(chapter, chapter_runs):
    run = chapter_runs.notebook(chapter)
    assert run.error is None, f"{run.notebook.name} failed under remote='ndif': {run.error!r}"
    cfg = run.ns["cfg"]
    assert cfg.remote == "ndif" and cfg.model == str(chapter_runs.path)
    assert not run.weights_here and run.devices == {"meta"}  # no weight was loaded here
    assert run.requests, "the chapter sent no request"
    local = chapter_runs.local(chapter)
    results = {None: local, "ndif": next((v for v in run.ns.values() if type(v) is type(local)), None)}
    if chapter == "intro":  # it caches nothing: its measurement's tensors are compared
        assert results["ndif"] is not None, f"{run.notebook.name} keeps no {type(local).__name__}"
    assert_same_chapter_results(chapter, results, {m: chapter_runs.cache(chapter, c) for m, c in
                                                   ((None, "local"), ("ndif", "ndif"))}, "ndif")
