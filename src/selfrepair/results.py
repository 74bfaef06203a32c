"""Results: one base for every measurement's output, and safe files.

Every result (:class:`SelfRepairResult` here; the sweep's, the neurons', the iterative and the
Hydra measurements' in their modules) is a dataclass deriving from :class:`Result`: its tensor
fields (and dicts of tensors) are saved as tensors, its other fields as JSON, and ``meta`` holds
the provenance the results cache writes (spec, model identity, data fingerprint, speed knobs,
versions). ``to_frame()`` gives a tidy frame with the canonical columns ``layer, head, label``.

Files are safetensors (no pickles) with the metadata as JSON inside the header, written
atomically (temporary file + rename) so a reader never sees a partial file — a write that fails
(disk full, permission denied) leaves the previous file intact — and verified by a SHA-256 of the
tensor bytes stored in the header.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd
import torch

from .errors import SelfRepairError

HEAD_QUANTITIES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair",
                   "from_heads", "from_mlps", "from_norm", "from_block_norms", "scale_ablated")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


class CorruptResultError(RuntimeError):
    """A result file is truncated, its checksum does not match, or it holds another result type."""


class ResultWriteError(SelfRepairError):
    """A result could not be written (disk full, permission denied); the previous file is intact."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place: a reader
    sees the old file or the whole new one, never part of one. The file gets the umask's
    permissions (results are meant to be shared). A failing write (``OSError``: disk full,
    permission denied, ...) removes its temporary file, leaves whatever was at ``path`` untouched
    and raises :class:`ResultWriteError` naming the path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        raise ResultWriteError(f"could not write {path} ({e.strerror or e}); the previous file there, "
                               "if any, is unchanged. Free some space or pick a writable cache_dir, "
                               "then run again.") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` + ``meta`` to ``path`` atomically (:func:`atomic_write`), with a checksum."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"meta": json.dumps(meta, sort_keys=True, default=str), "sha256": _digest(tensors)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`; :class:`CorruptResultError` if damaged.

    The file is read in one go and parsed from memory, so a reader racing a writer that replaces
    the file (a checkpoint being updated) sees one whole version, never the header of one and the
    data of another (``safetensors.safe_open`` opens the path more than once)."""
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # truncated headers or data raise several types
        raise CorruptResultError(f"{path} is unreadable ({e})") from e
    if "sha256" not in header or _digest(tensors) != header["sha256"]:
        raise CorruptResultError(f"{path} failed its checksum")
    return tensors, json.loads(header.get("meta", "{}"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class Result:
    """The base of every result: tensors + JSON attributes + ``meta``, one file.

    Subclasses are dataclasses. Tensor fields and ``dict[str, Tensor]`` fields are stored as
    tensors (a dict's entries as ``"<field>/<key>"``), every other field as JSON (lists of pairs
    come back as lists of tuples). ``meta`` is free-form provenance, written by the results cache.
    """

    meta: dict = field(default_factory=dict, kw_only=True)

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("heads",)  # JSON lists of pairs -> lists of tuples

    def _fields(self):
        return [f for f in fields(self) if f.name != "meta"]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in self._fields():
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v
            elif isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
                out.update({f"{f.name}/{k}": x for k, x in v.items()})
        return out

    def attributes(self) -> dict:
        tensor_names = {k.split("/", 1)[0] for k in self.tensors()}
        return {f.name: _jsonable(getattr(self, f.name)) for f in self._fields()
                if f.name not in tensor_names and not isinstance(getattr(self, f.name), torch.Tensor)}

    def save(self, path: str | os.PathLike) -> Path:
        meta = {**self.meta, "result": type(self).__name__, "attributes": self.attributes()}
        return save_tensors(path, self.tensors(), meta)

    @classmethod
    def load(cls, path: str | os.PathLike):
        tensors, meta = load_tensors(path)
        kind = meta.pop("result", None)
        if kind is not None and kind != cls.__name__:
            raise CorruptResultError(f"{path} holds a {kind}, not a {cls.__name__}")
        attrs = meta.pop("attributes", {})
        return cls._restore(tensors, attrs, meta)

    @classmethod
    def _restore(cls, tensors: dict, attrs: dict, meta: dict):
        kwargs: dict[str, Any] = {}
        for key, t in tensors.items():
            if "/" in key:
                name, sub = key.split("/", 1)
                kwargs.setdefault(name, {})[sub] = t
            else:
                kwargs[key] = t
        for name, value in attrs.items():
            if name in cls.TUPLE_FIELDS and value is not None:
                value = [tuple(v) for v in value]
            kwargs[name] = value
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}, meta=meta)

    def to_frame(self) -> pd.DataFrame:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def _head_index(heads: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layers, heads)`` index tensors of a list of ``(layer, head)`` pairs (possibly empty)."""
    return torch.tensor(heads, dtype=torch.long).view(-1, 2).unbind(1)


@dataclass
class SelfRepairResult(Result):
    """Per-head, per-token self-repair: each quantity ``[layer, head, batch, pos-1]`` (NaN for
    heads not listed in ``heads``).

    Signs: ``delta_logit = ablated - clean``; ``self_repair = delta_logit - (ablated_direct_effect
    - direct_effect)`` = ``from_heads + from_mlps + from_norm + from_block_norms``. ``tokens`` and
    ``corrupt_tokens`` are the rows measured and their resample sources.
    """

    direct_effect: torch.Tensor
    ablated_direct_effect: torch.Tensor
    delta_logit: torch.Tensor
    self_repair: torch.Tensor
    from_heads: torch.Tensor
    from_mlps: torch.Tensor
    from_norm: torch.Tensor
    from_block_norms: torch.Tensor
    scale_ablated: torch.Tensor
    scale_clean: torch.Tensor  # [batch, pos-1]
    logit: torch.Tensor  # [batch, pos-1] centered clean logit of the next token
    tokens: torch.Tensor | None = None  # [batch, seq] the rows measured
    corrupt_tokens: torch.Tensor | None = None  # [batch, seq] their resample sources
    ablation: str = "resample"
    heads: list = field(default_factory=list)
    delta_logit_capped: torch.Tensor | None = None  # soft-capped models: Δlogit after the final cap

    @property
    def delta_direct_effect(self) -> torch.Tensor:
        return self.ablated_direct_effect - self.direct_effect

    def to_frame(self, mask: torch.Tensor | None = None) -> pd.DataFrame:
        """Tidy per-token frame (one row per head x token) of the listed heads; ``mask``
        (``[layer, head, batch, pos-1]`` bool) keeps only selected tokens."""
        rows = []
        for layer, head in self.heads:
            keep = (torch.ones_like(self.direct_effect[layer, head], dtype=torch.bool)
                    if mask is None else mask[layer, head])
            b, p = keep.nonzero(as_tuple=True)
            frame = {"layer": layer, "head": head, "label": head_label(layer, head),
                     "batch": b.numpy(), "pos": p.numpy()}
            for q in self._per_head_fields():
                frame[q] = getattr(self, q)[layer, head][b, p].numpy()
            frame["scale_clean"] = self.scale_clean[b, p].numpy()
            frame["logit"] = self.logit[b, p].numpy()
            rows.append(pd.DataFrame(frame))
        df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
        if len(df):
            df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
        return df

    def per_head(self, mask: torch.Tensor | None = None) -> pd.DataFrame:
        """Per-head means (over the tokens in ``mask``, default all) — one row per head."""
        df = self.to_frame(mask)
        cols = list(self._per_head_fields()) + ["delta_direct_effect", "logit"]
        out = df.groupby(["layer", "head", "label"], sort=True)[cols].mean().reset_index()
        out["n_tokens"] = df.groupby(["layer", "head"], sort=True).size().to_numpy()
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The listed heads' rows only (unlisted heads are NaN; :meth:`load` restores them)."""
        layer, head = _head_index(self.heads)
        per_head = self._per_head_fields()
        return {q: t[layer, head] if q in per_head else t for q, t in super().tensors().items()}

    def _per_head_fields(self) -> tuple[str, ...]:
        return HEAD_QUANTITIES + (("delta_logit_capped",) if self.delta_logit_capped is not None else ())

    def attributes(self) -> dict:
        return {**super().attributes(), "head_grid": list(self.direct_effect.shape[:2])}

    @classmethod
    def _restore(cls, tensors: dict, attrs: dict, meta: dict):
        grid = attrs.pop("head_grid")
        layer, head = _head_index([tuple(h) for h in attrs.get("heads", [])])
        for q in (q for q in (*HEAD_QUANTITIES, "delta_logit_capped") if q in tensors):
            full = torch.full((*grid, *tensors[q].shape[1:]), float("nan"), dtype=tensors[q].dtype)
            full[layer, head] = tensors[q]
            tensors[q] = full
        return super()._restore(tensors, attrs, meta)
