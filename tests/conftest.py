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
# Integration tests, marked `slow` too (each a second or more): a script, torchrun, a pip install, the
# chapters on saved models, or a whole measurement through nnsight's remote path (every trace
# serialized and replayed) on every family. The other tests of their files stay in the unit layer.
SLOW_TESTS = {
    "test_gpu_script_runs_end_to_end_in_its_small_cpu_mode", "test_remote_bytes_script_reports_every_measurement_below_one_clean_pass",
    "test_one_chapter_per_mechanism_runs_on_its_saved_model", "test_a_killed_rank_resumes_its_shard_to_the_same_result",
    "test_every_measurement_under_two_processes_writes_the_one_process_entry",
    "test_two_processes_write_the_one_process_cache_entry", "test_core_installs_and_runs_without_the_book",
    "test_attention_patterns_remote_local_equal_the_local_ones", "test_chapter_measurements_remote_local_equal_the_local_ones",
    "test_cli_sweep_remote_local_equals_the_local_sweep", "test_cli_sweep_remote_true_without_weights_equals_the_local_sweep",
    "test_end_position_passes_remote_equal_local", "test_reads_patches_and_passes_equal_the_local_run",
    "test_remote_true_amplification_and_frozen_norms_equal_the_local_run",
    "test_remote_true_holds_no_weights_and_brings_back_only_the_reductions", "test_the_gradient_pass_equals_the_local_one",
    "test_remote_true_hydra_equals_the_local_run_and_brings_back_only_per_prompt_effects",
    "test_remote_true_noise_draws_do_not_depend_on_the_chunking",
    "test_ioi_measure_remote_true_equals_the_local_run_and_brings_back_only_reductions",
    "test_attribution_patching_remote_true_is_one_request_per_batch_of_sums",
    "test_measure_neurons_remote_true_brings_back_only_the_rows_that_can_enter_the_top_k"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """``slow``: every test that needs the book built or a chapter run (the session fixtures below),
    loads the real model (``smoke``), is one of :data:`SLOW_TESTS` or is marked ``slow`` by
    hand; ``make test-fast`` (``pytest -m "not slow"``) leaves them out, ``make test`` runs everything.

    Under pytest-xdist (``make test`` runs ``-n auto --dist loadgroup``) each test is in one group
    that a single worker runs (:func:`_group`): the tests of the book together, so it is built once;
    those of one chapter's runs together, so each is made once; every other test with the rest of
    its file, so a module-scoped fixture (a tiny model, a measured chapter) is made once."""
    for item in items:
        shared = sorted(SLOW_FIXTURES & set(item.fixturenames))
        if shared or item.get_closest_marker("smoke") or item.originalname in SLOW_TESTS:
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
