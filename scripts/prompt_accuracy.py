"""How many factual-recall prompts a model completes correctly, per relation.

A prompt counts as completed when the model's greedy next token at the last prompt position is
the first token of the target (as tokenized after the prompt) — the rule chapter 5 uses. Prints
a Markdown table (the one in data/SOURCES.md) and, last, ``correct: <n> / <total>``.

    python scripts/prompt_accuracy.py                      # the embedded gemma-3-270m
    python scripts/prompt_accuracy.py --model gpt2 --prompts my_prompts.csv
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from selfrepair import load_model
from selfrepair.data import load_prompts, prompt_tokens


def completions(model, prompts, batch_size: int = 32):
    """Per prompt: whether the greedy next token is the target's first token."""
    pt = prompt_tokens(prompts, model.tokenizer)
    hits = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="prompts", unit="batch"):
        rows = slice(i, i + batch_size)
        with torch.no_grad():
            logits = model.hf(input_ids=pt.input_ids[rows].to(model.device),
                              attention_mask=pt.attention_mask[rows].to(model.device)).logits
        last = logits[torch.arange(logits.shape[0]), pt.last_pos[rows].to(model.device)]
        hits.append((last.argmax(-1).cpu() == pt.target_ids[rows]))
    return torch.cat(hits).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--prompts", default=None, help="CSV with subject, relation, prompt, target")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    model = load_model(args.model, device=args.device)
    prompts = load_prompts(args.prompts)
    prompts["correct"] = completions(model, prompts)
    table = prompts.groupby("relation")["correct"].agg(["sum", "count"])
    print("| relation | correct | of |\n|---|---:|---:|")
    for relation, row in table.iterrows():
        print(f"| {relation} | {int(row['sum'])} | {int(row['count'])} |")
    n, total = int(prompts["correct"].sum()), len(prompts)
    print(f"| **total** | **{n}** | **{total}** |")
    print(f"correct: {n} / {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
