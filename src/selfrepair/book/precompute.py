"""The book's measurements without papermill (``selfrepair measure``): for a GPU box or a cluster.

:func:`measure_chapters` takes what ``selfrepair book`` takes to choose what is measured (a
profile's parameters, its per-chapter overrides, the chapters, ``cache_dir``), resolves each
chapter's parameters exactly as the book does (the notebook's ``parameters`` cell, then the
profile, then the flags, absolute paths under the book's root made relative to it, run from that
root; :func:`selfrepair.book.runner.plan` validates them all first), and calls each chapter's own
``measure(cfg)`` in this process. Every cached measurement a chapter reads is so computed into the
results cache under the key the book will look up: a later ``selfrepair book`` with the same
parameters reads those entries and recomputes nothing.

Under ``torchrun`` every rank runs the same chapters; each measurement shards through the driver
(:mod:`selfrepair.driver`), rank 0 writes the entries, and every rank gets the merged result, so the
choices a chapter makes from one measurement before the next (its featured heads) are the same on
every rank.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from .runner import chapter_notebooks, plan, relative_paths


def notebook_defaults(notebook: Path) -> dict:
    """The literal values of a chapter notebook's ``parameters`` cell (what papermill's injected
    parameters override)."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return {stmt.targets[0].id: ast.literal_eval(stmt.value) for stmt in ast.parse(source).body}


def chapter_config(notebook: Path, injected: dict, root: Path):
    """The config a chapter's notebook builds when the book runs it with ``injected`` parameters."""
    from ..chapters import chapter_module

    params = {**notebook_defaults(notebook), **relative_paths(injected, root)}
    return chapter_module(notebook.stem).Config.from_params(**params)


@contextlib.contextmanager
def working_directory(path: Path):
    """Run from ``path`` (the book's root, where each notebook runs), then come back."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def measure_chapters(root: Path, params: dict, per_chapter: dict | None = None,
                     chapters: Iterable[str] | None = None, *, progress: bool = True) -> list[str]:
    """Compute every selected chapter's measurements into ``params["cache_dir"]`` (module
    docstring); returns the chapters measured. Chapters whose config caches nothing (the
    introduction's live check) are skipped: the book computes them in seconds."""
    from ..chapters import chapter_module

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 reports (and writes)
    notebooks = chapter_notebooks(root, chapters)
    by_stem = plan(notebooks, params, per_chapter)  # every chapter's parameters, before any forward pass
    done = []
    for nb in notebooks:
        with working_directory(root):
            cfg = chapter_config(nb, by_stem[nb.stem], root)
            if not hasattr(cfg, "cache_dir"):
                continue
            started = time.time()
            chapter_module(nb.stem).measure(cfg, progress=progress and main)
        if main:
            print(f"  {nb.stem:<28} measured ({time.time() - started:.1f} s)", file=sys.stderr, flush=True)
        done.append(nb.stem)
    return done


__all__ = ["chapter_config", "measure_chapters", "notebook_defaults"]
