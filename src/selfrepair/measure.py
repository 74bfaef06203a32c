"""The measurement layer: specs, the results cache, and how a measurement is run.

Every measurement of the book is

- a **spec** — a frozen dataclass (subclass of :class:`Spec`) holding exactly the fields that
  change its numbers (ablation, heads, top_percent, ...; never speed knobs such as batch_size);
- its ``compute(model, data, options)`` method, which starts from the shared clean batch
  (:mod:`selfrepair.batch`) and runs every patched pass through :mod:`selfrepair.passes`;
- a result deriving from :class:`selfrepair.results.Result`.

The **cache** (:class:`Cache`) derives a result's key and path from the spec, the model's identity
and the fingerprint of the data the measurement reads (the token set's recipe for corpus
measurements, the prompts for the Hydra chapter)::

    <cache_dir>/<model slug>/<spec kind>-<16 hex digits of sha256(key)>.safetensors

A damaged file (checksum) or one whose stored key differs is recomputed with a warning; a write
that fails leaves the previous entry intact. Speed knobs (:class:`RunOptions`) are recorded in the
result's ``meta`` (as are ``world_size`` and ``remote``, where the passes ran), not in the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .models import Model, resolve_device
from .results import CorruptResultError, Result


@dataclass(frozen=True)
class RunOptions:
    """How a measurement runs — none of these change its numbers (beyond float rounding)."""

    batch_size: int = 8  # rows (or prompts) per clean pass
    max_rows: int = 64  # copies x rows per patched pass (memory)
    progress: bool = True  # tqdm bars
    checkpoint: Path | None = None  # where a resumable measurement keeps its partial state


@dataclass(frozen=True)
class Spec:
    """Base of every measurement's spec. Subclasses set ``kind`` (the file-name stem), ``result``
    (the :class:`~selfrepair.results.Result` type) and implement :meth:`compute`."""

    kind: ClassVar[str] = "measurement"
    result: ClassVar[type] = Result

    def key(self) -> dict:
        """The spec's part of the cache key: its kind and every field (JSON-able)."""
        return {"kind": self.kind, **json.loads(json.dumps(asdict(self), default=str))}

    def compute(self, model: Model, data: Any, options: RunOptions) -> Result:  # pragma: no cover
        raise NotImplementedError


def model_identity(model: Model) -> dict:
    """What identifies a model's numbers: its name and revision, a digest of a local checkpoint's
    files (so a re-saved directory is not mistaken for the old one), dtype, device type and this
    library's version."""
    from . import __version__

    ident = {"model": model.name, "revision": model.revision, "dtype": str(model.dtype).replace("torch.", ""),
             "device_type": model.device.type, "version": __version__}
    if model.meta.get("revision_sha256"):
        ident["weights"] = model.meta["revision_sha256"]
    local = Path(str(model.name))
    if local.is_dir():
        h = hashlib.sha256()
        for f in sorted(local.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
        ident["checkpoint"] = "sha256:" + h.hexdigest()[:16]
    return ident


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


class Cache:
    """Results on disk under ``root``, keyed by spec + model identity + data fingerprint."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def key(self, spec: Spec, model: Model, data: Any) -> dict:
        return {"spec": spec.key(), "model": model_identity(model), "data": dict(data.fingerprint)}

    def path(self, spec: Spec, model: Model, data: Any) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(spec, model, data), sort_keys=True,
                                           default=str).encode()).hexdigest()[:16]
        return self.root / _slug(str(model.name)) / f"{spec.kind}-{digest}.safetensors"

    def load(self, spec: Spec, model: Model, data: Any) -> Result | None:
        """The cached result, or ``None`` (absent, damaged or stale: warned and removed)."""
        path = self.path(spec, model, data)
        if not path.exists():
            return None
        try:
            res = spec.result.load(path)
        except CorruptResultError as e:
            warnings.warn(f"cached result {path} is corrupt ({e}); recomputing it")
            return None
        if res.meta.get("key") != json.loads(json.dumps(self.key(spec, model, data), default=str)):
            warnings.warn(f"cached result {path} was computed for other parameters; recomputing it")
            return None
        return res

    def get(self, spec: Spec, model: Model, data: Any, options: RunOptions = RunOptions()) -> Result:
        """The result of ``spec`` on ``model`` and ``data``: loaded if cached, else computed (with
        its checkpoint beside the entry), stamped with its provenance and saved atomically."""
        from .distributed import world

        cached = self.load(spec, model, data)
        if cached is not None:
            return cached
        w = world(model.device)  # under torchrun: every rank computes (its shard), rank 0 writes
        path = self.path(spec, model, data)
        started = time.time()
        res = spec.compute(model, data, replace(options, checkpoint=path.with_name(path.name + ".partial")))
        res.meta.update(stamp(self.key(spec, model, data), model, options, time.time() - started,
                              world_size=w.size))
        if w.main:
            res.save(path)
        w.barrier()
        return res


def stamp(key: dict, model: Model, options: RunOptions, seconds: float, *, world_size: int = 1) -> dict:
    """The provenance every cached result carries: its key, the model's shape, the speed knobs
    it ran with (``world_size``, the number of processes, included) and its wall time."""
    run = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in ("checkpoint", "progress")}
    return {**model.describe(), "key": json.loads(json.dumps(key, default=str)),
            "run": {**run, "world_size": world_size, "remote": model.remote,
                    "device": str(resolve_device(model.device)),
                    "wall_time_s": round(seconds, 1)}}
