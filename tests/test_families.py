"""Every supported model type, exact: a tiny random model of each (transformers' own config class,
every bias and norm gain randomized, saved with ``save_pretrained``) loads from its directory,
and ``self_repair`` under resample, mean and zero ablation equals the plain-PyTorch reference
(tests/reference.py); eq. 2 closes with the norm term computed directly; the direct effects plus
the biases sum to the model's own centered logit. The model types come from the registry."""

from __future__ import annotations

import torch
import pytest

from selfrepair import load_model, self_repair
from selfrepair.batch import clean_batch
from selfrepair.direct_effect import direct_effects
from selfrepair.models import ADAPTERS, tiny_model, tiny_tokenizer

from families import ALL
from reference import _mod, capture, reference_self_repair, spec
from remote_helpers import ndif_server  # noqa: F401 - a fixture

ABLATIONS = ("resample", "mean", "zero")
QUANTITIES = ("delta_logit", "direct_effect", "ablated_direct_effect", "from_heads", "from_mlps",
              "from_norm", "from_block_norms", "scale_ablated", "self_repair")


def tokens(model, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 9), generator=g)  # 9 > the tiny models' sliding windows (4)


@pytest.fixture(scope="module")
def errors(request):
    """Each family's worst errors, printed as one table after the module's tests (past the
    output capture)."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    yield table
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None or not table:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\nfamily        dtype    vs reference   eq. 2 residual   sum of DEs - logit")
        for (name, dtype), w in sorted(table.items()):
            reporter.write_line(f"{name:<13} {dtype:<8} {w['reference']:>12.1e} {w['eq. 2']:>16.1e}"
                                f" {w['logit']:>20.1e}")


@pytest.fixture(scope="module", params=ALL)
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return request.param, path


@pytest.fixture(scope="module")
def loaded(saved):
    """``saved``'s model loaded from its directory once per dtype (the load-time check included),
    shared by the tests of one family."""
    name, path = saved
    return name, {dtype: load_model(path, dtype=dtype) for dtype in ("float64", "float32")}


def compare(model, tol: float, ablations=ABLATIONS) -> dict[str, float]:
    """The largest difference from the reference (every quantity of eq. 1 and 2) and eq. 2's
    largest residual, over ``ablations``, each on its own head of layer 0 (every later attention
    and MLP responds to it); asserts both are below ``tol``."""
    tok, corrupt = tokens(model, 1), tokens(model, 7)
    clean, source = capture(model.hf, tok), capture(model.hf, corrupt)
    worst = {"reference": 0.0, "eq. 2": 0.0}
    for head, ablation in enumerate(ablations, start=1):
        r = self_repair(model, tok, ablation=ablation, corrupt_tokens=corrupt, heads=[(0, head)],
                        progress=False)
        ref = reference_self_repair(model.hf, tok, corrupt, 0, head, ablation=ablation, clean=clean,
                                    source=source)
        assert ref["delta_logit"].abs().max() > 1e-3  # not vacuous
        for q, want in ref.items():
            got = getattr(r, q)[0, head].double()
            worst["reference"] = max(worst["reference"], float((got - want).abs().max()))
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"{ablation} {q}")
        terms = sum(getattr(r, q)[0, head] for q in ("from_heads", "from_mlps", "from_norm",
                                                     "from_block_norms"))
        torch.testing.assert_close(terms, r.self_repair[0, head], atol=tol, rtol=tol)
        worst["eq. 2"] = max(worst["eq. 2"], float((terms - r.self_repair[0, head]).abs().max()))
    return worst


def float64_tolerance(hf) -> float:
    """1e-9, or 2e-6 where the family's norms compute in float32 even in a float64 model (Hugging
    Face's RMSNorm, OLMo's and Cohere's LayerNorm): their ~1e-7 rounding is all that differs."""
    norm = _mod(hf, spec(hf).final)
    x = torch.randn(3, hf.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = (norm(x) - norm(x + 1e-12)).abs().max() > 0  # float32 arithmetic loses 1e-12
    return 1e-9 if exact else 2e-6


def logit_error(model, tol: float) -> float:
    """The direct effects of every component plus the biases against the model's own centered
    logit (a soft-capped one's cap undone): the largest difference, asserted below ``tol``."""
    tok = tokens(model, 3)
    batch = clean_batch(model, tok)
    de = direct_effects(model, tok, batch.clean, batch.readout)
    own = capture(model.hf, tok)["logits"][:, :-1].gather(-1, tok[:, 1:, None])[..., 0]
    torch.testing.assert_close(de.total().double(), own, atol=tol, rtol=tol)
    return float((de.total().double() - own).abs().max())


def test_float64_equals_the_reference_under_every_ablation_and_effects_sum_to_the_logit(loaded, errors):
    name, models = loaded
    model = models["float64"]
    assert model.hf.config.model_type in ADAPTERS[model.adapter.family].model_types
    tol = float64_tolerance(model.hf)
    errors[name, "float64"] = {**compare(model, tol), "logit": logit_error(model, tol)}


def test_float32_equals_the_reference(loaded, errors):
    name, models = loaded
    model = models["float32"]
    errors[name, "float32"] = {**compare(model, 1e-4, ablations=("resample",)), "logit": logit_error(model, 1e-4)}


def test_attention_patterns_are_the_models_own(saved, loaded):
    """The ``pattern`` site equals what the family's own eager attention returns
    (``output_attentions`` of the model loaded with ``attn_implementation="eager"``)."""
    from transformers import AutoModelForCausalLM

    from selfrepair.intervene import run

    (name, path), (_, models) = saved, loaded
    tok = tokens(None, 5)
    got = run(models["float32"], tok, read=("pattern",)).reads["pattern"]
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with torch.no_grad():
        want = torch.stack(eager(tok, output_attentions=True).attentions)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# One family per mechanism: parallel from one norm, output norms, soft-capping, multipliers,
# experts, fused QKV with ALiBi, OPT's flattened MLP and project_out, tuple blocks.
MECHANISMS = {"parallel": "gptj", "output norms": "olmo2", "soft-capping": "gemma2",
              "multipliers": "granite", "experts": "mixtral", "fused qkv, alibi": "bloom",
              "flat mlp, project_out": "opt", "tuple blocks, two norms": "falcon"}


@pytest.mark.parametrize("family", sorted(set(MECHANISMS.values())))
def test_remote_local_and_device_map_equal_the_local_run(family, tmp_path):
    """nnsight's simulation of the remote path (the request serialized and run against the
    deserialized module) and accelerate's hooks on every module give the local numbers."""
    path = tmp_path / family
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    here = load_model(path)
    there = load_model(path, remote="local")
    spread = load_model(path, device_map={n.rsplit(".", 1)[0]: "cpu"
                                          for n, _ in here.hf.named_parameters(remove_duplicate=False)})
    assert hasattr(spread.module(spread.adapter.attn_out, 0), "_hf_hook")
    tok, corrupt = tokens(here, 1), tokens(here, 7)
    a, b, c = (self_repair(m, tok, corrupt_tokens=corrupt, heads=[(0, 1), (1, 2)], progress=False)
               for m in (here, there, spread))
    for q in QUANTITIES:
        torch.testing.assert_close(getattr(b, q), getattr(a, q), atol=1e-6, rtol=1e-6, equal_nan=True)
        torch.testing.assert_close(getattr(c, q), getattr(a, q), atol=1e-6, rtol=1e-6, equal_nan=True)


def test_remote_true_without_weights_equals_the_local_run(tmp_path, ndif_server):
    """A family with tuple blocks, one shared norm and an in-place MLP sum (Falcon): its adapter is
    checked on the server at load (one request) and ``self_repair`` runs there, no weight here."""
    from remote_helpers import here_and_there, saved_dir

    path = saved_dir(tmp_path, "falcon", new_decoder_architecture=False, multi_query=True)
    log = ndif_server(path)
    here, there = here_and_there(path, log)
    assert {p.device.type for p in there.hf.parameters()} == {"meta"}
    tok, corrupt = tokens(here, 1), tokens(here, 7)
    a, b = (self_repair(m, tok, ablation="mean", corrupt_tokens=corrupt, heads=[(0, 1)], progress=False)
            for m in (here, there))
    assert log  # it ran there
    for q in QUANTITIES:
        torch.testing.assert_close(getattr(b, q), getattr(a, q), atol=1e-6, rtol=1e-6, equal_nan=True)


def test_soft_capped_delta_logit_is_the_models_own_output():
    """Gemma-2: ``delta_logit`` is before the final cap (what eq. 2 sums to, checked above), and
    ``delta_logit_capped`` is the change of the model's own (capped) output logit, centered."""
    model = load_model("tiny-gemma2", dtype="float64")
    tok = tokens(model, 1)
    r = self_repair(model, tok, ablation="zero", heads=[(0, 1)], progress=False)
    sp = spec(model.hf)
    d_head = model.d_head

    def own(zero: bool):
        def pre(mod, args):
            z = args[0].clone()
            z[..., d_head:2 * d_head] = 0
            return (z,) + args[1:]
        hook = _mod(_mod(model.hf, sp.blocks)[0], sp.o_proj).register_forward_pre_hook(pre) if zero else None
        with torch.no_grad():
            logits = model.hf(tok).logits.double()
        if hook is not None:
            hook.remove()
        logits = logits - logits.mean(-1, keepdim=True)
        return logits[:, :-1].gather(-1, tok[:, 1:, None])[..., 0]

    want = own(True) - own(False)
    assert (want - r.delta_logit[0, 1]).abs().max() > 1e-4  # the cap matters here
    torch.testing.assert_close(r.delta_logit_capped[0, 1].double(), want, atol=1e-9, rtol=1e-9)


def test_value_bias_is_every_heads_output_on_a_zero_input(loaded):
    """Attention fed zeros everywhere averages the value bias alone (its probabilities sum to 1):
    each head's ``z`` is then its kv head's slice of :meth:`Model.value_bias` (fused layouts
    included), or zero where the family has no value bias."""
    name, models = loaded
    model = models["float64"]
    hf, layer = model.hf, model.n_layers - 1
    attn = model.module(model.adapter.attn, layer)

    def zeros(mod, args, kwargs):
        if args:
            return (torch.zeros_like(args[0]),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": torch.zeros_like(kwargs["hidden_states"])}

    got = {}
    hooks = [attn.register_forward_pre_hook(zeros, with_kwargs=True),
             model.module(model.adapter.attn_out, layer).register_forward_pre_hook(
                 lambda m, args: got.__setitem__("z", args[0].detach()))]
    try:
        with torch.no_grad():
            hf(tokens(model, 2))
    finally:
        for h in hooks:
            h.remove()
    z = got["z"].reshape(3, -1, model.n_heads, model.d_head)
    b = model.value_bias(layer)
    want = torch.zeros(model.n_heads, model.d_head, dtype=z.dtype) if b is None else \
        b.repeat_interleave(model.n_heads // len(b), 0)
    # BLOOM takes its softmax in float32 even in a float64 model: each row of probabilities sums to 1
    # within a few float32 epsilons (1.2e-7), so a head's output on a zero input is b_V times that sum
    torch.testing.assert_close(z, want.expand_as(z), atol=1e-12, rtol=5e-7)
