"""All-heads self-repair over a whole token set: streamed, resumable, cached.

Two passes over the rows, ``batch_size`` at a time, so memory does not grow with the number of
tokens:

1. *clean* (cheap): every head's clean direct effect per token; a running per-head top-k keeps
   the exact top ``top_percent``% instances (the paper's 2% of tokens by DE); for ``mean``
   ablation the mean ``z`` is accumulated as well.
2. *ablate*: every head ablated (:func:`selfrepair.self_repair.ablate_heads`); per head, sums of
   every quantity over all tokens and over its top instances, and the per-token values of its
   top instances plus a fixed random sample of instances (same for all heads, from ``seed``).

After every ``checkpoint_every`` batches the state is written atomically next to the result;
an interrupted run started again with the same parameters resumes from it and produces the same
numbers as an uninterrupted one (same batches, same order of summation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .ablation import check_ablation, default_corrupt_tokens, replacement_z
from .direct_effect import head_effects, readout
from .errors import InputError
from .intervene import run
from .models import Model
from .results import (HEAD_QUANTITIES, CorruptResultError, head_label, load_tensors,
                      save_tensors)
from .heads import ablate_heads, check_tokens, clean_pass

COLUMNS = HEAD_QUANTITIES + ("scale_clean", "logit")
KIND_TOP, KIND_SAMPLE = 1, 2


@dataclass
class Sweep:
    """Per-head summaries and selected per-token values of an all-heads sweep."""

    sum_all: torch.Tensor  # [layer, head, column] sums over every token
    sum_top: torch.Tensor  # [layer, head, column] sums over each head's top instances
    n_all: int
    n_top: torch.Tensor  # [layer, head]
    tok_index: torch.Tensor  # [n, 4] layer, head, instance (row * (seq-1) + pos), kind
    tok_values: torch.Tensor  # [n, column]
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.sum_all.shape[0]

    def per_head(self) -> pd.DataFrame:
        """One row per head: ``<q>`` = mean over the head's top instances, ``<q>_all`` = mean over
        all tokens, ``n_top``; canonical columns ``layer, head, label``."""
        L, H, _ = self.sum_all.shape
        rows = []
        for l in range(L):
            for h in range(H):
                row = {"layer": l, "head": h, "label": head_label(l, h), "n_top": int(self.n_top[l, h])}
                for i, q in enumerate(COLUMNS):
                    row[q] = float(self.sum_top[l, h, i] / max(1, self.n_top[l, h]))
                    row[f"{q}_all"] = float(self.sum_all[l, h, i] / max(1, self.n_all))
                rows.append(row)
        df = pd.DataFrame(rows)
        df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
        return df

    def tokens(self, kind: str = "top") -> pd.DataFrame:
        """Per-token rows of ``kind`` "top" (each head's top instances) or "sample"."""
        sel = self.tok_index[:, 3] == (KIND_TOP if kind == "top" else KIND_SAMPLE)
        idx, vals = self.tok_index[sel], self.tok_values[sel]
        seq1 = self.meta["seq_len"] - 1
        df = pd.DataFrame(vals.numpy(), columns=list(COLUMNS))
        df.insert(0, "layer", idx[:, 0].numpy())
        df.insert(1, "head", idx[:, 1].numpy())
        df.insert(2, "label", [head_label(l, h) for l, h in idx[:, :2].tolist()])
        df.insert(3, "row", (idx[:, 2] // seq1).numpy())
        df.insert(4, "pos", (idx[:, 2] % seq1).numpy())
        df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
        return df

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sum_all": self.sum_all, "sum_top": self.sum_top, "n_top": self.n_top,
                "n_all": torch.tensor(self.n_all), "tok_index": self.tok_index,
                "tok_values": self.tok_values}

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, self.tensors(), self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        t, meta = load_tensors(path)
        return cls(t["sum_all"], t["sum_top"], int(t["n_all"]), t["n_top"], t["tok_index"],
                   t["tok_values"], meta)


def _state_path(path: Path | None) -> Path | None:
    return None if path is None else path.with_name(path.name + ".partial")


def _load_state(state_path: Path | None, meta: dict) -> dict | None:
    if state_path is None or not state_path.exists():
        return None
    try:
        state, smeta = load_tensors(state_path)
    except CorruptResultError:
        import warnings
        warnings.warn(f"checkpoint {state_path} is corrupt; starting this sweep again")
        return None
    return state if smeta.get("params") == meta.get("params") else None


def thresholds(model: Model, tokens: torch.Tensor, k: int, batch_size: int, *,
               with_mean_z: bool, progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pass 1: each head's top-``k`` instance indices ``[layer, head, k]`` by clean DE (and the
    mean ``z`` over all tokens when needed)."""
    L, H = model.n_layers, model.n_heads
    best_v = torch.full((L, H, 0), -math.inf)
    best_i = torch.zeros((L, H, 0), dtype=torch.long)
    z_sum, seq1 = None, tokens.shape[1] - 1
    for start in tqdm(range(0, len(tokens), batch_size), desc="clean pass", disable=not progress):
        tok = tokens[start:start + batch_size]
        clean = clean_pass(model, tok)
        ro = readout(model, tok, clean)
        de = torch.stack([head_effects(model, clean.reads["z"][l][:, :-1],
                                       ro.write_dir(model, "attn", l), l) for l in range(L)])
        idx = torch.arange(start * seq1, (start + len(tok)) * seq1).expand(L, H, -1)
        v = torch.cat([best_v, de.flatten(2).cpu()], -1)
        i = torch.cat([best_i, idx], -1)
        top = v.topk(min(k, v.shape[-1]), dim=-1)
        best_v, best_i = top.values, i.gather(-1, top.indices)
        if with_mean_z:
            zs = clean.reads["z"].float().sum((1, 2)).cpu()
            z_sum = zs if z_sum is None else z_sum + zs
    mean_z = None if z_sum is None else (z_sum / tokens.numel())[:, None, None]
    return best_i.sort(-1).values, mean_z


def run_sweep(model: Model, tokens: torch.Tensor, *, ablation: str = "resample",
              top_percent: float = 2.0, batch_size: int = 8, seed: int = 0,
              sample_size: int = 512, max_rows: int = 64, path: str | Path | None = None,
              checkpoint_every: int = 1, params: dict | None = None,
              progress: bool = True) -> Sweep:
    """Sweep every head of ``model`` over ``tokens [rows, seq]`` (see module docstring).

    With ``path``, the finished sweep is written there and a checkpoint beside it while it runs.
    """
    check_ablation(ablation)
    tokens = check_tokens(model, tokens).cpu()
    if ablation == "resample" and batch_size < 2:
        raise InputError("resample ablation pairs rows inside a batch: use batch_size >= 2")
    L, H, seq1 = model.n_layers, model.n_heads, tokens.shape[1] - 1
    n_inst = len(tokens) * seq1
    k = max(1, math.ceil(top_percent / 100 * n_inst))
    path = None if path is None else Path(path)
    meta = {**model.describe(), "ablation": ablation, "top_percent": top_percent, "seed": seed,
            "batch_size": batch_size, "seq_len": tokens.shape[1], "n_rows": len(tokens),
            "params": params or {}}
    state_path = _state_path(path)
    state = _load_state(state_path, meta)
    if state is None:
        top_idx, mean_z = thresholds(model, tokens, k, batch_size, with_mean_z=ablation == "mean",
                                     progress=progress)
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(n_inst, generator=g)[:min(sample_size, n_inst)].sort().values
        state = {"top_idx": top_idx, "sample": sample, "next": torch.tensor(0),
                 "sum_all": torch.zeros(L, H, len(COLUMNS)), "sum_top": torch.zeros(L, H, len(COLUMNS)),
                 "n_top": torch.zeros(L, H, dtype=torch.long),
                 "tok_index": torch.zeros(0, 4, dtype=torch.long),
                 "tok_values": torch.zeros(0, len(COLUMNS))}
        if mean_z is not None:
            state["mean_z"] = mean_z
    starts = list(range(0, len(tokens), batch_size))
    done = int(state["next"])
    bar = tqdm(total=len(starts), initial=done, desc=f"{ablation} sweep", unit="batch",
               disable=not progress)
    last_save = time.monotonic()
    chunks_i, chunks_v = [], []  # per-token rows since the last consolidation (no O(n^2) concat)
    for bi in range(done, len(starts)):
        start = starts[bi]
        idx, vals, max_rows = _batch_with_oom_retry(model, tokens[start:start + batch_size],
                                                    start * seq1, ablation, state, max_rows)
        chunks_i.extend(idx)
        chunks_v.extend(vals)
        state["next"] = torch.tensor(bi + 1)
        bar.update()
        if state_path is not None and ((bi + 1) % checkpoint_every == 0 or time.monotonic() - last_save > 60):
            _consolidate(state, chunks_i, chunks_v)
            save_tensors(state_path, state, meta)
            last_save = time.monotonic()
    bar.close()
    _consolidate(state, chunks_i, chunks_v)
    sweep = Sweep(state["sum_all"], state["sum_top"], n_inst, state["n_top"], state["tok_index"],
                  state["tok_values"], {**meta, "n_tokens": int(tokens.numel())})
    if path is not None:
        sweep.save(path)
        if state_path.exists():
            state_path.unlink()
    return sweep


def _batch_with_oom_retry(model: Model, tok: torch.Tensor, offset: int, ablation: str,
                          state: dict, max_rows: int) -> tuple[list, list, int]:
    """One batch; out of GPU memory, retry once with half the rows per pass, then explain."""
    snapshot = {k: state[k].clone() for k in ("sum_all", "sum_top", "n_top")}
    try:
        return (*_sweep_batch(model, tok, offset, ablation, state, max_rows), max_rows)
    except torch.OutOfMemoryError:
        state.update(snapshot)  # undo the partial sums of the failed attempt
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = max(1, max_rows // 2)
        import warnings
        warnings.warn(f"out of memory with max_rows={max_rows}; retrying with {smaller}")
        try:
            return (*_sweep_batch(model, tok, offset, ablation, state, smaller), smaller)
        except torch.OutOfMemoryError as e:
            raise InputError(
                f"out of memory even with max_rows={smaller} (rows of heads x batch per pass): use "
                f"a smaller batch_size (now {len(tok)}) or seq_len, dtype='bfloat16', or a device "
                "with more memory. Progress so far is checkpointed; rerun to resume.") from e


def _consolidate(state: dict, chunks_i: list, chunks_v: list) -> None:
    if chunks_i:
        state["tok_index"] = torch.cat([state["tok_index"]] + chunks_i)
        state["tok_values"] = torch.cat([state["tok_values"]] + chunks_v)
        chunks_i.clear()
        chunks_v.clear()


def _sweep_batch(model: Model, tok: torch.Tensor, offset: int, ablation: str, state: dict,
                 max_rows: int) -> tuple[list, list]:
    """Ablate every head on one batch, fold the sums into ``state``; return new per-token rows."""
    tok = tok.to(model.device)
    b, seq1 = tok.shape[0], tok.shape[1] - 1
    clean = clean_pass(model, tok)
    ro = readout(model, tok, clean)
    corrupt_z = None
    if ablation == "resample":
        corrupt_z = run(model, default_corrupt_tokens(tok), read=("z",)).reads["z"]
    repl = (state["mean_z"].to(model.device, model.dtype) if ablation == "mean"
            else replacement_z(model, ablation, clean.reads["z"], corrupt_z))
    inst = torch.arange(offset, offset + b * seq1)
    in_sample = torch.isin(inst, state["sample"])
    per = max(1, max_rows // b)
    new_index, new_values = [], []
    for layer in range(model.n_layers):
        for j in range(0, model.n_heads, per):
            heads = list(range(j, min(model.n_heads, j + per)))
            out = ablate_heads(model, tok, clean, ro, layer, heads, repl[layer])
            cols = torch.stack([out[q] for q in HEAD_QUANTITIES]
                               + [ro.scale.expand_as(out["delta_logit"]),
                                  ro.logit.expand_as(out["delta_logit"])], -1).cpu()
            cols = cols.flatten(1, 2)  # [head, instance, column]
            for k, h in enumerate(heads):
                state["sum_all"][layer, h] += cols[k].sum(0)
                top = torch.isin(inst, state["top_idx"][layer, h])
                state["sum_top"][layer, h] += cols[k][top].sum(0)
                state["n_top"][layer, h] += int(top.sum())
                for mask, kind in ((top, 1), (in_sample, 2)):
                    n = int(mask.sum())
                    if n:
                        new_index.append(torch.stack([torch.full((n,), layer), torch.full((n,), h),
                                                      inst[mask], torch.full((n,), kind)], 1))
                        new_values.append(cols[k][mask])
    return new_index, new_values
