"""Write a random-weight model of Pythia-160M's shape (``GPTNeoXConfig``: 12 layers, 12 heads,
d_model 768, d_mlp 3072, vocabulary 50,304, parallel residual, rotary on a quarter of each head)
with ``save_pretrained``, plus the byte-level tokenizer of the tiny test models (ids 0-258, all
inside the vocabulary), so a machine without network can time the paper's model size and run the
book on it. The numbers it gives measure speed, memory and numerical agreement, not the paper's
findings.

    python bench/random_pythia.py OUT_DIR            # Pythia-160M's shape
    python bench/random_pythia.py OUT_DIR --small    # the same family, 2 layers x 4 heads (CPU checks)
"""

from __future__ import annotations

import argparse
import sys

import torch


def pythia_config(small: bool = False):
    from transformers import GPTNeoXConfig

    shape = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=256) \
        if small else dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768, intermediate_size=3072)
    return GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                         rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from selfrepair.models import tiny_tokenizer

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(pythia_config(args.small))
    model.save_pretrained(args.out)
    tiny_tokenizer().save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: random GPT-NeoX, {n / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
