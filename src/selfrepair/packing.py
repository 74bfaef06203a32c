"""A corpus turned into token rows: how the rows are cut from documents, and which row's
activations replace a row's under resample ablation.

Two packings (``packing``, a corpus chapter's parameter):

* ``"document"`` (:func:`pack_windows`): **one row per document** — BOS, then ``seq_len - 1``
  consecutive tokens of one document at a seeded uniform offset (documents shorter than that are
  passed over). Rows are then independent draws of text: the unit a cluster bootstrap resamples
  (:mod:`selfrepair.uncertainty`) is the row itself, so a token budget buys as many independent
  units as it has rows. Each document counts once, whatever its length.
* ``"concatenate"`` (:func:`pack_documents`): documents joined with one EOS between them and cut
  into rows — what TransformerLens's ``tokenize_and_concatenate`` does, which the self-repair
  paper's code uses (``prepare_dataset``). Consecutive rows are mostly pieces of one document, so
  its rows are grouped by the document holding most of each row (``doc_main``) into far fewer
  independent units than rows.

Every row starts with BOS at column 0; position ``p`` of a row is the ``p``-th input position of
the model; there is no padding. Documents are visited in an order shuffled by ``seed``; only as
many as needed are tokenized.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import datasets
import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .config import PACKING_NAMES
from .data import DataError, _check_strings, _texts

__all__ = ["PACKINGS", "Packed", "pack", "pack_documents", "pack_tokens", "pack_windows",
           "resample_sources", "same_document_rows"]


class Packed(NamedTuple):
    """Token rows and, for each row, the documents its tokens come from (see :func:`pack_documents`)."""

    tokens: torch.Tensor  #: ``[rows, seq_len]`` LongTensor, BOS first
    doc_first: torch.Tensor  #: ``[rows]`` index (in packing order) of the row's first document
    doc_last: torch.Tensor  #: ``[rows]`` index of its last document (EOS counts with the one before)
    doc_main: torch.Tensor  #: ``[rows]`` the document holding most of its tokens (ties: the earlier)


def pack_documents(dataset: datasets.Dataset | Sequence[str], tokenizer, *, n_tokens: int,
                   seq_len: int, bos_token_id: int | None = None, text_column: str = "text",
                   seed: int = 0, progress: bool = True, batch_docs: int = 64) -> Packed:
    """Documents joined with one EOS between them and cut into rows (``packing="concatenate"``, as
    TransformerLens's ``tokenize_and_concatenate``, which the paper's code uses), with the documents
    each row spans (what the resample source of a row must avoid, :func:`resample_sources`)."""
    texts, order = _documents(dataset, text_column, n_tokens, seq_len, seed)
    bos, eos = _special_ids(tokenizer, bos_token_id)
    n_rows = math.ceil(n_tokens / seq_len)
    body = seq_len - 1
    needed = n_rows * body
    stream: list[int] = []
    ends: list[int] = []  # ends[d]: stream length after document d (its EOS included)
    with tqdm(total=needed, unit="tok", desc="packing tokens", disable=not progress) as bar:
        for ids in _tokenized(texts, order, tokenizer, text_column, batch_docs):
            before = len(stream)
            stream.extend(ids)
            stream.append(eos)
            ends.append(len(stream))
            bar.update(min(len(stream), needed) - min(before, needed))
            if len(stream) >= needed:
                break
    if len(stream) < needed:
        raise DataError(f"corpus too small: it has {len(stream)} tokens (documents plus EOS separators) "
                        f"but {n_rows} rows x {body} tokens = {needed} are needed for n_tokens={n_tokens}, "
                        f"seq_len={seq_len}; ask for fewer tokens or use a larger corpus.")
    rows = torch.tensor(stream[:needed], dtype=torch.long).view(n_rows, body)
    tokens = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)
    ends_t = torch.tensor(ends)
    first_tok = torch.arange(n_rows) * body
    doc_first = torch.searchsorted(ends_t, first_tok, right=True)
    doc_last = torch.searchsorted(ends_t, first_tok + body - 1, right=True)
    return Packed(tokens, doc_first, doc_last, _main_documents(ends_t, doc_first, doc_last, body))


def _main_documents(ends: torch.Tensor, first: torch.Tensor, last: torch.Tensor, body: int) -> torch.Tensor:
    """Per row, the document (of those it spans) that holds most of its ``body`` tokens: rows
    grouped by it are the units a cluster bootstrap resamples (every row spans a piece of its
    neighbour's document, so grouping every row that shares one would chain them all together)."""
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    main = torch.empty_like(first)
    for r in range(len(first)):
        docs = torch.arange(int(first[r]), int(last[r]) + 1)
        lo, hi = r * body, (r + 1) * body
        held = torch.minimum(ends[docs], torch.tensor(hi)) - torch.maximum(starts[docs], torch.tensor(lo))
        main[r] = docs[int(held.argmax())]  # argmax: the first of equal maxima, the earlier document
    return main


def _special_ids(tokenizer, bos_token_id: int | None) -> tuple[int, int]:
    """(BOS, EOS) ids: BOS defaults to the tokenizer's BOS, else its EOS, and EOS to its EOS, else BOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    bos = bos_token_id if bos_token_id is not None else (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    if bos is None or eos is None:
        raise DataError("tokenizer has neither a BOS nor an EOS token; pass bos_token_id explicitly")
    return bos, eos


def _documents(dataset, text_column: str, n_tokens: int, seq_len: int, seed: int) -> tuple[Sequence[str], list[int]]:
    """The corpus's texts and the order (seeded) in which they are visited."""
    if seq_len < 2 or n_tokens < 1:
        raise DataError(f"need seq_len >= 2 and n_tokens >= 1, got seq_len={seq_len}, n_tokens={n_tokens}")
    texts = _texts(dataset, text_column)
    if len(texts) == 0:
        raise DataError("the corpus holds no documents: check the file (an empty file or a filter "
                        "that removed everything) or use dataset='embedded'.")
    return texts, torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()


def _tokenized(texts: Sequence[str], order: list[int], tokenizer, text_column: str, batch_docs: int):
    """Each visited document's token ids, in visiting order, tokenized ``batch_docs`` at a time."""
    for start in range(0, len(order), batch_docs):
        picked = order[start:start + batch_docs]
        batch = [texts[i] for i in picked]
        _check_strings(batch, picked, text_column)
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack_windows(dataset: datasets.Dataset | Sequence[str], tokenizer, *, n_tokens: int,
                 seq_len: int, bos_token_id: int | None = None, text_column: str = "text",
                 seed: int = 0, progress: bool = True, batch_docs: int = 64) -> Packed:
    """One row per document: BOS, then ``seq_len - 1`` consecutive tokens of the document starting
    at an offset drawn uniformly (seeded) among those that fit; documents shorter than the window
    are passed over. ``doc_first = doc_last = doc_main`` is the document's index in visiting order.
    Raises :class:`DataError` if fewer documents are long enough than rows are asked for."""
    texts, order = _documents(dataset, text_column, n_tokens, seq_len, seed)
    bos, _ = _special_ids(tokenizer, bos_token_id)
    n_rows, body = math.ceil(n_tokens / seq_len), seq_len - 1
    offsets = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    docs: list[int] = []
    visited = 0
    with tqdm(total=n_rows, unit="row", desc="one window per document", disable=not progress) as bar:
        for ids in _tokenized(texts, order, tokenizer, text_column, batch_docs):
            visited += 1
            if len(ids) < body:
                continue
            start = int(torch.randint(len(ids) - body + 1, (1,), generator=offsets))
            rows.append(ids[start:start + body])
            docs.append(visited - 1)
            bar.update(1)
            if len(rows) == n_rows:
                break
    if len(rows) < n_rows:
        raise DataError(f"corpus too small for packing='document', which needs one document of at least {body} tokens per row: "
                        f"{n_rows} rows for n_tokens={n_tokens} and seq_len={seq_len}, but the corpus has "
                        f"{len(rows)} such documents (of {visited}): ask for fewer tokens, lower seq_len, use a "
                        "larger corpus, or packing='concatenate' (documents joined and cut into rows).")
    body_t = torch.tensor(rows, dtype=torch.long).view(n_rows, body)
    tokens = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), body_t], dim=1)
    doc = torch.tensor(docs, dtype=torch.long)
    return Packed(tokens, doc, doc.clone(), doc.clone())


PACKINGS = {"document": pack_windows, "concatenate": pack_documents}
assert tuple(PACKINGS) == PACKING_NAMES  # the names config validates against


def pack(dataset: datasets.Dataset | Sequence[str], tokenizer, *, packing: str, **kwargs) -> Packed:
    """``dataset`` packed into rows by ``packing`` (``"document"`` or ``"concatenate"``; keyword
    arguments as :func:`pack_windows`)."""
    if packing not in PACKINGS:
        raise DataError(f"packing must be one of {', '.join(map(repr, PACKINGS))}, got {packing!r}")
    return PACKINGS[packing](dataset, tokenizer, **kwargs)


def pack_tokens(dataset: datasets.Dataset | Sequence[str], tokenizer, *, n_tokens: int, seq_len: int,
                bos_token_id: int | None = None, text_column: str = "text", seed: int = 0,
                progress: bool = True, batch_docs: int = 64) -> torch.Tensor:
    """Tokenize documents and pack them into BOS-prefixed rows of ``seq_len`` tokens.

    Documents are visited in an order shuffled by ``seed``, tokenized without special
    tokens, joined with one EOS token between documents, cut into chunks of
    ``seq_len - 1`` tokens, and each chunk is prefixed with BOS.  Only as many
    documents as needed are tokenized.

    Parameters
    ----------
    dataset
        A :class:`datasets.Dataset` (documents in ``text_column``) or a sequence of str.
    tokenizer
        Any Hugging Face tokenizer (called as ``tokenizer(list_of_str)``).
    n_tokens
        Total tokens wanted in the output, BOS included; rounded up to whole rows, so
        the result has ``ceil(n_tokens / seq_len)`` rows.
    seq_len
        Row length (>= 2), BOS included.
    bos_token_id
        Token put at column 0; default ``tokenizer.bos_token_id``, else its EOS id.
    seed
        Seed of the document-order shuffle.
    progress
        Show a tqdm bar (in tokens).

    Returns
    -------
    torch.LongTensor
        Shape ``[ceil(n_tokens / seq_len), seq_len]``.

    Raises
    ------
    DataError
        If the corpus is empty or too small, a document is not a string, or no BOS/EOS id
        can be found.
    """
    return pack_documents(dataset, tokenizer, n_tokens=n_tokens, seq_len=seq_len,
                          bos_token_id=bos_token_id, text_column=text_column, seed=seed,
                          progress=progress, batch_docs=batch_docs).tokens


def resample_sources(doc_first: torch.Tensor, doc_last: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """For each row of a packed token set, the row whose activations replace it under resample
    ablation (``[rows]`` row indices).

    The paper's code takes the resampled activations from the next batch of The Pile, i.e. from
    other text, and its argument needs the replacement to be unrelated to the clean tokens (the
    resampled head's direct effect near zero). Consecutive packed rows are mostly chunks of the
    same document, so rolling the rows by one would resample a row from its own document. Here each
    row's source is drawn uniformly (seeded) among the rows that share **no document** with it.
    Only where no such row exists (a corpus of one long document) the source is drawn among the rows
    at least a quarter of the token set away (a distant part of the same document);
    :func:`same_document_rows` counts those rows.
    """
    first, last = torch.as_tensor(doc_first).long(), torch.as_tensor(doc_last).long()
    n = len(first)
    if n < 2:
        raise DataError(f"resample ablation needs at least 2 rows of tokens (one row's source is "
                        f"another row), got {n}: raise n_tokens or lower seq_len.")
    # rows are in stream order, so the rows sharing a document with row i form one interval
    lo = torch.searchsorted(last, first, right=False)  # first row whose last doc >= my first doc
    hi = torch.searchsorted(first, last, right=True) - 1  # last row whose first doc <= my last doc
    n_other = lo + (n - 1 - hi)
    g = torch.Generator().manual_seed(seed)
    u = (torch.rand(n, generator=g, dtype=torch.float64) * n_other.clamp_min(1)).long()
    source = torch.where(u < lo, u, hi + 1 + (u - lo))
    alone = (n_other == 0).nonzero().flatten()
    if len(alone):  # one document covers these rows' whole neighbourhood: take a distant row
        far = max(1, n // 4)
        rows = torch.arange(n)
        for i in alone.tolist():
            options = rows[(rows - i).abs() >= far]
            source[i] = options[int(torch.randint(len(options), (1,), generator=g))]
    return source


def same_document_rows(doc_first: torch.Tensor, doc_last: torch.Tensor, source: torch.Tensor) -> int:
    """How many rows share a document with their resample ``source`` row (0 unless the corpus is
    too uniform for :func:`resample_sources` to avoid it)."""
    first, last = torch.as_tensor(doc_first), torch.as_tensor(doc_last)
    s = torch.as_tensor(source)
    return int(((first[s] <= last) & (first <= last[s])).sum())
