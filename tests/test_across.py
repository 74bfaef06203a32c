"""Across models (selfrepair.across): cached sweeps and the paper's released per-head values."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from selfrepair import across, experiment
from selfrepair.config import RunConfig

PAPER_HEADS = {"gpt2-small": 144, "gpt2-medium": 384, "pythia-160m": 144, "pythia-410m": 384}


@pytest.fixture(scope="module")
def paper():
    return across.load_paper_reference()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache dir with one tiny sweep in it."""
    root = tmp_path_factory.mktemp("results")
    cfg = RunConfig.from_params(model="tiny-gpt_neox", dataset="tiny", n_tokens=256, seq_len=16,
                                batch_size=4, top_percent=10, cache_dir=str(root))
    experiment.head_sweep(cfg, progress=False)
    return root


def test_reference_csv_has_the_four_models_and_quantities(paper):
    assert paper.groupby("model").size().to_dict() == PAPER_HEADS
    for name in across.QUANTITY_NAMES.values():
        assert name in paper.columns and paper[name].notna().all()
    assert paper["source"].eq("paper").all() and paper["ablation"].eq("resample").all()
    assert paper["rel_layer"].between(0, 1).all()
    assert paper.groupby("model")["n_layers"].first().to_dict() == {
        "gpt2-small": 12, "gpt2-medium": 24, "pythia-160m": 12, "pythia-410m": 24}
    assert paper.loc[paper["label"] == "L11H2", "model"].nunique() == 4


def test_reference_values_are_self_consistent(paper):
    # the authors' LayerNorm term is the remainder of eq. 2: the three parts sum to eq. 1
    parts = paper["from_norm"] + paper["from_heads"] + paper["from_mlps"]
    np.testing.assert_allclose(parts, paper["self_repair"], atol=1e-5)
    assert paper[["percent_norm_of_de", "percent_heads_of_de", "percent_mlps_of_de"]].stack().between(0, 1).all()
    late = paper[paper["rel_layer"] >= 0.5]
    assert late["self_repair"].mean() > 0  # the paper's headline, in its own numbers


def test_reference_variant_and_attribution(paper):
    other = across.load_paper_reference(variant="1.0")
    assert set(other["model"]) == {"gpt2-small", "pythia-160m"}
    readme = (across.reference_path().parent / "README.md").read_text()
    assert "starship006/backup_research" in readme and "Rushing" in readme
    assert "breakdown_self_repair" in across.PAPER_CITATION


def test_load_cached_sweeps(cache):
    ours = across.load_cached_sweeps(cache)
    assert len(ours) == 2 * 4 and set(ours["model"]) == {"tiny-gpt_neox"}
    assert ours["run"].nunique() == 1 and "resample" in ours["run"].iloc[0]
    assert set(across.COLUMNS) <= set(ours.columns)
    assert list(ours["label"][:2]) == ["L0H0", "L0H1"] and ours["rel_layer"].between(0, 1).all()
    np.testing.assert_allclose(ours["self_repair"],
                               ours["delta_logit"] - (ours["ablated_direct_effect"] - ours["direct_effect"]),
                               atol=1e-5)


def test_empty_and_damaged_caches(tmp_path, cache):
    empty = across.load_cached_sweeps(tmp_path)
    assert empty.empty and set(across.COLUMNS) <= set(empty.columns)
    bad = tmp_path / "x" / "sweep-resample-0000.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a safetensors file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert across.load_cached_sweeps(tmp_path).empty
    assert any("damaged" in str(w.message) for w in caught)


def test_compare_models_on_synthetic_heads():
    rows = []
    for layer in range(4):  # 4 layers: late = layers 2, 3 (rel_layer >= 0.5)
        for head, (de, dl) in enumerate([(1.0, -0.6), (1.0, -1.2), (-0.5, 0.1)]):
            rows.append({"source": "this project", "run": "toy (ours)", "model": "toy", "ablation": "resample",
                         "n_layers": 4, "layer": layer, "head": head, "direct_effect": de,
                         "ablated_direct_effect": 0.0, "delta_logit": dl, "from_heads": 0.0,
                         "from_mlps": 0.0, "from_norm": 0.1, "from_block_norms": 0.0})
    heads = pd.DataFrame(rows)
    heads["self_repair"] = heads["delta_logit"] + heads["direct_effect"]
    heads["rel_layer"] = heads["layer"] / 3
    table = across.compare_models(heads).iloc[0]
    assert table["frac_repaired_late"] == pytest.approx(0.5)  # head 0 repaired, head 1 over-broken
    assert table["repaired_share_late"] == pytest.approx((0.4 - 0.2) * 2 / 4)
    assert table["norm_share_late"] == pytest.approx(0.1 * 4 / 4)
    assert table["n_heads"] == 12 and table["block_norm_share_late"] == 0
    heads["from_block_norms"] = 0.05  # a sandwich-norm model: the block norms' share is reported
    table = across.compare_models(heads)
    assert table["block_norm_share_late"].iloc[0] == pytest.approx(0.05)
    assert "sandwich" in across.comparison_markdown(table)


def test_comparison_markdown(cache, paper):
    heads = across.combine(across.load_cached_sweeps(cache), paper)
    table = across.compare_models(heads)
    assert set(table["source"]) == {"this project", "paper"} and len(table) == 5
    md = across.comparison_markdown(table, current="tiny-gpt_neox")
    assert "tiny-gpt_neox" in md and "Paper models" in md and "backup_research" in md
    assert md.count("holds") + md.count("differs") == 4
    layers = across.per_layer(heads)
    assert len(layers) == 2 + 12 + 24 + 12 + 24
    empty = across.compare_models(across.combine(across.load_cached_sweeps("/nonexistent"), paper))
    assert "No sweep" in across.comparison_markdown(empty)
