"""Corpora and prompts turned into token batches.

Conventions
-----------
* **Token batches** are ``torch.LongTensor`` of shape ``[batch, seq_len]``, BOS at column 0:
  :mod:`selfrepair.packing` cuts them from a corpus (one window per document, or documents
  concatenated as the paper's code does) and pairs each row with a resample source from other
  text; its names are re-exported here.  For a bare tensor without document information
  :func:`corrupt_tokens` rolls the batch by one (row ``i`` receives row ``i - 1``) or, with a
  seed, draws a random derangement.
* **Prompts** are right-padded: :func:`prompt_tokens` puts BOS at position 0, the
  prompt at positions ``1 .. length - 1`` and padding after that, so ``last_pos =
  length - 1`` is the last real token.  In a causal model the logits at real
  positions do not depend on padding to their right, and positions/RoPE are the
  same as without padding, so ``logits[i, last_pos[i]]`` predicts the target.
* **Targets** begin with a space (``" Paris"``); ``target_ids`` is the id of the
  first token of the target as it is tokenized *after* the prompt.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import NamedTuple, Sequence

import datasets
import pandas as pd
import torch

from .errors import InputError

__all__ = ["EMBEDDED_CORPUS", "DataError", "Packed", "PromptTokens", "corrupt_tokens", "data_dir",
           "dataset_fingerprint", "load_corpus", "load_prompts", "pack", "pack_documents", "pack_tokens",
           "pack_windows", "prompt_tokens", "resample_sources", "same_document_rows", "tiny_corpus"]

EMBEDDED_CORPUS = "embedded"
EMBEDDED_FILE = Path("corpus") / "embedded.jsonl"
PROMPTS_FILE = "factual_prompts.csv"
PROMPT_COLUMNS = ("subject", "relation", "prompt", "target")
_BUILDERS = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv",
             ".txt": "text"}


class DataError(InputError):
    """A corpus, dataset or prompt file could not be loaded or used as asked (an ``InputError``)."""


def data_dir() -> Path:
    """Directory holding the embedded data: ``$SELFREPAIR_DATA_DIR``, else ``<repo>/data`` in a
    checkout, else the copy a wheel installs as ``selfrepair._data`` (pyproject.toml)."""
    env = os.environ.get("SELFREPAIR_DATA_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "data"
    if checkout.is_dir():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("selfrepair._data")
    return Path(next(iter(spec.submodule_search_locations))) if spec else checkout


def load_corpus(dataset: str | os.PathLike = EMBEDDED_CORPUS, *, split: str = "train",
                text_column: str = "text") -> datasets.Dataset:
    """Load a text corpus as a :class:`datasets.Dataset`.

    Parameters
    ----------
    dataset
        ``"embedded"`` (default): the committed mixed-domain corpus
        ``data/corpus/embedded.jsonl`` (~400k Gemma-3 tokens).  A local path: a
        json/jsonl(.gz)/parquet/csv/txt file or a directory of such files.  Anything
        else is a Hugging Face hub dataset id (e.g. ``"NeelNanda/pile-10k"``), which
        needs network access.
    split
        Split to load (local files and the embedded corpus only have ``"train"``).
    text_column
        Column that must be present; it holds the documents.

    Raises
    ------
    DataError
        If the embedded file is missing, a local path does not exist, the hub dataset
        cannot be loaded, or ``text_column`` is not a column.
    """
    name = os.fspath(dataset)
    if name == EMBEDDED_CORPUS:
        path = data_dir() / EMBEDDED_FILE
        if not path.is_file():
            raise DataError(f"The embedded corpus is missing ({path}). Rebuild it with "
                            "`python scripts/build_corpus.py` or re-clone the repository "
                            "(or point SELFREPAIR_DATA_DIR at a directory containing corpus/embedded.jsonl).")
        if split != "train":
            raise DataError(f"The embedded corpus has only a 'train' split, not {split!r}.")
        ds = datasets.load_dataset("json", data_files={"train": [str(path)]}, split=split)
    elif Path(name).expanduser().exists():
        ds = _load_local(Path(name).expanduser(), split)
    elif Path(name).suffix in _BUILDERS or name.startswith((".", "/", "~")):
        raise DataError(f"Local corpus path {name!r} does not exist.")
    else:
        from .hub import offline_env, offline_reason

        reason = offline_reason()
        if reason is not None and not offline_env():  # HF_HUB_OFFLINE: datasets reads its own cache
            raise DataError(
                f"Could not load dataset {name!r}: it is a hub id and the hub cannot be used ({reason}). "
                f"Use dataset='{EMBEDDED_CORPUS}' (the committed corpus) or a local file, or set "
                "HF_HUB_OFFLINE=1 if the dataset is in the local Hugging Face datasets cache.")
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # noqa: BLE001 -- hub errors come in many types
            raise DataError(
                f"Could not load dataset {name!r} (split {split!r}) from the Hugging Face hub: "
                f"{type(exc).__name__}: {exc}. Hub datasets need network access; offline, use "
                f"dataset='{EMBEDDED_CORPUS}' (the committed corpus) or a local file.") from exc
    if text_column not in ds.column_names:
        raise DataError(f"Dataset {name!r} has no column {text_column!r}; "
                        f"available columns: {ds.column_names}.")
    return ds


def dataset_fingerprint(dataset: str | os.PathLike) -> str:
    """What the cache key needs to notice a changed corpus: ``sha256:<hex>`` over the bytes of the
    embedded corpus or of a local file/directory's data files; a hub id is returned unchanged
    (the hub pins its own revisions)."""
    name = os.fspath(dataset)
    path = data_dir() / EMBEDDED_FILE if name == EMBEDDED_CORPUS else Path(name).expanduser()
    if not path.exists():
        return name
    digest = hashlib.sha256()
    for f in _data_files(path):
        digest.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _data_files(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else the data files under it (sorted)."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)


def _load_local(path: Path, split: str) -> datasets.Dataset:
    files = _data_files(path)
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise DataError(f"{path}: expected json/jsonl/parquet/csv/txt file(s) of one kind, "
                        f"found {[p.name for p in files][:10]}.")
    empty = [p.name for p in files if p.stat().st_size == 0]
    if empty:
        raise DataError(f"{path}: the corpus file(s) {empty[:5]} are empty: write one document per "
                        "line (jsonl: {\"text\": \"...\"}) or use dataset='embedded'.")
    try:
        return datasets.load_dataset(builders.pop(), data_files={split: [str(p) for p in files]},
                                     split=split)
    except (StopIteration, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(f"{path}: could not be read as a corpus ({type(e).__name__}: {e}); check the "
                        "file's format (one JSON object per line for .jsonl).") from e


def _texts(dataset: datasets.Dataset | Sequence[str], text_column: str) -> Sequence[str]:
    if isinstance(dataset, datasets.Dataset):
        if text_column not in dataset.column_names:
            raise DataError(f"Dataset has no column {text_column!r}; available columns: "
                            f"{dataset.column_names}.")
        return dataset[text_column]
    return dataset


def _check_strings(batch: list, rows: list[int], text_column: str) -> None:
    """One clear error for a document that is not text (a tokenizer's own error names no row)."""
    for row, doc in zip(rows, batch):
        if not isinstance(doc, str):
            raise DataError(f"row {row} of the corpus is {type(doc).__name__} "
                            f"{str(doc)[:40]!r}, not text: the column {text_column!r} must hold "
                            "strings (pass text_column= to name the column that does).")


def corrupt_tokens(tokens: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    """Resample-ablation source for a bare token tensor (no document information): each row
    replaced by a *different* row of the batch.

    Parameters
    ----------
    tokens
        ``[batch, ...]`` tensor with ``batch >= 2``.
    seed
        ``None`` (default): ``torch.roll(tokens, 1, 0)``, so row ``i`` gets row ``i - 1``
        (the paper's code pairs consecutive batches).  An int: a random derangement drawn with a
        seeded ``torch.Generator`` (uniform over permutations without fixed points).

    Token sets packed from a corpus use :func:`resample_sources` instead, which also keeps a row
    away from the documents it was cut from.
    """
    if tokens.dim() < 1 or tokens.shape[0] < 2:
        raise DataError(f"corrupt_tokens needs a batch of at least 2 rows, got shape {tuple(tokens.shape)}")
    if seed is None:
        return torch.roll(tokens, 1, 0)
    n, gen = tokens.shape[0], torch.Generator().manual_seed(seed)
    while True:  # rejection sampling: ~e draws on average
        perm = torch.randperm(n, generator=gen)
        if not bool((perm == torch.arange(n)).any()):
            return tokens[perm.to(tokens.device)]


def load_prompts(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the factual-recall prompts (default ``data/factual_prompts.csv``).

    Returns
    -------
    pandas.DataFrame
        Columns ``subject, relation, prompt, target`` (all str; targets start with a space).
    """
    path = Path(path) if path is not None else data_dir() / PROMPTS_FILE
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PROMPT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; available columns: {list(df.columns)}")
    if not df["target"].str.startswith(" ").all():
        bad = df.loc[~df["target"].str.startswith(" "), "target"].tolist()[:5]
        raise DataError(f"{path}: every target must start with a space, e.g. ' Paris'; got {bad}")
    return df


class PromptTokens(NamedTuple):
    """Right-padded prompt batch; see the module docstring for conventions."""

    input_ids: torch.Tensor       #: ``[n, max_len]`` LongTensor, BOS first, right-padded
    attention_mask: torch.Tensor  #: ``[n, max_len]`` LongTensor, 1 on real tokens
    last_pos: torch.Tensor        #: ``[n]`` index of each prompt's last real token
    target_ids: torch.Tensor      #: ``[n]`` id of the first token of each target


def prompt_tokens(prompts_df: pd.DataFrame, tokenizer, *, bos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> PromptTokens:
    """Tokenize prompts (BOS + prompt, right-padded) and the first token of each target.

    Parameters
    ----------
    prompts_df
        DataFrame with ``prompt`` and ``target`` columns (see :func:`load_prompts`).
    tokenizer
        Any Hugging Face tokenizer.
    bos_token_id, pad_token_id
        Defaults: the tokenizer's BOS (else EOS) and PAD (else EOS, else 0).

    Returns
    -------
    PromptTokens
        ``input_ids``, ``attention_mask``, ``last_pos`` and ``target_ids``.
    """
    bos = bos_token_id if bos_token_id is not None else (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    pad = next((t for t in (pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    prompts, targets = list(prompts_df["prompt"]), list(prompts_df["target"])
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full = tokenizer([p + t for p, t in zip(prompts, targets)], add_special_tokens=False)["input_ids"]
    alone = tokenizer(targets, add_special_tokens=False)["input_ids"]
    target_ids = [f[len(p)] if f[:len(p)] == p and len(f) > len(p) else a[0]
                  for p, f, a in zip(ids, full, alone)]
    rows = [[bos] + p for p in ids]
    lengths = torch.tensor([len(r) for r in rows])
    input_ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
    mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return PromptTokens(input_ids, mask, lengths - 1, torch.tensor(target_ids, dtype=torch.long))


_WORDS = ("the a one every some old new small large quiet bright dark red green blue cold warm "
          "river city garden house tree stone bird dog cat child teacher king road ship letter "
          "book song window mountain sea market friend story night morning rain wind fire "
          "sees finds keeps writes reads sings builds carries opens follows remembers watches "
          "and but while because near under over beside through after before with without").split()


def tiny_corpus(n_docs: int = 64, seed: int = 0) -> datasets.Dataset:
    """Synthetic English-like documents for fast tests (``text`` and ``pile_set_name``)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return datasets.Dataset.from_dict({"text": docs, "pile_set_name": ["Synthetic"] * n_docs})


# the packing of a corpus into token rows lives in selfrepair.packing (it needs _texts and
# DataError above); its names stay importable from here
from .packing import (Packed, pack, pack_documents, pack_tokens, pack_windows,  # noqa: E402
                      resample_sources, same_document_rows)
