"""The book on a saved model of each new mechanism: the tiny profile whose per-chapter entries put
each chapter on another family's ``save_pretrained`` directory, planned by the runner (its
validation and per-chapter parameters), each chapter's notebook then run cell by cell in this
process (tests/chapter_runs.py's ``run_cells``, as papermill injects the parameters).

Kept to one chapter per mechanism (every chapter but 06, which compares the models it is given
rather than running one), chosen so that the chapter exercises the mechanism: 00 states Gemma-2's
soft-cap and reports the capped Δlogit, 01's sweep runs Falcon's tuple blocks and shared norm, 02's
frozen norms and App. B run GPT-J's parallel block, 03's neurons OLMo-2's output norms, 04's
amplification granite's multipliers, 05's write ablations Mixtral's experts, 07's gradients OPT's
flattened MLP and project_out, 08's attention patterns BLOOM's ALiBi and fused QKV. In this
process, not one papermill kernel per chapter: a kernel's start-up (its imports) costs more than a
tiny chapter, and papermill's injection and the runner's kernels are what the book build (conftest's
``book``), the reader's Jupyter test and ``bench/gpu.sh --small`` (chapter 1 on a saved directory
through ``selfrepair book``) already run."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from selfrepair.models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_OF = {"gemma2": "00", "falcon": "01", "gptj": "02", "olmo2": "03", "granite": "04",
              "mixtral": "05", "opt": "07", "bloom": "08"}


@pytest.mark.workflow
def test_one_chapter_per_mechanism_runs_on_its_saved_model(tmp_path):
    from chapter_runs import run_cells
    from selfrepair.book import chapter_notebooks, load_profile
    from selfrepair.book.runner import plan
    from selfrepair.experiment import _model

    profile = yaml.safe_load((ROOT / "book" / "profiles" / "tiny.yaml").read_text())
    profile["chapters"] = {}
    for family, chapter in CHAPTER_OF.items():
        path = tmp_path / "models" / family
        tiny_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        profile["chapters"][chapter] = {"model": str(path)}
    (tmp_path / "mechanisms.yaml").write_text(yaml.safe_dump(profile))
    params = load_profile(tmp_path / "mechanisms.yaml", ROOT)
    per_chapter = params.pop("chapters")
    notebooks = chapter_notebooks(ROOT, CHAPTER_OF.values())
    by_stem = plan(notebooks, {**params, "cache_dir": str(tmp_path / "cache")}, per_chapter)
    outputs = {}
    for family, chapter in CHAPTER_OF.items():
        nb = next(nb for nb in notebooks if nb.stem.startswith(chapter))
        assert by_stem[nb.stem]["model"] == str(tmp_path / "models" / family), (chapter, family)
        _model.cache_clear()
        ns, outputs[chapter], error = run_cells(nb, by_stem[nb.stem], tmp_path)
        assert error is None, (chapter, family, error)
        assert ns["cfg"].model == str(tmp_path / "models" / family), (chapter, family)
    _model.cache_clear()
    # the soft-cap is stated, Δlogit after it beside
    assert any("after the cap" in text for text in outputs["00"]), outputs["00"]
