"""What every measurement starts from: the token set and the shared clean batch.

- :class:`TokenSet` — the rows of tokens a measurement reads and, for each row, its resample
  source (the tokens whose activations replace it under resample ablation), plus a fingerprint
  that identifies them in the results cache without materialising them. Packed from a corpus by
  :func:`selfrepair.experiment.open_tokens` (sources from other documents,
  :func:`selfrepair.data.resample_sources`) or wrapped around a tensor by :meth:`TokenSet.from_tensor`.
- :class:`PromptSet` — right-padded prompts with the position of each prompt's last real token
  (the Hydra chapter's data).
- :class:`CleanBatch` — one clean forward of some rows: the reads every measurement needs
  (``z``, ``attn``, ``mlp``, ``block``, embeddings, optionally neurons), the frozen-norm
  :class:`~selfrepair.direct_effect.Readout`, the clean direct effects of the heads, and the
  replacement of every head's output under each ablation. :func:`clean_batch` makes one; the
  patched passes of :mod:`selfrepair.passes` take it.

Position ``p`` predicts token ``p + 1``; an *instance* is ``row * (seq - 1) + p``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .ablation import check_ablation, replacement_z
from .direct_effect import Readout, head_effects, last_readout, readout
from .errors import InputError
from .intervene import Pass, Watch, run
from .models import Model

CLEAN_READS = ("z", "attn", "mlp", "block")


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """``sha256:<hex>`` of tensors' shapes, dtypes and bytes (``None`` counts as absent)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


class TokenSet:
    """Token rows ``[n, seq]`` and their resample sources ``corrupt_tokens [n, seq]``.

    ``fingerprint`` is what the results cache keys on: the recipe (corpus digest, ``n_tokens``,
    ``seq_len``, ``seed``) for a packed corpus, a digest of the tensors for :meth:`from_tensor`.
    The rows themselves are only produced (tokenized) when first used.
    """

    def __init__(self, fingerprint: dict, load: Callable[[], dict]):
        self.fingerprint = dict(fingerprint)
        self._load, self._data = load, None

    @classmethod
    def from_tensor(cls, tokens: torch.Tensor, corrupt_tokens: torch.Tensor | None = None,
                    source: torch.Tensor | None = None) -> "TokenSet":
        """Rows given directly; their resample source is ``corrupt_tokens`` (or ``tokens[source]``),
        default the rows rolled by one (:func:`selfrepair.data.corrupt_tokens`)."""
        tokens = tokens.detach().cpu().long()
        if corrupt_tokens is None and source is not None:
            corrupt_tokens = tokens[torch.as_tensor(source).long()]
        data = {"tokens": tokens, "corrupt_tokens": None if corrupt_tokens is None else
                corrupt_tokens.detach().cpu().long(), "source": source, "same_document": None,
                "main_document": None}
        return cls({"tokens": tensor_digest(tokens, data["corrupt_tokens"])}, lambda: data)

    def _get(self) -> dict:
        if self._data is None:
            self._data = self._load()
        return self._data

    @property
    def tokens(self) -> torch.Tensor:
        return self._get()["tokens"]

    @property
    def corrupt_tokens(self) -> torch.Tensor:
        """Each row's resample source; the rows rolled by one when none was given."""
        data = self._get()
        if data["corrupt_tokens"] is None:
            from .data import corrupt_tokens
            if len(data["tokens"]) < 2:
                raise InputError("resample ablation needs at least 2 rows of tokens (one row's source "
                                 "is another row): pass more rows or corrupt_tokens")
            data["corrupt_tokens"] = corrupt_tokens(data["tokens"])
        return data["corrupt_tokens"]

    @property
    def source(self) -> torch.Tensor | None:
        """Row index of each row's source, when the sources are rows of this set."""
        return self._get()["source"]

    @property
    def same_document(self) -> int | None:
        """Rows whose source shares a document with them (``None``: no document information)."""
        return self._get()["same_document"]

    @property
    def main_document(self) -> torch.Tensor | None:
        """``[rows]``: the document (in packing order) holding most of each row's tokens
        (:mod:`selfrepair.packing`); rows of one document are one unit of
        independence (:meth:`selfrepair.uncertainty.Clusters.documents`). ``None``: not known."""
        return self._get().get("main_document")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_instances(self) -> int:
        return len(self) * (self.seq_len - 1)

    def record(self) -> dict[str, torch.Tensor]:
        """The exact token ids a result was measured on (saved with it)."""
        out = {"tokens": self.tokens}
        if self._get()["corrupt_tokens"] is not None or len(self) > 1:
            out["corrupt_tokens"] = self.corrupt_tokens
        return out


def check_tokens(model: Model, tokens: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    """A ``[batch, seq]`` integer tensor of valid ids, ``2 <= seq <= n_ctx``; else one clear error."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InputError(f"{name} must be an integer tensor [batch, seq], got {shape}; tokenize "
                         "with selfrepair.data.pack_tokens or model.tokenizer(..., return_tensors='pt')")
    if tokens.shape[0] < 1:
        raise InputError(f"{name} holds no rows: pass at least one row of tokens")
    if tokens.shape[1] < 2:
        raise InputError(f"{name} needs at least 2 positions (position p predicts token p+1)")
    if tokens.shape[1] > model.n_ctx:
        raise InputError(f"{name} has {tokens.shape[1]} positions but {model.name} has a context of "
                         f"{model.n_ctx}: use seq_len <= {model.n_ctx}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab):
        raise InputError(f"{name} holds ids outside [0, {model.d_vocab}): were they made with "
                         "another model's tokenizer?")
    return tokens.to(model.device)


def token_set(model: Model, tokens: torch.Tensor | TokenSet,
              corrupt_tokens: torch.Tensor | None = None) -> TokenSet:
    """``tokens`` as a :class:`TokenSet`: a set as it is, a tensor checked (:func:`check_tokens`)
    and wrapped with its resample sources ``corrupt_tokens`` (default its rows rolled by one)."""
    if isinstance(tokens, TokenSet):
        return tokens
    return TokenSet.from_tensor(check_tokens(model, tokens).cpu(), corrupt_tokens)


def check_token_set(model: Model, data: TokenSet, ablation: str) -> None:
    """``data``'s rows (and, for resample ablation, their sources: valid ids, the rows' own shape),
    checked before the first forward pass."""
    check_tokens(model, data.tokens)
    if ablation == "resample":
        check_tokens(model, data.corrupt_tokens, "corrupt_tokens")
        if data.corrupt_tokens.shape != data.tokens.shape:
            raise InputError(f"corrupt_tokens has shape {tuple(data.corrupt_tokens.shape)} but tokens "
                             f"has {tuple(data.tokens.shape)}: resampling patches the same positions, "
                             "so they must match")


@dataclass
class PromptSet:
    """Right-padded prompts (BOS first) and the position of each prompt's last real token."""

    input_ids: torch.Tensor  # [n, max_len]
    last_pos: torch.Tensor  # [n]
    target_ids: torch.Tensor  # [n] first token of each prompt's dataset answer
    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = {"prompts": tensor_digest(self.input_ids, self.last_pos, self.target_ids)}

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts ``idx`` cut to their longest, padding replaced by BOS (never read: every read
        and edit is at a prompt's last real position, which attends only to earlier positions)."""
        tok = self.input_ids[idx, :int(self.last_pos[idx].max()) + 1]
        real = torch.arange(tok.shape[1]) <= self.last_pos[idx, None]
        return torch.where(real, tok, tok[:, :1]), self.last_pos[idx]


@dataclass
class CleanBatch:
    """One clean forward of ``tokens [b, seq]`` (rows ``start .. start + b`` of a token set)."""

    model: Model
    tokens: torch.Tensor
    corrupt: torch.Tensor | None
    start: int
    clean: Pass
    readout: Readout
    _corrupt_z: torch.Tensor | None = None
    _head_de: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq1(self) -> int:
        return self.tokens.shape[1] - 1

    def instances(self) -> torch.Tensor:
        """Instance ids ``row * (seq - 1) + pos`` of this batch's positions, row-major ``[b * (seq-1)]``."""
        return torch.arange(self.start * self.seq1, (self.start + self.rows) * self.seq1)

    def head_de(self, layer: int) -> torch.Tensor:
        """Clean direct effect of every head of ``layer`` ``[n_heads, b, seq-1]``."""
        if layer not in self._head_de:
            self._head_de[layer] = head_effects(self.model, self.clean.reads["z"][layer][:, :-1],
                                                self.readout.write_dir(self.model, "attn", layer), layer)
        return self._head_de[layer]

    def all_head_de(self) -> torch.Tensor:
        """``[layer, head, b, seq-1]``."""
        return torch.stack([self.head_de(l) for l in range(self.model.n_layers)])

    def corrupt_z(self) -> torch.Tensor:
        """Every layer's ``z`` on the resample source rows ``[layer, b, seq, n_heads * d_head]``."""
        if self._corrupt_z is None:
            if self.corrupt is None:
                raise InputError("this batch has no resample source rows: build it with corrupt tokens")
            self._corrupt_z = run(self.model, self.corrupt, read=("z",)).reads["z"]
        return self._corrupt_z

    def replacement(self, ablation: str, mean_z: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer's replacement ``z`` under ``ablation`` (``[layer, b or 1, seq or 1, ...]``);
        ``mean`` uses ``mean_z`` (the token set's mean, :func:`mean_z`) or else this batch's mean."""
        check_ablation(ablation)
        if ablation == "mean" and mean_z is not None:
            return mean_z.to(self.model.device, self.model.dtype)
        corrupt = self.corrupt_z() if ablation == "resample" else None
        return replacement_z(self.model, ablation, self.clean.reads["z"], corrupt)


def source_pool(prompts, idx: torch.Tensor, sources: torch.Tensor) -> dict:
    """Where the resample sources ``sources [b, P]`` (prompt indices) of the chunk of prompts
    ``idx`` are, for a chunk whose request reads its own prompts' clean pass: ``at [b, P]``, each
    source's row in the pool of the chunk's own prompts followed by the sources outside it, and
    ``rows``, those outside prompts' ``prompts.rows(...)`` (tokens, last positions; ``None`` when
    every source is inside), the only ones that need a pass of their own."""
    outside = torch.unique(sources[~torch.isin(sources, idx)])
    row = torch.full((len(prompts),), -1, dtype=torch.long)
    row[torch.cat([idx, outside])] = torch.arange(len(idx) + len(outside))
    return {"rows": prompts.rows(outside) if len(outside) else None, "at": row[sources]}


def clean_batch(model: Model, tokens: torch.Tensor, corrupt: torch.Tensor | None = None, *,
                start: int = 0, neuron_layers: tuple[int, ...] = (),
                extra_reads: tuple[str, ...] = (), last_pos: torch.Tensor | None = None,
                watch: Watch | None = None, watch_sites: tuple[str, ...] = ()) -> CleanBatch:
    """The clean pass of ``tokens`` (reads ``z``, ``attn``, ``mlp``, ``block``, the embeddings and
    the neurons of ``neuron_layers``) and its frozen-norm readout: of every next token, or, with
    ``last_pos [b]``, of the maximum-likelihood token at each row's position ``last_pos`` (prompts).
    ``watch`` / ``watch_sites``: reductions of more sites in the same pass (``clean.watched``;
    :func:`selfrepair.intervene.run`), e.g. the attention pattern at one position."""
    tokens = tokens.to(model.device)
    reads = CLEAN_READS + tuple(extra_reads) + (("neurons",) if neuron_layers else ())
    p = run(model, tokens, read=reads, read_embed=True, watch=watch, watch_sites=watch_sites,
            read_layers={"neurons": sorted(neuron_layers)} if neuron_layers else None)
    ro = readout(model, tokens, p) if last_pos is None else last_readout(model, p, last_pos)
    return CleanBatch(model, tokens, None if corrupt is None else corrupt.to(model.device), start, p, ro)


def z_sum(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Every layer's clean ``z`` summed over the rows and positions of ``tokens``:
    ``[layer, n_heads * d_head]`` fp64."""
    return run(model, tokens.to(model.device), read=("z",)).reads["z"].double().sum((1, 2))


def z_sum_rows(model: Model, rows: dict) -> torch.Tensor:
    """:func:`z_sum` of a batch's ``rows["tokens"]`` (the driver's mean-ablation stage,
    :meth:`selfrepair.driver.Driver.mean_z`: one request per batch, only the sums come back)."""
    return z_sum(model, rows["tokens"])


__all__ = ["CLEAN_READS", "CleanBatch", "PromptSet", "TokenSet", "check_token_set", "check_tokens",
           "clean_batch", "source_pool", "tensor_digest", "token_set", "z_sum", "z_sum_rows"]
