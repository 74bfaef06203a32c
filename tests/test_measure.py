"""``selfrepair measure``: the book's measurements without papermill.

- One process, every chapter of the tiny profile (the shared book build's cache, which ``selfrepair
  measure`` then reads without writing anything): the cache is the committed description
  of the tiny profile's cache (tests/cache_manifest.json: every key, every attribute, every tensor),
  so no change moves a cache key or a cached number unnoticed (tests/cache_manifest.py says how a
  legitimate change rebuilds it).
- ``torchrun --nproc-per-node 2`` on chapters 3 and 5 writes the same entries as one process
  (tensors to 1e-5, selections exactly), and ``selfrepair book`` on those chapters afterwards
  recomputes nothing: every entry is read, none is written again, none is added.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cache_manifest
from driver_cases import assert_same

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def _entries(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(cache).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in cache.glob("*/*.safetensors")}


@pytest.fixture(scope="module")
def one_process(book, tmp_path_factory) -> Path:
    """Every chapter of the tiny profile measured in one process: the results cache the shared book
    build wrote (conftest's ``book``, the same parameters), copied; ``selfrepair measure`` over
    every chapter on it then reads every entry and writes none (the same keys, nothing recomputed)."""
    from selfrepair.cli import main

    assert all(run.ok for run in book.runs.values()), f"the tiny book's build failed:\n{book.log}"
    out = tmp_path_factory.mktemp("one") / "results"
    shutil.copytree(book.results, out)
    before = _entries(out)
    assert main(["measure", "--profile", "tiny", "--cache-dir", str(out), "--root", str(ROOT)]) == 0
    assert _entries(out) == before, "selfrepair measure computed an entry the book did not write"
    return out


def test_the_tiny_profile_cache_matches_its_committed_description(one_process):
    want = json.loads(cache_manifest.MANIFEST.read_text())
    problems = cache_manifest.differences(cache_manifest.describe(one_process), want)
    assert not problems, "\n".join(problems + ["(a legitimate change: rebuild with "
                                               ".venv/bin/python tests/cache_manifest.py)"])


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_write_the_one_process_entries_and_the_book_recomputes_nothing(tmp_path, one_process):
    from selfrepair.measure import Spec

    cache = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = ["--profile", "tiny", "--chapters", "03", "05", "--cache-dir", str(cache), "--root", str(ROOT)]
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "selfrepair.cli", "measure", *args],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("measured 2 chapter(s)") == 1  # rank 0 reports
    written = _entries(cache)
    kinds = sorted(name.split("/")[1].split("-")[0] for name in written)
    # chapter 3 reads the sweep first, then its neurons and each neuron's clean DE on the distribution
    assert kinds == ["hydra", "hydra", "neuron_baseline", "neurons", "sweep"], kinds
    results = {s.kind: s.result for s in Spec.__subclasses__()}
    for name in written:
        a, b = (results[name.split("/")[1].split("-")[0]].load(d / name) for d in (one_process, cache))
        assert a.meta["key"] == b.meta["key"] and b.meta["run"]["world_size"] == 2, name
        assert_same(b, a, exact=False)
    assert not list(cache.glob("**/*.partial*"))

    from selfrepair.cli import main

    assert main(["book", *args, "--no-build", "--out", str(tmp_path / "book")]) == 0
    assert _entries(cache) == written  # every entry read as it was: nothing recomputed or added


def test_killed_with_sigkill_mid_measurement_it_resumes_to_the_uninterrupted_entries(tmp_path, one_process):
    """``selfrepair measure`` on chapter 3, SIGKILLed right after the neurons' first checkpoint (the
    sweep before them is written), started again: the neurons resume from their checkpoint and both
    entries equal the uninterrupted run's, bit for bit."""
    import signal
    import time

    from selfrepair.checkpoint import progress
    from selfrepair.neurons import NeuronResult
    from selfrepair.sweep import Sweep

    cache = tmp_path / "results"
    cmd = [sys.executable, "-m", "selfrepair.cli", "measure", "--profile", "tiny", "--chapters", "03",
           "--cache-dir", str(cache), "--root", str(ROOT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while not list(cache.glob("*/neurons-*.partial")):
            assert proc.poll() is None and time.monotonic() < deadline, "the neurons never checkpointed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = next(cache.glob("*/neurons-*.partial"))
    assert 0 < progress(partial)["neurons"] < 16 and not list(cache.glob("*/neurons-*.safetensors"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming neurons at row" in r.stderr and not partial.exists()
    for kind, result in (("sweep", Sweep), ("neurons", NeuronResult)):
        (entry,) = cache.glob(f"*/{kind}-*.safetensors")
        want = result.load(one_process / entry.relative_to(cache))
        assert_same(result.load(entry), want, exact=True)
