"""From a :class:`~selfrepair.config.RunConfig` to results: the notebooks' and CLI's entry point.

Loads (and memoizes) the model and the token rows, and computes or loads cached results. The
cache key is a hash of everything that changes the numbers — model, revision, dataset, token
count, sequence length, batch size, ablation, top-k%, seed, dtype, device type and the library
version — so re-running the book's text does not recompute, and a change of any of them does.
A damaged cache file is detected (checksum), reported with a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd
import torch

from .config import RunConfig
from .models import Model, load_model, resolve_device, resolve_dtype
from .results import CorruptResultError

T = TypeVar("T")
TINY_DATASET = "tiny"  # a small synthetic in-memory corpus for tests and quick runs


@lru_cache(maxsize=2)
def _model(name: str, device: str, dtype: str | None) -> Model:
    return load_model(name, device=device, dtype=dtype)


def open_model(cfg: RunConfig) -> Model:
    """The model named by ``cfg`` (loaded once per process)."""
    return _model(cfg.model, cfg.device, cfg.dtype)


def open_tokens(cfg: RunConfig, model: Model, *, progress: bool = True) -> torch.Tensor:
    """``[n_rows, seq_len]`` token rows of ``cfg.dataset``, each starting with BOS."""
    from .data import load_corpus, pack_tokens, tiny_corpus

    if model.tokenizer is None:
        from .errors import InputError
        raise InputError(f"{model.name} has no tokenizer: pass tokenizer= to load_model")
    if cfg.seq_len > model.n_ctx:
        from .errors import InputError
        raise InputError(f"seq_len={cfg.seq_len} is longer than {model.name}'s context of "
                         f"{model.n_ctx} tokens: use seq_len <= {model.n_ctx}")
    corpus = tiny_corpus(seed=cfg.seed) if cfg.dataset == TINY_DATASET else load_corpus(cfg.dataset)
    return pack_tokens(corpus, model.tokenizer, n_tokens=cfg.n_tokens, seq_len=cfg.seq_len,
                       seed=cfg.seed, progress=progress)


def cache_params(cfg: RunConfig, model: Model, **extra: Any) -> dict:
    from . import __version__
    from .data import dataset_fingerprint

    dev = resolve_device(cfg.device)
    corpus = "generated" if cfg.dataset == TINY_DATASET else dataset_fingerprint(cfg.dataset)
    return {"model": cfg.model, "revision": model.revision, "dataset": cfg.dataset, "corpus": corpus,
            "n_tokens": cfg.n_tokens, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "top_percent": cfg.top_percent,
            "dtype": str(resolve_dtype(cfg.dtype, dev)).replace("torch.", ""),
            "device_type": dev.type, "version": __version__, **extra}


def cache_path(cfg: RunConfig, kind: str, params: dict) -> Path:
    """``<cache_dir>/<model slug>/<kind>-<hash>.safetensors``."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model).strip("_")
    return Path(cfg.cache_dir) / slug / f"{kind}-{key}.safetensors"


def cached(path: Path, compute: Callable[[Path], T], load: Callable[[Path], T]) -> T:
    """Load ``path`` if present and intact; otherwise ``compute(path)`` (which writes it)."""
    if path.exists():
        try:
            return load(path)
        except CorruptResultError as e:
            warnings.warn(f"cached result {path} is corrupt ({e}); recomputing it")
            path.unlink()
    return compute(path)


def cached_result(cfg: RunConfig, kind: str, params: dict, measure: Callable[[], T],
                  load: Callable[[Path], T]) -> T:
    """The result of ``measure()`` for ``params``, from the results cache if it is there and
    intact; otherwise measured, stamped with ``params`` in its ``meta`` and saved atomically."""
    def compute(path: Path) -> T:
        res = measure()
        res.meta["params"] = params
        res.save(path)
        return res

    return cached(cache_path(cfg, kind, params), compute, load)


def head_sweep(cfg: RunConfig, ablation: str | None = None, *, progress: bool = True):
    """The all-heads sweep of ``cfg`` (``ablation`` overrides ``cfg.ablation``), cached."""
    from .sweep import Sweep, run_sweep

    ablation = ablation or cfg.ablation
    model = open_model(cfg)
    params = cache_params(cfg, model, ablation=ablation, kind="head_sweep")
    path = cache_path(cfg, f"sweep-{ablation}", params)

    def compute(p: Path) -> Sweep:
        tokens = open_tokens(cfg, model, progress=progress)
        return run_sweep(model, tokens, ablation=ablation, top_percent=cfg.top_percent,
                         batch_size=cfg.batch_size, seed=cfg.seed, path=p, params=params,
                         progress=progress)

    return cached(path, compute, Sweep.load)


def provenance(cfg: RunConfig, started: float | None = None, **extra: Any) -> pd.DataFrame:
    """The table every chapter ends with: versions, model, device, parameters, wall time."""
    import nnsight
    import transformers

    from . import __version__

    model = open_model(cfg)
    rows = {"selfrepair": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "nnsight": nnsight.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            **{k: v for k, v in model.describe().items()},
            **{f"param:{k}": v for k, v in cfg.as_dict().items() if k != "extra"},
            **{f"param:{k}": v for k, v in cfg.extra.items()}, **extra}
    if started is not None:
        rows["wall_time_s"] = round(time.time() - started, 1)
    return pd.DataFrame({"item": list(rows), "value": [str(v) for v in rows.values()]})
