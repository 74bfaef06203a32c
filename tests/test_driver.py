"""The measurement driver (selfrepair.driver), for every measurement of the book (tests/driver_cases.py):

- a run that dies right after its first checkpoint (what SIGKILL leaves on disk: the checkpoint and
  nothing else) and is started again gives the result of an uninterrupted run, bit for bit;
- an out-of-memory error in a batch is retried with fewer rows and gives the same result;
- a top-k% selection on rows that repeat (exact ties) is the same for batch sizes 1, 7 and 16, ties
  going to the lower token index;
- a checkpoint of other parameters is not resumed, and the folds merge like one run.

Real SIGKILLs: tests/test_sweep.py (the sweep's CLI), tests/test_distributed.py (a rank of a
torchrun launch) and tests/test_measure.py (``selfrepair measure``); two processes: tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

import selfrepair.checkpoint as checkpoint
import selfrepair.driver as driver
from driver_cases import CASES, TIES, assert_same, compute, data, options, reference, selections, tied_tokens
from selfrepair.selection import keep_top, ranked


class Killed(BaseException):
    """The process dies here: no handler runs, nothing more is written (as under SIGKILL)."""


@pytest.mark.parametrize("name", CASES)
def test_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch):
    want = reference(name)
    partial = tmp_path / f"{name}.partial"
    real, saves = checkpoint.Checkpoint.save, []

    def save_then_die(self):
        real(self)
        saves.append(dict(self.stages))
        raise Killed  # right after the first checkpoint reached the disk

    monkeypatch.setattr(checkpoint.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        compute(name, data(name), options(name, checkpoint=partial))
    monkeypatch.undo()
    left = checkpoint.progress(partial)
    assert len(saves) == 1 and partial.exists() and 0 < sum(left.values()), left
    got = compute(name, data(name), options(name, checkpoint=partial))
    assert_same(got, want, exact=True)


@pytest.mark.parametrize("name", CASES)
def test_out_of_memory_in_a_batch_is_retried_with_fewer_rows(name, monkeypatch):
    want = reference(name)
    real, calls = driver.in_session, []

    def second_runs_out(model, fn, rows, *args):
        calls.append(len(rows["index"]))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(model, fn, rows, *args)

    monkeypatch.setattr(driver, "in_session", second_runs_out)
    with pytest.warns(UserWarning, match="out of memory .* retrying as"):
        got = compute(name, data(name), options(name))
    assert calls[2] == max(1, calls[1] // 2), calls  # the failed batch, then its first half
    assert_same(got, want, exact=False)


@pytest.mark.parametrize("name", TIES)
def test_ties_go_to_the_lower_token_index_whatever_the_batch_size(name):
    tied = tied_tokens()
    runs = {b: compute(name, tied, options(name, batch_size=b, max_rows=64)) for b in (1, 7, 16)}
    for b in (7, 16):
        for k, v in selections(name, runs[1]).items():
            assert torch.equal(v, selections(name, runs[b])[k]), (b, k)
        assert_same(runs[b], runs[1], exact=False)


def test_the_tied_rows_do_straddle_a_selection():
    """Not vacuous: in the sweep of the tied rows some head's k-th best clean DE is shared by a
    selected and an unselected token, and the lower token index is the one selected."""
    from driver_cases import model

    from selfrepair.batch import clean_batch

    m, tied = model(), tied_tokens()
    sweep = compute("sweep", tied, options("sweep", batch_size=16))
    de = clean_batch(m, tied.tokens).all_head_de().flatten(2)  # [layer, head, instance]
    top = sweep.tokens_frame("top")
    straddled = 0
    for (layer, head), g in top.groupby(["layer", "head"]):
        chosen = torch.tensor((g["row"] * tied.seq_len - g["row"] + g["pos"]).to_numpy())
        values = de[layer, head]
        kth = values[chosen].min()
        left_out = [i for i in (values == kth).nonzero().flatten().tolist() if i not in set(chosen.tolist())]
        if left_out:
            straddled += 1
            assert max(i for i in chosen.tolist() if values[i] == kth) < min(left_out)
    assert straddled > 0


def test_ranked_is_a_total_order_whatever_the_split():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (3, 40), generator=g).float()  # many ties
    score[0, 5] = float("nan")
    index = torch.arange(40).expand(3, -1)
    once = keep_top(None, {"score": score, "instance": index}, 7)
    for cut in (1, 13, 39):
        a = keep_top(None, {"score": score[:, :cut], "instance": index[:, :cut]}, 7)
        b = keep_top(None, {"score": score[:, cut:], "instance": index[:, cut:]}, 7)
        for merged in (keep_top(a, b, 7), keep_top(b, a, 7)):  # in either order
            assert torch.equal(merged["instance"], once["instance"])
    assert once["instance"][0, 0] == 5  # NaN first, as torch.topk ranks it
    top = ranked(score[1], index[1], 7)
    assert torch.equal(top, torch.sort(score[1] * 100 - index[1], descending=True).indices[:7])


def test_a_checkpoint_of_other_parameters_is_not_resumed(tmp_path):
    from selfrepair.atp import AtpSpec
    from driver_cases import model

    partial = tmp_path / "atp.partial"
    checkpoint.Checkpoint(partial, driver.world(), {"key": AtpSpec("zero").key()}).save()
    with pytest.warns(UserWarning, match="belongs to another run"):
        got = compute("atp", data("atp"), options("atp", checkpoint=partial))
    assert_same(got, reference("atp"), exact=True)
    assert model().n_layers == got.atp.shape[0]


def test_states_pack_and_unpack_through_a_checkpoint(tmp_path):
    state = {"a": [torch.ones(2), (1, 2.5, None)], "b": {"c": torch.zeros(0, 4, dtype=torch.long), "d": "x"}}
    cp = checkpoint.Checkpoint(tmp_path / "s.partial", driver.world(), {"key": 1})
    cp.stages["one"] = (3, state)
    cp.save()
    back = checkpoint.Checkpoint(tmp_path / "s.partial", driver.world(), {"key": 1}).stages["one"]
    assert back[0] == 3 and torch.equal(back[1]["a"][0], state["a"][0]) and back[1]["a"][1] == (1, 2.5, None)
    assert back[1]["b"]["c"].shape == (0, 4) and back[1]["b"]["d"] == "x"
