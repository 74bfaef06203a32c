"""The streamed sweep: equal to the per-token API, resumable after SIGKILL, checksummed cache."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfrepair import load_model
from selfrepair.config import RunConfig
from selfrepair.direct_effect import top_percent_mask
from selfrepair.experiment import cache_path, cache_params, head_sweep, open_model
from selfrepair.results import CorruptResultError, load_tensors
from selfrepair.heads import self_repair
from selfrepair.sweep import Sweep, run_sweep


def rows(model, n=8, seq=12, seed=0):
    return torch.randint(0, model.d_vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_sweep_equals_self_repair_on_top_tokens(family, ablation):
    model = load_model("tiny-" + family)
    tok = rows(model)
    sweep = run_sweep(model, tok, ablation=ablation, batch_size=4, top_percent=10, progress=False)
    batches = (tok[:4], tok[4:]) if ablation == "resample" else (tok,)  # resample pairs rows in a batch
    parts = [self_repair(model, b, ablation=ablation, progress=False) for b in batches]
    sr = torch.cat([p.self_repair for p in parts], 2)
    de = torch.cat([p.direct_effect for p in parts], 2)
    mask = top_percent_mask(de, 10)
    want = (sr * mask).sum((2, 3)) / mask.sum((2, 3))
    got = torch.tensor(sweep.per_head()["self_repair"].to_numpy()).view(want.shape).float()
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
    top = sweep.tokens("top")
    assert len(top) == mask.sum() and set(top.label) == {f"L{l}H{h}" for l in range(2) for h in range(4)}
    all_mean = torch.tensor(sweep.per_head()["delta_logit_all"].to_numpy()).view(want.shape).float()
    torch.testing.assert_close(all_mean, torch.cat([p.delta_logit for p in parts], 2).mean((2, 3)).float(),
                               atol=1e-5, rtol=1e-4)


def test_same_seed_gives_identical_results(tmp_path):
    model = load_model("tiny-gpt2")
    tok = rows(model)
    a = run_sweep(model, tok, batch_size=4, seed=3, progress=False)
    b = run_sweep(model, tok, batch_size=4, seed=3, progress=False)
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k


CLI = ["sweep", "--model", "tiny-gpt2", "--dataset", "tiny", "--tokens", "768", "--seq-len", "16",
       "--batch-size", "2", "--top-percent", "5"]


def _cli(out_dir):
    return [sys.executable, "-m", "selfrepair.cli", *CLI, "--out", str(out_dir)]


def _result_file(out_dir):
    cfg = RunConfig.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=768, seq_len=16,
                                batch_size=2, top_percent=5, cache_dir=str(out_dir))
    return cache_path(cfg, "sweep-resample",
                      cache_params(cfg, open_model(cfg), ablation="resample", kind="head_sweep"))


def test_cli_sweep_killed_with_sigkill_resumes_to_identical_results(tmp_path):
    out = _result_file(tmp_path / "a")
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(_cli(tmp_path / "a"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:  # wait for a few checkpoints, then kill mid-run
            if partial.exists() and int(load_tensors(partial)[0]["next"]) >= 3:
                break  # load_tensors would raise if a checkpoint were ever half-written
            assert proc.poll() is None, "the sweep finished before it could be interrupted"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and partial.exists()
    done_before = int(load_tensors(partial)[0]["next"])
    assert 3 <= done_before < 24
    resumed = subprocess.run(_cli(tmp_path / "a"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert out.exists() and not partial.exists()
    fresh = subprocess.run(_cli(tmp_path / "b"), capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    a, b = Sweep.load(out), Sweep.load(_result_file(tmp_path / "b"))
    for k, v in b.tensors().items():
        assert torch.equal(v, a.tensors()[k]), k
    assert a.meta["params"] == b.meta["params"] and a.meta["seed"] == 0


def test_truncated_cache_is_detected_and_recomputed(tmp_path):
    cfg = RunConfig.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=256, seq_len=16,
                                batch_size=4, top_percent=10, cache_dir=str(tmp_path))
    first = head_sweep(cfg, progress=False)
    path = cache_path(cfg, "sweep-resample", cache_params(cfg, open_model(cfg), ablation="resample",
                                                           kind="head_sweep"))
    assert path.exists()
    meta = Sweep.load(path).meta
    for key in ("model", "dataset", "n_tokens", "seed", "version"):
        assert key in meta["params"], key
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptResultError):
        Sweep.load(path)
    with pytest.warns(UserWarning, match="corrupt"):
        again = head_sweep(cfg, progress=False)
    assert torch.equal(again.sum_top, first.sum_top)
    assert Sweep.load(path).n_all == first.n_all


def test_changed_parameters_change_the_cache_key(tmp_path):
    base = dict(model="tiny-gpt2", dataset="tiny", n_tokens=256, seq_len=16, cache_dir=str(tmp_path))
    a, b = RunConfig.from_params(**base), RunConfig.from_params(**base, seed=1)
    m = open_model(a)
    pa = cache_path(a, "sweep-resample", cache_params(a, m, ablation="resample"))
    pb = cache_path(b, "sweep-resample", cache_params(b, m, ablation="resample"))
    assert pa != pb and pa.parent == pb.parent


def test_out_of_memory_retries_once_with_fewer_rows_then_explains(monkeypatch):
    import selfrepair.sweep as sw
    from selfrepair.errors import InputError

    model = load_model("tiny-gpt2")
    tok = rows(model, n=4)
    want = run_sweep(model, tok, batch_size=4, progress=False)
    real, calls = sw.ablate_heads, []

    def flaky(*args, **kw):
        calls.append(len(args[5]))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kw)

    monkeypatch.setattr(sw, "ablate_heads", flaky)
    with pytest.warns(UserWarning, match="retrying with 8"):
        got = run_sweep(model, tok, batch_size=4, max_rows=16, progress=False)
    assert calls[0] == 4 and max(calls[1:]) == 2  # 16 rows / 4 = 4 heads, then 8 / 4 = 2
    torch.testing.assert_close(got.sum_top, want.sum_top)

    def always(*args, **kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(sw, "ablate_heads", always)
    with pytest.raises(InputError, match="out of memory even with max_rows=8.*smaller batch_size"):
        with pytest.warns(UserWarning):
            run_sweep(model, tok, batch_size=4, max_rows=16, progress=False)
