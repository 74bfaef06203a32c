"""The CPU-testable parts of bench/bench_sweep.py and bench/gpu.sh: the FLOP count (against the
model's own weight shapes and the block passes a sweep really runs), the agreement report, the
argument parsing, and the GPU script end to end in its small CPU mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_sweep as bench  # noqa: E402

from selfrepair import load_model, run_sweep  # noqa: E402


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gemma3", "gpt2"])
def test_layer_flops_are_twice_the_block_matmul_weights_plus_attention(family):
    model = load_model("tiny-" + family)
    block = model.module(model.adapter.blocks)[0]
    weights = sum(m.weight.numel() for m in block.modules()
                  if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    shape = bench.model_shape(model)
    assert bench.layer_flops(shape, 0) == 2 * weights
    assert bench.layer_flops(shape, 10) - bench.layer_flops(shape, 0) == 4 * 10 * model.n_heads * model.d_head


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_sweep_flops_count_the_block_passes_a_sweep_runs(family):
    """Every MLP call of a real sweep counted by a hook (skipped blocks run no MLP)."""
    model = load_model("tiny-" + family)
    seen = [0]
    for layer in range(model.n_layers):
        model.module(model.adapter.mlp, layer).register_forward_hook(
            lambda mod, args, out: seen.__setitem__(0, seen[0] + out.shape[0] * out.shape[1]))
    tok = torch.randint(0, model.d_vocab, (5, 9), generator=torch.Generator().manual_seed(0))
    run_sweep(model, tok, batch_size=2, progress=False)
    shape = bench.model_shape(model)
    competitor = tok.numel() * 2 * model.d_model * model.d_vocab
    blocks = (bench.sweep_flops(shape, 5, 9) - competitor) / bench.layer_flops(shape, 9)
    assert blocks == seen[0]


def test_agreement_is_zero_for_equal_sweeps_and_sees_a_moved_share():
    model = load_model("tiny-gpt2")
    tok = torch.randint(0, model.d_vocab, (6, 12), generator=torch.Generator().manual_seed(1))
    ref = run_sweep(model, tok, batch_size=3, top_percent=25, progress=False)
    same = bench.agreement(ref, ref)
    assert same["share_pp_max"] == 0 and max(same["relative"].values()) == 0
    assert bench.default_dtype_verdict(same["share_pp_max"]) == "bfloat16"
    from selfrepair.sweep import COLUMNS, Sweep

    moved = Sweep(**{**{k: getattr(ref, k) for k in ("sum_all", "sum_top", "n_all", "n_top", "tok_index",
                                                    "tokens", "corrupt_tokens")},
                     "tok_values": ref.tok_values.clone()}, meta=ref.meta)
    col = COLUMNS.index("scale_ablated")
    first_top = (moved.tok_index[:, 3] == 1).nonzero()[0, 0]  # one top token of one head flips
    clean = moved.tok_values[first_top, COLUMNS.index("scale_clean")]
    before = bool(clean / moved.tok_values[first_top, col] > 1)
    moved.tok_values[first_top, col] = clean * (2.0 if before else 0.5)
    n_top = int(ref.n_top[tuple(moved.tok_index[first_top, :2].tolist())])
    got = bench.agreement(ref, moved)
    assert got["share_pp_max"] == pytest.approx(100 / n_top)
    assert bench.default_dtype_verdict(got["share_pp_max"]) == "float32"  # > 0.5 pp with few tokens


def test_arguments_and_peaks():
    args = bench.parser().parse_args(["--library", "sweep", "--dtypes", "float32,bfloat16",
                                      "--peak-tflops", "float32=67,bfloat16=989.4"])
    assert args.library == "sweep" and args.peak_tflops == {"float32": 67.0, "bfloat16": 989.4}
    assert bench.parser().parse_args([]).library == "self_repair"  # make bench is unchanged
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--peak-tflops", "fast"])
    assert bench.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA H200", "float32", {"float32": 50.0}) == 50.0
    assert bench.peak_tflops("some GPU", "float32") is None


def test_gpu_script_runs_end_to_end_in_its_small_cpu_mode(tmp_path):
    """bench/gpu.sh --small on CPU: the GPU tests (skipped without CUDA), the bench in both dtypes
    with its report, the random-weight Pythia-shaped directory, chapter 1 under the paper profile."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_OUT": str(tmp_path / "out"),
           "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--small"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    report = (out / "summary.txt").read_text()
    assert "GPU default dtype by the 0.5 pp rule" in report and "tokens*heads/s" in report
    assert (out / "bench.json").exists() and (out / "pythia-160m-random" / "config.json").exists()
    assert (out / "book" / "src" / "book" / "01_self_repair_exists.ipynb").exists()
    assert "chapter 1: ok" in report


def test_remote_bytes_script_reports_every_measurement_below_one_clean_pass():
    """bench/remote_bytes.py runs (its numbers are held exactly by tests/test_remote*.py): every
    measurement's largest answer is smaller than one clean pass's reads."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "remote_bytes.py")], capture_output=True,
                         text=True, timeout=600, check=True).stdout.splitlines()
    clean = float(out[0].split(": ")[1].split()[0])
    rows = [line.split() for line in out[2:]]
    assert len(rows) == 6
    for row in rows:
        requests, down = int(row[-5]), float(row[-4])
        assert requests >= 2 and 0 < down < clean / 10, row
