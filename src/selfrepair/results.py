"""Result containers: tensors plus metadata, tidy frames, and safe files.

Files are safetensors (no pickles) with the metadata as JSON inside the header, written
atomically (temporary file + rename) so a reader never sees a partial file, and verified by a
SHA-256 of the tensor bytes stored in the header.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch

HEAD_QUANTITIES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair",
                   "from_heads", "from_mlps", "from_norm", "from_block_norms", "scale_ablated")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


class CorruptResultError(RuntimeError):
    """A result file is truncated or its checksum does not match."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` + ``meta`` to ``path`` atomically, with a checksum."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"meta": json.dumps(meta, sort_keys=True, default=str), "sha256": _digest(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`; :class:`CorruptResultError` if damaged."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated headers/data
        raise CorruptResultError(f"{path} is unreadable ({e})") from e
    if "sha256" not in header or _digest(tensors) != header["sha256"]:
        raise CorruptResultError(f"{path} failed its checksum")
    return tensors, json.loads(header.get("meta", "{}"))


def _head_index(heads: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layers, heads)`` index tensors of a list of ``(layer, head)`` pairs (possibly empty)."""
    return torch.tensor(heads, dtype=torch.long).view(-1, 2).unbind(1)


@dataclass
class SelfRepairResult:
    """Per-head, per-token self-repair: each quantity ``[layer, head, batch, pos-1]``.

    Signs: ``delta_logit = ablated - clean``; ``self_repair = delta_logit - (ablated_direct_effect
    - direct_effect)`` = ``from_heads + from_mlps + from_norm + from_block_norms``.
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
    ablation: str = "resample"
    heads: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def delta_direct_effect(self) -> torch.Tensor:
        return self.ablated_direct_effect - self.direct_effect

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

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
            for q in HEAD_QUANTITIES:
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
        cols = list(HEAD_QUANTITIES) + ["delta_direct_effect", "logit"]
        out = df.groupby(["layer", "head", "label"], sort=True)[cols].mean().reset_index()
        out["n_tokens"] = df.groupby(["layer", "head"], sort=True).size().to_numpy()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the listed heads' rows only (unlisted heads are NaN; :meth:`load` restores them)."""
        n_layers, n_heads = self.direct_effect.shape[:2]
        meta = {**self.meta, "ablation": self.ablation, "heads": [list(h) for h in self.heads],
                "head_grid": [n_layers, n_heads]}
        layer, head = _head_index(self.heads)
        tensors = {q: t[layer, head] if q in HEAD_QUANTITIES else t for q, t in self.tensors().items()}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SelfRepairResult":
        tensors, meta = load_tensors(path)
        heads = [tuple(h) for h in meta.pop("heads", [])]
        grid = meta.pop("head_grid", None)
        if grid is not None:
            layer, head = _head_index(heads)
            for q in HEAD_QUANTITIES:
                full = torch.full((*grid, *tensors[q].shape[1:]), float("nan"), dtype=tensors[q].dtype)
                full[layer, head] = tensors[q]
                tensors[q] = full
        return cls(**tensors, ablation=meta.get("ablation", "resample"), heads=heads, meta=meta)
