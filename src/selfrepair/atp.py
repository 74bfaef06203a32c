"""Attribution patching (AtP; Kramár et al. 2024) of every head, against the exact ablation.

AtP replaces the ablated forward pass by one backward pass: for head ``h`` of layer ``l`` the
change of a metric ``M`` under an ablation that moves the head's ``z`` from ``z_h`` to ``z'_h``
is estimated to first order,

    AtP_h = sum_p (z'_h[p] - z_h[p]) . dM/dz_h[p]        (gradient at the clean run)

Conventions (the same as the sweep's, :mod:`selfrepair.heads`, so the two are comparable):

- **Metric.** ``M`` is the sum over every predicting position ``p < seq - 1`` of every row of the
  centered logit of the correct next token, read off the model's real final-norm output (norm
  live): ``M = sum_{row, p} u[p] . norm(r[p])`` with ``u`` the centered unembedding row. A head's
  ``z`` at position ``p`` reaches later positions through attention, so a gradient of ``M`` gives
  the *sum over tokens* of each head's estimated Δlogit, not one value per token (that would take
  one backward per position). So AtP is compared with the sweep's **whole-set mean** Δlogit per
  head (``sum / n_instances``, the paper's Fig 2 quantity), which is exact to compare.
- **Nodes and ablation.** The node is the head's slice of the attention out-projection's input
  ``z`` (value bias included, ``b_O`` not), as everywhere in this library; ``z'`` is the same
  replacement the sweep writes (resample: the head's ``z`` on the row's resample source from
  another document; mean; zero), built by :meth:`selfrepair.batch.CleanBatch.replacement`.
- **Decomposition (eq. 2).** A second backward of the *frozen-norm* readout
  ``F = sum_{row, p} dir[p] . r[p]`` (``dir = d / S``, the final norm's linear part at the clean
  scale ``S``; block norms stay live) gives ``AtP_frozen``. Then

  - ``delta_direct_effect`` (ΔDE of the head, clean scales) is linear in ``z``: AtP gets it
    exactly, and ``AtP_frozen - ΔDE`` is the first-order estimate of what the downstream heads,
    MLPs and (sandwich models) block norms do — eq. 2's ``from_heads + from_mlps +
    from_block_norms``, since ``F`` changes under the ablation by exactly
    ``ΔDE + from_heads + from_mlps + from_block_norms``;
  - ``AtP - AtP_frozen`` is the first-order estimate of ``from_norm``, the final norm's scale
    change;

  so ``exact - AtP = (from_norm - atp_norm) + (downstream - atp_downstream)`` exactly, with
  ``exact = delta_logit`` and ``downstream = from_heads + from_mlps + from_block_norms`` from the
  cached sweep. AtP's error is the self-repair beyond its first order: ``exact - AtP = self_repair -
  (AtP - ΔDE)``. Which block is downstream follows eq. 2 (the same layer's MLP in a sequential
  block, not in a parallel-residual one); in sandwich models (Gemma-2/3) the ablated layer's own
  post-attention norm reacts to the head's change, and its first order sits in ``AtP_frozen - ΔDE``
  as its exact change sits in ``from_block_norms``: the head's ΔDE reads its write at the clean
  block scale, as the sweep does.
- **AtP*'s QK fix** (Kramár et al.) recomputes exactly the softmax of a head whose *query or key*
  node is patched, because attention saturates and a linear estimate of the pattern fails. Here
  the patched node is the head's output ``z``, which comes after its own softmax: there is nothing
  for the fix to recompute. The saturation that still matters is in the *downstream* heads'
  patterns, which the QK fix does not address (it linearizes everything after the patched head).
  So it is not applied. (GradDrop, AtP*'s other part, costs one backward per layer and is not
  done either.)

Signs: ``error = exact - atp`` (``delta_logit - atp``), every term ablated minus clean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch

from .ablation import check_ablation
from .batch import CleanBatch, TokenSet, clean_batch, token_set
from .driver import Driver, Stage, collect
from .direct_effect import head_effects
from .errors import InputError, check_finite
from .intervene import gradients
from .measure import RunOptions, Spec
from .models import Model
from .results import Result, head_label


def readout_gradients(batch: CleanBatch, *, frozen: bool = False) -> torch.Tensor:
    """``dM/dz`` of every layer ``[layer, batch, pos, n_heads*d_head]`` (effect dtype) at the clean
    run of ``batch``: one forward and one backward (:func:`selfrepair.intervene.run`).

    ``M`` sums over the batch's predicting positions the centered logit of the next token through
    the live final norm, or with ``frozen`` the frozen-norm readout ``dir . r`` (see the module
    docstring)."""
    model, ro = batch.model, batch.readout

    def metric(resid: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        if frozen:
            return (model.acc(resid[:, :-1]) * ro.dir).sum()
        return (model.acc(normed[:, :-1]) * ro.u).sum()

    return model.acc(gradients(model, batch.tokens, metric).z)


def head_sums(model: Model, delta_z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_{batch, pos} (Δz_h . g_h)`` per head: ``delta_z``, ``grad`` ``[layer, batch, pos,
    n_heads*d_head]`` -> ``[layer, head]``."""
    return row_sums(model, delta_z, grad).sum(0)


def row_sums(model: Model, delta_z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_pos (Δz_h . g_h)`` per row and head ``[batch, layer, head]``: a row's own AtP estimate
    (rows of a batch do not interact, so ``dM/dz`` of a row is that of the row's own terms of M)."""
    prod = (model.acc(delta_z) * grad).unflatten(-1, (model.n_heads, model.d_head))
    return prod.sum((2, 4)).transpose(0, 1)


def atp_batch(batch: CleanBatch, repl: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head sums over ``batch``'s tokens ``[layer, head]``: ``atp`` (live norm), ``atp_frozen``
    (frozen-norm readout), ``delta_direct_effect`` (exact ΔDE of the head); ``row`` the same three
    per row ``[batch, layer, head, 3]`` (what a bootstrap over rows or documents resamples); and
    ``seconds``, the wall time of AtP alone (the replacement and the backward pass with the live norm)."""
    model, clean = batch.model, batch.clean
    started = time.perf_counter()
    repl = repl.expand_as(clean.reads["z"])
    delta_z = model.acc(repl) - model.acc(clean.reads["z"])
    atp = row_sums(model, delta_z, readout_gradients(batch))
    seconds = time.perf_counter() - started
    frozen = row_sums(model, delta_z, readout_gradients(batch, frozen=True))
    dde = torch.stack([
        (head_effects(model, repl[l][:, :-1], batch.readout.write_dir(model, "attn", l), l)
         - batch.head_de(l)).sum(2).T for l in range(model.n_layers)], 1)  # [batch, layer, head]
    row = torch.stack([atp, frozen, dde], -1)
    out = {"atp": atp.sum(0), "atp_frozen": frozen.sum(0), "delta_direct_effect": dde.sum(0)}
    check_finite(out, "attribution patching", model.name, model.dtype)
    return {**out, "row": row, "seconds": torch.tensor(seconds)}


@dataclass
class Atp(Result):
    """Per-head sums over every token of the AtP estimates and of the head's exact ΔDE."""

    atp: torch.Tensor  # [layer, head] sum of the AtP estimate of Δlogit (live final norm)
    atp_frozen: torch.Tensor  # [layer, head] the same for the frozen-norm readout
    delta_direct_effect: torch.Tensor  # [layer, head] sum of ΔDE_head (clean scales, exact)
    n_all: int  # instances summed (rows x (seq - 1))
    seconds_atp: float  # wall time of AtP alone: replacements + a forward and backward a batch (server's)
    ablation: str = "resample"
    tokens: torch.Tensor | None = None  # [rows, seq] the rows measured
    corrupt_tokens: torch.Tensor | None = None  # [rows, seq] their resample sources
    row: torch.Tensor | None = None  # [rows, layer, head, ROW_TERMS] each row's sums (fp64)

    @property
    def heads(self) -> list[tuple[int, int]]:
        L, H = self.atp.shape
        return [(l, h) for l in range(L) for h in range(H)]

    def to_frame(self) -> pd.DataFrame:
        """One row per head, whole-set means: ``atp``, ``atp_frozen``, ``delta_direct_effect``,
        ``atp_norm = atp - atp_frozen``, ``atp_downstream = atp_frozen - delta_direct_effect`` and
        ``atp_self_repair = atp - delta_direct_effect``."""
        L, H = self.atp.shape
        n = max(1, self.n_all)
        layer, head = torch.meshgrid(torch.arange(L), torch.arange(H), indexing="ij")
        df = pd.DataFrame({"layer": layer.flatten().numpy(), "head": head.flatten().numpy()})
        df.insert(2, "label", [head_label(l, h) for l, h in zip(df["layer"], df["head"])])
        for name in ("atp", "atp_frozen", "delta_direct_effect"):
            df[name] = (getattr(self, name).double() / n).flatten().numpy()
        df["atp_norm"] = df["atp"] - df["atp_frozen"]
        df["atp_downstream"] = df["atp_frozen"] - df["delta_direct_effect"]
        df["atp_self_repair"] = df["atp"] - df["delta_direct_effect"]
        return df


def attribution_patching(model: Model, tokens: torch.Tensor | TokenSet, ablation: str = "resample",
                         corrupt_tokens: torch.Tensor | None = None, *, batch_size: int = 8,
                         progress: bool = True) -> Atp:
    """AtP of every head of ``model`` on every token of ``tokens`` (a tensor or token set; its
    resample sources as :func:`selfrepair.heads.self_repair` takes them); see the module docstring.
    ``batch_size`` rows at a time (speed only), each one request on the remote path
    (:func:`_batch_atp`; mean ablation: first the mean ``z``, a request per batch too), so
    ``seconds_atp`` is then the server's wall time of AtP."""
    check_ablation(ablation)
    return AtpSpec(ablation).compute(model, token_set(model, tokens, corrupt_tokens),
                                     RunOptions(batch_size=batch_size, progress=progress))


def _batch_atp(model: Model, rows: dict, ablation: str, mz: torch.Tensor | None) -> dict:
    """One batch of :func:`attribution_patching` (inside its request): its clean pass, the
    replacement (resample: one forward of the source rows), the two gradient passes and the exact
    ΔDE. Returns only each row's ``[layer, head]`` sums of :data:`ROW_TERMS` (``row``, fp64, CPU;
    the batch's sums are their sum) and ``seconds``, the wall time of AtP alone (replacement and
    live-norm gradient pass; on the remote path the server's)."""
    batch = clean_batch(model, rows["tokens"], rows["corrupt"], start=rows["start"])
    started = time.perf_counter()
    repl = batch.replacement(ablation, mz)
    seconds = time.perf_counter() - started
    out = atp_batch(batch, repl)
    seconds += float(out["seconds"])
    return {"row": out["row"].double().cpu(), "seconds": seconds}


@dataclass(frozen=True)
class AtpSpec(Spec):
    """AtP of every head on every token of a token set (the sweep's tokens and sources)."""

    kind = "atp"
    result = Atp

    ablation: str = "resample"  # what replaces each head's output (as in the sweep)
    layout = 1  # 1: per-row sums (Atp.row); older entries lack them

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> Atp:
        """The driver runs :func:`_batch_atp` on every batch (after the mean ``z`` for mean
        ablation) and collects its per-row sums in row order."""
        check_ablation(self.ablation)
        run = Driver(model, data, options, key=self.key(), sources=self.ablation == "resample")
        mz = run.mean_z() if self.ablation == "mean" else None
        got = run.run(Stage("attribution patching", _batch_atp, collect(summed=("seconds",)),
                            args=(self.ablation, mz), sources=self.ablation == "resample"))
        row = got["row"]  # [rows, layer, head, ROW_TERMS], in row order
        sums = {k: row[..., i].sum(0) for i, k in enumerate(ROW_TERMS)}
        rec = run.record()
        return Atp(**sums, n_all=data.n_instances, seconds_atp=round(float(got["seconds"]), 3),
                   ablation=self.ablation, tokens=rec["tokens"], corrupt_tokens=rec.get("corrupt_tokens"), row=row,
                   meta=run.meta(ablation=self.ablation, n_tokens=int(data.tokens.numel()),
                                 seq_len=data.seq_len))


ROW_TERMS = ("atp", "atp_frozen", "delta_direct_effect")  # Atp.row's last axis


# -- AtP against the exact ablation ------------------------------------------------------------
EXACT = ("delta_logit", "delta_direct_effect", "self_repair", "from_heads", "from_mlps",
         "from_block_norms", "from_norm")


def compare(per_head: pd.DataFrame, atp: Atp) -> pd.DataFrame:
    """One row per head: the sweep's exact whole-set means (``per_head`` of
    :meth:`selfrepair.sweep.Sweep.per_head`, columns ``<q>_all``) beside AtP's, with the error and
    its decomposition:

    - ``exact`` = mean Δlogit, ``atp``, ``error = exact - atp``;
    - ``error_norm = from_norm - atp_norm`` (the final norm's scale change, beyond first order);
    - ``error_downstream = downstream - atp_downstream`` with ``downstream = from_heads + from_mlps
      + from_block_norms`` (downstream heads, MLPs, block norms, beyond first order);
    - ``error_direct = delta_direct_effect (sweep) - delta_direct_effect (AtP)``: 0 to rounding, as
      the head's own write is linear in its ``z`` (a check that both read the same tokens);

    so ``error = error_norm + error_downstream + error_direct`` exactly."""
    keys = ["layer", "head", "label"]
    exact = per_head[keys].copy()
    for q in EXACT:
        exact[q] = per_head[f"{q}_all"].to_numpy()
    a = atp.to_frame().rename(columns={"delta_direct_effect": "atp_delta_direct_effect"})
    df = exact.merge(a, on=keys, how="inner", validate="one_to_one")
    if len(df) != len(exact):
        raise InputError("the AtP result and the sweep are of different models (their heads differ)")
    df["exact"] = df["delta_logit"]
    df["error"] = df["exact"] - df["atp"]
    df["downstream"] = df["from_heads"] + df["from_mlps"] + df["from_block_norms"]
    df["error_norm"] = df["from_norm"] - df["atp_norm"]
    df["error_downstream"] = df["downstream"] - df["atp_downstream"]
    df["error_direct"] = df["delta_direct_effect"] - df["atp_delta_direct_effect"]
    return df


def rank_agreement(frame: pd.DataFrame, k: int) -> dict:
    """How AtP ranks the heads by ``|Δlogit|`` against the exact ranking: the Spearman
    correlation of ``|exact|`` and ``|atp|`` over all heads, and the share of the exact top-``k``
    heads that are also in AtP's top ``k`` (ties broken by layer, head)."""
    k = int(min(max(1, k), len(frame)))
    a = frame.assign(abs_exact=frame["exact"].abs(), abs_atp=frame["atp"].abs())
    spearman = float(a["abs_exact"].rank().corr(a["abs_atp"].rank()))
    order = ["layer", "head"]
    top_exact = set(a.sort_values(["abs_exact", *order], ascending=[False, True, True],
                                  kind="mergesort")["label"].head(k))
    top_atp = set(a.sort_values(["abs_atp", *order], ascending=[False, True, True],
                                kind="mergesort")["label"].head(k))
    return {"spearman": spearman, "k": k, "overlap": len(top_exact & top_atp) / k,
            "top_exact": sorted(top_exact), "top_atp": sorted(top_atp)}


def layer_errors(frame: pd.DataFrame) -> pd.DataFrame:
    """Per layer, over its heads: mean ``|exact|``, mean ``|error|``, the mean signed error and its
    two parts (``error_norm``, ``error_downstream``)."""
    g = frame.assign(abs_exact=frame["exact"].abs(), abs_error=frame["error"].abs()).groupby("layer", sort=True)
    out = g[["abs_exact", "abs_error", "error", "error_norm", "error_downstream"]].mean().reset_index()
    return out.assign(n_heads=g.size().to_numpy())


__all__ = ["ROW_TERMS", "Atp", "AtpSpec", "atp_batch", "attribution_patching", "compare", "head_sums",
           "layer_errors", "rank_agreement", "readout_gradients", "row_sums"]
