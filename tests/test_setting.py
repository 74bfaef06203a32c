"""What ran, on what (``selfrepair.setting``): the model and the data in words, computed from what
was loaded, beside the paper's setup quoted once."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from selfrepair import setting
from selfrepair.chapters import CHAPTERS, chapter_module
from selfrepair.experiment import open_model, open_tokens

TINY = {"model": "tiny-gpt_neox", "dataset": "tiny", "n_tokens": 512, "seq_len": 32, "top_percent": 10}


def _stub_model(weights: str, dtype: str = "float32", n: int = 268_098_176):
    """A loaded model as ``model_words`` sees it (describe() and the weights' sizes), without
    loading the real embedded Gemma."""
    describe = {"model": "gemma-3-270m", "model_type": "gemma3_text", "n_layers": 18, "n_heads": 4,
                "dtype": dtype, "weights": weights}
    return SimpleNamespace(describe=lambda: describe, hf=SimpleNamespace(parameters=lambda: [torch.empty(n, device="meta")]))


def test_model_words_of_the_embedded_model():
    words = setting.model_words(_stub_model("Gemma-3-270M Q4_K_M GGUF (third-party re-packaging, dequantized)"))
    assert words.startswith("`gemma-3-270m`: a Gemma 3 model with 268M parameters (18 layers × 4 heads)")
    assert "4-bit quantized weights (Q4_K_M GGUF) dequantized to fp32" in words
    bf16 = setting.model_words(_stub_model("", dtype="bfloat16", n=1_011_781_632), device="cuda")
    assert "1.0B parameters" in bf16 and "weights in bf16, run on cuda" in bf16


def test_model_words_read_the_loaded_model():
    cfg = chapter_module("01").Config.from_params(**TINY)
    model = open_model(cfg)
    n = sum(p.numel() for p in model.hf.parameters())
    words = setting.model_words(model)
    assert f"{n / 1e3:.0f}k parameters" in words and f"{model.n_layers} layers × {model.n_heads} heads" in words
    assert "random weights (seed 0) in fp32" in words and "say nothing about trained models" in words


@pytest.mark.parametrize("n_tokens", [512, 1024])
def test_corpus_words_count_what_was_measured(n_tokens):
    cfg = chapter_module("01").Config.from_params(**{**TINY, "n_tokens": n_tokens})
    text = setting.data_words(cfg, open_model(cfg), setting.PAPERS["existence"])
    rows = open_tokens(cfg, open_model(cfg)).tokens.shape[0]
    assert text.startswith(f"{rows * 32:,} tokens ({rows} rows of 32; each row a window of its own "
                           "document) of a synthetic corpus")
    joined = chapter_module("01").Config.from_params(**{**TINY, "n_tokens": n_tokens, "packing": "concatenate"})
    data = open_tokens(joined, open_model(joined))
    n_docs = len(set(data.main_document.tolist()))
    assert (f"the documents joined and cut into rows, as the paper's code does ({n_docs} document"
            in setting.data_words(joined, open_model(joined), setting.PAPERS["existence"]))
    assert f"{rows * 32 / setting.PILE_TOKENS:.1%} of the paper's 1,000,000 tokens of The Pile" in text


def test_every_chapter_says_what_ran_beside_its_paper():
    for prefix, name in CHAPTERS.items():
        config = chapter_module(prefix).Config
        params = {k: v for k, v in {**TINY, "n_prompts": 24}.items() if k in config.field_names()}
        text = setting.run_summary(config.from_params(**params))
        assert text.startswith("**What ran here.**") and "`tiny-gpt_neox`" in text, name
        assert "**Whose numbers.**" in text, name
        if name == "scorecard":  # it runs no model and quotes no paper of its own: it reads the records
            assert "None is loaded and nothing is measured" in text and "`results/`" in text
        else:
            assert f"({setting.PAPERS[name].source})" in text, name
        assert not re.search(r"[A-Za-z]\((?:s|es)\)", text), name
    hydra = setting.run_summary(chapter_module("05").Config.from_params(model="tiny-gpt_neox", n_prompts=24))
    assert "24 factual-recall prompts" in hydra and "1,209 Counterfact prompts" in hydra



def test_the_caveat_names_quantized_weights_and_the_corpus_from_what_ran():
    """"What this can change": said from the model's weights (a GGUF quantization) and the corpus's
    own sources; nothing for a run on unquantized weights and another corpus."""
    from selfrepair.chapters import existence
    from selfrepair.setting import _caveat

    quantized, plain = _stub_model("Gemma-3-270M Q4_K_M GGUF (dequantized)"), _stub_model("from the hub")
    text = _caveat(existence.Config.from_params(), quantized)
    assert text.startswith("The weights were quantized to 4 bits") and "not exactly the released model" in text
    assert re.search(r"; \d+% of the embedded corpus's documents are \S", text) and "The Pile" in text
    assert "not a refutation" in text and ". Either can move" in text
    assert _caveat(existence.Config.from_params(dataset="tiny"), plain) == ""
    only_data = _caveat(existence.Config.from_params(), plain)
    assert re.match(r"\d+% of the embedded corpus's documents", only_data) and "quantized" not in only_data
    assert ". This can move" in only_data


def test_whose_numbers_is_short_and_cites_the_chapters_own_example():
    """Issue 25 (read3 #9): one short sentence, the same boilerplate in no two chapters that quote a
    different paper value; its example is the chapter's own (the first claim quoting the paper's
    value, as its verdict prints it: chapter 2's 90.7%, chapter 5's 70%), none where the chapter
    quotes no paper value (no "paper ≈ 30%" in chapters without such a number)."""
    from selfrepair.claims import number

    for prefix in ("01", "02", "05", "08"):
        module = chapter_module(prefix)
        text = setting.whose_numbers(module.Config.__module__)
        quoted = [c for c in module.CLAIMS if c.paper is not None]
        assert "paper ≈ 30%" not in text and len(text) < 200, (prefix, text)
        if quoted:
            assert f"“the paper reports {number(quoted[0].paper, quoted[0].fmt)}”" in text, (prefix, text)
        else:
            assert "the paper reports" not in text, (prefix, text)
    assert "90.7%" in setting.whose_numbers(chapter_module("02").Config.__module__)


def test_the_shape_table_names_its_rows_in_words_and_says_no_revision_as_provenance_does():
    """read3 #18: the introduction's shape table has no code-name rows (`model_type`, `n_layers`,
    `d_vocab`, `parallel_residual`, `revision_sha256`); a revision not set is "—" there and in the
    provenance table (it read "revision None" there)."""
    from selfrepair.chapters import intro
    from selfrepair.experiment import provenance

    cfg = intro.Config.from_params(model="tiny-gpt_neox")
    rows = dict(intro.shape_table(open_model(cfg)).cells())
    assert not [k for k in rows if "_" in k], rows
    assert rows["layers"] == "2" and rows["revision on the hub"] == "—"
    prov = dict(provenance(cfg).frame.values.tolist())
    assert prov["revision"] == "—" and prov["param:dtype"] == "None"
