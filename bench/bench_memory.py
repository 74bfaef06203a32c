"""Benchmark: peak host memory of the streamed sweep does not grow with the number of tokens.

Runs :func:`selfrepair.sweep.run_sweep` on ``--small`` and ``--large`` token counts, each in its
own process, and prints both peak resident set sizes and, last, ``memory ratio: <large/small>``
(target: <= 1.5 for 200k vs 20k tokens). The default model is a random-weight GPT-NeoX of
Pythia-14M's shape (fast on CPU); ``--model gemma-3-270m`` measures the embedded model (hours).

    python bench/bench_memory.py
    python bench/bench_memory.py --small 20000 --large 200000 --model tiny-gpt_neox
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch


def _worker(args: dict, n_tokens: int, queue) -> None:
    from selfrepair import load_model
    from selfrepair.models import tiny_model
    from selfrepair.sweep import run_sweep

    if args["model"] == "pythia-14m-shape":  # random weights; only the shape matters here
        model = load_model(tiny_model("gpt_neox", n_layers=6, n_heads=4, d_head=32, d_mlp=512,
                                      d_vocab=50304, n_ctx=2048))
    else:
        model = load_model(args["model"])
    g = torch.Generator().manual_seed(0)
    rows = -(-n_tokens // args["seq_len"])
    tokens = torch.randint(0, model.d_vocab, (rows, args["seq_len"]), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    sweep = run_sweep(model, tokens, batch_size=args["batch_size"], progress=False)
    queue.put({"tokens": int(tokens.numel()), "seconds": time.perf_counter() - t0,
               "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "after_load_mib": base, "kept_rows": int(sweep.tok_values.shape[0]),
               "heads": model.n_layers * model.n_heads})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-14m-shape")
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    args = vars(ap.parse_args(argv))
    ctx = mp.get_context("spawn")
    out = {}
    for n in (args["small"], args["large"]):
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(args, n, q))
        p.start()
        out[n] = q.get()
        p.join()
    print(f"model: {args['model']}  heads: {out[args['small']]['heads']}  seq_len: {args['seq_len']}  "
          f"batch_size: {args['batch_size']}")
    for n, s in out.items():
        print(f"tokens: {s['tokens']:8d}  seconds: {s['seconds']:8.1f}  peak RSS: {s['peak_mib']:8.1f} MiB "
              f"(after model load {s['after_load_mib']:.1f})  per-token rows kept: {s['kept_rows']}")
    ratio = out[args["large"]]["peak_mib"] / out[args["small"]]["peak_mib"]
    print(f"memory ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
