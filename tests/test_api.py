"""The public API: the documented import line gives functions, and importing has no side effects."""

import inspect
import subprocess
import sys

import selfrepair


def test_documented_import_line_gives_functions():
    from selfrepair import load_model, run_sweep, self_repair

    for f in (load_model, self_repair, run_sweep):
        assert inspect.isfunction(f), f
    assert "self_repair" in selfrepair.__all__ and "run_sweep" in selfrepair.__all__


def test_every_public_name_exists():
    missing = [name for name in selfrepair.__all__ if not hasattr(selfrepair, name)]
    assert not missing
    no_doc = [name for name in selfrepair.__all__ if callable(getattr(selfrepair, name))
              and not inspect.getdoc(getattr(selfrepair, name))]
    assert not no_doc, f"public names without a docstring: {no_doc}"


def test_importing_changes_neither_renderer_nor_random_state():
    # a fresh interpreter: this test process has already imported (and configured) everything
    code = """
import altair as alt, torch
renderer, theme = alt.renderers.active, alt.theme.active
torch.manual_seed(123); want = torch.rand(3)
torch.manual_seed(123)
import selfrepair, selfrepair.figures, selfrepair.figures.existence, selfrepair.figures.hydra
from selfrepair import tiny_model
tiny_model("gpt2"); tiny_model("gemma3", seed=5)
assert torch.equal(torch.rand(3), want), "tiny_model or an import reseeded the global RNG"
assert (alt.renderers.active, alt.theme.active) == (renderer, theme), "an import switched Altair"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
