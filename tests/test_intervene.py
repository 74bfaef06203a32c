"""The contract of intervene.run, the only function that traces the model: resuming from a clean
residual equals a full pass, stop_after stops, read_layers indexes, write sites alias correctly,
and edits act where they say."""

import pytest
import torch

from selfrepair import load_model
from selfrepair.intervene import SITES, run

from families import CORE as FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return load_model("tiny-" + request.param, dtype="float64")


def tokens(model, b=3, s=9):
    return torch.randint(0, model.d_vocab, (b, s), generator=torch.Generator().manual_seed(1))


def test_resume_from_the_clean_residual_equals_a_full_pass(model):
    tok = tokens(model)
    full = run(model, tok, read=("block", "z", "mlp"))
    for start in range(1, model.n_layers):
        part = run(model, tok, read=("z", "mlp"), start_layer=start, resume=full.reads["block"][start - 1])
        torch.testing.assert_close(part.final_normed, full.final_normed, atol=1e-10, rtol=0)
        torch.testing.assert_close(part.final_resid, full.final_resid, atol=1e-10, rtol=0)
        # reads are the layers from start_layer on, in order
        torch.testing.assert_close(part.reads["z"], full.reads["z"][start:], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="needs `resume`"):
        run(model, tok, start_layer=1)


def test_read_layers_keeps_only_the_listed_layers_in_order(model):
    tok = tokens(model)
    full = run(model, tok, read=("z", "neurons"))
    last = model.n_layers - 1
    some = run(model, tok, read=("z", "neurons"), read_layers={"neurons": [last], "z": [0, last]})
    assert some.reads["neurons"].shape[0] == 1 and some.reads["z"].shape[0] == 2
    torch.testing.assert_close(some.reads["neurons"][0], full.reads["neurons"][last])
    torch.testing.assert_close(some.reads["z"][1], full.reads["z"][last])


def test_stop_after_returns_reads_only(model):
    tok = tokens(model)
    full = run(model, tok, read=("z",))
    p = run(model, tok, read=("z",), read_layers={"z": [0]}, stop_after=("z", 0))
    assert p.final_resid is None and p.final_normed is None
    torch.testing.assert_close(p.reads["z"][0], full.reads["z"][0])
    with pytest.raises(ValueError, match="neither read, watched nor edited"):
        run(model, tok, read=("z",), stop_after=("mlp", 0))


def test_write_sites_alias_the_raw_outputs_without_sandwich_norms(model):
    tok = tokens(model)
    p = run(model, tok, read=("attn", "attn_write", "mlp", "mlp_write"))
    if model.sandwich:  # the post-attention / post-feedforward norms' outputs
        assert not torch.allclose(p.reads["attn_write"], p.reads["attn"])
        norm = model.module(model.adapter.post_attn_norm, 0)
        with torch.no_grad():
            torch.testing.assert_close(norm(p.reads["attn"][0]), p.reads["attn_write"][0])
    else:
        assert torch.equal(p.reads["attn_write"], p.reads["attn"])
        assert torch.equal(p.reads["mlp_write"], p.reads["mlp"])


def test_edits_act_where_they_say(model):
    tok = tokens(model)
    clean = run(model, tok, read=("mlp",))
    same = run(model, tok, read=("mlp",), edits={("z", 0): lambda z: z.clone()})
    torch.testing.assert_close(same.final_normed, clean.final_normed, atol=0, rtol=0)
    moved = run(model, tok, read=("mlp",), edits={("mlp_write", model.n_layers - 1): lambda v: v * 0})
    # zeroing the last MLP's write changes the output but nothing read before it
    assert not torch.allclose(moved.final_normed, clean.final_normed)
    torch.testing.assert_close(moved.reads["mlp"][:-1], clean.reads["mlp"][:-1], atol=0, rtol=0)
    seen = []
    run(model, tok, watch=lambda site, layer, v: seen.append((site, layer)), watch_sites=("attn", "mlp"))
    assert seen == [(s, l) for l in range(model.n_layers) for s in ("attn", "mlp")]
    with pytest.raises(ValueError, match="unknown site"):
        run(model, tok, read=("nonsense",))
    assert SITES.index("z") < SITES.index("attn") < SITES.index("mlp")
