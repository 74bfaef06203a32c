"""The measurement layer's contract: the paper profile resolves to the paper's heads, every chapter's
parameters are validated before anything runs, cache keys hold exactly what a measurement reads,
and a failed write leaves the previous entry intact."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from selfrepair.book.runner import chapter_notebooks, load_profile, plan
from selfrepair.chapters import chapter_module, existence, featured, hydra, iterative, layernorm, neurons
from selfrepair.errors import InputError
from selfrepair.experiment import head_sweep, open_model, open_prompts, open_tokens, sweep_spec
from selfrepair.measure import Cache
from selfrepair.models import load_model
from selfrepair.results import ResultWriteError
from selfrepair.sweep import Sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny-gpt_neox", dataset="tiny", n_tokens=256, seq_len=16, batch_size=4,
            top_percent=10)


def _paper_configs() -> dict:
    profile = load_profile("paper", ROOT)
    per_chapter = profile.pop("chapters")
    return {stem: chapter_module(stem).Config.from_params(**params)
            for stem, params in plan(chapter_notebooks(ROOT), profile, per_chapter, check=False).items()}


def _per_head(n_layers: int, n_heads: int, seed: int = 0) -> pd.DataFrame:
    """A synthetic Sweep.per_head() frame of a model's shape (values are random)."""
    rng = np.random.default_rng(seed)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    df = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
    df["label"] = [f"L{l}H{h}" for l, h in zip(df["layer"], df["head"])]
    df["n_top"], df["n_all"] = 20, 1000
    from selfrepair.existence import MEANS

    for q in MEANS:
        df[q] = rng.normal(size=len(df))
        df[f"{q}_all"] = rng.normal(size=len(df)) / 10
    return df


def test_paper_profile_runs_each_chapter_on_the_papers_model_with_its_heads():
    cfgs = _paper_configs()
    assert cfgs["01_self_repair_exists"].model == "EleutherAI/pythia-410m"
    assert cfgs["02_layernorm"].model == cfgs["03_anti_erasure"].model == "EleutherAI/pythia-160m"
    assert cfgs["04_iterative_inference"].model == "gpt2-medium"
    assert cfgs["08_backup_name_movers"].model == "gpt2"  # IOI's model and name movers (Wang et al. 2023)
    assert cfgs["08_backup_name_movers"].name_movers == ("L9H9", "L9H6", "L10H0")
    assert all(c.n_tokens == 1_000_000 for k, c in cfgs.items() if hasattr(c, "n_tokens"))
    # each chapter's own head choice returns the paper's heads, whatever the sweep says
    ex_cfg = cfgs["01_self_repair_exists"]
    fig3 = featured(_per_head(24, 16), ex_cfg.featured_heads, lambda ph: ph.head(4), rule="rule")
    assert list(fig3["label"]) == ["L22H11", "L20H6", "L23H1", "L20H14"]
    assert set(fig3["reason"]) == {"pinned by the parameters"}
    ratio, abl, fig15 = layernorm.figure_heads(cfgs["02_layernorm"], _per_head(12, 12))
    assert (ratio, abl, fig15) == ((11, 2), (11, 10), (11, 0))
    heads = neurons.choose(cfgs["03_anti_erasure"], _per_head(12, 12), _Shape(12, 12, parallel_residual=True))
    assert list(heads["label"]) == ["L10H11", "L7H8"]
    classes = pd.DataFrame({"label": ["L21H1", "L3H0"], "class": ["neutral", "self-repressing"],
                            "direct_effect": [1.0, 2.0], "relative_change": [0.0, -0.5]})
    assert iterative.it.featured(classes, 4, cfgs["04_iterative_inference"].featured_heads) == ["L21H1"]


def test_paper_profile_uses_the_papers_conventions():
    """Value biases folded wherever a chapter's numbers depend on them (TransformerLens, which the
    paper's code used), chapter 3 on each head's full top 2%, Fig 15 on its caption's L11H0, and
    Hydra's 15 resample sources per prompt."""
    cfgs = _paper_configs()
    takes = {stem for stem, c in cfgs.items() if hasattr(c, "fold_value_biases")}
    assert takes == set(cfgs) - {"05_hydra"}  # a layer's whole write does not depend on it
    assert all(cfgs[stem].fold_value_biases is True for stem in takes)
    ch3 = cfgs["03_anti_erasure"]
    spec = neurons.spec(ch3, ((10, 11), (7, 8)))
    assert ch3.top_percent == 2.0 and spec.top_percent == 2.0 and spec.max_instances is None
    assert cfgs["02_layernorm"].fig15_head == "L11H0"
    assert cfgs["05_hydra"].n_patches == 15
    defaults = {stem: chapter_module(stem).Config() for stem in cfgs}  # off unless asked
    assert not any(getattr(c, "fold_value_biases", False) for c in defaults.values())
    assert defaults["05_hydra"].n_patches == 3 and defaults["02_layernorm"].fig15_head is None


class _Shape:
    """A model's shape for head choice without its weights (Pythia-160M: 12 x 12, parallel)."""

    def __init__(self, n_layers, n_heads, parallel_residual):
        self.n_layers, self.n_heads, self.parallel_residual = n_layers, n_heads, parallel_residual


def test_stand_ins_are_chosen_by_the_papers_criterion_when_not_pinned():
    per_head = _per_head(12, 12, seed=3)
    cfg = layernorm.Config.from_params(**TINY)
    ratio, abl, fig15 = layernorm.figure_heads(cfg, per_head)
    last = per_head[per_head["layer"] == 11]
    assert ratio == (11, int(last.loc[last["direct_effect"].idxmax(), "head"])) and abl == ratio == fig15


def test_unknown_and_bad_parameters_fail_before_any_chapter_runs(tmp_path):
    notebooks = chapter_notebooks(ROOT)
    with pytest.raises(InputError, match=r"unknown parameter n_tokns: the book.s chapters take .*n_tokens"):
        plan(notebooks, {"n_tokns": 5}, check=False)
    with pytest.raises(InputError, match=r"chapter 01_self_repair_exists: n_boot must be at least 10"):
        plan(notebooks, {**TINY, "n_boot": -5}, check=False)
    with pytest.raises(InputError, match="unknown chapters"):
        plan(notebooks, TINY, {"99": {"model": "x"}}, check=False)
    # checks that need the model and the data, still before any forward pass
    with pytest.raises(InputError, match="chapter 02_layernorm: ratio_head: L7H0 is not a head of tiny-gpt_neox"):
        plan(notebooks, {**TINY, "ratio_head": "L7H0", "cache_dir": str(tmp_path)})
    with pytest.raises(InputError, match="not upstream of the last MLP layer"):
        plan(notebooks, {**TINY, "fig7_head": "L1H0", "cache_dir": str(tmp_path)})
    with pytest.raises(InputError, match="corpus too small"):
        plan(notebooks, {**TINY, "n_tokens": 10_000_000, "cache_dir": str(tmp_path)})
    with pytest.raises(InputError, match="n_patches=30 needs at least 31 prompts"):
        plan(notebooks, {**TINY, "n_prompts": 12, "n_patches": 30, "cache_dir": str(tmp_path)})
    with pytest.raises(InputError, match="missing columns"):
        bad = tmp_path / "prompts.csv"
        bad.write_text("question,answer\nq, a\n")
        plan(notebooks, {**TINY, "prompts": str(bad), "cache_dir": str(tmp_path)})
    assert not list(tmp_path.glob("**/*.safetensors"))  # nothing was measured


def test_book_command_rejects_an_unknown_param_before_executing(tmp_path, capsys):
    from selfrepair.cli import main

    rc = main(["book", "--profile", "tiny", "-p", "n_bot=5", "--out", str(tmp_path / "build"),
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown parameter n_bot" in err and "n_boot" in err
    assert not (tmp_path / "build" / "src" / "book").exists()


def test_hydra_key_ignores_the_corpus_and_sweep_key_ignores_speed_knobs(tmp_path):
    model = load_model("tiny-gpt_neox")
    prompts = open_prompts(model, None, 8, 0)
    cache = Cache(tmp_path)
    spec = hydra.hy.HydraSpec(n_patches=2)
    a = hydra.Config.from_params(model="tiny-gpt_neox", n_prompts=8, cache_dir=str(tmp_path))
    assert "dataset" not in hydra.Config.field_names() and "n_tokens" not in spec.key()
    assert cache.path(spec, model, prompts) == cache.path(spec, model, open_prompts(model, None, 8, 0))
    assert cache.path(spec, model, prompts) != cache.path(spec, model, open_prompts(model, None, 8, 1))
    assert a.n_prompts == 8
    # the sweep: batch_size and chapter extras are not in the key
    base = existence.Config.from_params(**TINY, cache_dir=str(tmp_path))
    other = existence.Config.from_params(**{**TINY, "batch_size": 16}, n_boot=20, cache_dir=str(tmp_path))
    m = open_model(base)
    assert cache.path(sweep_spec(base), m, open_tokens(base, m)) == cache.path(sweep_spec(other), m,
                                                                              open_tokens(other, m))


def test_a_failed_write_keeps_the_previous_entry(tmp_path, monkeypatch):
    cfg = existence.Config.from_params(**TINY, cache_dir=str(tmp_path))
    first = head_sweep(cfg, progress=False)
    model = open_model(cfg)
    path = Cache(cfg.cache_dir).path(sweep_spec(cfg), model, open_tokens(cfg, model))
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ResultWriteError, match=f"could not write {path}.*No space left.*unchanged"):
        first.save(path)
    assert path.read_bytes() == before and not list(path.parent.glob(".*.tmp"))
    assert torch.equal(Sweep.load(path).sum_all, first.sum_all)


def test_a_chapter_packs_its_corpus_once(monkeypatch):
    """The chapter's check and its measurements read one TokenSet: the corpus is packed once."""
    import selfrepair.packing as packing
    from selfrepair.chapters import check

    calls = []
    pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a, **k: calls.append(1) or pack(*a, **k))
    cfg = existence.Config.from_params(**{**TINY, "seed": 12345})
    model = open_model(cfg)
    check(cfg)
    tokens = open_tokens(cfg, model)
    assert tokens is open_tokens(cfg, model) and len(tokens) > 1 and calls == [1]
    other = open_tokens(existence.Config.from_params(**{**TINY, "seed": 12346}), model)
    assert len(other) == len(tokens) and not torch.equal(other.tokens, tokens.tokens) and calls == [1, 1]


def test_one_chapter_with_a_whole_book_profile():
    """`--chapters 00 --profile tiny`: the profile's parameters for the other chapters are not errors."""
    profile = load_profile("tiny", ROOT)
    per_chapter = profile.pop("chapters", {})
    out = plan(chapter_notebooks(ROOT, ["00"]), profile, per_chapter, check=False)
    assert list(out) == ["00_introduction"] and "n_tokens" not in out["00_introduction"]


def test_injected_paths_are_relative_to_the_book_root(tmp_path):
    """The runner injects paths under the kernel's working directory (the book's root) relative to
    it, so the executed notebook shows ``cache_dir = "results"``, not this machine's folders;
    provenance shows other absolute paths by their last part."""
    from selfrepair.book.runner import relative_paths
    from selfrepair.experiment import shown_path

    root = tmp_path / "book"
    params = {"cache_dir": str(root / "results"), "prompts": str(root / "data" / "p.csv"),
              "model": "tiny-gpt_neox", "n_tokens": 512, "dataset": "/elsewhere/corpus.jsonl"}
    assert relative_paths(params, root) == {**params, "cache_dir": "results", "prompts": "data/p.csv"}
    assert shown_path(str(root / "results"), root) == "results"
    assert shown_path("/scratch/models/pythia-160m", root) == "…/pythia-160m"
    assert shown_path("tiny-gpt_neox", root) == "tiny-gpt_neox" and shown_path(3, root) == 3
