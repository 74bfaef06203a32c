"""Every chapter's measurement with ``remote=True`` against the in-process NDIF server
(tests/ndif_fake.py): the model here holds no weights (meta device), every readout runs inside a
request, and the cached results equal the ordinary local run's to 1e-6."""

import importlib
from pathlib import Path

import pytest
import torch

from selfrepair.book import load_profile
from selfrepair.chapters import CHAPTERS
from selfrepair.experiment import _model

from remote_helpers import assert_same_chapter_results, ndif_server, saved_dir  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_NAMES = sorted(CHAPTERS.values())


@pytest.mark.parametrize("chapter", CHAPTER_NAMES)
def test_every_chapter_runs_remote_true_without_weights_and_equals_the_local_run(tmp_path, chapter,
                                                                                   ndif_server):
    mod = importlib.import_module(f"selfrepair.chapters.{chapter}")
    profile = load_profile("tiny", ROOT)
    profile.pop("chapters", None)
    family = profile["model"].removeprefix("tiny-")
    path = saved_dir(tmp_path, family)
    log = ndif_server(path)
    names = set(mod.Config.field_names())
    results = {}
    _model.cache_clear()
    try:
        for remote in (None, "ndif"):
            params = {k: v for k, v in profile.items() if k in names} | {"model": str(path)}
            if "cache_dir" in names:
                params["cache_dir"] = str(tmp_path / str(remote))
            cfg = mod.Config.from_params(**params, remote=remote)
            if remote is None:
                assert not log, "the local run sent a request"
            results[remote] = mod.measure(cfg, progress=False)
        there = _model(str(path), cfg.device, cfg.dtype, "ndif")
        assert there.remote is True and not there.weights_here
        assert {p.device.type for p in there.hf.parameters()} == {"meta"}  # no weight was loaded here
    finally:
        _model.cache_clear()
    assert log, "the remote chapter sent no request"
    assert_same_chapter_results(chapter, results, {r: tmp_path / str(r) for r in (None, "ndif")}, "ndif")


def _run_notebook_here(notebook: Path, params: dict, workdir: Path) -> dict:
    """Every code cell of ``notebook`` executed in this process (so the in-process server
    answers its requests), the parameters cell followed by ``params`` as papermill injects them."""
    import contextlib
    import io
    import os

    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    ns: dict = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                exec(compile(cell.source, f"{notebook.name}", "exec"), ns)  # noqa: S102 - our own book
                if "parameters" in cell.metadata.get("tags", []):
                    ns.update(params)
    finally:
        os.chdir(cwd)
    return ns


@pytest.mark.parametrize("chapter", CHAPTER_NAMES)
def test_every_notebook_runs_remote_true_without_weights(tmp_path, chapter, ndif_server):
    """The whole chapter as a reader runs it with ``remote="ndif"``: every cell, not only the
    measurement (its tables, texts, figures and exercises), with no weight on this machine."""
    from selfrepair.book import chapter_notebooks
    from selfrepair.book.runner import chapter_params

    notebook = next(nb for nb in chapter_notebooks(ROOT)
                    if CHAPTERS[nb.name[:2]] == chapter)
    profile = load_profile("tiny", ROOT)
    per_chapter = profile.pop("chapters", None)
    path = saved_dir(tmp_path, profile["model"].removeprefix("tiny-"))
    log = ndif_server(path)
    params = chapter_params(notebook, {**profile, "model": str(path), "remote": "ndif",
                                       "cache_dir": str(tmp_path / "results")}, per_chapter)
    _model.cache_clear()
    try:
        ns = _run_notebook_here(notebook, params, tmp_path)
        there = _model(str(path), ns["cfg"].device, ns["cfg"].dtype, "ndif")
        assert ns["cfg"].remote == "ndif" and ns["cfg"].model == str(path) and not there.weights_here
        assert {p.device.type for p in there.hf.parameters()} == {"meta"}
    finally:
        _model.cache_clear()
    assert log, "the chapter sent no request"
