"""The model families the tests run on, all from the adapter registry: ``ALL`` is one tiny model
per supported model type (tests/test_families.py, tests/test_adapter_check.py run every one);
``CORE`` the four whose layouts the deeper tests of each measurement exercise — LayerNorm with
Conv1D weights (gpt2), a parallel residual (gpt_neox), RMSNorm with grouped-query attention
(llama) and sandwich norms with a head size apart from ``d_model / n_heads`` (gemma3)."""

from selfrepair.models import ADAPTERS, tiny_names

ALL = tiny_names()
CORE = ["gpt2", "gpt_neox", "llama", "gemma3"]
assert set(CORE) <= set(ALL) and all(f in ADAPTERS for f in CORE)
