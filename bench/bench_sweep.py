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
    from selfrepair import load_model
    from selfrepair.heads import self_repair

    torch.set_num_threads(args["threads"]) if args["threads"] else None
    model = load_model(args["model"], device=args["device"], dtype=args["dtype"])
    tokens = _tokens(model, args["tokens"], args["seq_len"], args["seed"])
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if method == "library":
        r = self_repair(model, tokens, ablation="resample", batch_size=args["batch_size"],
                        max_rows=args["max_rows"], progress=args["progress"])
        res = {"delta_logit": r.delta_logit.double(), "self_repair": r.self_repair.double()}
    else:
        res = naive_self_repair(model, tokens, args["batch_size"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    Path(args["scratch"]).mkdir(parents=True, exist_ok=True)
    torch.save(res, Path(args["scratch"]) / f"{method}.pt")
    queue.put({"method": method, "seconds": seconds, "peak_mib": _peak_memory(dev),
               "tokens": int(tokens.numel()), "heads": model.n_layers * model.n_heads,
               "device": str(dev), "dtype": str(model.dtype).replace("torch.", ""),
               "logit_scale": float(res["delta_logit"].abs().mean())})


def main(argv=None) -> int:
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
    args = vars(ap.parse_args(argv))
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
