"""Ablating with the norms frozen, and with everything frozen but the norms (self-repair paper §3
opening, §5.2).

§3: "If we ablate a head and freeze the output of all downstream components *except* for the
LayerNorm normalization factor, this recovers a significant logit difference relative to freezing
all components *including* the normalization factor." §5.2 suggests "freezing LayerNorm while
ablating" to keep ablations closer to the model's distribution. Two patched passes per head
(:func:`selfrepair.passes.ablate_heads` with ``freeze``), beside the live one of the shared sweep:

- **norms frozen** (``freeze="norms"``): the final norm divides by its clean scale ``S`` and, in
  sandwich models, every block norm from the ablated layer's post-attention norm on divides by
  its clean scale ``s`` (inside the forward: later components read residuals built with frozen
  norms). The ablated layer's own post-attention norm is frozen too: it is downstream of the
  head's raw output, and its reaction is part of eq. 2's ``from_block_norms``. The pre-norms in
  front of attention and the MLP stay live: they belong to the component they feed, as in eq. 2.
  ``self_repair_frozen = delta_logit_frozen - delta_DE = from_heads' + from_mlps'`` (the
  downstream components' change in this pass).
- **norms only** (``freeze="components"``): every downstream attention and MLP output replaced
  by its clean value, the norms live — the repair the norms alone give:
  ``self_repair_norms_only = from_norm'' + from_block_norms''``.

What the algebra says (tests/test_frozen_norm.py checks each, per token):

- without sandwich norms nothing upstream of the final norm changes when it is frozen, so
  ``self_repair - self_repair_frozen = from_norm`` and ``self_repair_frozen = from_heads +
  from_mlps`` of the live pass, exactly;
- with sandwich norms freezing only the final norm gives the same identity; freezing the block
  norms as well changes what later components read, so ``self_repair - self_repair_frozen`` equals
  ``from_norm + from_block_norms`` plus the change of the components' own reactions, which no
  eq. 2 term predicts (the book shows how large it is);
- norms only, without sandwich norms: the ablated residual is the clean one plus the head's
  change, so ``delta_logit`` is App. B's closed form for *every* head (not only a last-layer head
  of a parallel model); with sandwich norms the ablated layer's post-attention norm reacts too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from .batch import TokenSet, clean_batch
from .errors import SelfRepairError
from .heads import check_heads, each_head, head_groups
from .measure import RunOptions, Spec
from .models import Model
from .passes import ablate_heads
from .results import Result, head_label

MODES = {"frozen": "norms", "norms_only": "components"}  # result prefix -> ablate_heads(freeze=)
TERMS = ("delta_logit", "self_repair", "from_heads", "from_mlps", "from_norm", "from_block_norms")


@dataclass
class FrozenNormResult(Result):
    """Per listed head and token, ``[head, batch, pos-1]`` in the order of ``heads``: the clean and
    ablated direct effects, and every term of eq. 2 in the frozen-norm pass (``frozen/<term>``)
    and in the norms-only pass (``norms_only/<term>``). Signs as everywhere: ``delta = ablated -
    clean``, ``self_repair = delta_logit - (ablated_direct_effect - direct_effect)``."""

    direct_effect: torch.Tensor
    ablated_direct_effect: torch.Tensor
    frozen: dict[str, torch.Tensor]
    norms_only: dict[str, torch.Tensor]
    tokens: torch.Tensor | None = None
    corrupt_tokens: torch.Tensor | None = None
    ablation: str = "resample"
    heads: list = field(default_factory=list)

    def index(self, head: tuple[int, int]) -> int:
        return self.heads.index(tuple(head))

    def at(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` (columns ``layer, head, row, pos``, e.g. the sweep's top-k% instances of the
        listed heads) with this result's values at those instances."""
        listed = set(self.heads)
        rows = rows[[tuple(h) in listed for h in zip(rows["layer"], rows["head"])]]
        i = torch.tensor([self.index(h) for h in zip(rows["layer"], rows["head"])], dtype=torch.long)
        b = torch.tensor(rows["row"].to_numpy(dtype="int64", copy=True))
        p = torch.tensor(rows["pos"].to_numpy(dtype="int64", copy=True))
        cols = {"direct_effect_frozen_pass": self.direct_effect[i, b, p]}
        for prefix in MODES:
            for term, t in getattr(self, prefix).items():
                cols[f"{term}_{prefix}"] = t[i, b, p]
        return rows.assign(**{c: v.double().numpy() for c, v in cols.items()})

    def to_frame(self) -> pd.DataFrame:
        """Per listed head, the means over every token measured."""
        rows = []
        for i, (layer, head) in enumerate(self.heads):
            row = {"layer": layer, "head": head, "label": head_label(layer, head),
                   "direct_effect": float(self.direct_effect[i].double().mean())}
            for prefix in MODES:
                row.update({f"{t}_{prefix}": float(v[i].double().mean())
                            for t, v in getattr(self, prefix).items()})
            rows.append(row)
        return pd.DataFrame(rows)


def frozen_norm_ablation(model: Model, data: TokenSet, heads, ablation: str = "resample", *,
                         batch_size: int = 8, max_rows: int = 64, progress: bool = True) -> FrozenNormResult:
    """Both passes (module docstring) for each of ``heads`` on every token of ``data``."""
    spec = FrozenNormSpec(heads=tuple(check_heads(model, heads)), ablation=ablation)
    return spec.compute(model, data, RunOptions(batch_size=max(1, min(len(data), batch_size)),
                                                max_rows=max_rows, progress=progress))


def _batch_frozen(model: Model, rows: dict, ablation: str, mz: torch.Tensor | None, pairs: list) -> dict:
    """One batch of :func:`frozen_norm_ablation` (inside its request): the terms of both passes and
    the heads' clean / ablated DEs, ``{name: [b, head, seq-1]}`` (``pairs`` in order) on the CPU."""
    batch = clean_batch(model, rows["tokens"], rows["corrupt"], start=rows["start"])
    repl = batch.replacement(ablation, mz)
    got = {}
    for layer, hs in head_groups(pairs, max(1, rows["max_rows"] // batch.rows)):
        per = {}
        for prefix, freeze in MODES.items():
            res = ablate_heads(batch, layer, hs, repl[layer], freeze=freeze)
            per.update({f"{prefix}/{t}": getattr(res, t) for t in TERMS})
        per["direct_effect"], per["ablated_direct_effect"] = res.direct_effect, res.ablated_direct_effect
        got.update({(layer, h): {k: v[i].cpu() for k, v in per.items()} for i, h in enumerate(hs)})
    return {k: torch.stack([got[p][k] for p in pairs], 1) for k in got[pairs[0]]}


@dataclass(frozen=True)
class FrozenNormSpec(Spec):
    """:func:`frozen_norm_ablation` of listed heads as a cached spec (chapter 2)."""

    kind = "frozen_norm"
    result = FrozenNormResult

    heads: tuple[tuple[int, int], ...]  # the (layer, head) pairs ablated, one at a time
    ablation: str = "resample"

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> FrozenNormResult:
        """The driver runs :func:`_batch_frozen` on every batch; per-row outputs in row order."""
        run, pairs, got = each_head(self, model, data, options, "frozen-norm ablation", _batch_frozen)
        out = {k: v.transpose(0, 1).to(model.effect_dtype).contiguous() for k, v in got.items()}
        rec = run.record()
        return FrozenNormResult(out["direct_effect"], out["ablated_direct_effect"],
                                {t: out[f"frozen/{t}"] for t in TERMS},
                                {t: out[f"norms_only/{t}"] for t in TERMS},
                                tokens=rec["tokens"], corrupt_tokens=rec.get("corrupt_tokens"),
                                ablation=self.ablation, heads=pairs, meta=run.meta(ablation=self.ablation))


def per_head(top: pd.DataFrame, result: FrozenNormResult) -> pd.DataFrame:
    """Per listed head, means over its top-k% instances (``top``: the shared sweep's per-token
    rows, live pass): the live ``self_repair`` and its eq. 2 norm terms, the frozen-norm and the
    norms-only self-repair, and ``gap = (self_repair - self_repair_frozen) - (from_norm +
    from_block_norms)`` — zero where the algebra says freezing removes exactly eq. 2's norm terms."""
    t = result.at(top)
    if len(t) == 0:
        raise SelfRepairError("none of the frozen-norm heads has top-k% rows in the sweep")
    spread = (t["direct_effect"] - t["direct_effect_frozen_pass"]).abs().max()
    if spread > 1e-3 * max(1.0, float(t["direct_effect"].abs().max())):
        raise SelfRepairError(
            f"the clean direct effects of the frozen-norm run and of the sweep differ by {spread:.3g}: "
            "they were computed on different tokens (was the corpus changed?). Delete the cached "
            "files under cache_dir and run again.")
    cols = ["direct_effect", "self_repair", "from_heads", "from_mlps", "from_norm", "from_block_norms",
            "self_repair_frozen", "from_heads_frozen", "from_mlps_frozen", "self_repair_norms_only"]
    out = t.groupby(["layer", "head", "label"], sort=True)[cols].mean().reset_index()
    out["n"] = t.groupby(["layer", "head"], sort=True).size().to_numpy()
    out["norm_terms"] = out["from_norm"] + out["from_block_norms"]
    out["removed"] = out["self_repair"] - out["self_repair_frozen"]
    out["gap"] = out["removed"] - out["norm_terms"]
    return out


def long_frame(heads: pd.DataFrame) -> pd.DataFrame:
    """:func:`per_head` in long format for the figure: one row per head x measure."""
    names = {"self_repair": "live", "self_repair_frozen": "norms frozen",
             "self_repair_norms_only": "norms only", "norm_terms": "eq. 2 norm terms"}
    return (heads.melt(id_vars=["layer", "head", "label", "direct_effect", "n"], value_vars=list(names),
                       var_name="quantity", value_name="value")
            .assign(measure=lambda f: f["quantity"].map(names)))


def summary(heads: pd.DataFrame) -> dict:
    """The numbers the chapter's paragraph quotes, from :func:`per_head`."""
    pos = heads[heads["self_repair"] > 0]
    halved = pos["self_repair_frozen"] < 0.5 * pos["self_repair"]
    worst = heads.loc[heads["gap"].abs().idxmax()]
    de = heads["direct_effect"].where(heads["direct_effect"] != 0)
    return {"n_heads": len(heads), "n_positive": len(pos), "n_halved": int(halved.sum()),
            "max_gap": float(worst["gap"]), "max_gap_head": str(worst["label"]),
            "max_norm_terms": float(heads["norm_terms"].abs().max()),
            "mean_norms_only": float(heads["self_repair_norms_only"].mean()),
            "mean_norm_terms": float(heads["norm_terms"].mean()),
            "mean_self_repair": float(heads["self_repair"].mean()),
            "mean_frozen": float(heads["self_repair_frozen"].mean()),
            "norms_only_share": (heads["self_repair_norms_only"] / de).dropna()}


__all__ = ["FrozenNormResult", "FrozenNormSpec", "MODES", "frozen_norm_ablation", "long_frame",
           "per_head", "summary"]
