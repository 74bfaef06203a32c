"""Shared fixtures: autouse seeding, and the book's notebooks executed once per session.

Keep this file small: fixtures used by one test file belong in that file.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state (python, numpy, torch)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _book_renderer():
    """Charts render as in the book (the offline renderer and theme), restored afterwards."""
    import altair as alt

    from selfrepair.figures import use_book_renderer

    renderer, theme = alt.renderers.active, alt.theme.active
    use_book_renderer()
    yield
    alt.renderers.enable(renderer)
    alt.theme.enable(theme)


@pytest.fixture(scope="session")
def executed_book(tmp_path_factory) -> SimpleNamespace:
    """Every ``book/*.ipynb`` executed with papermill on the ``tiny`` profile, in a temp dir.

    Shared by tests/test_notebooks.py (one test per chapter) and tests/test_book_browser.py
    (which builds the HTML from these executed copies). ``runs`` maps a notebook's stem to its
    :class:`selfrepair.book.ChapterRun`; ``params`` are the injected parameters.
    """
    from selfrepair.book import chapter_notebooks, execute_chapters, load_profile

    out = tmp_path_factory.mktemp("book")
    params = {**load_profile("tiny", ROOT), "cache_dir": str(out / "results")}
    runs = execute_chapters(chapter_notebooks(ROOT), params, out / "src", logs=out / "logs",
                            jobs=2, progress=False, workdir=out)  # injected: cache_dir = "results"
    return SimpleNamespace(root=ROOT, out=out, params=params, runs={r.name: r for r in runs})
