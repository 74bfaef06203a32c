"""Exercises: "implement it" checks for the book's chapters.

A chapter asks the reader to write a short function (the direct effect of a head from a cached
run, Δlogit and eq. 1, App. B's closed form, the norm share, ...). ``check(name, fn)`` runs ``fn``
on small cases built from tiny models (:mod:`~selfrepair.exercises.cases`), compares it with the
reference answer (:mod:`~selfrepair.exercises.answers`) and says, specifically, what is wrong: when
the reader's output equals what a typical mistake computes (logits not centred, the ablated run's
norm scale instead of the clean one, the output projection's *output* sliced by head, ...), the
message names that mistake; otherwise it says where the output first differs.

    >>> from selfrepair import exercises
    >>> exercises.check("direct_effect", my_direct_effect)   # in a notebook: renders as Markdown

``exercises.EXERCISES`` lists every exercise with its chapter and signature;
:mod:`~selfrepair.exercises.student` strips the solutions from the notebooks for a course.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..tables import counted
from . import answers as A
from .cases import Case, HydraCase, IoiCase, Run, make_case, make_hydra_case, make_ioi_case

RTOL, ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class Mistake:
    name: str
    message: str  # what the reader did and how to fix it
    compute: Callable  # the reference's inputs -> what this mistake computes


@dataclass(frozen=True)
class Exercise:
    name: str
    chapter: str  # two-digit prefix of the chapter that asks for it
    signature: str
    inputs: Callable[[], list[tuple[str, tuple]]]  # named inputs the check calls the function on
    reference: Callable
    mistakes: tuple[Mistake, ...] = ()


@dataclass(frozen=True)
class Feedback:
    """The verdict of a check; renders as one Markdown line in a notebook."""

    exercise: str
    ok: bool
    message: str
    mistake: str | None = None  # the recognised mistake's name, if any

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return f"{'correct' if self.ok else 'not yet'} — {self.message}"

    def _repr_markdown_(self) -> str:
        return f"{'**Correct.**' if self.ok else '**Not yet.**'} {self.message}"


# -- the inputs each exercise is checked on --------------------------------------------------------
def _de_inputs():
    out = []
    for family in ("gpt2", "llama"):
        c = make_case(family)
        (l, h), last = c.head, c.W_O.shape[0] - 1
        out += [(f"{c.name}: the clean run, L{l}H{h}", (c, c.clean, l, h)),
                (f"{c.name}: the ablated run, L{last}H2 (downstream of the ablated head)",
                 (c, c.ablated, last, 2))]
    return out


def _cases(*families):
    return lambda: [(c.name, (c,)) for c in map(make_case, families)]


def _closed_form_inputs():
    c = make_case("gpt_neox", head=(1, 0))  # last layer of a parallel-residual model: App. B is exact
    return [(c.name, A.closed_form_inputs(c))]


def _norm_share_inputs():
    out = []
    for c in (make_case("gpt2"), make_case("gpt_neox")):
        fn, de = A.norm_term(c), A.direct_effect(c, c.clean, *c.head)
        out.append((c.name, (fn.flatten(), de.flatten())))
    fn, de = out[0][1]
    out.append(("the same with one more token whose direct effect is exactly 0",
                (torch.cat([fn, torch.tensor([0.3])]), torch.cat([de, torch.tensor([0.0])]))))
    return out


def _relative_change_inputs():
    return [("four heads of 200 tokens, one with a negative mean direct effect", A.relative_change_inputs())]


def _compensation_inputs():
    out = []
    for c in (make_hydra_case("gpt2"), make_hydra_case("gpt_neox")):
        for m, what in ((0, "attention layer 0"), (1, "MLP layer 0")):
            out.append((f"{c.name}, {what} ablated",
                        (c.delta_de[:, m].clone(), c.total_effect[:, m].clone(), m, c.parallel)))
    return out


def _top_inputs():
    g = torch.Generator().manual_seed(1)
    return [("210 tokens (7 rows of 30), top 2%", (torch.randn(7, 30, generator=g), 2.0)),
            ("33 tokens, top 10%", (A.direct_effect(make_case("gpt2"), make_case("gpt2").clean, 0, 1), 10.0))]


def _ioi_inputs():
    return [(c.name, (c.logits, c.end_pos, c.io, c.s)) for c in map(make_ioi_case, ("gpt2", "llama"))]


UNCENTERED = ("logits not centred",
              "the logits are not centred: subtract the mean over the vocabulary at each position "
              "before reading the target's logit (App. E), or read out with `W_U[target] − W_U.mean(0)`.")
EXERCISES: dict[str, Exercise] = {e.name: e for e in (
    Exercise("direct_effect", "00", "direct_effect(case, run, layer, head) -> [batch, pos-1]",
             _de_inputs, A.direct_effect, (
                 Mistake(*UNCENTERED, A.de_uncentered),
                 Mistake("ablated norm scale",
                         "on the ablated run you divided by that run's own final-norm scale "
                         "(`run.scale`): freeze the final norm at the **clean** run's scale "
                         "(`case.clean.scale`), so that direct effects stay linear and comparable.",
                         A.de_own_scale),
                 Mistake("sliced after o_proj",
                         "you sliced the attention output *after* the output projection "
                         "(`run.attn_out`) into heads: that tensor is already summed over heads. A "
                         "head's output is its slice of the projection's **input**, `run.z[layer][..., "
                         "head, :]`, times its rows of W_O (`case.W_O[layer, head]`).", A.de_after_o_proj),
                 Mistake("no final norm",
                         "the final norm's linear part is missing: apply `case.norm_linear` (centring "
                         "for LayerNorm, and the gain) before dividing by the clean scale.", A.de_no_norm))),
    Exercise("self_repair", "01", "self_repair(case) -> (delta_logit, self_repair), each [batch, pos-1]",
             _cases("gpt2", "llama"), A.self_repair, (
                 Mistake(*UNCENTERED, A.sr_uncentered),
                 Mistake("clean minus ablated",
                         "Δlogit has the wrong sign: it is ablated − clean (a head that helped gives "
                         "Δlogit < 0).", A.sr_clean_minus_ablated),
                 Mistake("self-repair sign",
                         "self-repair has the wrong sign: eq. 1 is Δlogit − ΔDE_head.", A.sr_flipped),
                 Mistake("added the DE change",
                         "you added ΔDE_head: eq. 1 subtracts it (self-repair = Δlogit − ΔDE_head).",
                         A.sr_plus),
                 Mistake("clean DE instead of ΔDE",
                         "you subtracted the head's clean direct effect: eq. 1 subtracts its *change*, "
                         "`case.delta_direct_effect` (zero ablation is the one case where they agree).",
                         A.sr_clean_de))),
    Exercise("closed_form", "02", "closed_form(ratio, logit, delta_de) -> [batch, pos-1]",
             _closed_form_inputs, A.closed_form, (
                 Mistake("inverted ratio",
                         "the ratio is inverted: App. B uses S/S′ (clean over ablated scale), which "
                         "is what `ratio` holds — use it as given.", A.cf_inverted),
                 Mistake("no first term",
                         "the first term is missing: the scale change also rescales every *other* "
                         "component's logit, (S/S′ − 1)·logit.", A.cf_no_first_term),
                 Mistake("unscaled ΔDE",
                         "ΔDE must be multiplied by S/S′ too: the ablated head's new output passes "
                         "through the changed scale.", A.cf_no_ratio))),
    Exercise("norm_share", "02", "norm_share(from_norm, direct_effect) -> float",
             _norm_share_inputs, A.norm_share, (
                 Mistake("not clipped",
                         "the per-token shares are not clipped: clip each token's "
                         "from_norm / direct_effect to [0, 1] before averaging (Fig 10; the "
                         "unclipped mean is Fig 9's variant).", A.ns_unclipped),
                 Mistake("ratio of means",
                         "you divided the means: the share is the mean of per-token ratios, each "
                         "clipped to [0, 1].", A.ns_ratio_of_means),
                 Mistake("zero DE kept",
                         "tokens whose direct effect is exactly 0 have no share: leave them out "
                         "(dividing by 0 gives ±inf, which clipping turns into 0 or 1).",
                         A.ns_zero_kept))),
    Exercise("neuron_delta_de", "03", "neuron_delta_de(case) -> [d_mlp, batch, pos-1]",
             _cases("gpt2", "llama"), A.neuron_delta_de, (
                 Mistake("ablated norm scale",
                         "you read the ablated run's neurons out at the ablated run's own final-norm "
                         "scale: every direct effect uses the **clean** scale `case.clean.scale` (the "
                         "norm's reaction is eq. 2's separate norm term).", A.nd_own_scale),
                 Mistake(*UNCENTERED, A.nd_uncentered),
                 Mistake("clean minus ablated", "the sign is flipped: ΔDE = ablated − clean.",
                         A.nd_flipped),
                 Mistake("clean DE only",
                         "that is each neuron's clean direct effect; the exercise asks for its change "
                         "under the ablation (ablated − clean).", A.nd_clean_only))),
    Exercise("relative_change", "04", "relative_change(clean_de, new_de, top) -> [n_heads]",
             _relative_change_inputs, A.relative_change, (
                 Mistake("signed denominator",
                         "divide by |mean clean DE|: with the signed mean, a head with a negative "
                         "direct effect that grows more negative looks self-repressing.", A.rc_signed),
                 Mistake("all tokens",
                         "you averaged over every token: use only each head's top tokens (`top`).",
                         A.rc_all_tokens),
                 Mistake("not relative",
                         "that is the change of the mean DE; divide it by |mean clean DE| so heads of "
                         "different size compare.", A.rc_difference),
                 Mistake("mean of ratios",
                         "you averaged per-token ratios (noisy where the clean DE is near 0): take "
                         "the ratio of the means over the top tokens.", A.rc_mean_of_ratios))),
    Exercise("compensation", "05", "compensation(delta_de, total_effect, ablated, parallel) -> [n]",
             _compensation_inputs, A.compensation, (
                 Mistake("remainder",
                         "you took compensation as the remainder Δ_ablate − ΔDE_m: that also counts "
                         "the final norm's rescaling (and would make the decomposition impossible to "
                         "fail). Sum ΔDE over the downstream components instead (eq. 33).",
                         A.ce_remainder),
                 Mistake("ablated component included",
                         "the ablated component itself is not downstream of itself: leave its ΔDE "
                         "out.", A.ce_with_self),
                 Mistake("same block's MLP left out",
                         "in a sequential block the MLP reads its own layer's attention output: when "
                         "an attention layer is ablated, that layer's MLP is downstream too.",
                         A.ce_later_layers_only))),
    Exercise("top_percent", "06", "top_percent(values, percent) -> bool mask like values",
             _top_inputs, A.top_percent, (
                 Mistake("rounded down",
                         "you rounded the number of tokens down: the top k% of N is ceil(k/100 · N) "
                         "tokens (at least one).", A.tp_floor),
                 Mistake("per row",
                         "you took the top k% of each row: the selection is over all (row, position) "
                         "instances together.", A.tp_per_row),
                 Mistake("bottom", "those are the *smallest* values: take the largest.", A.tp_bottom),
                 Mistake("fraction",
                         "`percent` is a percentage (2 means 2%), not a fraction.", A.tp_fraction))),
    Exercise("ioi_metrics", "08", "ioi_metrics(logits, end_pos, io, s) -> (logit_diff [n], accuracy)",
             _ioi_inputs, A.ioi_metrics, (
                 Mistake("S minus IO",
                         "the sign is flipped: the logit difference is logit(IO) − logit(S), positive "
                         "when the model prefers the indirect object.", A.ioi_flipped),
                 Mistake("last column",
                         "you read the last column of `logits`: prompts are right-padded, so each one "
                         "ends at its own `end_pos[i]` — read the logits there.", A.ioi_last_column),
                 Mistake("probabilities",
                         "you took the difference of probabilities: the metric is the difference of "
                         "the raw logits (centring, or a log-softmax, would not change it; a softmax "
                         "does).", A.ioi_probabilities))),
)}


# -- comparing -------------------------------------------------------------------------------------
def _as_tensors(x: Any) -> tuple[torch.Tensor, ...] | None:
    items = x if isinstance(x, tuple) else (x,)
    try:
        return tuple(torch.as_tensor(i).detach().cpu() for i in items)
    except (TypeError, ValueError, RuntimeError):
        return None


def _close(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and (torch.equal(x, y) if x.dtype == torch.bool or y.dtype == torch.bool
                                else torch.allclose(x.double(), y.double(), rtol=RTOL, atol=ATOL, equal_nan=True))
        for x, y in zip(a, b))


def _shape_problem(got: tuple, want: tuple, ex: Exercise) -> str | None:
    if len(got) != len(want):
        return f"it returned {counted(len(got), 'value')}; `{ex.signature}` returns {len(want)}."
    for x, y in zip(got, want):
        if x.shape != y.shape:
            hint = (" Position p predicts token p+1, so per-token answers have `pos − 1` positions: "
                    "drop the last position." if x.dim() == y.dim() and x.shape[-1] == y.shape[-1] + 1 else "")
            return f"it returned shape {list(x.shape)}; expected {list(y.shape)} (`{ex.signature}`).{hint}"
    return None


def _first_difference(got: tuple, want: tuple) -> str:
    for k, (x, y) in enumerate(zip(got, want)):
        d = (x.double() - y.double()).abs()
        if d.numel() and not torch.allclose(x.double(), y.double(), rtol=RTOL, atol=ATOL, equal_nan=True):
            i = tuple(int(v) for v in torch.unravel_index(torch.nan_to_num(d, nan=float("inf")).argmax(), d.shape)) if d.dim() else ()
            which = f"value {k + 1}, " if len(got) > 1 else ""
            return (f"{which}largest difference {float(d[i]):.3g} at index {list(i)}: yours "
                    f"{float(x[i]):.4g}, expected {float(y[i]):.4g}")
    return "the values differ"


def check(name: str, fn: Callable) -> Feedback:
    """Run the reader's ``fn`` for exercise ``name`` on every input of :data:`EXERCISES`."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}: have {', '.join(EXERCISES)}")
    ex = EXERCISES[name]
    inputs = ex.inputs()
    for label, args in inputs:
        want = _as_tensors(ex.reference(*args))
        try:
            out = fn(*args)
        except NotImplementedError:
            return Feedback(name, False, f"`{ex.signature.split('(')[0]}` is not written yet: replace "
                            "`raise NotImplementedError` with your code and run the cell again.")
        except Exception as e:  # the reader's code: report, never crash the notebook
            return Feedback(name, False, f"your function raised `{type(e).__name__}: {e}` on {label}.")
        got = _as_tensors(out)
        if got is None:
            return Feedback(name, False, f"it returned a {type(out).__name__}; expected `{ex.signature}`.")
        if (problem := _shape_problem(got, want, ex)) is not None:
            return Feedback(name, False, f"On {label}: {problem}")
        if _close(got, want):
            continue
        for m in ex.mistakes:
            try:
                variant = _as_tensors(m.compute(*args))
            except (ValueError, RuntimeError):
                continue  # this mistake cannot be made on this input (e.g. d_model != n_heads * d_head)
            if variant is not None and not _close(variant, want) and _close(got, variant):
                return Feedback(name, False, f"On {label}: {m.message}", mistake=m.name)
        return Feedback(name, False, f"On {label}: not equal to the reference — {_first_difference(got, want)}.")
    n = len(inputs)
    return Feedback(name, True, f"`{ex.signature.split('(')[0]}` matches the reference on {n} "
                    f"input{'s' if n > 1 else ''}: {'; '.join(label for label, _ in inputs)}.")


__all__ = ["Case", "EXERCISES", "Exercise", "Feedback", "HydraCase", "IoiCase", "Mistake", "Run", "check",
           "make_case", "make_hydra_case", "make_ioi_case"]
