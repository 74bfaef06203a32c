"""What each measurement's remote requests bring back, against one clean pass's reads.

Runs every measurement of the book with ``remote=True`` on a tiny random Gemma-3 (d_model 128)
against the NDIF server of ``tests/ndif_fake.py`` (in this process, no network) and prints, per
measurement, the number of requests and the largest request's bytes down and up. Usage::

    .venv/bin/python bench/remote_bytes.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ndif_fake import FakeNDIF  # noqa: E402 - the test suite's server
from nnsight.modeling.mixins.remotable import Remotable  # noqa: E402

from selfrepair import ioi, load_model, models, self_repair  # noqa: E402
from selfrepair.atp import attribution_patching  # noqa: E402
from selfrepair.experiment import open_prompts  # noqa: E402
from selfrepair.hydra import hydra_effect  # noqa: E402
from selfrepair.intervene import run  # noqa: E402
from selfrepair.name_movers import ioi_measure  # noqa: E402
from selfrepair.neurons import measure_neurons  # noqa: E402
from selfrepair.remote import remote_wrapper  # noqa: E402
from selfrepair.sweep import run_sweep  # noqa: E402


def main() -> None:
    path = Path(tempfile.mkdtemp()) / "tiny-gemma3"
    models.tiny_model("gemma3", d_head=32).save_pretrained(path)
    models.tiny_tokenizer().save_pretrained(path)
    server, log = remote_wrapper(str(path), dtype=torch.float32), []
    models.loading._ndif_source = lambda src, revision: None  # the fake server hosts this directory
    Remotable._remote_backend = lambda self, *a: FakeNDIF(server, log)
    m = load_model(path, remote=True)
    tok = torch.randint(0, m.d_vocab, (8, 32), generator=torch.Generator().manual_seed(0))
    run(m, tok[:4], read=("z", "attn", "mlp", "block"), read_embed=True)
    print(f"d_model {m.d_model}; one clean pass's reads of 4 rows x 32 tokens: {log[-1].down / 1e3:.0f} kB")
    prompts = open_prompts(m, None, 24, 0)
    names = ioi.ioi_prompts(m.tokenizer, 12, names=list(ioi.LETTER_NAMES))
    cases = {
        "sweep, 8 rows (two passes)": lambda: run_sweep(m, tok, batch_size=4, sample_size=20, progress=False),
        "self_repair, 3 heads": lambda: self_repair(m, tok, heads=[(0, 1), (1, 2), (1, 3)], batch_size=4,
                                                    progress=False),
        "neurons, 2 heads": lambda: measure_neurons(m, tok, [(0, 1), (1, 2)], batch_size=4, top_percent=2,
                                                    progress=False),
        "AtP, every head": lambda: attribution_patching(m, tok, batch_size=4, progress=False),
        "Hydra resample, 24 prompts": lambda: hydra_effect(m, prompts, n_patches=3, max_rows=24,
                                                           progress=False),
        "IOI mean, 12 prompts": lambda: ioi_measure(m, names, ablation="mean", batch_size=4, progress=False),
    }
    print(f"{'measurement':30s} {'requests':>8s} {'down max':>10s} {'up max':>10s}")
    for name, measure in cases.items():
        log.clear()
        measure()
        print(f"{name:30s} {len(log):8d} {max(r.down for r in log) / 1e3:8.1f} kB "
              f"{max(r.up for r in log) / 1e3:8.1f} kB")


if __name__ == "__main__":
    main()
