"""The remote path (NDIF) simulated offline with nnsight's ``remote="local"``: every trace is
serialized and deserialized with local modules hidden, then run. Reads, patches, the ablated
passes, the CLI sweep and every chapter's measurement equal the ordinary local run to 1e-6; the
errors for a missing key, an unreachable server, a model NDIF does not host and an in-memory
model each say what failed."""

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from selfrepair import load_model, self_repair
from selfrepair.batch import clean_batch
from selfrepair.errors import InputError, RemoteError
from selfrepair.intervene import gradients, run
from selfrepair.models import tiny_model, tiny_tokenizer
from selfrepair.passes import ablate_heads, ablate_writes, amplify_heads

from remote_helpers import (FAMILIES, TOL, assert_same_chapter_results, cached, max_diff,  # noqa: F401
                            here_and_there, ndif_server, saved_dir, tensor_bytes)


@pytest.fixture
def traces(monkeypatch):
    """Counts the traces that went through nnsight's local simulation of the remote path."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    count, real = [0], LocalSimulationBackend.__call__

    def counted(self, tracer):
        count[0] += 1
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", counted)
    return count


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_patches_and_passes_equal_the_local_run(tmp_path, family, traces):
    path = saved_dir(tmp_path, family)
    here, there = load_model(path), load_model(path, remote="local")
    assert there.remote == "local" and type(there.nn).__name__ == "TransformersModel"
    tok = torch.randint(0, here.d_vocab, (3, 9), generator=torch.Generator().manual_seed(1))
    got = {}
    for m in (here, there):
        full = run(m, tok, read=("z", "attn", "attn_write", "mlp", "neurons", "block"), read_embed=True)
        edited = run(m, tok, read=("mlp",), start_layer=1, resume=full.reads["block"][0],
                     edits={("z", 1): lambda z: z * 0.5, ("mlp_write", 1): lambda v: v + 1.0},
                     watch=lambda s, l, v: v[:, -1].sum(-1), watch_sites=("attn",),
                     final=lambda r, n: (r[:, -1], n.norm(dim=-1)))
        batch = clean_batch(m, tok, torch.roll(tok, 1, 0))
        repl = batch.replacement("resample")
        pos = torch.tensor([8, 5, 7])
        prompts = clean_batch(m, tok, last_pos=pos)  # the Hydra chapter's readout at each last position
        got[m.remote] = {
            "reads": full.reads, "final_resid": full.final_resid, "embed": full.embed,
            "edited_mlp": edited.reads["mlp"], "watched": edited.watched[("attn", 1)],
            "final_last": edited.final[0], "final_norm": edited.final[1],
            "heads": ablate_heads(batch, 0, [0, 3], repl[0], neuron_layer=1),
            "frozen_norms": ablate_heads(batch, 0, [1], repl[0], freeze="norms"),
            "norms_only": ablate_heads(batch, 0, [2], repl[0], freeze="components"),
            "amplify": amplify_heads(batch, 1, [1, 2], (0.5, 2.0)),
            "writes": ablate_writes(prompts, pos, 1, prompts.clean.reads["mlp"][0][[1, 2, 0], pos[[1, 2, 0]]],
                                    torch.zeros(3, 2 * here.n_layers)),
        }
    assert traces[0] >= 8  # every pass of the remote model went through the simulated remote path
    assert got[False]["watched"].shape == (3,)  # what a watch returns is what comes back
    for name in got[False]:
        assert max_diff(got[False][name], got["local"][name]) <= TOL, name


def test_a_tiny_model_name_is_saved_and_wrapped_with_the_same_weights(traces):
    here, there = load_model("tiny-llama"), load_model("tiny-llama", remote="local")
    assert traces[0] == 1  # the remote load ran its load-time check as one trace
    traces[0] = 0
    assert there.name == "tiny-llama" and Path(there.nn.repo_id).is_dir()
    for (n, p), (_, q) in zip(here.hf.named_parameters(), there.hf.named_parameters()):
        assert torch.equal(p, q), n
    tok = torch.randint(0, 259, (2, 6), generator=torch.Generator().manual_seed(0))
    a, b = run(here, tok, read=("z",)), run(there, tok, read=("z",))
    assert traces[0] == 1 and max_diff(a.reads, b.reads) <= TOL


def test_a_shipped_model_references_the_servers_modules_and_carries_no_weights(tmp_path):
    """What a trace's closures take along: the model pickles with its modules as nnsight's
    persistent ids, so the copy the server rebuilds reads the server's weights, not shipped ones."""
    from nnsight.intervention.serialization import dumps, loads

    from selfrepair.remote import ship_library

    tiny_model("gpt2", d_head=32, d_mlp=1024).save_pretrained(tmp_path)  # 2.3 MB of weights
    m = load_model(tmp_path, remote="local")
    ship_library()
    blob = dumps(m)
    weights = sum(p.numel() * p.element_size() for p in m.hf.parameters())
    assert len(blob) < weights / 4, (len(blob), weights)
    copy = loads(blob, m.nn._remoteable_persistent_objects())
    assert copy.hf is m.hf and copy.nn._module is m.hf and copy.tokenizer is None
    assert copy.module(copy.adapter.attn_out, 1) is m.module(m.adapter.attn_out, 1)
    assert copy.envoy(copy.adapter.final_norm)._module is m.module(m.adapter.final_norm)


def test_cli_sweep_remote_local_equals_the_local_sweep(tmp_path, capsys, traces):
    from selfrepair.cli import main

    path = saved_dir(tmp_path, "gpt_neox")
    args = ["sweep", "--model", str(path), "--dataset", "tiny", "--tokens", "192", "--seq-len", "16",
            "--batch-size", "4", "--top-percent", "10"]
    assert main([*args, "--out", str(tmp_path / "here")]) == 0
    assert traces[0] == 0
    assert main([*args, "--remote", "local", "--out", str(tmp_path / "there")]) == 0
    # the load-time check (one trace), then one session per batch (3 batches) and pass (clean, ablated)
    assert traces[0] == 1 + 2 * 3
    capsys.readouterr()
    here, there = cached(tmp_path / "here"), cached(tmp_path / "there")
    assert here.keys() == there.keys() and len(here) == 1  # the same cache key: remote is not in it
    (a, ma), (b, mb) = here.popitem()[1], there.popitem()[1]
    assert a.keys() == b.keys()
    for k in a:
        assert max_diff(a[k], b[k]) <= TOL, k
    assert ma["key"] == mb["key"] and ma["run"]["remote"] is False and mb["run"]["remote"] == "local"


CHAPTERS = ["intro", "existence", "layernorm", "neurons", "iterative", "hydra", "across", "atp", "ioi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gradient_pass_equals_the_local_one(tmp_path, family, traces):
    """Chapter 7's backward pass: its ``with metric.backward():`` runs in a function of its own,
    which nnsight finds by its source line (a block nested in the traced body is re-generated
    source under the remote path, whose lines are not the file's)."""
    path = saved_dir(tmp_path, family)
    here, there = load_model(path), load_model(path, remote="local")
    tok = torch.randint(0, here.d_vocab, (2, 8), generator=torch.Generator().manual_seed(3))
    metric = lambda resid, normed: (normed[:, :-1] * resid[:, 1:]).sum()  # noqa: E731
    traces[0] = 0  # loading a saved folder the remote way runs its load-time check as one trace
    a, b = gradients(here, tok, metric), gradients(there, tok, metric)
    assert traces[0] == 1
    assert a.z.shape == (here.n_layers, 2, 8, here.n_heads * here.d_head)
    assert float(a.z.abs().sum()) > 0  # not the empty backward
    assert max_diff(a.z, b.z) <= TOL and max_diff(a.final_resid, b.final_resid) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma3"])
def test_end_position_passes_remote_equal_local(family):
    """Chapter 8's passes that need no attention pattern (the name movers' ablation at the end, the
    residual-moving pass) run through the remote simulation and agree with the local run."""
    from selfrepair import ioi, load_model
    from selfrepair import name_movers as nm
    from selfrepair.batch import clean_batch
    from selfrepair.prompt_passes import ablate_heads_at, moved_residual_de

    out = {}
    for remote in (False, "local"):
        m = load_model(f"tiny-{family}", remote=remote)
        data = ioi.ioi_prompts(m.tokenizer, 8, names=list("ABCDEFGH"))
        tok, pos = data.rows(torch.arange(len(data)))
        b = clean_batch(m, tok, last_pos=pos)
        b.readout = nm.diff_readout(m, b.clean, pos, data.io_token, data.s_token)
        zero = torch.zeros(1, m.n_heads * m.d_head)
        out[remote] = {**ablate_heads_at(b, pos, [(0, 1), (1, 2)], {0: zero, 1: zero}).tensors(),
                       "moved": moved_residual_de(b, pos, 0, 1)}
    for key, value in out[False].items():
        torch.testing.assert_close(out["local"][key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma3"])
def test_attention_patterns_remote_local_equal_the_local_ones(family, traces):
    """The pattern site (the ``attention_interface`` call's inputs through nnsight ``.source``, the
    probabilities computed in the trace) runs through the remote simulation, and the model's own
    attention implementation is left as it was there too."""
    from selfrepair import load_model
    from selfrepair.intervene import run

    tok = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(2))
    here, there = load_model(f"tiny-{family}"), load_model(f"tiny-{family}", remote="local")
    assert traces[0] == 1  # the remote load ran its load-time check as one trace
    traces[0] = 0
    a, b = run(here, tok, read=("pattern",)), run(there, tok, read=("pattern",))
    assert traces[0] == 1
    assert a.reads["pattern"].shape == (here.n_layers, 2, here.n_heads, 21, 21)
    assert max_diff(a.reads, b.reads) <= TOL
    assert there.hf.config._attn_implementation == here.hf.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_measurements_remote_local_equal_the_local_ones(chapter, chapter_runs, traces):
    """Each chapter's measurement on a saved tiny model (conftest's ``chapter_runs``: the local run
    is the one tests/test_remote_chapters.py compares its notebook with)."""
    local = chapter_runs.local(chapter)
    traces[0] = 0
    results = {None: local, "local": chapter_runs.simulated(chapter)}
    assert traces[0] > 0, "the remote-local chapter ran no trace through the remote path"
    assert_same_chapter_results(chapter, results, {None: chapter_runs.cache(chapter, "local"),
                                                   "local": chapter_runs.cache(chapter, "simulated")}, "local")


def test_remote_flag_reaches_every_chapter_as_the_remote_parameter():
    from selfrepair.cli import _flags, parser

    assert _flags(parser().parse_args(["book", "--profile", "tiny", "--remote", "local"]))["remote"] == "local"
    assert _flags(parser().parse_args(["sweep", "--remote", "--model", "m"]))["remote"] == "ndif"
    assert "remote" not in _flags(parser().parse_args(["sweep", "--model", "m"]))
    with pytest.raises(SystemExit):
        parser().parse_args(["sweep", "--remote", "elsewhere"])


# -- errors ------------------------------------------------------------------------------------
@pytest.fixture
def ndif(monkeypatch):
    """nnsight's configuration, restored afterwards: no key, default host."""
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(CONFIG.API, "HOST", CONFIG.API.HOST)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    return CONFIG


def test_remote_without_a_key_says_how_to_set_one(ndif):
    with pytest.raises(RemoteError, match="needs an NDIF API key.*NDIF_API_KEY.*nnsight.login"):
        load_model("EleutherAI/pythia-70m", remote=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_named(ndif):
    ndif.API.APIKEY = "test-key"
    ndif.API.HOST = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RemoteError, match=f"server at {ndif.API.HOST} is unreachable"):
        load_model("EleutherAI/pythia-70m", remote=True)


def test_a_model_ndif_does_not_host_lists_the_hosted_ones(ndif):
    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server protocol
            body = json.dumps({"deployments": {"a": {"repo_id": "openai-community/gpt2"},
                                               "b": {"repo_id": "meta-llama/Llama-3.1-8B"}}}).encode()
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ndif.API.APIKEY = "test-key"
        ndif.API.HOST = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(RemoteError, match="'EleutherAI/pythia-70m' is not hosted.*NDIF hosts only "
                           r"the models it lists.*nnsight.status\(\).*openai-community/gpt2"):
            load_model("EleutherAI/pythia-70m", remote=True)
    finally:
        server.shutdown()


def test_models_the_remote_path_cannot_name_are_refused(tmp_path, ndif):
    with pytest.raises(InputError, match="in-memory GPT2LMHeadModel remotely.*hub id or a directory"):
        load_model(tiny_model("gpt2"), remote="local")
    with pytest.raises(InputError, match="'tiny-gpt2' cannot run on NDIF.*remote='local'"):
        load_model("tiny-gpt2", remote=True)
    with pytest.raises(InputError, match="local directory, which NDIF cannot load"):
        load_model(saved_dir(tmp_path, "gpt2"), remote=True)
    with pytest.raises(InputError, match="unknown remote 'yes'"):
        load_model("tiny-gpt2", remote="yes")


# -- remote=True against a server in this process (tests/ndif_fake.py) ------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_remote_true_holds_no_weights_and_brings_back_only_the_reductions(tmp_path, family, ndif_server):
    from selfrepair.errors import RemoteError
    from selfrepair.sweep import COLUMNS, ROW_COLUMNS, run_sweep

    path = tmp_path / family
    tiny_model(family, d_head=32).save_pretrained(path)  # d_model 128: activations dwarf reductions
    tiny_tokenizer().save_pretrained(path)
    log = ndif_server(path)
    here, there = load_model(path), load_model(path, remote=True)
    assert there.remote is True and not there.weights_here and there.device == torch.device("cpu")
    assert {p.device.type for p in there.hf.parameters()} == {"meta"}  # nothing materialized here
    tok = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))

    # one trace, one request: what it reads comes back whole (the full-activation yardstick)
    full = run(there, tok[:4], read=("z", "attn", "mlp", "block"), read_embed=True)
    assert max_diff(full.reads, run(here, tok[:4], read=("z", "attn", "mlp", "block")).reads) <= TOL
    clean_pass = log[-1].down
    assert clean_pass >= tensor_bytes(full.reads)
    with pytest.raises(RemoteError, match="weights are not loaded here.*outside a remote session"):
        clean_batch(there, tok[:4])  # a readout here needs the weights
    log.clear()

    a = run_sweep(here, tok, batch_size=4, sample_size=20, progress=False)
    b = run_sweep(there, tok, batch_size=4, sample_size=20, progress=False)
    for k, v in a.tensors().items():
        assert max_diff(v, b.tensors()[k]) <= TOL, k
    assert len(log) == 2 * 2  # one session per batch (2) and pass: clean and every ablated pass
    L, H, C, n = here.n_layers, here.n_heads, len(COLUMNS), 4 * 31  # 4 rows x 31 positions a batch
    for i, r in enumerate(log):
        if i < 2:  # pass 1: per head and token one DE, per token its instance and competitor gap
            bound = L * H * n * 4 + n * (8 + 4)
        else:  # pass 2: per head the sums and counts (and per row of the batch its sums of
            # ROW_COLUMNS), per returned token row its index and values
            rows = sum(len(t) for t in r.saved["out"]["index"])
            bound = L * H * (2 * C * 8 + 8 + 4 * len(ROW_COLUMNS) * 4) + rows * (4 * 8 + C * 4)
        assert tensor_bytes(r.saved) == bound, i  # nothing else comes back
        assert r.down <= 1.5 * bound + 16_000, (i, r.down, bound)  # pickle framing only
        assert 10 * r.down < clean_pass, (i, r.down, clean_pass)  # never the activations

    # chapter 0's listed heads, mean ablation: the mean z and the ablations, a request per batch each
    log.clear()
    heads = [(0, 1), (1, 2), (1, 3)]
    a, b = (self_repair(m, tok, "mean", heads=heads, batch_size=4, progress=False) for m in (here, there))
    for k, v in a.tensors().items():
        assert max_diff(v, b.tensors()[k]) <= TOL, k
    assert len(log) == 2 + 2 and all(10 * r.down < clean_pass for r in log)


def test_cli_sweep_remote_true_without_weights_equals_the_local_sweep(tmp_path, capsys, ndif_server):
    from selfrepair.cli import main

    path = saved_dir(tmp_path, "gemma3")
    log = ndif_server(path)
    args = ["sweep", "--model", str(path), "--dataset", "tiny", "--tokens", "192", "--seq-len", "16",
            "--batch-size", "4", "--top-percent", "10"]
    assert main([*args, "--out", str(tmp_path / "here")]) == 0 and not log
    assert main([*args, "--remote", "--out", str(tmp_path / "there")]) == 0
    assert len(log) == 1 + 2 * 3  # the load-time check; 12 rows, 3 batches, two passes
    capsys.readouterr()
    here, there = cached(tmp_path / "here"), cached(tmp_path / "there")
    assert here.keys() == there.keys() and len(here) == 1
    (a, ma), (b, mb) = here.popitem()[1], there.popitem()[1]
    for k in a:
        assert max_diff(a[k], b[k]) <= TOL, k
    assert ma["key"] == mb["key"] and mb["run"]["remote"] is True


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_remote_true_amplification_and_frozen_norms_equal_the_local_run(tmp_path, family, ndif_server):
    """Chapters 4 and 2's own measurements: one request per batch, no weights here."""
    from selfrepair.batch import TokenSet
    from selfrepair.frozen_norm import frozen_norm_ablation
    from selfrepair.iterative import measure_iterative

    path = saved_dir(tmp_path, family)
    log = ndif_server(path)
    here, there = here_and_there(path, log)
    assert not there.weights_here
    tok = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(2))
    heads = [(0, 2), (1, 0), (1, 3)]
    a, b = (measure_iterative(m, tok, (0.5, 2.0), heads=heads, batch_size=4, progress=False)
            for m in (here, there))
    for k, v in a.tensors().items():
        assert max_diff(v, b.tensors()[k]) <= TOL, k
    assert len(log) == 2  # 6 rows, 2 batches
    log.clear()
    data = TokenSet.from_tensor(tok)
    a, b = (frozen_norm_ablation(m, data, heads, batch_size=4, progress=False) for m in (here, there))
    for k, v in a.tensors().items():
        assert max_diff(v, b.tensors()[k]) <= TOL, k
    assert len(log) == 2
