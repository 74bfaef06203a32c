"""Run parameters: one validated, typed config per chapter, one snake_case name per parameter.

:class:`RunConfig` holds what every chapter needs (model, device, dtype, seed);
:class:`CorpusConfig` adds the token set of the corpus chapters (dataset, n_tokens, seq_len,
top_percent), their batch size and the results cache. Each chapter derives its own config from one of them with exactly the
parameters it uses (``selfrepair.chapters.<chapter>.Config``); its notebook's ``parameters`` cell
lists the same names.

:meth:`Config.from_params` converts the values papermill and the command line pass (strings such
as ``"512"``, lists for tuples), rejects unknown names with the list of known ones, checks every
value and raises one :class:`~selfrepair.errors.InputError` naming the parameter and what to pass.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .errors import InputError

HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")


def parse_head(label: str) -> tuple[int, int]:
    m = HEAD_LABEL.match(str(label))
    if not m:
        raise InputError(f"head label must look like 'L11H2', got {label!r}")
    return int(m.group(1)), int(m.group(2))


def _origin(tp) -> tuple[Any, tuple, bool]:
    """(base type, type args, optional) of an annotation such as ``tuple[str, ...] | None``."""
    args = typing.get_args(tp)
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        tp = rest[0]
        args = typing.get_args(tp)
    return typing.get_origin(tp) or tp, args, optional


def _coerce(name: str, value: Any, tp) -> Any:
    base, args, optional = _origin(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")
                         and optional):
        if optional:
            return None
        raise InputError(f"parameter {name} must be {getattr(base, '__name__', base)}, got None")
    if base is tuple:
        items = [value] if isinstance(value, (str, int, float)) else value
        if isinstance(value, str) and "," in value:  # "1,3,5" from a command line
            items = [v for v in value.strip("[]()").split(",") if v.strip()]
        try:
            items = list(items)
        except TypeError:
            raise InputError(f"parameter {name} must be a list, got {value!r}") from None
        return tuple(_coerce(name, v, args[0]) for v in items)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InputError(f"parameter {name} must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool):
            raise InputError(f"parameter {name} must be {base.__name__}, got bool {value!r}")
        try:
            out = base(value)
        except (TypeError, ValueError):
            raise InputError(f"parameter {name} must be {base.__name__}, got {type(value).__name__} "
                             f"{value!r}") from None
        if base is int and isinstance(value, float) and value != out:
            raise InputError(f"parameter {name} must be a whole number, got {value!r}")
        return out
    if base is str:
        if not isinstance(value, str):
            raise InputError(f"parameter {name} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _heads(name: str, labels) -> None:
    for item in labels or ():
        if not HEAD_LABEL.match(item):
            raise InputError(f"{name} must be labels like 'L11H2', got {item!r}")


@dataclass(frozen=True)
class Config:
    """A validated set of parameters (see module docstring)."""

    HEAD_FIELDS: ClassVar[tuple[str, ...]] = ()  # fields holding head labels (checked)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_params(cls, **params: Any):
        """Build and validate from notebook/CLI parameters."""
        known = cls.field_names()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InputError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"for {cls.__module__.split('.')[-1]}: the known parameters are "
                             f"{', '.join(known)}")
        hints = typing.get_type_hints(cls)
        cfg = cls(**{k: _coerce(k, v, hints[k]) for k, v in params.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in self.HEAD_FIELDS:
            value = getattr(self, name)
            _heads(name, [value] if isinstance(value, str) else value)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RunConfig(Config):
    """What every chapter runs with."""

    model: str = "gemma-3-270m"  # hub id, local directory, "gemma-3-270m" or "tiny-<family>"
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto"
    dtype: str | None = None  # None: fp32 (GPU too, until bf16 is shown to agree)
    remote: str | None = None  # None: run here; "local": simulated remote path; "ndif": on NDIF
    seed: int = 0  # resample sources, samples, bootstrap

    def validate(self) -> None:
        super().validate()
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.dtype is not None:
            from .models import DTYPES
            if self.dtype not in DTYPES:
                raise InputError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)} or None")
        if self.remote is not None:
            from .models import resolve_remote
            resolve_remote(self.remote)
        if not self.model.strip():
            raise InputError("model must name a model: a hub id, a local directory, 'gemma-3-270m' "
                             "or 'tiny-<family>'")


PACKING_NAMES = ("document", "concatenate")  # selfrepair.packing.PACKINGS: one window per document / documents joined


@dataclass(frozen=True)
class CorpusConfig(RunConfig):
    """Chapters measured on tokens of a corpus."""

    dataset: str = "embedded"  # "embedded", "tiny", a local file/dir or a hub dataset id
    n_tokens: int = 8192  # tokens measured (rounded up to whole rows)
    seq_len: int = 128  # tokens per row, BOS included
    packing: str = "document"  # "document": each row a window of its own document; "concatenate": documents joined and cut into rows (the paper's code)
    top_percent: float = 2.0  # per head, the top k% of tokens by clean direct effect
    batch_size: int = 8  # rows per forward pass: speed only, never in the cache key
    cache_dir: str = "results"  # where computed results are cached
    fold_value_biases: bool = False  # TransformerLens's convention (the paper's code): each b_V·W_O in the layer's bias, not the head's output

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1:
            raise InputError(f"batch_size must be positive, got {self.batch_size}")
        if self.n_tokens < 1:
            raise InputError(f"n_tokens must be positive, got {self.n_tokens}")
        if self.seq_len < 2:
            raise InputError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.packing not in PACKING_NAMES:
            raise InputError(f"packing must be one of {', '.join(map(repr, PACKING_NAMES))}, got "
                             f"{self.packing!r}: 'document' cuts each row from its own document, "
                             "'concatenate' joins the documents and cuts the stream into rows")
        if not 0 < self.top_percent <= 100:
            raise InputError(f"top_percent must be in (0, 100], got {self.top_percent}")
        if self.n_instances * self.top_percent / 100 < 1:
            raise InputError(f"n_tokens={self.n_tokens} gives fewer than one token in the top "
                             f"{self.top_percent}% per head: raise n_tokens or top_percent")

    @property
    def n_rows(self) -> int:
        return -(-self.n_tokens // self.seq_len)

    @property
    def n_instances(self) -> int:
        return self.n_rows * (self.seq_len - 1)
