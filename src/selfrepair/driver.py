"""The measurement driver: every measurement over a token set or a prompt set runs through it.

A measurement supplies its spec (:class:`selfrepair.measure.Spec`), one or more :class:`Stage`\\ s —
a *per-batch function* that runs inside one request and returns only reductions, and a
:class:`Fold` that folds what it returns into the stage's state here — and a finish that turns the
states into its result. :class:`Driver` owns everything else, the same for every measurement:

- **validation** before the first forward: the rows (and their resample sources) hold valid ids
  and fit the model's context, the speed knobs are positive (:meth:`Driver.__init__`);
- **the items**: a token set's rows (their resample sources with them) or a prompt set's prompts
  (their sources through :func:`selfrepair.batch.source_pool`), sliced ``batch_size`` at a time in
  the stage's order, plus any per-item values the stage names (``per_item``);
- **one request per batch** (:func:`selfrepair.remote.in_session`: on the remote path one nnsight
  session, locally a plain call);
- **progress** (tqdm; rank 0 only);
- **checkpointing** after finished batches and **resume** after any kill (SIGKILL, SIGINT, SIGTERM,
  an out-of-memory error that ends the run): the state of every stage is written beside the result
  (:class:`selfrepair.checkpoint.Checkpoint`); a rerun continues at the first unfinished batch and,
  with the same batch size, gives the identical result (folds are pure: a batch cut short leaves
  no trace, :func:`selfrepair.interrupt.graceful`);
- **sharding** under ``torchrun``: rank ``r`` takes the contiguous items ``World.shard`` of each
  stage; the states are merged exactly (the fold's ``merge``, in rank order) on every rank, so
  every rank returns the same result and the cache's rank 0 writes it;
- **out of memory**: a batch that runs out is retried as two halves with half the ``max_rows``
  per patched pass, down to one row, then one error says what to change;
- **recording** the rows (and sources) measured and the provenance (:meth:`Driver.record`,
  :meth:`Driver.meta`).

Folds are pure: ``add(state, out, items)`` and ``merge(a, b)`` return a new state and change
neither argument, and ``None`` is the empty state. A state nests dicts, lists and tuples of tensors
and numbers (what :mod:`selfrepair.checkpoint` writes). Ready-made folds: :func:`total` (sums),
:func:`collect` (per-item values, returned in item order), :func:`folding` (one function that
merges a batch's output like a state).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .batch import TokenSet, check_token_set, check_tokens, source_pool, tensor_digest
from .checkpoint import Checkpoint
from .distributed import world
from .errors import InputError
from .interrupt import graceful
from .measure import RunOptions
from .models import Model
from .remote import in_session


def plus(a: Any, b: Any) -> Any:
    """``a + b`` through nested dicts, lists and tuples (``None`` is zero)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {k: plus(a.get(k), b.get(k)) for k in {**a, **b}}
    if isinstance(a, (list, tuple)):
        return type(a)(plus(x, y) for x, y in zip(a, b))
    return a + b


@dataclass(frozen=True)
class Fold:
    """How a stage's batch outputs become its state (pure functions, ``None`` the empty state):
    ``add(state, out, items)`` folds one batch's output (``items``: its item ids), ``merge(a, b)``
    joins the states of two runs of consecutive items (``a``'s first; ranks, in rank order) and
    ``result(state)`` is what the stage returns once every item is folded."""

    add: Callable[[Any, Any, torch.Tensor], Any]
    merge: Callable[[Any, Any], Any]
    result: Callable[[Any], Any] = lambda state: state


def total() -> Fold:
    """Sums of every batch's output (nested; fp64 sums stay fp64)."""
    return Fold(lambda s, out, items: plus(s, out), plus)


def folding(fn: Callable[[Any, Any], Any]) -> Fold:
    """``fn(state, out)`` both folds a batch's output and merges two states (a running top-k)."""
    return Fold(lambda s, out, items: out if s is None else fn(s, out),
                lambda a, b: a if b is None else b if a is None else fn(a, b))


def _in_item_order(state: list | None, summed: tuple[str, ...]) -> dict | None:
    if not state:
        return None
    items = torch.cat([i for i, _ in state])
    order = items.argsort(stable=True)
    outs = [o for _, o in state]
    got = {k: torch.cat([o[k] for o in outs])[order] for k in outs[0] if k not in summed}
    for k in summed:
        for o in outs:
            got[k] = plus(got.get(k), o.get(k))
    return got


def collect(*, summed: tuple[str, ...] = ()) -> Fold:
    """Per-item outputs: each batch returns a dict of tensors whose first dimension is its items
    (in the order given); the stage returns them for every item in item order. Keys in ``summed``
    are sums over the batch instead, added up."""
    return Fold(lambda s, out, items: (s or []) + [(items, out)],
                lambda a, b: (a or []) + (b or []), lambda s: _in_item_order(s, summed))


@dataclass(frozen=True)
class Stage:
    """One loop over the items: ``batch(model, rows, *args)`` per batch inside one request,
    folded by ``fold``. ``rows`` (built by the driver): ``tokens``, ``start`` and ``index`` (the
    item ids), ``max_rows``; token sets also ``corrupt`` (the rows' resample sources when
    ``sources``, else ``None``); prompt sets ``last_pos`` and, with ``sources [n, P]`` (each
    prompt's source prompts), ``pool`` (:func:`~selfrepair.batch.source_pool`); plus ``per_item``
    values sliced to the batch's items. ``args``: the other arguments, or a function of the
    running state returning them. ``order``: the order the items are batched in (default theirs);
    ``batch_size``: items per request (default the run's)."""

    name: str
    batch: Callable[..., Any]
    fold: Fold = field(default_factory=total)
    args: tuple | Callable[[Any], tuple] = ()
    sources: bool | torch.Tensor = False
    per_item: dict = field(default_factory=dict)
    order: torch.Tensor | None = None
    batch_size: int | None = None
    unit: str = "row"


def _who(w) -> str:
    return "" if w.size == 1 else f"rank {w.rank} of {w.size}: "


class Driver:
    """One measurement's run over ``data`` (a :class:`~selfrepair.batch.TokenSet` or a prompt set
    with ``rows(idx)``); see the module docstring. ``key``: the measurement's part of the cache
    key (a checkpoint of other parameters is never resumed); ``sources``: the rows' resample
    sources are read (checked here)."""

    def __init__(self, model: Model, data: Any, options: RunOptions, *, key: dict, sources: bool = False):
        if options.batch_size < 1 or options.max_rows < 1:
            raise InputError(f"batch_size and max_rows must be positive, got {options.batch_size}, "
                             f"{options.max_rows}")
        self.model, self.data, self.options = model, data, options
        self.tokens = isinstance(data, TokenSet)
        if self.tokens:
            check_token_set(model, data, "resample" if sources else "zero")
            digest = tensor_digest(*data.record().values())
        else:
            if len(data) < 1:
                raise InputError("no prompts to measure")
            check_tokens(model, data.rows(torch.arange(len(data)))[0], "prompts")
            digest = dict(data.fingerprint)
        self.world = world(model.device)
        self.progress = options.progress and self.world.main
        ident = {"key": key, "data": digest, "model": str(model.name), "world_size": self.world.size,
                 "rank": self.world.rank}
        self.checkpoint = Checkpoint(options.checkpoint, self.world, ident)

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, stage: Stage, items: torch.Tensor, max_rows: int) -> dict:
        """What one batch of ``stage`` reads (see :class:`Stage`)."""
        d, out = self.data, {"index": items, "start": int(items[0]), "max_rows": max_rows}
        if self.tokens:  # contiguous rows
            rows = slice(int(items[0]), int(items[-1]) + 1)
            out.update(tokens=d.tokens[rows], corrupt=d.corrupt_tokens[rows] if stage.sources is True else None)
        else:
            out["tokens"], out["last_pos"] = d.rows(items)
            if isinstance(stage.sources, torch.Tensor):
                out["pool"] = source_pool(d, items, stage.sources[items])
        out.update({k: v[items] for k, v in stage.per_item.items()})
        return out

    def run(self, stage: Stage) -> Any:
        """Run ``stage`` over this rank's items (resuming from the checkpoint), merge every rank's
        state and return ``stage.fold.result`` of it (the same on every rank)."""
        n = len(self.data)
        order = torch.arange(n) if stage.order is None else stage.order
        lo, hi = self.world.shard(n)
        size = stage.batch_size or self.options.batch_size
        cp = self.checkpoint
        start, state = cp.stages.get(stage.name, (lo, None))
        if stage.name in cp.stages and start < hi:
            print(f"selfrepair: {_who(self.world)}resuming {stage.name} at {stage.unit} {start} of "
                  f"{stage.unit}s {lo}..{hi} from {cp.path}", file=sys.stderr)
        cp.stages[stage.name] = (start, state)
        bar = tqdm(total=hi - lo, initial=start - lo, desc=f"{_who(self.world)}{stage.name}",
                   unit=stage.unit, disable=not self.progress)
        with graceful(cp.save, resume_hint=f"run the same command again to resume ({cp.path})") as guard:
            for first in range(start, hi, size):
                stop = min(hi, first + size)
                state = self._batch(stage, order[first:stop], state, self.options.max_rows)
                cp.stages[stage.name] = (stop, state)  # one assignment: a signal sees before or after
                bar.update(stop - first)
                guard.checkpoint()
        bar.close()
        return stage.fold.result(self.merged(stage.fold, state))

    def merged(self, fold: Fold, state: Any) -> Any:
        """Every rank's state joined in rank order (on every rank)."""
        if self.world.size == 1:
            return state
        parts = self.world.gather(state)
        out = parts[0]
        for part in parts[1:]:
            out = fold.merge(out, part)
        return out

    def _batch(self, stage: Stage, items: torch.Tensor, state: Any, max_rows: int) -> Any:
        """One batch folded into ``state``: one request; out of memory, two halves with half the
        ``max_rows``, down to one row and one row per pass."""
        args = stage.args(state) if callable(stage.args) else stage.args
        try:
            out = in_session(self.model, stage.batch, self.rows(stage, items, max_rows), *args)
        except torch.OutOfMemoryError as e:
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1 and max_rows == 1:
                raise InputError(
                    f"out of memory on one {stage.unit} with max_rows=1 (one row per patched pass) in "
                    f"{stage.name}: use a smaller seq_len, dtype='bfloat16' or a device with more "
                    "memory. Progress so far is checkpointed; rerun to resume.") from e
            half, smaller = max(1, len(items) // 2), max(1, max_rows // 2)
            warnings.warn(f"out of memory in {stage.name} on {len(items)} {stage.unit}s with max_rows="
                          f"{max_rows}; retrying as {len(items[:half])} + {len(items[half:])} with "
                          f"max_rows={smaller}")
            state = self._batch(stage, items[:half], state, smaller)
            return self._batch(stage, items[half:], state, smaller) if len(items) > half else state
        return stage.fold.add(state, out, items)

    def mean_z(self) -> torch.Tensor:
        """Each head's clean ``z`` averaged over every token ``[layer, 1, 1, n_heads*d_head]`` (mean
        ablation's replacement; a head's output is linear in ``z``), one stage of sums."""
        from .batch import z_sum_rows

        total_z = self.run(Stage("mean z", z_sum_rows))
        return (total_z / self.data.tokens.numel())[:, None, None].to(self.model.dtype)

    def record(self) -> dict[str, torch.Tensor]:
        """The token ids measured (and their resample sources), saved with the result."""
        return self.data.record() if self.tokens else {"input_ids": self.data.input_ids}

    def meta(self, **extra: Any) -> dict:
        """The result's provenance: the model's description and ``extra``."""
        return {**self.model.describe(), **extra}


__all__ = ["Driver", "Fold", "Stage", "collect", "folding", "plus", "total"]
