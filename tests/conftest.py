"""Shared fixtures: autouse seeding, the book built once per session, every chapter run once per
mode (here, ``remote="local"``, its notebook with ``remote="ndif"``).

Keep this file small: fixtures used by one test file belong in that file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# Tests that need one of these session fixtures are marked `slow` (see pytest_collection_modifyitems).
SLOW_FIXTURES = {"book", "chapter_runs"}
# Whole files of integration tests, marked `slow` too: each test runs a script, a CLI in a subprocess,
# torchrun, a pip install or nnsight's remote path (every trace serialized and replayed) end to end.
SLOW_MODULES = {"test_remote", "test_remote_hydra", "test_remote_neurons_atp", "test_remote_ioi", "test_bench",
                "test_book_families", "test_distributed", "test_packaging"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """``slow``: every test that needs the book built or a chapter run (the session fixtures below),
    loads the real model (``smoke``), is in a file of :data:`SLOW_MODULES` or is marked ``slow`` by
    hand; ``make test-fast`` (``pytest -m "not slow"``) leaves them out, ``make test`` runs everything.

    Under pytest-xdist (``make test`` runs ``-n auto --dist loadgroup``) each test is in one group
    that a single worker runs (:func:`_group`): the tests of the book together, so it is built once;
    those of one chapter's runs together, so each is made once; every other test with the rest of
    its file, so a module-scoped fixture (a tiny model, a measured chapter) is made once."""
    for item in items:
        shared = sorted(SLOW_FIXTURES & set(item.fixturenames))
        if shared or item.get_closest_marker("smoke") or item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(_group(item, shared)))


def _group(item, shared: list[str]) -> str:
    """The xdist group of a test: its file's, the book's, or one chapter's runs (``chapter_runs`` is
    made chapter by chapter, so the tests of one chapter share a worker and the chapters spread)."""
    if not shared:
        return item.path.stem
    chapter = getattr(item, "callspec", None) and item.callspec.params.get("chapter")
    return f"chapter_runs-{chapter}" if shared == ["chapter_runs"] and chapter else shared[0]


def pytest_configure(config):
    """A pytest-xdist worker computes with one thread: the workers already share the cores. Every
    test process reuses freed memory (:func:`selfrepair.allocator.keep_freed_memory`), as the book does."""
    from selfrepair.allocator import keep_freed_memory

    keep_freed_memory()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


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
def book(tmp_path_factory):
    """The book built once per test run, as the Pages workflow's build step builds it (``make
    book`` on the ``tiny`` profile, in a copy of the repository): tests/book_helpers.py. Shared by
    tests/test_notebooks.py (one test per chapter), test_prose.py, test_book_browser.py and
    test_workflows.py."""
    from book_helpers import build_book

    return build_book(tmp_path_factory.mktemp("book") / "repo")


@pytest.fixture(scope="session")
def chapter_runs(tmp_path_factory):
    """Every chapter once per mode on a saved tiny model, each run made when first asked for:
    here, ``remote="local"`` and its whole notebook with ``remote="ndif"`` (tests/chapter_runs.py)."""
    from chapter_runs import ChapterRuns

    return ChapterRuns(tmp_path_factory.mktemp("chapters"))
