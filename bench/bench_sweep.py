"""Benchmark: the library's all-heads sweep against the naive method, in one run.

The naive method is what the paper's code does: for every head, one full forward pass of the
whole model with the head patched, full-vocabulary logits, and every layer's output cached; the
quantities are then computed from those logits and caches. The library starts each ablated
pass at the ablated layer from the clean residual (nnsight ``skip``), stacks several heads along
the batch, and never materialises full-vocabulary logits (it gathers the target's unembedding row).

Both run on the same model and tokens; the script checks they agree (<= 1e-4, relative to the
logit scale) and prints tokens, heads, seconds, tokens*heads/s and peak memory for each, and,
as its last line, ``speedup: <naive seconds / library seconds>x``. Each method runs in its own
process so that the peak memory reported is its own.

    python bench/bench_sweep.py                       # embedded Gemma-3-270M, CPU, 1024 tokens
    python bench/bench_sweep.py --model EleutherAI/pythia-160m --device cuda --tokens 65536

``--library sweep`` times the streamed all-heads sweep the book runs (:func:`selfrepair.run_sweep`)
instead of the per-token API; ``--dtypes float32,bfloat16`` runs it once per dtype (each in its own
process) and reports, besides tokens*heads/s and peak memory, the FLOP count of the work
(:func:`sweep_flops`), the achieved TFLOP/s and its fraction of the chip's peak, and how far each
dtype's results are from the first's (:func:`agreement`), ending with the GPU default dtype that
rule implies: bf16 only if it moves no head's share of top tokens with ``S/S' > 1`` by more than
0.5 percentage points. ``bench/gpu.sh`` runs it that way on a GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch


# Dense peak TFLOP/s by chip and dtype (NVIDIA data sheets, SXM parts; fp32 without TF32, which
# torch leaves off for matmuls by default).
PEAK_TFLOPS = {"H200": {"float32": 67.0, "bfloat16": 989.4}, "H100": {"float32": 67.0, "bfloat16": 989.4},
               "A100": {"float32": 19.5, "bfloat16": 312.0}}
SHARE_TOLERANCE_PP = 0.5  # bf16 may move a head's share of S/S' > 1 tokens by at most this


def layer_flops(shape: dict, seq_len: int) -> int:
    """Multiply-adds x 2 of one block for one token: the q, k, v and output projections (k and v
    with ``n_kv_heads``), attention scores and weighted values over ``seq_len`` positions (the full
    square, as dense kernels compute it), and the MLP (three matrices when ``gated``)."""
    d, dh, h = shape["d_model"], shape["d_head"], shape["n_heads"]
    kv = shape.get("n_kv_heads") or h
    proj = 2 * d * (h + 2 * kv) * dh + 2 * h * dh * d
    attn = 2 * 2 * seq_len * h * dh
    mlp = 2 * d * shape["d_mlp"] * (3 if shape.get("gated") else 2)
    return proj + attn + mlp


def sweep_flops(shape: dict, n_rows: int, seq_len: int, ablation: str = "resample") -> int:
    """The FLOPs of :func:`selfrepair.run_sweep` over ``n_rows x seq_len`` tokens: pass 1 (one
    clean forward and the full-vocabulary competitor search per token), pass 2 (a clean forward,
    the resample sources' forward under resample ablation, and per head one pass from its layer
    to the last: ``n_heads * L (L + 1) / 2`` block-forwards per token). Norms, embeddings and the
    gathered readouts are left out (well under 1%)."""
    L, H = shape["n_layers"], shape["n_heads"]
    blocks = 2 * L + (L if ablation == "resample" else 0) + H * L * (L + 1) // 2
    per_token = blocks * layer_flops(shape, seq_len) + 2 * shape["d_model"] * shape["d_vocab"]
    return n_rows * seq_len * per_token


def model_shape(model) -> dict:
    cfg = model.hf.config
    gated = model.adapter.family in ("llama", "gemma3")
    return {"n_layers": model.n_layers, "n_heads": model.n_heads, "d_model": model.d_model,
            "d_head": model.d_head, "d_mlp": model.d_mlp, "d_vocab": model.d_vocab,
            "n_kv_heads": getattr(cfg, "num_key_value_heads", None) or model.n_heads, "gated": gated}


def peak_tflops(device_name: str, dtype: str, override: dict | None = None) -> float | None:
    """The chip's dense peak for ``dtype`` (``override``: ``{dtype: TFLOP/s}``), ``None`` if unknown."""
    if override and dtype in override:
        return override[dtype]
    for chip, peaks in PEAK_TFLOPS.items():
        if chip in device_name:
            return peaks.get(dtype)
    return None


def agreement(ref, other) -> dict:
    """How far sweep ``other`` (e.g. bf16) is from ``ref`` (fp32): per quantity the largest
    difference of the per-head means over all tokens and over the top tokens, relative to the
    largest per-head magnitude in ``ref``; and per head the share of its top tokens with
    ``S/S' > 1`` (each run's own top set), the largest move in percentage points."""
    from selfrepair.sweep import COLUMNS

    a, b = ref.per_head(), other.per_head()
    out = {}
    for q in COLUMNS:
        for col in (q, f"{q}_all"):
            scale = max(float(a[col].abs().max()), 1e-12)
            out[col] = float((a[col] - b[col]).abs().max()) / scale
    shares = []
    for sweep in (ref, other):
        t = sweep.tokens_frame("top")
        shares.append((t["scale_clean"] / t["scale_ablated"] > 1).groupby(t["label"]).mean() * 100)
    moved = (shares[0] - shares[1].reindex(shares[0].index)).abs()
    return {"relative": out, "share_pp_max": float(moved.max()), "share_pp_mean": float(moved.mean()),
            "share_ref_mean": float(shares[0].mean())}


def default_dtype_verdict(share_pp_max: float) -> str:
    return ("bfloat16" if share_pp_max <= SHARE_TOLERANCE_PP else "float32")


def _tokens(model, n_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token rows: from the embedded corpus when the model has a tokenizer, else random ids."""
    if model.tokenizer is not None and not model.name.startswith("tiny-"):
        from selfrepair.data import load_corpus, pack_tokens
        return pack_tokens(load_corpus("embedded"), model.tokenizer, n_tokens=n_tokens,
                           seq_len=seq_len, seed=seed, progress=False)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (-(-n_tokens // seq_len), seq_len), generator=g)


def _peak_memory(device: torch.device) -> float:
    """Peak memory of this process in MiB: GPU allocator peak on CUDA, else max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_self_repair(model, tokens: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """One full forward with full logits per head (per batch): delta_logit and self-repair."""
    from selfrepair.ablation import head_slice
    from selfrepair.data import corrupt_tokens
    from selfrepair.batch import clean_batch
    from selfrepair.direct_effect import head_effects
    from selfrepair.intervene import run

    L, H = model.n_layers, model.n_heads
    out = {q: [] for q in ("delta_logit", "self_repair")}
    corrupt_all = corrupt_tokens(tokens)  # the rows rolled by one, as the library does for a tensor
    for start in range(0, len(tokens), batch_size):
        tok = tokens[start:start + batch_size].to(model.device)
        tgt = tok[:, 1:]
        batch = clean_batch(model, tok)
        clean, ro = batch.clean, batch.readout
        corrupt = corrupt_all[start:start + batch_size].to(model.device)
        corrupt_z = run(model, corrupt, read=("z",)).reads["z"]
        with torch.no_grad():
            logits = model.hf(tok).logits.double()  # full vocabulary, as the paper's code does
        clean_logit = (logits - logits.mean(-1, keepdim=True))[:, :-1].gather(-1, tgt[..., None])[..., 0]
        dl = torch.empty(L, H, *tgt.shape, dtype=torch.float64)
        sr = torch.empty_like(dl)
        for layer in range(L):
            o_proj = model.module(model.adapter.attn_out, layer)
            da = ro.write_dir(model, "attn", layer)
            for head in range(H):
                sl = head_slice(model, head)

                def patch(mod, args, sl=sl, layer=layer):
                    z = args[0].clone()
                    z[..., sl] = corrupt_z[layer][..., sl]
                    return (z,) + args[1:]

                hook = o_proj.register_forward_pre_hook(patch)
                try:
                    with torch.no_grad():
                        lg = model.hf(tok).logits.double()
                finally:
                    hook.remove()
                new = (lg - lg.mean(-1, keepdim=True))[:, :-1].gather(-1, tgt[..., None])[..., 0]
                dl[layer, head] = new - clean_logit
                z_new = clean.reads["z"][layer].clone()
                z_new[..., sl] = corrupt_z[layer][..., sl]
                dde = (head_effects(model, z_new[:, :-1], da, layer)[head]
                       - head_effects(model, clean.reads["z"][layer][:, :-1], da, layer)[head])
                sr[layer, head] = dl[layer, head] - dde.double()
        out["delta_logit"].append(dl)
        out["self_repair"].append(sr)
    return {q: torch.cat(v, 2) for q, v in out.items()}


def _worker(method: str, args: dict, queue) -> None:
    from selfrepair import load_model, run_sweep
    from selfrepair.heads import self_repair

    torch.set_num_threads(args["threads"]) if args["threads"] else None
    model = load_model(args["model"], device=args["device"], dtype=args["dtype"])
    tokens = _tokens(model, args["tokens"], args["seq_len"], args["seed"])
    if args["random_tokens"]:
        g = torch.Generator().manual_seed(args["seed"])
        tokens = torch.randint(0, model.d_vocab, tokens.shape, generator=g)
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if method == "sweep":
        sweep = run_sweep(model, tokens, ablation="resample", batch_size=args["batch_size"],
                          max_rows=args["max_rows"], top_percent=args["top_percent"],
                          progress=args["progress"])
        res = {"delta_logit": sweep.sum_all[..., 2].double() / sweep.n_all}
    elif method == "library":
        r = self_repair(model, tokens, ablation="resample", batch_size=args["batch_size"],
                        max_rows=args["max_rows"], progress=args["progress"])
        res = {"delta_logit": r.delta_logit.double(), "self_repair": r.self_repair.double()}
    else:
        res = naive_self_repair(model, tokens, args["batch_size"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    dtype = str(model.dtype).replace("torch.", "")
    Path(args["scratch"]).mkdir(parents=True, exist_ok=True)
    torch.save(res, Path(args["scratch"]) / f"{method}.pt")
    flops = {}
    if method == "sweep":
        sweep.save(Path(args["scratch"]) / f"sweep-{dtype}.safetensors")
        n = sweep_flops(model_shape(model), tokens.shape[0], tokens.shape[1])
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        peak = peak_tflops(name, dtype, args["peak_tflops"])
        flops = {"flops": n, "tflops_per_s": n / seconds / 1e12, "chip": name, "peak_tflops": peak,
                 "peak_fraction": None if peak is None else n / seconds / 1e12 / peak}
    queue.put({"method": method, "seconds": seconds, "peak_mib": _peak_memory(dev), **flops,
               "tokens": int(tokens.numel()), "heads": model.n_layers * model.n_heads,
               "device": str(dev), "dtype": dtype,
               "logit_scale": float(res["delta_logit"].abs().mean())})


def _peaks(text: str | None) -> dict:
    """``float32=67,bfloat16=989`` -> ``{"float32": 67.0, "bfloat16": 989.0}``."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--peak-tflops takes dtype=TFLOPS pairs, got {part!r}") from None
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-rows", type=int, default=64, help="rows (heads x batch) per ablated pass")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-naive", action="store_true", help="time the library only")
    ap.add_argument("--scratch", default="bench/.scratch")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--library", choices=("self_repair", "sweep"), default="self_repair",
                    help="time the per-token API (default) or the streamed all-heads sweep")
    ap.add_argument("--dtypes", help="comma-separated dtypes, one sweep each (with --library sweep); "
                    "the first is the reference of the agreement report")
    ap.add_argument("--top-percent", type=float, default=2.0, dest="top_percent")
    ap.add_argument("--random-tokens", action="store_true", help="uniform random token ids")
    ap.add_argument("--peak-tflops", type=_peaks, default={}, help="dtype=TFLOPS pairs, e.g. "
                    "float32=67,bfloat16=989 (default: from the chip's name)")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    return ap


def _spawn(method: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(method, args, q))
    p.start()
    try:
        got = q.get()
    finally:
        p.join()
    if p.exitcode:
        raise RuntimeError(f"{method} run failed (exit {p.exitcode})")
    return got


def sweep_report(args: dict) -> int:
    """``--library sweep``: one sweep per dtype, FLOP rates, agreement with the first dtype."""
    from selfrepair.sweep import Sweep

    dtypes = (args["dtypes"] or args["dtype"] or "float32").split(",")
    stats = {}
    for dt in dtypes:
        try:
            stats[dt] = _spawn("sweep", {**args, "dtype": dt})
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    first = stats[dtypes[0]]
    print(f"model: {args['model']}  device: {first['device']} ({first['chip']})  "
          f"tokens: {first['tokens']}  heads: {first['heads']}  FLOPs of the work: {first['flops']:.3e}")
    for dt, s in stats.items():
        frac = "n/a (unknown chip: pass --peak-tflops)" if s["peak_fraction"] is None else \
            f"{100 * s['peak_fraction']:.1f}% of {s['peak_tflops']:.0f}"
        print(f"{s['dtype']:9s} seconds: {s['seconds']:9.2f}  tokens*heads/s: "
              f"{s['tokens'] * s['heads'] / s['seconds']:12.1f}  TFLOP/s: {s['tflops_per_s']:8.2f} ({frac})  "
              f"peak memory: {s['peak_mib']:9.1f} MiB")
    report = {"bench": "sweep", "stats": stats}
    if len(dtypes) > 1:
        ref = Sweep.load(Path(args["scratch"]) / f"sweep-{first['dtype']}.safetensors")
        for dt in dtypes[1:]:
            other = Sweep.load(Path(args["scratch"]) / f"sweep-{stats[dt]['dtype']}.safetensors")
            agree = agreement(ref, other)
            report[f"agreement_{stats[dt]['dtype']}"] = agree
            worst = sorted(agree["relative"].items(), key=lambda kv: -kv[1])
            print(f"{stats[dt]['dtype']} vs {first['dtype']}: largest relative differences of per-head means: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in worst[:6]))
            print("  every quantity: " + ", ".join(f"{k} {v:.2e}" for k, v in agree["relative"].items()))
            print(f"  share of top tokens with S/S' > 1: moved by at most {agree['share_pp_max']:.2f} pp "
                  f"(mean {agree['share_pp_mean']:.2f} pp; mean share {agree['share_ref_mean']:.1f}%)")
            if stats[dt]["dtype"] == "bfloat16":
                verdict = default_dtype_verdict(agree["share_pp_max"])
                report["gpu_default_dtype"] = verdict
                print(f"GPU default dtype by the {SHARE_TOLERANCE_PP} pp rule: {verdict}")
    if args["json"]:
        args["json"].write_text(json.dumps(report, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    args = vars(parser().parse_args(argv))
    if args["library"] == "sweep":
        return sweep_report(args)
    ctx = mp.get_context("spawn")
    stats = {}
    for method in (("library",) if args["skip_naive"] else ("library", "naive")):
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(method, args, q))
        p.start()
        stats[method] = q.get()
        p.join()
        if p.exitcode:
            print(f"{method} run failed (exit {p.exitcode})", file=sys.stderr)
            return 1
    lib = stats["library"]
    print(f"model: {args['model']}  device: {lib['device']}  dtype: {lib['dtype']}  "
          f"torch threads: {args['threads'] or torch.get_num_threads()}")
    print(f"tokens: {lib['tokens']}  heads: {lib['heads']}")
    for method, s in stats.items():
        rate = s["tokens"] * s["heads"] / s["seconds"]
        print(f"{method:8s} seconds: {s['seconds']:9.2f}  tokens*heads/s: {rate:12.1f}  "
              f"peak memory: {s['peak_mib']:9.1f} MiB")
    if "naive" not in stats:
        return 0
    a = torch.load(Path(args["scratch"]) / "library.pt")
    b = torch.load(Path(args["scratch"]) / "naive.pt")
    worst = max(float((a[q] - b[q]).abs().max()) for q in a)
    tol = 1e-4 * max(1.0, lib["logit_scale"])
    print(f"agreement: max |library - naive| = {worst:.2e} (tolerance {tol:.1e}) "
          f"{'OK' if worst <= tol else 'MISMATCH'}")
    print(json.dumps({"bench": "sweep", **{f"{m}_{k}": v for m, s in stats.items() for k, v in s.items()}}))
    print(f"speedup: {stats['naive']['seconds'] / lib['seconds']:.2f}x")
    return 0 if worst <= tol else 2


if __name__ == "__main__":
    sys.exit(main())
