"""The chapters' exercises: every solution in the notebooks passes its check; typical wrong answers
(made by editing those solutions the way a reader would get them wrong) fail with a message naming
the mistake; each reference answer equals the library's own measurement; the student export
strips every solution; at least six chapters have exercises.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch

from selfrepair import exercises
from selfrepair.exercises import answers as A
from selfrepair.exercises import make_case, make_hydra_case
from selfrepair.exercises.student import student_notebook, stub

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def solutions() -> dict[str, str]:
    """Exercise name -> the source of its solution cell in the notebooks."""
    out = {}
    for path in NOTEBOOKS:
        cells = _cells(path)
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code" and "solution" in _tags(cell) and "reveal" not in _tags(cell):
                name = next(_src(c).split("exercises.check(")[1].split(",")[0].strip("'\" ")
                            for c in cells[i + 1:] if "exercises.check(" in _src(c))
                out[name] = _src(cell)
    return out


SOLUTIONS = solutions()


def _function(source: str, name: str):
    namespace: dict = {}
    exec(compile(source, f"<solution {name}>", "exec"), namespace)
    return namespace[name]


def test_every_exercise_has_a_solution_in_its_chapter():
    assert sorted(SOLUTIONS) == sorted(exercises.EXERCISES)
    for name, ex in exercises.EXERCISES.items():
        (path,) = [p for p in NOTEBOOKS if p.stem.startswith(ex.chapter)]
        assert any(f"exercises.check({name!r}" in _src(c) for c in _cells(path)), (name, path.name)


def test_six_chapters_have_exercises_and_predictions():
    per = {}
    for path in NOTEBOOKS:
        md = "\n".join(_src(c) for c in _cells(path) if c["cell_type"] == "markdown")
        per[path.stem] = (md.count(":::{exercise}"), sum("reveal" in _tags(c) for c in _cells(path)))
    full = [stem for stem, (n_ex, n_reveal) in per.items() if n_ex >= 3 and n_reveal >= 2]
    assert len(full) >= 6, per


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solutions_are_folded_in_gated_blocks(path):
    """Every solution cell sits between a solution-start (dropdown) and a solution-end cell."""
    cells = _cells(path)
    for i, cell in enumerate(cells):
        if "solution" in _tags(cell):
            before, after = _src(cells[i - 1]), _src(cells[i + 1])
            assert before.startswith(":::{solution-start}") and ":class: dropdown" in before, (path.name, i)
            assert after.startswith(":::{solution-end}"), (path.name, i)
            label = before.split("}")[1].split("\n")[0].strip()
            assert any(f":label: {label}" in _src(c) for c in cells if c["cell_type"] == "markdown"), label


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_solution_passes_its_check(name):
    feedback = exercises.check(name, _function(SOLUTIONS[name], name))
    assert feedback.ok, feedback.message


# -- wrong answers, written the way a reader gets them wrong: edits of the book's solutions ---------
WRONG = [
    ("direct_effect", "logits not centred", "logits = logits - logits.mean(-1, keepdim=True)", "pass"),
    ("direct_effect", "ablated norm scale", "case.clean.scale[:, :-1, None]", "run.scale[:, :-1, None]"),
    ("direct_effect", "sliced after o_proj", "run.z[layer][:, :-1, head]",
     "run.attn_out[layer][:, :-1].unflatten(-1, (case.n_heads, case.d_head))[..., head, :]"),
    ("self_repair", "logits not centred", "clean = clean - clean.mean(-1, keepdim=True)  # centred logits\n"
     "    ablated = ablated - ablated.mean(-1, keepdim=True)", "pass"),
    ("self_repair", "clean minus ablated", "(ablated.gather(-1, t) - clean.gather(-1, t))",
     "(clean.gather(-1, t) - ablated.gather(-1, t))"),
    ("neuron_delta_de", "ablated norm scale", "(case.ablated.neurons - case.clean.neurons)[:, :-1]",
     "(case.ablated.neurons * case.clean.scale[..., None] / case.ablated.scale[..., None] - case.clean.neurons)[:, :-1]"),
    ("neuron_delta_de", "logits not centred", "case.W_U[case.targets] - case.W_U.mean(0)", "case.W_U[case.targets]"),
    ("closed_form", "no first term", "(ratio - 1) * logit + ratio * delta_de", "ratio * delta_de"),
    ("norm_share", "not clipped", ".clamp(0, 1)", ""),
    ("relative_change", "signed denominator", "/ old.abs()", "/ old"),
    ("compensation", "remainder", "return (delta_de * (later | same_block_mlp)).sum(-1)",
     "return total_effect - delta_de[:, ablated]"),
    ("compensation", "same block's MLP left out", "(later | same_block_mlp)", "later"),
    ("top_percent", "rounded down", "math.ceil(percent / 100 * values.numel())", "int(percent / 100 * values.numel())"),
    ("ioi_metrics", "S minus IO", "logits[rows, end_pos, io] - logits[rows, end_pos, s]",
     "logits[rows, end_pos, s] - logits[rows, end_pos, io]"),
    ("ioi_metrics", "last column", "logits[rows, end_pos, io] - logits[rows, end_pos, s]",
     "logits[rows, -1, io] - logits[rows, -1, s]"),
]
MESSAGE_WORDS = {"logits not centred": "centred", "ablated norm scale": "clean",
                 "sliced after o_proj": "input"}


@pytest.mark.parametrize("name,mistake,old,new", WRONG, ids=[f"{n}-{m}" for n, m, _, _ in WRONG])
def test_typical_wrong_answer_fails_naming_the_mistake(name, mistake, old, new):
    source = SOLUTIONS[name]
    assert old in source, f"the solution of {name} changed: update this test's edit"
    feedback = exercises.check(name, _function(source.replace(old, new), name))
    assert not feedback.ok
    assert feedback.mistake == mistake, feedback.message
    assert MESSAGE_WORDS.get(mistake, "") in feedback.message


def test_other_failures_say_what_happened():
    assert "not written yet" in exercises.check("direct_effect", _function(stub(SOLUTIONS["direct_effect"]), "direct_effect")).message
    boom = exercises.check("self_repair", lambda case: case.no_such_field)
    assert not boom.ok and "AttributeError" in boom.message
    shape = exercises.check("direct_effect", lambda case, run, layer, head: torch.zeros(3, 12))
    assert "drop the last position" in shape.message
    off = exercises.check("closed_form", lambda r, l, d: A.closed_form(r, l, d) + 0.5)
    assert not off.ok and off.mistake is None and "largest difference 0.5" in off.message
    with pytest.raises(KeyError, match="no exercise"):
        exercises.check("nope", lambda: None)


# -- the reference answers against the library's measurements ----------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_references_equal_the_library(family):
    from selfrepair import load_model, self_repair

    for head in ((0, 1), (1, 0)):
        case = make_case(family, head=head)
        model = load_model(f"tiny-{family}", dtype="float32")
        res = self_repair(model, case.tokens, "resample", corrupt_tokens=case.tokens.roll(1, 0),
                          heads=[head], progress=False)
        l, h = head
        close = lambda a, b: torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)  # noqa: E731
        close(A.direct_effect(case, case.clean, l, h), res.direct_effect[l, h])
        close(case.delta_direct_effect, res.ablated_direct_effect[l, h] - res.direct_effect[l, h])
        dl, sr = A.self_repair(case)
        close(dl, res.delta_logit[l, h])
        close(sr, res.self_repair[l, h])
        close(A.norm_term(case), res.from_norm[l, h])
        if l == model.n_layers - 1:  # nothing downstream but the last layer's own MLP (if sequential)
            close(A.neuron_delta_de(case).sum(0), res.from_mlps[l, h])
            if model.parallel_residual:  # App. B is exact: only the final norm is downstream
                close(A.closed_form(*A.closed_form_inputs(case)), res.delta_logit[l, h])


def test_top_percent_and_compensation_references_equal_the_library():
    from selfrepair.direct_effect import top_percent_mask

    values = torch.randn(7, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(A.top_percent(values, 2.0), top_percent_mask(values[None], 2.0)[0])
    for family in ("gpt2", "gpt_neox"):
        c = make_hydra_case(family)
        for m in range(c.delta_de.shape[1]):
            ce = A.compensation(c.delta_de[:, m], c.total_effect[:, m], m, c.parallel)
            # Hydra's identity: Δ_ablate = ΔDE_m + CE + from_norm (no block norms in these models)
            torch.testing.assert_close(c.delta_de[:, m, m] + ce + c.from_norm[:, m], c.total_effect[:, m],
                                       rtol=1e-4, atol=1e-5)


def test_ioi_metrics_reference_equals_the_library():
    from selfrepair import ioi, load_model
    from selfrepair.exercises import make_ioi_case
    from selfrepair.name_movers import ioi_measure

    c = make_ioi_case("gpt2")
    diff, acc = A.ioi_metrics(c.logits, c.end_pos, c.io, c.s)
    torch.testing.assert_close(diff, ioi.logit_diff(c.logits, c.end_pos, c.io, c.s))
    assert float(acc) == pytest.approx(ioi.summary(diff)["accuracy"])
    model = load_model("tiny-gpt2", dtype="float32")  # the chapter's frozen-norm readout: the same value
    data = ioi.ioi_prompts(model.tokenizer, 8, names=list("ABCDEFGH"))
    res = ioi_measure(model, data, batch_size=8, progress=False)
    torch.testing.assert_close(res.logit_diff, diff, rtol=1e-4, atol=1e-4)


def test_relative_change_reference_is_the_ratio_of_top_token_means():
    clean, new, top = A.relative_change_inputs()
    got = A.relative_change(clean, new, top)
    for h in range(4):
        old = clean[h][top[h]].mean()
        torch.testing.assert_close(got[h], (new[h][top[h]].mean() - old) / old.abs())
    assert (top.sum(-1) == 20).all()  # ceil(10% of 200)


# -- the student export --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_notebook_strips_every_solution(path):
    nb = student_notebook(nbformat.read(path, as_version=4))
    text = json.dumps(nb.cells)
    assert "solution-start" not in text and "solution-end" not in text and ":::{exercise}" not in text
    for cell in nb.cells:
        assert not cell.get("outputs")
        if "exercise" in cell.metadata.get("tags", []) and "def " in cell.source:
            assert cell.source.rstrip().endswith("raise NotImplementedError  # your code here")
    for name, source in SOLUTIONS.items():
        body = [line for line in source.splitlines()[2:] if line.strip() and not line.strip().startswith(("import", '"""'))]
        for line in body:
            assert line not in text, f"{path.name}: a solution line of {name} is left: {line!r}"


def test_student_cli_writes_every_chapter(tmp_path):
    from selfrepair.cli import main

    assert main(["student", "--root", str(ROOT), "--out", str(tmp_path / "student")]) == 0
    assert sorted(p.name for p in (tmp_path / "student").glob("*.ipynb")) == [p.name for p in NOTEBOOKS]


def test_teaching_plan_counts_the_chapters_exercises():
    from selfrepair.exercises.plan import teaching_markdown, teaching_plan

    plan = teaching_plan(ROOT).set_index("chapter")
    assert list(plan.index) == [p.stem[:2] for p in NOTEBOOKS]
    for prefix, row in plan.iterrows():
        assert row["implement exercises"] == sum(e.chapter == prefix for e in exercises.EXERCISES.values())
        (path,) = [p for p in NOTEBOOKS if p.stem.startswith(prefix)]
        assert row["predict questions"] == sum("reveal" in _tags(c) for c in _cells(path))
        assert row["class time (min)"] >= 3 * row["predict questions"] + 15 * row["implement exercises"] - 5
    assert f"over {len(plan)} chapters" in teaching_markdown(plan.reset_index())
