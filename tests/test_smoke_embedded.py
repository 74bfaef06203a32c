"""Smoke test on the real embedded Gemma-3-270M (marked `smoke`): loads, measures a few heads."""

import pytest
import torch

from selfrepair import EMBEDDED_MODEL, load_model
from selfrepair.direct_effect import direct_effects, readout
from selfrepair.intervene import run
from selfrepair.heads import self_repair

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def gemma():
    return load_model(EMBEDDED_MODEL)


def test_embedded_model_shape_and_provenance(gemma):
    d = gemma.describe()
    assert (d["n_layers"], d["n_heads"], d["d_head"], d["d_model"]) == (18, 4, 256, 640)
    assert d["model_type"] == "gemma3_text" and gemma.sandwich and "Q4_K_M" in d["weights"]
    assert gemma.head_out_weight(0).shape == (4, 256, 640)  # o_proj input is 1024 wide, not 640


def test_embedded_model_invariants(gemma):
    tok = gemma.tokenizer(["The Eiffel Tower is located in the city of Paris, which is",
                           "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"],
                          return_tensors="pt", padding="max_length", max_length=16,
                          truncation=True).input_ids
    p = run(gemma, tok, read=("z", "attn", "mlp"), read_embed=True)
    ro = readout(gemma, tok, p)
    de = direct_effects(gemma, tok, p, ro)
    with torch.no_grad():
        logits = gemma.hf(tok).logits.double()
    want = (logits - logits.mean(-1, keepdim=True))[:, :-1].gather(-1, tok[:, 1:, None])[..., 0]
    # the residual stream reaches ~1e3 and the logits ~10: fp32 rounding bounds this at ~1e-3
    torch.testing.assert_close(de.total().double(), want, atol=2e-3, rtol=1e-4)
    r = self_repair(gemma, tok, heads=[(0, 0), (9, 1), (17, 3)], progress=False)
    parts = r.from_heads + r.from_mlps + r.from_norm + r.from_block_norms
    ok = ~torch.isnan(r.self_repair)
    torch.testing.assert_close(parts[ok], r.self_repair[ok], atol=2e-3, rtol=1e-3)
    assert r.from_block_norms[ok].abs().max() > 0  # sandwich norms take part in the repair
