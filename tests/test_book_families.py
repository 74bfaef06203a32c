"""The book on a saved model of each new mechanism: one `selfrepair book` run on the tiny profile
whose per-chapter entries put each chapter on another family's ``save_pretrained`` directory.

Kept to one chapter per mechanism (every chapter but 06, which compares the models it is given
rather than running one), chosen so that the chapter exercises the mechanism: 00 states Gemma-2's
soft-cap and reports the capped Δlogit, 01's sweep runs Falcon's tuple blocks and shared norm, 02's
frozen norms and App. B run GPT-J's parallel block, 03's neurons OLMo-2's output norms, 04's
amplification granite's multipliers, 05's write ablations Mixtral's experts, 07's gradients OPT's
flattened MLP and project_out, 08's attention patterns BLOOM's ALiBi and fused QKV. Each chapter
is a papermill run (tens of seconds even on a tiny model), so the whole book on every mechanism
would cost minutes more for what one chapter each already shows."""

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
    from selfrepair.cli import main

    profile = yaml.safe_load((ROOT / "book" / "profiles" / "tiny.yaml").read_text())
    profile["chapters"] = {}
    for family, chapter in CHAPTER_OF.items():
        path = tmp_path / "models" / family
        tiny_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        profile["chapters"][chapter] = {"model": str(path)}
    (tmp_path / "mechanisms.yaml").write_text(yaml.safe_dump(profile))
    out = tmp_path / "build"
    rc = main(["book", "--profile", str(tmp_path / "mechanisms.yaml"), "--chapters", *CHAPTER_OF.values(),
               "--no-build", "--jobs", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    for family, chapter in CHAPTER_OF.items():
        nb = nbformat.read(next((out / "src").glob(f"**/{chapter}_*.ipynb")), as_version=4)
        params = next(c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert str(tmp_path / "models" / family) in params, (chapter, family)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, (chapter, family)
    capped = (out / "src").glob("**/00_*.ipynb")
    assert "after the cap" in next(capped).read_text()  # the soft-cap is stated, Δlogit after it beside
