"""Measurements over several processes (torchrun, gloo on CPU): every measurement writes the
one-process cache entry, exactly merged (one launch, tests/distributed_worker.py; the top-k%
selections on repeated rows identical); a sweep's rank resumes its own shard after one of them is
killed; another number of processes is refused with a message saying how to resume."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfrepair.checkpoint import progress
from selfrepair.distributed import World
from selfrepair.sweep import Sweep

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
SWEEP = ["sweep", "--model", "tiny-gpt2", "--dataset", "tiny", "--tokens", "768", "--seq-len", "16",
         "--batch-size", "2", "--top-percent", "5"]  # 48 rows: 24 per rank, 12 batches each
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")


def _env():
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def test_every_measurement_under_two_processes_writes_the_one_process_entry(tmp_path):
    """One torchrun launch runs all eight measurements (and the three top-k% ones on repeated
    rows); each entry has the one-process entry's name and key, its tensors equal to 1e-5 and
    its selections (integer tensors) exactly equal."""
    from driver_cases import assert_same
    from distributed_worker import measure_all

    measure_all(tmp_path / "one")
    worker = Path(__file__).with_name("distributed_worker.py")
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(worker), str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=900, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d).glob("*/*.safetensors"))
                for d in ("one", "two"))
    assert one == two and len(one) == 11, (one, two)
    assert not list((tmp_path / "two").glob("**/*.partial*"))
    kinds = {"heads", "frozen_norm", "iterative", "atp", "neurons", "sweep", "hydra", "ioi"}
    assert {p.name.split("-")[0] for p in one} == kinds
    for rel in one:
        a, b = (_result_type(rel).load(tmp_path / d / rel) for d in ("one", "two"))
        assert a.meta["key"] == b.meta["key"] and b.meta["run"]["world_size"] == 2, rel
        assert_same(b, a, exact=False)


def _result_type(path: Path):
    """The result class an entry holds (by its kind)."""
    from driver_cases import SPECS

    kind = path.name.split("-")[0]
    return next(s.result for s in SPECS.values() if s.kind == kind)


def _cmd(out: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "selfrepair.cli", *SWEEP, "--out", str(out)]
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "selfrepair.cli", *SWEEP,
            "--out", str(out)]


def _run(out: Path, nproc: int) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, nproc), capture_output=True, text=True, timeout=600, env=_env())


def _entry(out: Path) -> Path:
    files = [p for p in out.glob("*/*.safetensors")]
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    r = _run(out, 1)
    assert r.returncode == 0, r.stderr
    return _entry(out)


def _assert_same_entry(path: Path, reference: Path) -> float:
    """Same cache key and file name, every tensor equal to 1e-5; returns the largest difference."""
    a, b = Sweep.load(path), Sweep.load(reference)
    assert path.relative_to(path.parents[1]) == reference.relative_to(reference.parents[1])
    assert a.meta["key"] == b.meta["key"]
    worst = 0.0
    for k, want in b.tensors().items():
        got = a.tensors()[k]
        assert got.shape == want.shape and got.dtype == want.dtype, k
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0, msg=k)
        worst = max(worst, float((got.double() - want.double()).abs().max()) if got.numel() else 0.0)
    return worst


def test_shards_cover_every_row_once_in_rank_order():
    for n in (0, 1, 5, 48, 49):
        for size in (1, 2, 3, 8):
            shards = [World(r, size).shard(n) for r in range(size)]
            assert shards[0][0] == 0 and shards[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
            assert max(hi - lo for lo, hi in shards) - min(hi - lo for lo, hi in shards) <= 1


def test_two_processes_write_the_one_process_cache_entry(tmp_path, one_process):
    r = _run(tmp_path, 2)
    assert r.returncode == 0, r.stderr
    path = _entry(tmp_path)
    worst = _assert_same_entry(path, one_process)
    print(f"max |2 processes - 1 process| = {worst:.3g}")
    assert Sweep.load(path).meta["run"]["world_size"] == 2
    assert Sweep.load(one_process).meta["run"]["world_size"] == 1
    assert r.stdout.count("cached as") == 1  # rank 0 reports, once
    assert not list(tmp_path.glob("**/*.partial*"))


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            out += [int(k) for k in kids]
            todo += [int(k) for k in kids]
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the rank")
def test_a_killed_rank_resumes_its_shard_to_the_same_result(tmp_path, one_process):
    entry = tmp_path / one_process.relative_to(one_process.parents[1])
    rank1 = entry.with_name(entry.name + ".partial.rank1-of-2")
    rank0 = entry.with_name(entry.name + ".partial.rank0-of-2")
    proc = subprocess.Popen(_cmd(tmp_path, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env())
    deadline, killed = time.monotonic() + 300, None
    try:
        while time.monotonic() < deadline:  # rank 1 (rows 24..48) has finished a few batches
            if rank1.exists() and progress(rank1).get("resample sweep", 0) >= 28:
                killed = _rank_pid(proc.pid, 1)
                break
            assert proc.poll() is None, "the sweep finished before rank 1 could be killed"
            time.sleep(0.02)
        assert killed is not None, "rank 1's process was not found"
        os.kill(killed, signal.SIGKILL)
        _, err = proc.communicate(timeout=180)  # the launcher stops rank 0 (SIGTERM: it saves)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not entry.exists() and rank1.exists() and rank0.exists()
    at1 = progress(rank1)["resample sweep"]
    assert 28 <= at1 < 48  # rank 1 stopped mid-shard

    other = _run(tmp_path, 1)  # one process cannot use two shards' checkpoints: it says how to resume
    assert other.returncode == 2
    assert "2 processes" in other.stderr and "--nproc-per-node 2" in other.stderr
    assert not entry.exists() and rank1.exists()

    resumed = _run(tmp_path, 2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"rank 1 of 2: resuming resample sweep at row {at1} of rows 24..48" in resumed.stderr
    worst = _assert_same_entry(entry, one_process)
    print(f"max |resumed 2 processes - 1 process| = {worst:.3g}")
    assert Sweep.load(entry).meta["run"]["world_size"] == 2
    assert not list(tmp_path.glob("**/*.partial*"))


def test_the_book_under_torchrun_says_how_to_precompute_instead(monkeypatch, capsys):
    from selfrepair.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["book", "--profile", "tiny", "--no-build", "--chapters", "01"]) == 2
    err = capsys.readouterr().err
    assert "does not shard" in err and "torchrun --nproc-per-node N -m selfrepair.cli measure" in err
