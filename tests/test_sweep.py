"""The streamed sweep: equal to the per-token API, independent of the batch size, resumable after
SIGKILL, SIGINT and SIGTERM, checksummed cache whose key ignores speed knobs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfrepair import load_model
from selfrepair.batch import TokenSet
from selfrepair.chapters.existence import Config
from selfrepair.direct_effect import top_percent_mask
from selfrepair.experiment import head_sweep, open_model, open_tokens, sweep_spec
from selfrepair.heads import self_repair
from selfrepair.measure import Cache
from selfrepair.checkpoint import progress
from selfrepair.results import CorruptResultError, load_tensors
from selfrepair.sweep import COLUMNS, ROW_COLUMNS, Sweep, run_sweep


def rows(model, n=8, seq=12, seed=0):
    return torch.randint(0, model.d_vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_sweep_equals_self_repair_on_top_tokens(family, ablation):
    model = load_model("tiny-" + family)
    tok = rows(model, n=7)  # a last batch of one row: its source comes from the whole set
    sweep = run_sweep(model, tok, ablation=ablation, batch_size=3, top_percent=10, progress=False)
    r = self_repair(model, tok, ablation=ablation, progress=False)  # rows rolled by one, as the sweep
    mask = top_percent_mask(r.direct_effect, 10)
    want = (r.self_repair * mask).sum((2, 3)) / mask.sum((2, 3))
    got = torch.tensor(sweep.per_head()["self_repair"].to_numpy()).view(want.shape).float()
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
    top = sweep.tokens_frame("top")
    assert len(top) == mask.sum() and set(top.label) == {f"L{l}H{h}" for l in range(2) for h in range(4)}
    all_mean = torch.tensor(sweep.per_head()["delta_logit_all"].to_numpy()).view(want.shape).float()
    torch.testing.assert_close(all_mean, r.delta_logit.mean((2, 3)).float(), atol=1e-5, rtol=1e-4)
    assert torch.equal(sweep.tokens, tok) and torch.equal(sweep.corrupt_tokens, torch.roll(tok, 1, 0))
    # per-row sums (what the cluster bootstrap resamples): each row's own tokens, adding up to sum_all
    for i, q in enumerate(ROW_COLUMNS):
        want_rows = getattr(r, q).sum(-1).permute(2, 0, 1).float()  # [row, layer, head]
        torch.testing.assert_close(sweep.sum_row[..., i], want_rows, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sweep.sum_row[..., i].double().sum(0),
                                   sweep.sum_all[..., COLUMNS.index(q)].double(), atol=1e-4, rtol=1e-5)
    assert sweep.main_document is None  # a bare tensor: no documents known, each row its own unit


def test_sample_is_uniform_over_instances_and_the_same_for_every_head():
    model = load_model("tiny-gpt2")
    tok = rows(model, n=8, seq=12)
    sweep = run_sweep(model, tok, ablation="zero", batch_size=4, sample_size=40, seed=2, progress=False)
    sample = sweep.tokens_frame("sample")
    per_head = sample.groupby("label")[["row", "pos"]].apply(lambda g: tuple(map(tuple, g.to_numpy())))
    assert per_head.nunique() == 1 and len(per_head.iloc[0]) == 40  # the same 40 instances per head
    r = self_repair(model, tok, ablation="zero", progress=False)
    one = sample[sample["label"] == "L1H2"]
    want = r.delta_logit[1, 2][one["row"].to_numpy(copy=True), one["pos"].to_numpy(copy=True)].numpy()
    assert abs(one["delta_logit"].to_numpy() - want).max() < 1e-5


def test_lone_last_row_equals_the_same_row_inside_a_full_batch():
    """A last batch of one row is measured with the same resample source as in a full batch."""
    model = load_model("tiny-gpt_neox")
    tok = rows(model, n=5)
    corrupt = torch.roll(tok, 2, 0)
    lone = run_sweep(model, TokenSet.from_tensor(tok, corrupt), batch_size=2, top_percent=100,
                     sample_size=0, progress=False)  # batches of 2, 2 and 1 row
    full = run_sweep(model, TokenSet.from_tensor(tok, corrupt), batch_size=5, top_percent=100,
                     sample_size=0, progress=False)
    a, b = lone.tokens_frame("top"), full.tokens_frame("top")
    last = a[a["row"] == 4].sort_values(["layer", "head", "pos"]).reset_index(drop=True)
    want = b[b["row"] == 4].sort_values(["layer", "head", "pos"]).reset_index(drop=True)
    assert len(last) == model.n_layers * model.n_heads * (tok.shape[1] - 1)
    cols = ["direct_effect", "delta_logit", "self_repair", "from_norm"]
    assert abs(last[cols].to_numpy() - want[cols].to_numpy()).max() < 1e-5


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


def _config(out_dir, **kw):
    return Config.from_params(**{**dict(model="tiny-gpt2", dataset="tiny", n_tokens=768, seq_len=16,
                                        batch_size=2, top_percent=5, cache_dir=str(out_dir)), **kw})


def _result_file(out_dir):
    cfg = _config(out_dir)
    model = open_model(cfg)
    return Cache(cfg.cache_dir).path(sweep_spec(cfg), model, open_tokens(cfg, model))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The CLI sweep run once without interruption: what every interrupted-and-resumed run below
    must equal (one run for the three of them: the same command, the same result)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    fresh = subprocess.run(_cli(out), capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    return Sweep.load(_result_file(out))


@pytest.mark.slow  # the CLI in a subprocess, killed and started again
def test_cli_sweep_killed_with_sigkill_resumes_to_identical_results(tmp_path, uninterrupted):
    out = _result_file(tmp_path / "a")
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(_cli(tmp_path / "a"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:  # wait for the first checkpoint, then kill mid-run
            if partial.exists() and progress(partial).get("resample sweep", 0) >= 2:
                break  # load_tensors would raise if a checkpoint were ever half-written
            assert proc.poll() is None, "the sweep finished before it could be interrupted"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and partial.exists()
    done_before = progress(partial)["resample sweep"]
    assert 2 <= done_before < 48
    resumed = subprocess.run(_cli(tmp_path / "a"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert out.exists() and not partial.exists()
    a, b = Sweep.load(out), uninterrupted
    for k, v in b.tensors().items():
        assert torch.equal(v, a.tensors()[k]), k
    assert a.meta["key"] == b.meta["key"] and a.meta["seed"] == 0


@pytest.mark.slow  # the CLI in a subprocess, killed and started again
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_sweep_interrupted_saves_and_resumes_to_identical_results(tmp_path, sig, uninterrupted):
    out = _result_file(tmp_path / "a")
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(_cli(tmp_path / "a"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if partial.exists() and progress(partial).get("resample sweep", 0) >= 2:
                break  # the first checkpoint (the next ones are throttled): 46 rows to go
            assert proc.poll() is None, "the sweep finished before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "resume" in err and signal.Signals(sig).name in err
    load_tensors(partial)  # intact: it loads and passes its checksum
    assert not out.exists() and 2 <= progress(partial)["resample sweep"] < 48
    resumed = subprocess.run(_cli(tmp_path / "a"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = Sweep.load(out), uninterrupted
    for k, v in b.tensors().items():
        assert torch.equal(v, a.tensors()[k]), k


def test_truncated_cache_is_detected_and_recomputed(tmp_path):
    cfg = _config(tmp_path, n_tokens=256, batch_size=4, top_percent=10)
    first = head_sweep(cfg, progress=False)
    model = open_model(cfg)
    path = Cache(cfg.cache_dir).path(sweep_spec(cfg), model, open_tokens(cfg, model))
    assert path.exists()
    key = Sweep.load(path).meta["key"]
    assert {"model", "version", "dtype"} <= set(key["model"])
    assert {"dataset", "corpus", "n_rows", "seq_len", "seed"} <= set(key["data"])
    assert {"ablation", "top_percent", "sample_size", "seed"} <= set(key["spec"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptResultError):
        Sweep.load(path)
    with pytest.warns(UserWarning, match="corrupt"):
        again = head_sweep(cfg, progress=False)
    assert torch.equal(again.sum_top, first.sum_top)
    assert Sweep.load(path).n_all == first.n_all


def _path(cfg, ablation="resample"):
    model = open_model(cfg)
    return Cache(cfg.cache_dir).path(sweep_spec(cfg, ablation), model, open_tokens(cfg, model))


def test_changed_parameters_change_the_cache_key_and_speed_knobs_do_not(tmp_path):
    base = _path(_config(tmp_path))
    for change in ({"seed": 1}, {"n_tokens": 1024}, {"seq_len": 32}, {"top_percent": 10},
                   {"dataset": "embedded"}):
        assert _path(_config(tmp_path, **change)) != base, change
    assert _path(_config(tmp_path), "zero") != base
    assert _path(_config(tmp_path, batch_size=7)) == base  # speed only
    assert _path(_config(tmp_path, n_boot=50, featured_heads=["L1H1"])) == base  # chapter-1 extras
    assert _path(_config(tmp_path, n_tokens=767)) == base  # the same whole rows


def test_results_equal_whatever_the_batch_size(tmp_path):
    a = head_sweep(_config(tmp_path / "a", n_tokens=256, batch_size=3), progress=False)
    b = head_sweep(_config(tmp_path / "b", n_tokens=256, batch_size=16), progress=False)
    torch.testing.assert_close(a.sum_all, b.sum_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.sum_row, b.sum_row, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.main_document, b.main_document) and a.main_document.shape == (len(a.tokens),)
    for kind in ("top", "sample"):  # the same tokens and values, whatever order the batches wrote them
        fa, fb = (s.tokens_frame(kind).sort_values(["layer", "head", "row", "pos"]).reset_index(drop=True)
                  for s in (a, b))
        assert fa[["layer", "head", "row", "pos"]].equals(fb[["layer", "head", "row", "pos"]])
        assert abs(fa["self_repair"] - fb["self_repair"]).max() < 1e-5
    assert a.meta["key"] == b.meta["key"]
    assert a.meta["run"]["batch_size"] == 3 and a.meta["run"]["world_size"] == 1


def test_out_of_memory_retries_with_fewer_rows_then_explains(monkeypatch):
    import selfrepair.sweep_batch as sw
    from selfrepair.errors import InputError

    model = load_model("tiny-gpt2")
    tok = rows(model, n=4)
    want = run_sweep(model, tok, batch_size=4, progress=False)
    real, calls = sw.ablate_heads, []

    def flaky(*args, **kw):
        calls.append(args[0].rows * len(args[2]))  # rows of one patched pass: batch rows x heads
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kw)

    monkeypatch.setattr(sw, "ablate_heads", flaky)
    with pytest.warns(UserWarning, match="retrying as 2 \\+ 2 with max_rows=8"):
        got = run_sweep(model, tok, batch_size=4, max_rows=16, progress=False)
    assert calls[0] == 16 and max(calls[1:]) == 8  # 4 rows x 4 heads, then 2 rows x 4 heads
    torch.testing.assert_close(got.sum_top, want.sum_top)
    assert torch.equal(got.tok_index, want.tok_index)

    def always(*args, **kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(sw, "ablate_heads", always)
    with pytest.raises(InputError, match="out of memory on one row with max_rows=1.*smaller seq_len"):
        with pytest.warns(UserWarning):
            run_sweep(model, tok, batch_size=4, max_rows=16, progress=False)


@pytest.mark.parametrize("args", [["--tokens", "20000", "--seq-len", "64"],
                                  ["--tokens", "1000", "--seq-len", "33", "--batch-size", "3"]])
def test_sweeps_with_a_last_batch_of_one_row_complete(tmp_path, args, capsys):
    """The two commands that used to run every batch and then die ("resample ablation needs a batch
    of at least 2 sequences"): 313 rows in batches of 8, and 31 rows in batches of 3."""
    from selfrepair.cli import main

    rc = main(["sweep", "--model", "tiny-gpt_neox", *args, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    path = Path(out.strip().splitlines()[-1].removeprefix("cached as "))
    sweep = Sweep.load(path)
    n_rows = -(-int(args[1]) // int(args[3]))
    assert sweep.meta["n_rows"] == n_rows and n_rows % sweep.meta["run"]["batch_size"] == 1
    assert int(sweep.n_top.sum()) > 0 and not list(tmp_path.glob("**/*.partial"))


class _SignalsWhenCollected:
    """Sends SIGTERM from its finalizer: the handler's exception is raised inside ``__del__``,
    where Python prints it and carries on (as when a signal lands in a library's finalizer)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        self.sent = True  # a bytecode after the signal: the handler runs here, inside __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost one
@pytest.mark.parametrize("when", ["mid-batch", "while-saving", "in-a-finalizer"])
def test_interruption_at_any_point_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, when):
    """SIGTERM in the middle of a batch (the batch is undone), while a checkpoint is written (the
    write completes, nothing is undone) or inside a finalizer (its exception is lost: the run stops
    at the end of the batch, saved): each way the resumed sweep equals an uninterrupted one."""
    import selfrepair.checkpoint as checkpoint
    import selfrepair.sweep_batch as batch
    from selfrepair.interrupt import Interrupted

    model = load_model("tiny-gpt2")
    tok = rows(model, n=10)
    want = run_sweep(model, tok, batch_size=2, sample_size=30, progress=False)
    calls = {"n": 0}
    sw = checkpoint if when == "while-saving" else batch  # where the driver looks each one up
    target = sw.save_tensors if when == "while-saving" else sw.ablate_heads

    def signal_once(*args, **kwargs):  # the 3rd ablated pass, or the first checkpoint write
        calls["n"] += 1
        if calls["n"] == (1 if when == "while-saving" else 3):
            if when == "in-a-finalizer":
                _SignalsWhenCollected()  # collected at once: the Interrupted is printed and lost
            else:
                os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode
        return target(*args, **kwargs)

    monkeypatch.setattr(sw, "save_tensors" if when == "while-saving" else "ablate_heads", signal_once)
    part = tmp_path / "sweep.safetensors"
    with pytest.raises(Interrupted, match="SIGTERM.*resume") as info:
        run_sweep(model, tok, batch_size=2, sample_size=30, path=part, progress=False)
    assert info.value.saved == (when != "mid-batch")
    monkeypatch.undo()
    assert not part.exists() and part.with_name(part.name + ".partial").exists()
    got = run_sweep(model, tok, batch_size=2, sample_size=30, path=part, progress=False)
    torch.testing.assert_close(got.sum_all, want.sum_all, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.sum_row, want.sum_row, atol=1e-6, rtol=1e-6)
    for kind in ("top", "sample"):
        a = got.tokens_frame(kind).sort_values(["layer", "head", "row", "pos"]).reset_index(drop=True)
        b = want.tokens_frame(kind).sort_values(["layer", "head", "row", "pos"]).reset_index(drop=True)
        assert a[["layer", "head", "row", "pos"]].equals(b[["layer", "head", "row", "pos"]]), kind
