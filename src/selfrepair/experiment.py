"""From a config to results: the model, the data and the cached measurements a chapter reads.

- :func:`open_model` — the config's model, loaded once per process;
- :func:`open_tokens` — the config's :class:`~selfrepair.batch.TokenSet` (packed from its corpus,
  each row's resample source from another document, tokenized only when first used, once per
  model and corpus in a process);
- :func:`open_prompts` — the factual prompts of the Hydra chapter as a :class:`~selfrepair.batch.PromptSet`;
- :func:`measure` — a spec's result from the results cache (:class:`selfrepair.measure.Cache`),
  computed and saved when missing;
- :func:`provenance` — the table every chapter ends with (one line, the table folded);
- :func:`run_summary` — what a chapter ran, on what, in words (the cell near its top).
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .allocator import keep_freed_memory
from .batch import PromptSet, TokenSet
from .config import CorpusConfig, RunConfig
from .errors import InputError
from .measure import Cache, RunOptions, Spec
from .models import Model, load_model

TINY_DATASET = "tiny"  # a small synthetic in-memory corpus for tests and quick runs
SOURCE_RULE = "other-document"  # version of the resample-source rule (selfrepair.data.resample_sources)
# open_tokens' sets, by (model, fingerprint): a chapter's check and its measurements share one packing.
# The model is held with its set so that its id is not reused while the entry lives.
_TOKEN_SETS: dict[tuple[int, str], tuple[Model, TokenSet]] = {}
_MAX_TOKEN_SETS = 8


@lru_cache(maxsize=2)
def _model(name: str, device: str, dtype: str | None, remote: str | None = None,
           fold_value_biases: bool = False) -> Model:
    if device == "cpu" or not torch.cuda.is_available():  # on a GPU no tensor of the passes is in RAM
        keep_freed_memory()  # a chapter's passes reuse freed memory instead of faulting it in again
    return load_model(name, device=device, dtype=dtype, remote=remote,
                      fold_value_biases=fold_value_biases)


def open_model(cfg: RunConfig) -> Model:
    """The model named by ``cfg`` (loaded once per process), wrapped for the remote path when
    ``cfg.remote`` says so, its value biases folded when the chapter's ``fold_value_biases`` says
    so (a chapter without that parameter is not changed by it: the model as it is)."""
    return _model(cfg.model, cfg.device, cfg.dtype, cfg.remote, getattr(cfg, "fold_value_biases", False))


def tiny_documents(cfg: CorpusConfig) -> int:
    """How many documents the generated ``"tiny"`` corpus has for ``cfg``: 64 when packed by
    concatenation (as before the packing was a parameter), 512 for one window per row."""
    return 64 if cfg.packing == "concatenate" else 512


def corpus_fingerprint(dataset: str, seed: int, n_docs: int = 64) -> str:
    from .data import dataset_fingerprint

    if dataset != TINY_DATASET:
        return dataset_fingerprint(dataset)
    return f"generated:tiny_corpus(seed={seed}{'' if n_docs == 64 else f', n_docs={n_docs}'})"


def open_tokens(cfg: CorpusConfig, model: Model, *, progress: bool = True) -> TokenSet:
    """``cfg``'s token rows ``[n_rows, seq_len]`` (each starting with BOS) with their resample
    sources; the corpus is read and tokenized on first use of the rows, not before, and once per
    model and fingerprint in a process (later calls return the same set)."""
    if model.tokenizer is None:
        raise InputError(f"{model.name} has no tokenizer: pass tokenizer= to load_model or save "
                         "the tokenizer next to the model")
    if cfg.seq_len > model.n_ctx:
        raise InputError(f"seq_len={cfg.seq_len} is longer than {model.name}'s context of "
                         f"{model.n_ctx} tokens: use seq_len <= {model.n_ctx}")
    fingerprint = {"dataset": cfg.dataset, "corpus": corpus_fingerprint(cfg.dataset, cfg.seed, tiny_documents(cfg)),
                   "n_rows": cfg.n_rows, "seq_len": cfg.seq_len, "seed": cfg.seed,
                   "sources": SOURCE_RULE}
    if cfg.packing != "concatenate":  # the packing before this parameter existed keeps its keys
        fingerprint["packing"] = cfg.packing

    def load() -> dict:
        from .data import load_corpus, tiny_corpus
        from .packing import pack, resample_sources, same_document_rows

        corpus = (tiny_corpus(tiny_documents(cfg), seed=cfg.seed) if cfg.dataset == TINY_DATASET
                  else load_corpus(cfg.dataset))
        packed = pack(corpus, model.tokenizer, packing=cfg.packing, n_tokens=cfg.n_tokens,
                      seq_len=cfg.seq_len, seed=cfg.seed, progress=progress)
        if int(packed.tokens.max()) >= model.d_vocab:
            raise InputError(f"the tokenizer of {model.name} produced ids up to {int(packed.tokens.max())} "
                             f"but the model has {model.d_vocab} embeddings: use the model's own tokenizer")
        source = (resample_sources(packed.doc_first, packed.doc_last, seed=cfg.seed)
                  if len(packed.tokens) > 1 else None)
        return {"tokens": packed.tokens, "source": source,
                "corrupt_tokens": None if source is None else packed.tokens[source],
                "same_document": None if source is None else
                same_document_rows(packed.doc_first, packed.doc_last, source),
                "main_document": packed.doc_main}

    key = (id(model), json.dumps(fingerprint, sort_keys=True))
    if key not in _TOKEN_SETS:
        if len(_TOKEN_SETS) >= _MAX_TOKEN_SETS:
            del _TOKEN_SETS[next(iter(_TOKEN_SETS))]
        _TOKEN_SETS[key] = (model, TokenSet(fingerprint, load))
    return _TOKEN_SETS[key][1]


def open_prompts(model: Model, path: str | None = None, n_prompts: int | None = None,
                 seed: int = 0) -> PromptSet:
    """The factual prompts (``data/factual_prompts.csv`` or ``path``) as a right-padded
    :class:`PromptSet`; ``n_prompts`` keeps a seeded subset (``None``: all)."""
    import hashlib

    from .data import load_prompts, prompt_tokens

    if model.tokenizer is None:
        raise InputError(f"{model.name} has no tokenizer: the prompts cannot be tokenized")
    prompts = load_prompts(path)
    if n_prompts is not None:
        if n_prompts < 2:
            raise InputError(f"n_prompts must be at least 2 (a prompt's resample source is another "
                             f"prompt), got {n_prompts}")
        keep = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
        prompts = prompts.iloc[keep[:min(n_prompts, len(prompts))].sort().values.numpy()]
    prompts = prompts.reset_index(drop=True)
    pt = prompt_tokens(prompts, model.tokenizer)
    if int(pt.input_ids.max()) >= model.d_vocab:
        raise InputError(f"the tokenizer of {model.name} produced ids outside its embeddings")
    digest = hashlib.sha256(prompts[["prompt", "target"]].to_csv(index=False).encode()).hexdigest()[:16]
    return PromptSet(pt.input_ids, pt.last_pos, pt.target_ids, list(prompts["prompt"]),
                     list(prompts["target"]), fingerprint={"prompts": f"sha256:{digest}",
                                                           "n_prompts": len(prompts)})


def measure(cfg: RunConfig, spec: Spec, data: Any, *, progress: bool = True, **options: Any):
    """``spec``'s result on ``cfg``'s model and ``data``, from ``cfg.cache_dir`` (computed and saved
    if missing). ``options`` are :class:`~selfrepair.measure.RunOptions` (speed knobs)."""
    if not hasattr(cfg, "cache_dir"):
        raise InputError(f"{type(cfg).__name__} has no cache_dir: this chapter caches nothing")
    if isinstance(cfg, CorpusConfig):
        options.setdefault("batch_size", cfg.batch_size)
    return Cache(cfg.cache_dir).get(spec, open_model(cfg), data,
                                    RunOptions(progress=progress, **options))


def sweep_spec(cfg: CorpusConfig, ablation: str = "resample"):
    """The spec of ``cfg``'s all-heads sweep (the same for chapters 1, 2, 3 and 6, so they share
    one cache entry)."""
    from .sweep import SweepSpec

    return SweepSpec(ablation=ablation, top_percent=cfg.top_percent, seed=cfg.seed)


def head_sweep(cfg: CorpusConfig, ablation: str = "resample", *, progress: bool = True):
    """The all-heads sweep of ``cfg``'s token set under ``ablation`` (cached)."""
    return measure(cfg, sweep_spec(cfg, ablation), open_tokens(cfg, open_model(cfg), progress=progress),
                   progress=progress)


def shown_path(value: Any, root: str | Path | None = None) -> Any:
    """``value`` as the book shows it: an absolute path under ``root`` (default: the working
    directory, the book's root when ``selfrepair book`` runs a chapter) relative to it, any other
    absolute path as ``…/<its last part>``; other values unchanged.

    Where a model directory or a corpus file sat on the machine that built the book tells a reader
    nothing and names that machine's folders; its name (``…/pythia-160m``) is what identifies it,
    and a path under the book (``results``, ``data/...``) is where the reader's own copy has it."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    path, base = Path(value).resolve(), Path(root or Path.cwd()).resolve()
    if path.is_relative_to(base):
        return path.relative_to(base).as_posix() or "."
    return f"…/{path.name}"


def provenance(cfg: RunConfig, started: float | None = None, **extra: Any):
    """The table every chapter ends with (versions, model, device, parameters, wall time), shown
    as one line — what ran, with which library, in how long — and the whole table folded below
    it (:func:`selfrepair.tables.folded`; its ``.frame`` has the columns ``item, value``). A config
    that runs no model (the scorecard's) has no model rows. Paths are shown by :func:`shown_path`
    (relative to the book's root, or ``…/<name>``)."""
    import nnsight
    import transformers

    from . import __version__
    from .tables import folded

    described = open_model(cfg).describe() if isinstance(cfg, RunConfig) else {}  # the scorecard runs none
    rows = {"selfrepair": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "nnsight": nnsight.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            **described, **{f"param:{k}": v for k, v in cfg.as_dict().items()}, **extra}
    if started is not None:
        rows["wall_time_s"] = round(time.time() - started, 1)
    # a model value not set (a revision of None: the hub's default) is "—", as the introduction's
    # shape table shows it; a parameter keeps None, the literal its cell takes
    frame = pd.DataFrame({"item": list(rows), "value": ["—" if v is None and k in described else str(shown_path(v))
                                                        for k, v in rows.items()]})
    took = f" in {rows['wall_time_s']:,.1f} s" if "wall_time_s" in rows else ""
    where = f"Ran on {rows['model']} ({rows['dtype']}, {cfg.device})" if described else "Ran, loading no model,"
    summary = (f"{where}{took} with selfrepair "
               f"{__version__}, torch {torch.__version__}, transformers {transformers.__version__} "
               f"and nnsight {nnsight.__version__}.")
    return folded(frame, summary, label=f"Every version and parameter ({len(frame)} rows)")
