"""Every chapter run once per mode on one tiny model saved as a directory, shared by the tests that
compare the modes (conftest's session fixture ``chapter_runs``; each run is made the first time a
test asks for it):

- ``local(chapter)``: its measurement here, the reference of the other modes;
- ``simulated(chapter)``: its measurement through nnsight's simulation of the remote path
  (``remote="local"``; tests/test_remote.py);
- ``notebook(chapter)``: its whole notebook with ``remote="ndif"`` against the in-process NDIF
  server of tests/ndif_fake.py (no weight here), every cell run in this process by IPython, its
  measurement included and its displayed outputs kept (tests/test_remote_chapters.py, and
  tests/test_prose.py reads their prose).

The model is tiny Llama (sequential blocks, RMSNorm, grouped key/value heads), so the prose of a
second family is checked without a second build of the book (which is tiny GPT-NeoX: parallel
residual, LayerNorm); each mode's results land in their own cache under ``root / mode / chapter``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from remote_helpers import saved_dir

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "llama"


@dataclass
class NotebookRun:
    """One chapter notebook run in this process with ``remote="ndif"``."""

    notebook: Path  # the chapter's notebook (book/*.ipynb)
    ns: dict  # the notebook's namespace after its last cell
    markdown: list[str]  # every Markdown output, in order
    error: BaseException | None  # the first cell's error (the cells after it did not run)
    requests: int  # requests the in-process server answered
    weights_here: bool  # whether the model of the notebook held any weight in this process
    devices: set = field(default_factory=set)  # the device types of its parameters


def notebook_of(chapter: str) -> Path:
    from selfrepair.book import chapter_notebooks
    from selfrepair.chapters import CHAPTERS

    return next(nb for nb in chapter_notebooks(ROOT) if CHAPTERS[nb.name[:2]] == chapter)


def run_cells(notebook: Path, params: dict, workdir: Path) -> tuple[dict, list[str], BaseException | None]:
    """Every code cell of ``notebook`` run by an IPython shell in this process (the parameters
    cell followed by ``params``, as papermill injects them; the last expression of a cell displayed
    as Jupyter displays it). Returns the namespace, the Markdown outputs and the first error."""
    import nbformat
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    nb = nbformat.read(notebook, as_version=4)
    hooks, cwd = (sys.displayhook, sys.excepthook), os.getcwd()
    shell, markdown, error = InteractiveShell.instance(), [], None
    os.chdir(workdir)
    try:
        for cell in (c for c in nb.cells if c.cell_type == "code"):
            with capture_output() as out:
                result = shell.run_cell(cell.source, store_history=False)
            markdown += [o.data["text/markdown"] for o in out.outputs if "text/markdown" in o.data]
            if not result.success:
                error = result.error_in_exec or result.error_before_exec
                break
            if "parameters" in cell.metadata.get("tags", []):
                shell.user_ns.update(params)
        return dict(shell.user_ns), markdown, error
    finally:
        os.chdir(cwd)
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


class ChapterRuns:
    def __init__(self, root: Path):
        from selfrepair.book import load_profile

        self.root, self.path = root, saved_dir(root, FAMILY)
        self.profile = load_profile("tiny", ROOT)
        self.per_chapter = self.profile.pop("chapters", None)
        self._done: dict[tuple[str, str], object] = {}
        self._server = None

    def cache(self, chapter: str, mode: str) -> Path:
        return self.root / mode / chapter

    def params(self, chapter: str, mode: str) -> dict:
        from selfrepair.book.runner import chapter_params

        return chapter_params(notebook_of(chapter), {**self.profile, "model": str(self.path),
                                                     "cache_dir": str(self.cache(chapter, mode))},
                              self.per_chapter)

    def _once(self, chapter: str, mode: str, fn):
        from selfrepair.experiment import _model

        if (chapter, mode) not in self._done:
            _model.cache_clear()
            try:
                self._done[(chapter, mode)] = fn()
            finally:
                _model.cache_clear()
        return self._done[(chapter, mode)]

    def _measure(self, chapter: str, mode: str, remote):
        from selfrepair.chapters import chapter_module

        mod = chapter_module(notebook_of(chapter).stem)
        return mod.measure(mod.Config.from_params(**self.params(chapter, mode), remote=remote), progress=False)

    def local(self, chapter: str):
        """The chapter's measurement here (cached under ``cache(chapter, "local")``)."""
        return self._once(chapter, "local", lambda: self._measure(chapter, "local", None))

    def simulated(self, chapter: str):
        """The chapter's measurement with ``remote="local"`` (nnsight's simulation)."""
        return self._once(chapter, "simulated", lambda: self._measure(chapter, "simulated", "local"))

    def notebook(self, chapter: str) -> NotebookRun:
        """The chapter's notebook with ``remote="ndif"`` against the in-process server."""
        return self._once(chapter, "ndif", lambda: self._notebook(chapter))

    def _notebook(self, chapter: str) -> NotebookRun:
        from nnsight.modeling.mixins.remotable import Remotable

        from ndif_fake import FakeNDIF
        from selfrepair.models import loading
        from selfrepair.experiment import _model
        from selfrepair.remote import remote_wrapper

        if self._server is None:
            self._server = remote_wrapper(str(self.path), dtype=torch.float32)
        log, server = [], self._server
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
            mp.setattr(loading, "_ndif_source", lambda src, revision: None)
            mp.setattr(Remotable, "_remote_backend", lambda self, *a: FakeNDIF(server, log))
            ns, markdown, error = run_cells(notebook_of(chapter), {**self.params(chapter, "ndif"),
                                                                   "remote": "ndif"}, self.root)
            cfg = ns.get("cfg")
            # the scorecard's config names no device: it loads no model and only reads verdict records
            there = None if getattr(cfg, "device", None) is None else \
                _model(str(self.path), cfg.device, cfg.dtype, "ndif")
        return NotebookRun(notebook_of(chapter), ns, markdown, error, len(log), there is None or there.weights_here,
                           set() if there is None else {p.device.type for p in there.hf.parameters()})
