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
    layout: ClassVar[int] = 0  # bumped when the result gains what an older entry lacks

    def key(self) -> dict:
        """The spec's part of the cache key: its kind, every field (JSON-able) and, once bumped,
        the result's ``layout`` (so an entry written before a result gained a field is
        recomputed, never misread)."""
        key = {"kind": self.kind, **json.loads(json.dumps(asdict(self), default=str))}
        return {**key, "layout": self.layout} if self.layout else key

    def compute(self, model: Model, data: Any, options: RunOptions) -> Result:  # pragma: no cover
        raise NotImplementedError


def model_identity(model: Model) -> dict:
    """What identifies a model's numbers: its name and revision, a digest of a local checkpoint's
    files (so a re-saved directory is not mistaken for the old one), dtype, device type and this
    library's version."""
    from . import __version__

    ident = {"model": model.name, "revision": model.revision, "dtype": str(model.dtype).replace("torch.", ""),
             "device_type": model.device.type, "version": __version__}
    if model.meta.get("fold_value_biases"):  # TransformerLens's convention: other head outputs
        ident["fold_value_biases"] = True
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


def results_root(cache_dir: str | os.PathLike) -> Path:
    """The folder ``cache_dir`` names: as given when absolute; a relative one from the book's root
    (the first of the working directory and its parents holding ``_toc.yml`` and ``book/``: where
    ``selfrepair book`` runs every chapter), so a chapter run in a reader's Jupyter from ``book/``
    reads and writes the entries ``make book`` wrote; outside a checkout, from the working directory."""
    path = Path(cache_dir).expanduser()
    if path.is_absolute():
        return path
    here = Path.cwd()
    root = next((d for d in (here, *here.parents)
                 if (d / "_toc.yml").is_file() and (d / "book").is_dir()), None)
    return root / path if root is not None else path


class Cache:
    """Results on disk under ``root`` (:func:`results_root`), keyed by spec + model identity + data
    fingerprint."""

    def __init__(self, root: str | os.PathLike):
        self.root = results_root(root)

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
        from .checkpoint import remove
        from .distributed import world

        w = world(model.device)  # under torchrun: every rank computes (its shard), rank 0 writes
        cached = self.load(spec, model, data)
        if w.all(cached is not None):  # every rank reads it, or every rank takes part in computing it
            return cached
        path = self.path(spec, model, data)
        partial = path.with_name(path.name + ".partial")
        started = time.time()
        res = spec.compute(model, data, replace(options, checkpoint=partial))
        res.meta.update(stamp(self.key(spec, model, data), model, options, time.time() - started,
                              world_size=w.size))
        if w.main:
            res.save(path)
        w.barrier()  # the entry is written before any rank's checkpoint goes
        remove(partial, w)
        return res


def stamp(key: dict, model: Model, options: RunOptions, seconds: float, *, world_size: int = 1) -> dict:
    """The provenance every cached result carries: its key, the model's shape, the speed knobs
    it ran with (``world_size``, the number of processes, included) and its wall time."""
    run = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in ("checkpoint", "progress")}
    return {**model.describe(), "key": json.loads(json.dumps(key, default=str)),
            "run": {**run, "world_size": world_size, "remote": model.remote,
                    "device": str(resolve_device(model.device)),
                    "wall_time_s": round(seconds, 1)}}
