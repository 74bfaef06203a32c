"""Run parameters shared by the notebooks' ``parameters`` cells, the CLI and cached metadata.

One snake_case name per parameter everywhere. :meth:`RunConfig.from_params` validates types and
values and raises one :class:`~selfrepair.errors.InputError` naming the parameter and what to
pass instead (papermill injects strings from the command line, so numeric strings are accepted).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .ablation import ABLATIONS
from .errors import InputError

HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")


@dataclass(frozen=True)
class RunConfig:
    model: str = "gemma-3-270m"  # hub id, local directory, "gemma-3-270m" or "tiny-<family>"
    dataset: str = "embedded"  # "embedded", a local file/dir, or a hub dataset id
    n_tokens: int = 8192  # tokens measured (rounded up to whole rows)
    seq_len: int = 128  # tokens per row, BOS included
    batch_size: int = 8  # rows per forward pass
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto"
    dtype: str | None = None  # None: fp32 on CPU, bf16 on GPU
    top_percent: float = 2.0  # per head, the top k% of tokens by clean direct effect
    seed: int = 0  # corrupt-token pairing, bootstrap, samples and featured-head choice
    ablation: str = "resample"  # "resample", "mean" or "zero"
    featured_heads: tuple[str, ...] | None = None  # e.g. ("L17H3",); None = chosen automatically
    cache_dir: str = "results"  # where computed results are cached
    extra: dict = field(default_factory=dict, compare=False)  # chapter-specific parameters

    @classmethod
    def from_params(cls, **params: Any) -> "RunConfig":
        """Build and validate from notebook/CLI parameters; unknown names go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in params.items() if k in known}
        extra = {k: v for k, v in params.items() if k not in known}
        for name, kind in (("n_tokens", int), ("seq_len", int), ("batch_size", int), ("seed", int)):
            if name in kwargs:
                kwargs[name] = _coerce(name, kwargs[name], kind)
        if "top_percent" in kwargs:
            kwargs["top_percent"] = _coerce("top_percent", kwargs["top_percent"], float)
        for name in ("model", "dataset", "device", "ablation", "cache_dir"):
            if name in kwargs and not isinstance(kwargs[name], str):
                raise InputError(f"parameter {name} must be a string, got "
                                 f"{type(kwargs[name]).__name__} {kwargs[name]!r}")
        if kwargs.get("dtype") is not None and not isinstance(kwargs["dtype"], str):
            raise InputError(f"parameter dtype must be a string or None, got {kwargs['dtype']!r}")
        if kwargs.get("featured_heads") is not None:
            kwargs["featured_heads"] = _heads(kwargs["featured_heads"])
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.n_tokens < 1:
            raise InputError(f"n_tokens must be positive, got {self.n_tokens}")
        if self.seq_len < 2:
            raise InputError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 < self.top_percent <= 100:
            raise InputError(f"top_percent must be in (0, 100], got {self.top_percent}")
        if self.ablation not in ABLATIONS:
            raise InputError(f"unknown ablation {self.ablation!r}: use one of {', '.join(ABLATIONS)}")
        rows = -(-self.n_tokens // self.seq_len)
        if rows * (self.seq_len - 1) * self.top_percent / 100 < 1:
            raise InputError(f"n_tokens={self.n_tokens} gives fewer than one token in the top "
                             f"{self.top_percent}% per head: raise n_tokens or top_percent")

    @property
    def n_rows(self) -> int:
        return -(-self.n_tokens // self.seq_len)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["featured_heads"] = list(self.featured_heads) if self.featured_heads else None
        return d


def _coerce(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise InputError(f"parameter {name} must be {kind.__name__}, got bool {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise InputError(f"parameter {name} must be {kind.__name__}, got {type(value).__name__} "
                         f"{value!r}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise InputError(f"parameter {name} must be a whole number, got {value!r}")
    return out


def _heads(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not HEAD_LABEL.match(item):
            raise InputError(f"featured_heads must be labels like 'L11H2', got {item!r}")
    return tuple(items)


def parse_head(label: str) -> tuple[int, int]:
    m = HEAD_LABEL.match(label)
    if not m:
        raise InputError(f"head label must look like 'L11H2', got {label!r}")
    return int(m.group(1)), int(m.group(2))
