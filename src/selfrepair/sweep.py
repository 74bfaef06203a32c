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
lone last row is measured like any other. After every batch the state is written atomically
beside the result; an interrupted run started again resumes from it (at the same row, whatever
the batch size) and produces the same numbers as an uninterrupted one. Per-token rows are stored
sorted by (kind, layer, head, instance), whatever the batch size.

Under ``torchrun --nproc-per-node N`` (:mod:`selfrepair.distributed`) rank ``r`` measures the
contiguous rows ``World.shard``: pass 1 merges exactly (the global top-k of every rank's top-k
candidates, summed ``z``, the gaps of every row), pass 2 runs on each shard alone, and the sums,
counts and per-token rows are merged at the end; every rank returns the same :class:`Sweep` and
only rank 0 writes it. Each rank checkpoints its own shard (``<checkpoint>.rank<r>-of-<N>``); a
restart with the same N resumes every shard where its last checkpoint left it. A restart with
another number of processes (one included) finds checkpoints it cannot use and refuses with a
message saying how to resume, rather than silently starting again.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .ablation import check_ablation
from .batch import TokenSet, tensor_digest
from .distributed import World, world
from .errors import InputError
from .interrupt import graceful
from .measure import RunOptions, Spec
from .models import Model
from .heads import check_token_set, token_set
from .remote import in_session
from .results import CorruptResultError, Result, head_label, load_tensors, save_tensors
from .structure import top_k
from .sweep_batch import COLUMNS, KIND_SAMPLE, KIND_TOP, ablated_sums, clean_summary
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

    ablation: str = "resample"  # what replaces each head's output
    top_percent: float = 2.0  # per head, the top k% of tokens by clean direct effect
    sample_size: int = SAMPLE_SIZE  # instances kept per head for per-token views (uniform sample)
    seed: int = 0  # which instances the sample holds

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> Sweep:
        return run_sweep(model, data, ablation=self.ablation, top_percent=self.top_percent,
                         sample_size=self.sample_size, seed=self.seed, batch_size=options.batch_size,
                         max_rows=options.max_rows, checkpoint=options.checkpoint,
                         progress=options.progress)


def thresholds(model: Model, data: TokenSet, k: int, batch_size: int, *, with_mean_z: bool,
               progress: bool, world: World = World()
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pass 1: each head's top-``k`` instance indices ``[layer, head, k]`` by clean DE, the mean ``z``
    over all tokens (when needed) and every instance's ``competitor_gap`` ``[n_instances]``.

    With several processes each rank runs the clean pass on its own rows (``world.shard``) and
    the results are merged exactly: the global top-``k`` is the top-``k`` of every rank's top-``k``
    candidates, ``z`` sums are added, the gaps are concatenated in row order (the same on every rank)."""
    L, H = model.n_layers, model.n_heads
    lo, hi = world.shard(len(data))
    best_v = torch.full((L, H, 0), -float("inf"))
    best_i = torch.zeros((L, H, 0), dtype=torch.long)
    z_sum, runner = None, [torch.zeros(0)]
    for start in tqdm(range(lo, hi, batch_size), total=-(-(hi - lo) // batch_size),
                      desc="clean pass", disable=not progress):
        stop = min(hi, start + batch_size)  # one request per batch on the remote path
        c = in_session(model, clean_summary, data.tokens[start:stop], start, with_mean_z)
        v = torch.cat([best_v, c["de"]], -1)
        i = torch.cat([best_i, c["instances"].expand(L, H, -1)], -1)
        top = v.topk(min(k, v.shape[-1]), dim=-1)
        best_v, best_i = top.values, i.gather(-1, top.indices)
        runner.append(c["competitor_gap"])
        if with_mean_z:
            z_sum = c["z_sum"] if z_sum is None else z_sum + c["z_sum"]
    runner = torch.cat(runner)
    if world.size > 1:
        parts = world.gather((best_v, best_i, z_sum, runner))
        v, i = torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)
        top = v.topk(min(k, v.shape[-1]), dim=-1)
        best_i = i.gather(-1, top.indices)
        sums = [p[2] for p in parts if p[2] is not None]
        z_sum = None if not sums else sum(sums[1:], sums[0])
        runner = torch.cat([p[3] for p in parts])
    mean_z = None if z_sum is None else (z_sum / data.tokens.numel())[:, None, None].float()
    return best_i.sort(-1).values, mean_z, runner


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
    check_token_set(model, data, ablation)
    if batch_size < 1 or max_rows < 1 or sample_size < 0:
        raise InputError(f"batch_size and max_rows must be positive and sample_size >= 0, got "
                         f"{batch_size}, {max_rows}, {sample_size}")
    L, H = model.n_layers, model.n_heads
    n_inst = data.n_instances
    k = top_k(n_inst, top_percent)
    w = world(model.device)
    lo, hi = w.shard(len(data))
    progress = progress and w.main
    path = None if path is None else Path(path)
    base = Path(checkpoint) if checkpoint is not None else (
        None if path is None else path.with_name(path.name + ".partial"))
    state_path = None if base is None else shard_checkpoint(base, w)
    _refuse_other_world_sizes(base, w)
    ident = {"ablation": ablation, "top_percent": top_percent, "seed": seed, "sample_size": sample_size,
             "data": tensor_digest(data.tokens, data.corrupt_tokens if ablation == "resample" else None),
             "model": model.name}
    if w.size > 1:
        ident.update(world_size=w.size, rank=w.rank, rows=[lo, hi])
    state = _load_state(state_path, ident)
    if state is not None:
        print(f"selfrepair: {_who(w)}resuming {ablation} sweep at row {int(state['next_row'])} of "
              f"rows {lo}..{hi} from {state_path}", file=sys.stderr)
    if not w.all(state is not None):  # pass 1 is collective: every rank takes part
        top_idx, mean_z, runner = thresholds(model, data, k, batch_size, with_mean_z=ablation == "mean",
                                             progress=progress, world=w)
    if state is None:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(n_inst, generator=g)[:min(sample_size, n_inst)].sort().values
        state = {"top_idx": top_idx, "sample": sample, "competitor_gap": runner, "next_row": torch.tensor(lo),
                 "sum_all": torch.zeros(L, H, len(COLUMNS), dtype=torch.float64),
                 "sum_top": torch.zeros(L, H, len(COLUMNS), dtype=torch.float64),
                 "n_top": torch.zeros(L, H, dtype=torch.long),
                 "tok_index": torch.zeros(0, 4, dtype=torch.long),
                 "tok_values": torch.zeros(0, len(COLUMNS))}
        if mean_z is not None:
            state["mean_z"] = mean_z
    done = int(state["next_row"])
    bar = tqdm(total=hi - lo, initial=done - lo, desc=f"{_who(w)}{ablation} sweep", unit="row",
               disable=not progress)
    chunks_i, chunks_v = [], []  # per-token rows since the last consolidation (no O(n^2) concat)

    def take_snapshot() -> None:  # the state at the end of the last finished batch
        snapshot.update({k: state[k].clone() for k in ("sum_all", "sum_top", "n_top", "next_row")})
        snapshot["rows"] = rows[0]

    def restore() -> None:  # back to the snapshot, whatever was consolidated since
        _consolidate(state, chunks_i, chunks_v)
        state.update({k: v for k, v in snapshot.items() if k != "rows"})
        state["tok_index"] = state["tok_index"][:snapshot["rows"]]
        state["tok_values"] = state["tok_values"][:snapshot["rows"]]

    def save_state() -> None:
        if state_path is not None:
            _consolidate(state, chunks_i, chunks_v)
            save_tensors(state_path, state, {"ident": ident})

    snapshot: dict = {}
    rows = [len(state["tok_index"])]  # per-token rows of the finished batches (state + chunks)
    take_snapshot()
    with graceful(save_state, restore=restore,
                  resume_hint=f"run the same command again to resume ({state_path})") as guard:
        for start in range(done, hi, batch_size):
            stop = min(hi, start + batch_size)
            idx, vals, max_rows = _batch_with_oom_retry(model, data, start, stop, ablation, state,
                                                        max_rows, snapshot)
            chunks_i.extend(idx)
            chunks_v.extend(vals)
            rows[0] += sum(len(i) for i in idx)
            state["next_row"] = torch.tensor(stop)
            bar.update(stop - start)
            guard.checkpoint()
            take_snapshot()
    bar.close()
    _consolidate(state, chunks_i, chunks_v)
    merged = _merge(state, w)
    order = _canonical_order(merged["tok_index"], L, H, n_inst)
    rec = data.record()
    sweep = Sweep(merged["sum_all"].float(), merged["sum_top"].float(), n_inst, merged["n_top"],
                  merged["tok_index"][order], merged["tok_values"][order], tokens=rec["tokens"],
                  corrupt_tokens=rec.get("corrupt_tokens"),
                  meta={**model.describe(), "ablation": ablation, "top_percent": top_percent,
                        "seed": seed, "sample_size": sample_size, "seq_len": data.seq_len,
                        "n_rows": len(data), "n_tokens": int(data.tokens.numel()),
                        "same_document_sources": data.same_document})
    if path is not None and w.main:
        sweep.save(path)
    w.barrier()  # every shard is merged (and the result written) before any checkpoint goes
    if state_path is not None and state_path.exists():
        state_path.unlink()
    return sweep


def shard_checkpoint(base: Path, w: World) -> Path:
    """Where rank ``w.rank`` keeps its shard's partial state: ``base`` itself for one process,
    ``<base>.rank<r>-of-<N>`` for N."""
    return base if w.size == 1 else base.with_name(f"{base.name}.rank{w.rank}-of-{w.size}")


def _who(w: World) -> str:
    return "" if w.size == 1 else f"rank {w.rank} of {w.size}: "


def _refuse_other_world_sizes(base: Path | None, w: World) -> None:
    """Checkpoints of this sweep left by a run with another number of processes shard the rows
    differently: rather than silently recompute (or mix shards), say how to resume."""
    if base is None or not base.parent.is_dir():
        return
    found = {}
    for p in base.parent.iterdir():
        if p.name == base.name:
            found.setdefault(1, []).append(p)
        elif p.name.startswith(base.name + ".rank"):
            m = re.fullmatch(r"\.rank\d+-of-(\d+)", p.name[len(base.name):])
            if m:
                found.setdefault(int(m.group(1)), []).append(p)
    others = {n: ps for n, ps in found.items() if n != w.size}
    if others:
        n, ps = next(iter(sorted(others.items())))
        how = "without torchrun" if n == 1 else f"under torchrun --nproc-per-node {n}"
        raise InputError(
            f"this sweep was interrupted in a run with {n} process{'es' if n > 1 else ''} (checkpoint"
            f"{'s' if len(ps) > 1 else ''} {', '.join(str(p) for p in sorted(ps))}); this run has "
            f"{w.size}. Resume it {how}, or delete those files to start the sweep again.")


def _merge(state: dict, w: World) -> dict:
    """Every rank's sums, counts and per-token rows, added and concatenated in rank order."""
    names = ("sum_all", "sum_top", "n_top", "tok_index", "tok_values")
    if w.size == 1:
        return {k: state[k] for k in names}
    parts = w.gather({k: state[k] for k in names})
    out = {k: sum((p[k] for p in parts[1:]), parts[0][k]) for k in ("sum_all", "sum_top", "n_top")}
    out.update({k: torch.cat([p[k] for p in parts]) for k in ("tok_index", "tok_values")})
    return out


def _canonical_order(tok_index: torch.Tensor, n_layers: int, n_heads: int, n_inst: int) -> torch.Tensor:
    """Per-token rows sorted by (kind, layer, head, instance): the stored order depends neither on
    the batch size nor on how many processes shared the rows."""
    layer, head, inst, kind = tok_index.unbind(1)
    key = ((kind * n_layers + layer) * n_heads + head) * n_inst + inst
    return torch.argsort(key)


def _load_state(state_path: Path | None, ident: dict) -> dict | None:
    if state_path is None or not state_path.exists():
        return None
    try:
        state, smeta = load_tensors(state_path)
    except CorruptResultError:
        warnings.warn(f"checkpoint {state_path} is corrupt; starting this sweep again")
        return None
    return state if smeta.get("ident") == ident else None


def _batch_with_oom_retry(model: Model, data: TokenSet, start: int, stop: int, ablation: str,
                          state: dict, max_rows: int, snapshot: dict) -> tuple[list, list, int]:
    """One batch; out of GPU memory, retry once with half the rows per pass, then explain."""
    try:
        return (*_sweep_batch(model, data, start, stop, ablation, state, max_rows), max_rows)
    except torch.OutOfMemoryError:
        state.update({k: v.clone() for k, v in snapshot.items() if k != "rows"})  # undo the failed attempt
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = max(1, max_rows // 2)
        warnings.warn(f"out of memory with max_rows={max_rows}; retrying with {smaller}")
        try:
            return (*_sweep_batch(model, data, start, stop, ablation, state, smaller), smaller)
        except torch.OutOfMemoryError as e:
            raise InputError(
                f"out of memory even with max_rows={smaller} (rows of heads x batch per pass): use "
                f"a smaller batch_size (now {stop - start}) or seq_len, dtype='bfloat16', or a device "
                "with more memory. Progress so far is checkpointed; rerun to resume.") from e


def _consolidate(state: dict, chunks_i: list, chunks_v: list) -> None:
    if chunks_i:
        state["tok_index"] = torch.cat([state["tok_index"]] + chunks_i)
        state["tok_values"] = torch.cat([state["tok_values"]] + chunks_v)
        chunks_i.clear()
        chunks_v.clear()


def _sweep_batch(model: Model, data: TokenSet, start: int, stop: int, ablation: str, state: dict,
                 max_rows: int) -> tuple[list, list]:
    """Ablate every head on rows ``start:stop`` (one request on the remote path: only the sums
    and the selected per-token rows come back), fold the sums into ``state``; return the new
    per-token rows."""
    corrupt = data.corrupt_tokens[start:stop] if ablation == "resample" else None
    out = in_session(model, ablated_sums, data.tokens[start:stop], corrupt, start, ablation,
                     state.get("mean_z"), state["top_idx"], state["sample"],
                     state["competitor_gap"][start * (data.seq_len - 1):stop * (data.seq_len - 1)], max_rows)
    for name in ("sum_all", "sum_top", "n_top"):
        state[name] += out[name]
    return out["index"], out["values"]


__all__ = ["COLUMNS", "SAMPLE_SIZE", "Sweep", "SweepSpec", "competitor", "competitor_gap", "run_sweep",
           "thresholds"]
