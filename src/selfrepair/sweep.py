"""All-heads self-repair over a whole token set: streamed, resumable, cached.

Two passes over the rows, ``batch_size`` at a time, so memory does not grow with the number of
tokens:

1. *clean* (cheap): every head's clean direct effect per token; a running per-head top-k keeps
   the exact top ``top_percent``% instances (the paper's 2% of tokens by DE); for ``mean``
   ablation the mean ``z`` over every token is accumulated as well; and each token's
   ``competitor_gap`` — how far the correct token's logit is above its strongest competitor's, in
   the part of the logits the final norm's scale multiplies (App. H).
2. *ablate*: every head ablated (:func:`selfrepair.passes.ablate_heads`); per head, sums of
   every quantity over all tokens (the paper's Fig 2 "across the whole dataset") and over its top
   instances (Fig 1), and the per-token values of its top instances plus a uniform random sample
   of instances, the same for all heads (Fig 3's "tokens of the distribution").

Each row's resample source is fixed for the whole token set (from another document, see
:func:`selfrepair.data.resample_sources`), so the numbers do not depend on ``batch_size`` and a
lone last row is measured like any other. A head's top instances are chosen by
:data:`~selfrepair.selection.TIE_RULE` (equal DEs: the lower token index first), so the selection
does not depend on the batch size or on the number of processes either. Per-token rows are stored
sorted by (kind, layer, head, instance), whatever the batch size.

Both passes are stages of the measurement driver (:mod:`selfrepair.driver`), which checkpoints,
resumes, shards under ``torchrun`` (pass 1 merges exactly: the global top-k of every rank's top-k
candidates, summed ``z``, the gaps of every row; pass 2's sums, counts and per-token rows are
merged at the end; every rank returns the same :class:`Sweep`, rank 0 writes it) and retries a
batch that runs out of memory with fewer rows. What the sweep supplies: the two per-batch
functions of :mod:`selfrepair.sweep_batch` and their folds (:func:`_candidates`, :func:`_add_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from .ablation import check_ablation
from .batch import TokenSet, token_set
from .checkpoint import remove
from .distributed import world
from .driver import Driver, Fold, Stage, plus
from .errors import InputError
from .measure import RunOptions, Spec
from .models import Model
from .results import Result, head_label
from .selection import TIE_RULE, ranked
from .structure import top_k
from .sweep_batch import COLUMNS, KIND_SAMPLE, KIND_TOP, ROW_COLUMNS, ablated_sums, clean_summary
from .sweep_batch import competitor, competitor_gap  # noqa: F401 - the sweep's own quantities

SAMPLE_SIZE = 5000  # the paper's Fig 3: 5,000 individual tokens of the distribution


@dataclass
class Sweep(Result):
    """Per-head summaries and selected per-token values of an all-heads sweep."""

    sum_all: torch.Tensor  # [layer, head, column] sums over every token
    sum_top: torch.Tensor  # [layer, head, column] sums over each head's top instances
    n_all: int
    n_top: torch.Tensor  # [layer, head]
    tok_index: torch.Tensor  # [n, 4] layer, head, instance (row * (seq-1) + pos), kind
    tok_values: torch.Tensor  # [n, column]
    tokens: torch.Tensor | None = None  # [rows, seq] the rows measured
    corrupt_tokens: torch.Tensor | None = None  # [rows, seq] their resample sources
    sum_row: torch.Tensor | None = None  # [rows, layer, head, ROW_COLUMNS] each row's sums
    main_document: torch.Tensor | None = None  # [rows] the document holding most of each row (None: unknown)

    @property
    def n_layers(self) -> int:
        return self.sum_all.shape[0]

    @property
    def seq1(self) -> int:
        return (self.tokens.shape[1] if self.tokens is not None else self.meta["seq_len"]) - 1

    @property
    def heads(self) -> list[tuple[int, int]]:
        L, H, _ = self.sum_all.shape
        return [(l, h) for l in range(L) for h in range(H)]

    def per_head(self) -> pd.DataFrame:
        """One row per head: ``<q>`` = mean over the head's top instances (Fig 1), ``<q>_all`` =
        mean over every token (Fig 2), ``n_top``, ``n_all``; canonical columns ``layer, head, label``."""
        L, H, _ = self.sum_all.shape
        top = (self.sum_top / self.n_top.clamp_min(1)[..., None]).double()
        every = (self.sum_all / max(1, self.n_all)).double()
        layer, head = torch.meshgrid(torch.arange(L), torch.arange(H), indexing="ij")
        df = pd.DataFrame({"layer": layer.flatten().numpy(), "head": head.flatten().numpy()})
        df.insert(2, "label", [head_label(l, h) for l, h in zip(df["layer"], df["head"])])
        df["n_top"], df["n_all"] = self.n_top.flatten().numpy(), self.n_all
        for i, q in enumerate(COLUMNS):
            df[q] = top[..., i].flatten().numpy()
            df[f"{q}_all"] = every[..., i].flatten().numpy()
        df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
        df["delta_direct_effect_all"] = df["ablated_direct_effect_all"] - df["direct_effect_all"]
        return df

    def to_frame(self) -> pd.DataFrame:
        return self.per_head()

    def tokens_frame(self, kind: str = "top") -> pd.DataFrame:
        """Per-token rows of ``kind`` "top" (each head's top instances) or "sample" (a uniform
        sample of all instances, the same for every head)."""
        sel = self.tok_index[:, 3] == (KIND_TOP if kind == "top" else KIND_SAMPLE)
        idx, vals = self.tok_index[sel], self.tok_values[sel]
        df = pd.DataFrame(vals.double().numpy(), columns=list(COLUMNS))
        df.insert(0, "layer", idx[:, 0].numpy())
        df.insert(1, "head", idx[:, 1].numpy())
        df.insert(2, "label", [head_label(l, h) for l, h in idx[:, :2].tolist()])
        df.insert(3, "row", (idx[:, 2] // self.seq1).numpy())
        df.insert(4, "pos", (idx[:, 2] % self.seq1).numpy())
        df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
        return df


@dataclass(frozen=True)
class SweepSpec(Spec):
    """Every head of the model ablated on every token (chapters 1, 2, 3 and 6)."""

    kind = "sweep"
    result = Sweep
    layout = 2  # 2: per-row sums (sum_row) and each row's main document; older entries lack them

    ablation: str = "resample"  # what replaces each head's output
    top_percent: float = 2.0  # per head, the top k% of tokens by clean direct effect
    sample_size: int = SAMPLE_SIZE  # instances kept per head for per-token views (uniform sample)
    seed: int = 0  # which instances the sample holds

    def key(self) -> dict:
        """Also the tie rule of the top-k% selection (:data:`~selfrepair.selection.TIE_RULE`)."""
        return {**super().key(), "ties": TIE_RULE}

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> Sweep:
        """The driver's two stages (module docstring): :func:`thresholds`, then
        :func:`~selfrepair.sweep_batch.ablated_sums` on every batch, its sums added and its
        per-token rows kept (:func:`_add_rows`)."""
        check_ablation(self.ablation)
        if self.sample_size < 0:
            raise InputError(f"sample_size must be >= 0, got {self.sample_size}")
        run = Driver(model, data, options, key=self.key(), sources=self.ablation == "resample")
        n_inst, seq1 = data.n_instances, data.seq_len - 1
        top_idx, mean_z, gaps = thresholds(run, top_k(n_inst, self.top_percent), self.ablation == "mean")
        g = torch.Generator().manual_seed(self.seed)
        sample = torch.randperm(n_inst, generator=g)[:min(self.sample_size, n_inst)].sort().values
        got = run.run(Stage(f"{self.ablation} sweep", ablated_sums, Fold(_add_rows, _join_rows),
                            args=(self.ablation, mean_z, top_idx, sample), sources=self.ablation == "resample",
                            per_item={"gap": gaps.view(len(data), seq1)}))
        index, values = torch.cat(got["tok_index"]), torch.cat(got["tok_values"])
        order = _canonical_order(index, model.n_layers, model.n_heads, n_inst)
        rec = run.record()
        return Sweep(got["sum_all"].float(), got["sum_top"].float(), n_inst, got["n_top"], index[order],
                     values[order], tokens=rec["tokens"], corrupt_tokens=rec.get("corrupt_tokens"),
                     sum_row=torch.cat(got["sum_row"]), main_document=data.main_document,
                     meta=run.meta(ablation=self.ablation, top_percent=self.top_percent, seed=self.seed,
                                   sample_size=self.sample_size, seq_len=data.seq_len, n_rows=len(data),
                                   n_tokens=int(data.tokens.numel()), same_document_sources=data.same_document))


def _candidates(a: dict | None, b: dict | None, *, k: int) -> dict | None:
    """Two runs' clean-pass states joined (``a``'s rows first): each head's top-``k`` candidates
    ``v`` (clean DE), ``i`` (instance) under :data:`~selfrepair.selection.TIE_RULE`, the
    competitor gaps of every row in order, the ``z`` sums added."""
    parts = [p for p in (a, b) if p is not None]
    if not parts:
        return None
    v, i = torch.cat([p["v"] for p in parts], -1), torch.cat([p["i"] for p in parts], -1)
    top = ranked(v, i, k)
    return {"v": v.gather(-1, top), "i": i.gather(-1, top), "gap": [g for p in parts for g in p["gap"]],
            "z_sum": plus(parts[0]["z_sum"], parts[-1]["z_sum"] if len(parts) > 1 else None)}


def _first_pass(out: dict) -> dict:
    """One batch's :func:`~selfrepair.sweep_batch.clean_summary` as a clean-pass state."""
    v = out["de"]
    return {"v": v, "i": out["instances"].expand(*v.shape[:2], -1), "gap": [out["competitor_gap"]],
            "z_sum": out.get("z_sum")}


def thresholds(run: Driver, k: int, with_mean_z: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pass 1 (the driver's stage "clean pass"): each head's top-``k`` instance indices ``[layer,
    head, k]`` (sorted) by clean DE, ties to the lower instance index, the mean ``z`` over all
    tokens (when ``with_mean_z``) and every instance's ``competitor_gap`` ``[n_instances]``. Each
    batch's clean DEs are merged into the running top-``k`` as they come; under torchrun the ranks'
    candidates are merged the same way (exact: :data:`~selfrepair.selection.TIE_RULE` is a total
    order), the gaps joined in row order, the ``z`` sums added."""
    merge = partial(_candidates, k=k)
    state = run.run(Stage("clean pass", clean_summary, Fold(lambda s, out, items: merge(s, _first_pass(out)), merge),
                          args=(with_mean_z,)))
    mean_z = None if state["z_sum"] is None else (state["z_sum"] / run.data.tokens.numel())[:, None, None].float()
    return state["i"].sort(-1).values, mean_z, torch.cat(state["gap"])


def _add_rows(state: dict | None, out: dict, items: torch.Tensor) -> dict:
    """One batch of pass 2 folded in: its sums added, its per-row sums and per-token rows kept (one
    chunk each; the rows are contiguous and folded in order, so the chunks are in row order)."""
    part = {k: out[k] for k in ("sum_all", "sum_top", "n_top")}
    part["sum_row"] = [out["sum_row"]]
    part["tok_index"] = [torch.cat(out["index"]) if out["index"] else torch.zeros(0, 4, dtype=torch.long)]
    part["tok_values"] = [torch.cat(out["values"]) if out["values"] else torch.zeros(0, len(COLUMNS))]
    return _join_rows(state, part)


def _join_rows(a: dict | None, b: dict | None) -> dict | None:
    """Two runs' pass-2 states (``a``'s rows first): sums and counts added, per-row sums and
    per-token rows joined (lists of chunks)."""
    if a is None or b is None:
        return b if a is None else a
    return {k: a[k] + b[k] for k in ("sum_all", "sum_top", "n_top", "sum_row", "tok_index", "tok_values")}


def run_sweep(model: Model, tokens: torch.Tensor | TokenSet, *, ablation: str = "resample",
              top_percent: float = 2.0, batch_size: int = 8, seed: int = 0,
              sample_size: int = SAMPLE_SIZE, max_rows: int = 64,
              corrupt_tokens: torch.Tensor | None = None, path: str | Path | None = None,
              checkpoint: str | Path | None = None, progress: bool = True) -> Sweep:
    """Sweep every head of ``model`` over ``tokens [rows, seq]`` (a tensor or a
    :class:`~selfrepair.batch.TokenSet`); see the module docstring.

    Resample sources: a token set's own; for a tensor ``corrupt_tokens`` or else the rows rolled
    by one (over the whole tensor, not per batch). ``checkpoint`` (default ``<path>.partial``)
    keeps the partial state after every batch; with ``path`` the finished sweep is written there.
    """
    check_ablation(ablation)
    data = token_set(model, tokens, corrupt_tokens)
    spec = SweepSpec(ablation=ablation, top_percent=top_percent, sample_size=sample_size, seed=seed)
    path = None if path is None else Path(path)
    base = Path(checkpoint) if checkpoint is not None else (
        None if path is None else path.with_name(path.name + ".partial"))
    sweep = spec.compute(model, data, RunOptions(batch_size=batch_size, max_rows=max_rows, progress=progress,
                                                 checkpoint=base))
    w = world(model.device)
    if path is not None and w.main:
        sweep.save(path)
    w.barrier()  # every shard is merged (and the result written) before any checkpoint goes
    remove(base, w)
    return sweep


def _canonical_order(tok_index: torch.Tensor, n_layers: int, n_heads: int, n_inst: int) -> torch.Tensor:
    """Per-token rows sorted by (kind, layer, head, instance): the stored order depends neither on
    the batch size nor on how many processes shared the rows."""
    layer, head, inst, kind = tok_index.unbind(1)
    key = ((kind * n_layers + layer) * n_heads + head) * n_inst + inst
    return torch.argsort(key)


__all__ = ["COLUMNS", "ROW_COLUMNS", "SAMPLE_SIZE", "Sweep", "SweepSpec", "competitor", "competitor_gap",
           "run_sweep", "thresholds"]
