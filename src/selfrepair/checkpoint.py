"""A measurement's partial state on disk, so that a run killed at any point resumes to the same result.

The driver (:mod:`selfrepair.driver`) keeps, per stage of a measurement, how far this process got
(``next``: items done) and the state folded from those items. :class:`Checkpoint` writes them after
finished batches (atomically, checksummed: :func:`selfrepair.results.save_tensors`) beside the
result they lead to, ``<entry>.partial`` for one process and ``<entry>.partial.rank<r>-of-<N>``
for rank ``r`` of ``N``. A state is any nesting of dicts, lists and tuples of tensors, numbers,
strings and ``None`` (:func:`pack`, :func:`unpack`: tensors as tensors, the structure as JSON).

A checkpoint is used only by the run it belongs to: its ``ident`` (the measurement's key, the data's
digest, the world size and this rank's items) must match, else it is set aside with a warning. A
checkpoint left by a run with another number of processes shards the items differently: rather
than mix shards or silently start again, :func:`refuse_other_world_sizes` says how to resume.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .distributed import World
from .errors import InputError
from .results import CorruptResultError, load_tensors, save_tensors


def pack(obj: Any, tensors: dict[str, torch.Tensor], at: str = "s") -> Any:
    """``obj``'s structure as JSON, its tensors moved into ``tensors`` under their paths."""
    if isinstance(obj, torch.Tensor):
        tensors[at] = obj.detach().cpu()
        return {"tensor": at}
    if isinstance(obj, dict):
        return {"dict": {str(k): pack(v, tensors, f"{at}/{k}") for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [pack(v, tensors, f"{at}/{i}")
                                                             for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"a checkpointed state holds tensors, numbers, strings, lists and dicts, not {type(obj)}")


def unpack(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    (kind, value), = spec.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: unpack(v, tensors) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [unpack(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


def shard_path(base: Path, w: World) -> Path:
    """Where rank ``w.rank`` keeps its partial state: ``base`` itself for one process,
    ``<base>.rank<r>-of-<N>`` for N."""
    return base if w.size == 1 else base.with_name(f"{base.name}.rank{w.rank}-of-{w.size}")


def _left(base: Path) -> dict[int, list[Path]]:
    """The checkpoints of ``base`` on disk, by the number of processes that wrote them."""
    found: dict[int, list[Path]] = {}
    if not base.parent.is_dir():
        return found
    for p in base.parent.iterdir():
        if p.name == base.name:
            found.setdefault(1, []).append(p)
        elif p.name.startswith(base.name + ".rank"):
            m = re.fullmatch(r"\.rank\d+-of-(\d+)", p.name[len(base.name):])
            if m:
                found.setdefault(int(m.group(1)), []).append(p)
    return found


def refuse_other_world_sizes(base: Path | None, w: World) -> None:
    """Checkpoints of this measurement left by a run with another number of processes shard the
    items differently: say how to resume instead of recomputing (or mixing shards)."""
    if base is None:
        return
    others = {n: ps for n, ps in _left(base).items() if n != w.size}
    if others:
        n, ps = next(iter(sorted(others.items())))
        how = "without torchrun" if n == 1 else f"under torchrun --nproc-per-node {n}"
        raise InputError(
            f"this measurement was interrupted in a run with {n} process{'es' if n > 1 else ''} "
            f"(checkpoint{'s' if len(ps) > 1 else ''} {', '.join(str(p) for p in sorted(ps))}); this "
            f"run has {w.size}. Resume it {how}, or delete those files to start it again.")


def remove(base: Path | None, w: World) -> None:
    """Delete this rank's checkpoint (its result is written)."""
    if base is not None:
        shard_path(Path(base), w).unlink(missing_ok=True)


def progress(path: Path) -> dict[str, int]:
    """How far each stage of the checkpoint at ``path`` got (items done, ``next``), by stage name."""
    return {name: int(s["next"]) for name, s in load_tensors(path)[1]["stages"].items()}


class Checkpoint:
    """This rank's partial state of one measurement: ``stages[name] = (next, state)``."""

    def __init__(self, base: Path | None, w: World, ident: dict):
        self.path = None if base is None else shard_path(Path(base), w)
        self.ident = json.loads(json.dumps(ident, default=str))
        self.stages: dict[str, tuple[int, Any]] = {}
        refuse_other_world_sizes(None if base is None else Path(base), w)
        if self.path is not None and self.path.exists():
            self.stages = self._read()

    def _read(self) -> dict:
        try:
            tensors, meta = load_tensors(self.path)
        except CorruptResultError:
            warnings.warn(f"checkpoint {self.path} is corrupt; starting this measurement again")
            return {}
        if meta.get("ident") != self.ident:
            warnings.warn(f"checkpoint {self.path} belongs to another run (other parameters, data or "
                          "version); starting this measurement again")
            return {}
        return {name: (int(s["next"]), unpack(s["state"], tensors)) for name, s in meta["stages"].items()}

    def save(self) -> None:
        if self.path is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        stages = {name: {"next": nxt, "state": pack(state, tensors, f"{i}")}
                  for i, (name, (nxt, state)) in enumerate(self.stages.items())}
        save_tensors(self.path, tensors, {"ident": self.ident, "stages": stages})


__all__ = ["Checkpoint", "pack", "progress", "refuse_other_world_sizes", "remove", "shard_path", "unpack"]
