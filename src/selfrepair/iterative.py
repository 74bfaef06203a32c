"""Iterative inference: self-reinforcing and self-repressing heads (paper §5.3, App. F, G; Fig 18, 19).

For a head ``(l, h)`` we take its clean output and add it, scaled by ``alpha``, back into the
residual stream *that feeds the head*: the input of layer ``l``'s attention pre-norm becomes
``x + alpha * w_h`` (site ``attn_in``). Only layer ``l``'s attention reads the edited input (all its
heads do); the residual stream itself, and so every other component, is untouched.

``w_h`` is what the head adds to the residual stream on the clean run: ``z_h @ W_O[h]`` (value
bias included, ``b_O`` excluded); in sandwich-norm models (Gemma-2/3) the post-attention-normed
write ``g * (z_h @ W_O[h]) / s`` with the clean scale ``s`` — the head's share of the block's write.

The head's **new direct effect** is ``DE(z'_h @ W_O[h])`` at the clean scales (final norm ``S`` and,
in sandwich models, ``s``), exactly like its clean DE; ``alpha = 0`` gives the clean DE back.
``relative_change = (mean new DE - mean DE) / |mean DE|`` over the head's top-k% tokens by clean
DE. A head is **self-reinforcing** if ``relative_change >= threshold`` at the largest alpha,
**self-repressing** if ``<= -threshold``, **neutral** otherwise, and **weak** (unclassified) when its
mean top-token DE is below ``min_effect`` x the median head's (a relative change of a tiny DE is
noise). A class is **specific** when the head responds to its own output beyond its response to a
random push of the same norm (the control) by at least ``threshold`` in the class's direction.

Speed: per layer, one pass (:func:`selfrepair.passes.amplify_heads`) stacks every (head, alpha) copy
along the batch, starts at block ``l`` from the clean residual (nnsight ``skip``) and stops as soon
as layer ``l``'s ``z`` is read (nothing after the head's own layer is run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch

from .batch import TokenSet, clean_batch
from .driver import Driver, Stage, folding
from .errors import InputError
from .heads import check_heads, token_set
from .measure import RunOptions, Spec
from .models import Model
from .passes import amplify_heads
from .results import Result, head_label
from .selection import TIE_RULE, keep_top
from .structure import top_k

DEFAULT_ALPHAS = (1.0, 3.0, 5.0)


def check_alphas(alphas) -> tuple[float, ...]:
    """Scales as a tuple of floats (a list, a number or a string like ``"1,3,5"``)."""
    if isinstance(alphas, str):
        alphas = [a for a in alphas.replace("[", "").replace("]", "").split(",") if a.strip()]
    try:
        out = tuple(float(a) for a in (alphas if hasattr(alphas, "__iter__") else [alphas]))
    except (TypeError, ValueError):
        raise InputError(f"alphas must be numbers like [1, 3, 5], got {alphas!r}") from None
    if not out or not all(math.isfinite(a) for a in out):
        raise InputError(f"alphas must be finite numbers like [1, 3, 5], got {alphas!r}")
    return out


@dataclass
class IterativeResult(Result):
    """``instance``, ``direct_effect`` ``[head, k]`` and ``new_direct_effect`` ``[head, k, alpha]`` on
    each head's top-k% tokens by clean DE; ``sum_de [head]``, ``sum_new [head, alpha]`` over all
    tokens; with the control, ``control_direct_effect [head, k]`` and ``sum_control [head]``."""

    heads: list
    alphas: tuple
    data: dict
    tokens: torch.Tensor | None = None  # [rows, seq] the rows measured

    def __post_init__(self):
        self.alphas = tuple(self.alphas)

    def to_frame(self) -> pd.DataFrame:
        return response(self)


def measure_iterative(model: Model, tokens: torch.Tensor | TokenSet, alphas=DEFAULT_ALPHAS, *,
                      heads: list[tuple[int, int]] | None = None, top_percent: float = 2.0,
                      batch_size: int = 8, control: bool = True, seed: int = 0,
                      progress: bool = True) -> IterativeResult:
    """Clean and amplified DE of every (or each listed) head over ``tokens [rows, seq]``, streamed
    ``batch_size`` rows at a time; keeps each head's top-k% tokens by clean DE (ties: the lower
    token index, :data:`~selfrepair.selection.TIE_RULE`) and all-token sums. ``control``: also the
    norm-matched random push at the largest alpha (seeded by ``seed``)."""
    spec = AmplifySpec(alphas=check_alphas(alphas), top_percent=top_percent, control=control, seed=seed)
    return amplify(spec, model, token_set(model, tokens), RunOptions(batch_size=batch_size, progress=progress),
                   heads)


def amplify(spec: "AmplifySpec", model: Model, data: TokenSet, options: RunOptions,
            heads: list[tuple[int, int]] | None = None) -> IterativeResult:
    """``spec`` on ``data`` through the driver: :func:`_batch_amplify` per batch, its sums and its
    own top-k folded into the running ones (:func:`_merge`)."""
    alphas, heads = check_alphas(spec.alphas), check_heads(model, heads)
    run = Driver(model, data, options, key=spec.key())
    k = top_k(data.n_instances, spec.top_percent)
    layers = sorted({l for l, _ in heads})
    state = run.run(Stage("amplify", _batch_amplify, folding(partial(_merge, k=k)),
                          args=(heads, layers, alphas, spec.seed if spec.control else None, k)))
    top = dict(state["top"])
    new = top.pop("new_direct_effect")
    out = {key: v.contiguous() for key, v in top.items() if key != "score"}
    out.update(new_direct_effect=new[..., :len(alphas)].contiguous(), sum_de=state["sum_de"],
               sum_new=state["sum_new"][:, :len(alphas)].contiguous(), n_all=torch.tensor(data.n_instances))
    if spec.control:
        out.update(control_direct_effect=new[..., -1].contiguous(),
                   sum_control=state["sum_new"][:, -1].contiguous())
    meta = run.meta(top_percent=spec.top_percent, seq_len=data.seq_len, n_rows=len(data), k=k)
    return IterativeResult(heads, alphas, out, tokens=data.tokens, meta=meta)


def _merge(a: dict, b: dict, *, k: int) -> dict:
    """Two runs' sums added and their top-k merged (rows of ``a`` first)."""
    return {"sum_de": a["sum_de"] + b["sum_de"], "sum_new": a["sum_new"] + b["sum_new"],
            "top": keep_top(a["top"], b["top"], k)}


def _batch_amplify(model: Model, rows: dict, heads: list, layers: list, alphas: tuple,
                   control: int | None, k: int) -> dict:
    """One batch of :func:`measure_iterative` (inside its request): per head the sums over the
    batch's instances of the clean DE ``sum_de [head]`` and of the amplified DEs ``sum_new [head,
    alpha (+ control)]``, and the batch's own top-``k`` rows (``top``: clean DE as ``score``, the
    amplified DEs, ``instance``), on the CPU."""
    batch = clean_batch(model, rows["tokens"], start=rows["start"])
    des, news = [], []
    for layer in layers:
        hs = [h for l, h in heads if l == layer]
        des.append(batch.head_de(layer)[hs])
        news.append(amplify_heads(batch, layer, hs, alphas, control))
    de = torch.cat(des).flatten(1).cpu()  # [head, instance]
    new = torch.cat(news).flatten(2).transpose(1, 2).cpu()  # [head, instance, alpha]
    inst = batch.instances().expand(len(heads), -1)
    return {"sum_de": de.sum(1), "sum_new": new.sum(1),
            "top": keep_top(None, {"score": de, "direct_effect": de, "new_direct_effect": new,
                                   "instance": inst}, k)}


@dataclass(frozen=True)
class AmplifySpec(Spec):
    """Every head fed its own output, scaled by each alpha (chapter 4)."""

    kind = "iterative"
    result = IterativeResult

    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # scales of the head's own output added to its input
    top_percent: float = 2.0  # per head, the top k% of tokens by clean direct effect kept
    control: bool = True  # also a random push of the same norm at the largest alpha
    seed: int = 0  # the control's random directions

    def key(self) -> dict:
        """Also the tie rule of the top-k% selection (:data:`~selfrepair.selection.TIE_RULE`)."""
        return {**super().key(), "ties": TIE_RULE}

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> IterativeResult:
        return amplify(self, model, data, options)


# -- tidy frames -------------------------------------------------------------------------------
def response(res: IterativeResult, classes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per head x alpha (``alpha = 0`` included: the unchanged input, new DE = DE): mean DE
    and new DE on the head's top tokens and over all tokens, ``relative_change`` (top tokens);
    with ``classes`` (:func:`classify`) also each head's ``class``."""
    de = res.data["direct_effect"].double().mean(1)
    new = res.data["new_direct_effect"].double().mean(1)  # [head, alpha]
    n_all = float(res.data["n_all"])
    rows = []
    for i, (l, h) in enumerate(res.heads):
        for j, a in ([] if 0.0 in res.alphas else [(None, 0.0)]) + list(enumerate(res.alphas)):
            nd = float(de[i] if j is None else new[i, j])
            na = float(res.data["sum_de"][i] if j is None else res.data["sum_new"][i, j]) / n_all
            rows.append({"label": head_label(l, h), "layer": l, "head": h, "alpha": a,
                         "direct_effect": float(de[i]), "new_direct_effect": nd,
                         "relative_change": (nd - float(de[i])) / max(abs(float(de[i])), 1e-12),
                         "direct_effect_all": float(res.data["sum_de"][i]) / n_all,
                         "new_direct_effect_all": na})
    out = pd.DataFrame(rows)
    return out if classes is None else out.merge(classes[["label", "class"]], on="label", how="left")


def classify(res: IterativeResult, threshold: float = 0.1, min_effect: float = 0.25) -> pd.DataFrame:
    """One row per head at the largest alpha: ``relative_change`` (top tokens; gives ``class``, see
    module docstring), ``relative_change_all`` (all tokens: free of the top-token selection, whose
    extreme DEs tend to shrink under any perturbation), ``control_change`` (top tokens, a random push
    of the same norm instead of the head's own output), ``slope`` (least squares of the relative change
    on alpha through 0), ``monotone`` (one direction as alpha grows) and ``flips`` (mean DE changes sign)."""
    r = response(res)
    a_max = max(res.alphas)
    de = res.data["direct_effect"].double().mean(1)
    ctrl = res.data.get("control_direct_effect")
    rows = []
    for i, (label, g) in enumerate(r.groupby("label", sort=False)):
        g = g.sort_values("alpha")
        rel, al = g["relative_change"].to_numpy(), g["alpha"].to_numpy()
        steps = np.diff(rel)
        last = g[g["alpha"] == a_max].iloc[0]
        base_all = last["direct_effect_all"]
        rows.append({"label": label, "layer": int(last["layer"]), "head": int(last["head"]),
                     "direct_effect": last["direct_effect"], "alpha": a_max,
                     "new_direct_effect": last["new_direct_effect"],
                     "relative_change": last["relative_change"],
                     "relative_change_all": (last["new_direct_effect_all"] - base_all)
                     / max(abs(base_all), 1e-12),
                     "control_change": float("nan") if ctrl is None else
                     float((ctrl[i].double().mean() - de[i]) / max(abs(float(de[i])), 1e-12)),
                     "slope": float((al * rel).sum() / max((al ** 2).sum(), 1e-12)),
                     "monotone": bool((steps >= 0).all() or (steps <= 0).all()),
                     "flips": bool(np.sign(last["new_direct_effect"]) != np.sign(last["direct_effect"]))})
    out = pd.DataFrame(rows)
    weak = out["direct_effect"] < min_effect * out["direct_effect"].median()
    out["class"] = np.select([weak, out["relative_change"] >= threshold,
                              out["relative_change"] <= -threshold],
                             ["weak", "self-reinforcing", "self-repressing"], "neutral")
    beyond = out["relative_change"] - out["control_change"]
    out["specific"] = (((out["class"] == "self-reinforcing") & (beyond >= threshold))
                       | ((out["class"] == "self-repressing") & (beyond <= -threshold)))
    return out


def featured(classes: pd.DataFrame, n: int = 4, chosen=None) -> list[str]:
    """``chosen`` labels when given (``cfg.featured_heads``); else, among the classified heads with at
    least the median head's DE (large heads: their relative changes are not noise), the ``n`` most
    extreme: the strongest self-repressing ones first, then the strongest self-reinforcing ones (half
    each when both exist)."""
    if chosen:
        return list(chosen)
    ok = classes[(classes["class"] != "weak")
                 & (classes["direct_effect"] >= classes["direct_effect"].median())]
    ok = ok.sort_values("relative_change")
    down, up = ok[ok["relative_change"] < 0], ok[ok["relative_change"] > 0].iloc[::-1]
    n_down = min(len(down), max(n - len(up), n // 2 + n % 2))
    return list(down["label"].iloc[:n_down]) + list(up["label"].iloc[:n - n_down])


def token_frame(res: IterativeResult, labels: list[str]) -> pd.DataFrame:
    """Fig 18/19: per listed head x alpha x top token, the original and new DE."""
    seq1, frames = res.meta["seq_len"] - 1, []
    for i, (l, h) in enumerate(res.heads):
        if head_label(l, h) not in labels:
            continue
        inst = res.data["instance"][i]
        for j, a in enumerate(res.alphas):
            frames.append(pd.DataFrame({
                "label": head_label(l, h), "layer": l, "head": h, "alpha": a,
                "row": (inst // seq1).numpy(), "pos": (inst % seq1).numpy(),
                "direct_effect": res.data["direct_effect"][i].numpy(),
                "new_direct_effect": res.data["new_direct_effect"][i, :, j].numpy()}))
    if not frames:
        raise InputError(f"none of {labels} was measured")
    return pd.concat(frames, ignore_index=True)
