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

Speed: per layer, one pass stacks every (head, alpha) copy along the batch, starts at block ``l``
from the clean residual (nnsight ``skip``) and stops as soon as layer ``l``'s ``z`` is read (the
``watch`` callback raises; nothing after the head's own layer is run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .direct_effect import block_scales, head_effects, readout
from .errors import InputError
from .intervene import Pass, run
from .models import Model
from .neurons import keep_top
from .results import head_label, load_tensors, save_tensors
from .heads import check_heads, check_tokens, clean_pass

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


def head_writes(model: Model, clean: Pass, layer: int) -> torch.Tensor:
    """Each head's clean write to the residual stream ``[head, batch, pos, d_model]`` (see module)."""
    zh = model.acc(clean.reads["z"][layer]).unflatten(-1, (model.n_heads, model.d_head))
    w = torch.einsum("bphk,hkd->hbpd", zh, model.head_out_weight(layer))
    if model.sandwich:
        norm = model.module(model.adapter.post_attn_norm, layer)
        s = block_scales(model, "attn", clean.reads["attn"][layer][None], range(layer, layer + 1))[0]
        w = w * model.norm_gain(norm) / s[..., None]
    return w


def amplified_effects(model: Model, tokens: torch.Tensor, clean: Pass, ro, layer: int,
                      heads: list[int], alphas: tuple[float, ...],
                      control: torch.Generator | None = None) -> torch.Tensor:
    """New DE ``[head, alpha, batch, pos-1]`` of each of ``heads`` (of ``layer``) after adding
    ``alpha`` x its own clean write to the input of the layer's attention pre-norm.

    With a ``control`` generator one more entry is appended along the alpha axis: the head's DE
    after adding, at the largest alpha, a random direction with the same norm as its write at each
    position (is the response specific to the head's own output, or any push of that size?)."""
    b = tokens.shape[0]
    w = head_writes(model, clean, layer)
    scaled = []  # (direction, scale) per copy, head-major
    for h in heads:
        scaled += [(w[h], a) for a in alphas]
        if control is not None:
            scaled.append((_random_like(w[h], control), max(alphas)))
    delta = torch.stack([a * v for v, a in scaled]).flatten(0, 1)  # [copy * batch, pos, d]
    per = len(alphas) + (control is not None)
    copies = [(h, j) for h in heads for j in range(per)]
    resume = clean.reads["block"][layer - 1].repeat(len(copies), 1, 1) if layer > 0 else None
    # only this layer's z is needed: the pass stops there (the rest of the model never runs)
    p = run(model, tokens.repeat(len(copies), 1), start_layer=layer, resume=resume,
            edits={("attn_in", layer): lambda x: x + delta.to(x.dtype)}, read=("z",),
            read_layers={"z": [layer]}, stop_after=("z", layer))
    z = p.reads["z"][0][:, :-1].unflatten(0, (len(copies), b))
    de = head_effects(model, z, ro.write_dir(model, "attn", layer), layer)  # [n_heads, copy, b, p]
    new = torch.stack([de[h, i] for i, (h, _) in enumerate(copies)])
    return new.unflatten(0, (len(heads), per))


def _random_like(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction with the norm of ``w [batch, pos, d]`` at every position."""
    r = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.device, w.dtype)
    return r * (w.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-30))


@dataclass
class IterativeResult:
    """``instance``, ``direct_effect`` ``[head, k]`` and ``new_direct_effect`` ``[head, k, alpha]`` on
    each head's top-k% tokens by clean DE; ``sum_de [head]``, ``sum_new [head, alpha]`` over all
    tokens; with the control, ``control_direct_effect [head, k]`` and ``sum_control [head]``."""

    heads: list[tuple[int, int]]
    alphas: tuple[float, ...]
    data: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, self.data, {**self.meta, "heads": [list(h) for h in self.heads],
                                              "alphas": list(self.alphas)})

    @classmethod
    def load(cls, path: str | Path) -> "IterativeResult":
        data, meta = load_tensors(path)
        return cls([tuple(h) for h in meta["heads"]], tuple(meta["alphas"]), data, meta)


def measure_iterative(model: Model, tokens: torch.Tensor, alphas=DEFAULT_ALPHAS, *,
                      heads: list[tuple[int, int]] | None = None, top_percent: float = 2.0,
                      batch_size: int = 8, control: bool = True, seed: int = 0,
                      progress: bool = True) -> IterativeResult:
    """Clean and amplified DE of every (or each listed) head over ``tokens [rows, seq]``, streamed
    ``batch_size`` rows at a time; keeps each head's top-k% tokens by clean DE and all-token sums.
    ``control``: also the norm-matched random push at the largest alpha (seeded by ``seed``)."""
    alphas = check_alphas(alphas)
    tokens = check_tokens(model, tokens).cpu()
    heads = check_heads(model, heads)
    seq1 = tokens.shape[1] - 1
    k = max(1, math.ceil(top_percent / 100 * len(tokens) * seq1))
    layers = sorted({l for l, _ in heads})
    per = len(alphas) + control
    dt = model.effect_dtype
    state, sum_de, sum_new = None, torch.zeros(len(heads), dtype=dt), torch.zeros(len(heads), per, dtype=dt)
    gen = torch.Generator().manual_seed(seed) if control else None
    for start in tqdm(range(0, len(tokens), batch_size), desc="amplify", disable=not progress):
        tok = tokens[start:start + batch_size].to(model.device)
        clean = clean_pass(model, tok)
        ro = readout(model, tok, clean)
        des, news = [], []
        for layer in layers:
            hs = [h for l, h in heads if l == layer]
            des.append(head_effects(model, clean.reads["z"][layer][:, :-1],
                                    ro.write_dir(model, "attn", layer), layer)[hs])
            news.append(amplified_effects(model, tok, clean, ro, layer, hs, alphas, gen))
        de = torch.cat(des).flatten(1).cpu()  # [head, instance]
        new = torch.cat(news).flatten(2).transpose(1, 2).cpu()  # [head, instance, alpha]
        sum_de += de.sum(1)
        sum_new += new.sum(1)
        inst = torch.arange(start * seq1, start * seq1 + de.shape[1]).expand(len(heads), -1)
        state = keep_top(state, {"score": de, "direct_effect": de, "new_direct_effect": new,
                                 "instance": inst}, k)
    new = state.pop("new_direct_effect")
    data = {key: v.contiguous() for key, v in state.items() if key != "score"}
    data.update(new_direct_effect=new[..., :len(alphas)].contiguous(), sum_de=sum_de,
                sum_new=sum_new[:, :len(alphas)].contiguous(), n_all=torch.tensor(len(tokens) * seq1))
    if control:
        data.update(control_direct_effect=new[..., -1].contiguous(), sum_control=sum_new[:, -1].contiguous())
    meta = {**model.describe(), "top_percent": top_percent, "seq_len": tokens.shape[1],
            "n_rows": len(tokens), "k": k, "batch_size": batch_size}
    return IterativeResult(heads, alphas, data, meta)


def amplification_sweep(cfg, alphas=None, *, progress: bool = True) -> IterativeResult:
    """:func:`measure_iterative` of every head for ``cfg`` (cached); ``alphas`` defaults to
    ``cfg.extra["alphas"]`` or :data:`DEFAULT_ALPHAS`."""
    from . import experiment

    alphas = check_alphas(cfg.extra.get("alphas", DEFAULT_ALPHAS) if alphas is None else alphas)
    model = experiment.open_model(cfg)
    params = experiment.cache_params(cfg, model, kind="iterative", alphas=list(alphas), control=True)
    return experiment.cached_result(
        cfg, "iterative", params,
        lambda: measure_iterative(model, experiment.open_tokens(cfg, model), alphas,
                                  top_percent=cfg.top_percent, batch_size=cfg.batch_size,
                                  seed=cfg.seed, progress=progress),
        IterativeResult.load)


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


def on_this_model(res: IterativeResult, classes: pd.DataFrame, threshold: float = 0.1) -> str:
    """The chapter's "On this model" paragraph (Markdown), every number computed."""
    counts = classes["class"].value_counts()
    ok = classes[classes["class"] != "weak"]
    a_max = max(res.alphas)
    rep = ok[ok["class"] == "self-repressing"].sort_values("relative_change")
    rein = ok[ok["class"] == "self-reinforcing"].sort_values("relative_change", ascending=False)
    late = ok[ok["layer"] >= res.meta["n_layers"] // 2]
    moved = ok[ok["class"] != "neutral"]

    def ex(df: pd.DataFrame) -> str:
        return ", ".join(f"{r.label} ({100 * r.relative_change:+.0f}%)" for r in df.head(3).itertuples()) or "none"

    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.0f}%"

    text = (f"**On this model** ({res.meta.get('model')}, {len(classes)} heads, top "
            f"{res.meta.get('top_percent'):g}% tokens = {res.meta.get('k')} per head; classes at "
            f"alpha = {a_max:g} with a threshold of ±{100 * threshold:.0f}% of the head's mean DE): "
            f"{counts.get('self-repressing', 0)} self-repressing, {counts.get('self-reinforcing', 0)} "
            f"self-reinforcing, {counts.get('neutral', 0)} neutral and {counts.get('weak', 0)} weak "
            f"heads (DE too small to classify). In the later half of the layers "
            f"{pct((late['class'] == 'self-repressing').mean() if len(late) else float('nan'))} of the "
            f"classified heads self-repress. Strongest self-repressing: {ex(rep)}; strongest "
            f"self-reinforcing: {ex(rein)}. The mean DE flips sign for {pct(ok['flips'].mean())} of the "
            f"classified heads; the change keeps one direction as alpha grows for "
            f"{pct(moved['monotone'].mean() if len(moved) else float('nan'))} of the non-neutral ones "
            f"(the paper: repression proportional to alpha for GPT2-Medium L21H1). Over all tokens, not "
            f"only the top ones, the mean DE moves the same way for "
            f"{pct((np.sign(moved['relative_change_all']) == np.sign(moved['relative_change'])).mean() if len(moved) else float('nan'))}"
            f" of the non-neutral heads.")
    if classes["control_change"].notna().any():
        n_rep, n_rein = len(rep), len(rein)
        text += (f" Control: a random push of the same norm changes the classified heads' top-token "
                 f"DE by a median {100 * ok['control_change'].median():+.0f}% (their own output: "
                 f"{100 * ok['relative_change'].median():+.0f}%); {int(rep['specific'].sum())} of the "
                 f"{n_rep} self-repressing and {int(rein['specific'].sum())} of the {n_rein} "
                 f"self-reinforcing heads respond to their own output beyond that push by at least "
                 f"the threshold (*specific*).")
    return text
