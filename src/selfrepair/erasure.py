"""Anti-erasure, resampled: chapter 3's evidence as per-cluster sums (self-repair paper §4, App. C),
and each neuron's clean direct effect *on the distribution* (App. C: "We've additionally colored
each neuron with its median clean direct effect on the distribution").

:class:`NeuronBaselineSpec` measures, on every token of the token set, how many positions of each
row give each neuron of the last MLP layer a negative clean direct effect (a neuron's median clean
DE over a set of tokens is negative exactly when more than half of them give a negative one, so
these counts decide "erasure neuron" on any resample of the rows), and keeps the full clean DE
vectors of a seeded uniform sample of instances for the medians a figure shows. One clean pass per
batch through the measurement driver (:mod:`selfrepair.driver`: one request per batch on the remote
path, checkpoints and resume; :func:`_batch_baseline`), only the counts and the sampled rows coming
back. Direct effects as in :mod:`selfrepair.neurons` (clean scales).

:class:`Evidence` turns a :class:`~selfrepair.neurons.NeuronResult` and the baseline into
per-cluster sums (each kept instance's row goes with its document); the statistics below are
functions of their weighted totals, so every bootstrap replicate recomputes each head's shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch import TokenSet, clean_batch
from .direct_effect import neuron_effects
from .driver import Driver, Fold, Stage
from .heads import check_tokens, token_set
from .measure import RunOptions, Spec
from .models import Model
from .neurons import resolve_neuron_layer
from .results import Result
from .uncertainty import Clusters, mean_finite, ratio

TOP = 10  # §4.2.2: "the top 10 repairing neurons"


@dataclass
class NeuronBaseline(Result):
    """``negative [rows, d_mlp]``: per row, the positions where each neuron of ``neuron_layer`` has
    a negative clean DE; ``positions [rows]`` the positions counted; ``sample [m, d_mlp]`` the clean
    DEs at the uniformly sampled ``instance [m]`` (``row * (seq - 1) + pos``)."""

    neuron_layer: int
    negative: torch.Tensor
    positions: torch.Tensor
    sample: torch.Tensor
    instance: torch.Tensor

    def medians(self) -> torch.Tensor:
        """Each neuron's median clean DE over the sampled instances ``[d_mlp]``."""
        return self.sample.double().quantile(0.5, dim=0)  # the mean of the two middle values for an even count


def measure_baseline(model: Model, data: torch.Tensor | TokenSet, neuron_layer: int | None = None, *,
                     sample_size: int = 2000, seed: int = 0, batch_size: int = 8,
                     progress: bool = True) -> NeuronBaseline:
    """:class:`NeuronBaseline` of ``data`` (``[rows, seq]`` tokens or a token set; module
    docstring); the sample drawn by ``seed``."""
    data = token_set(model, data)
    check_tokens(model, data.tokens)
    spec = NeuronBaselineSpec(neuron_layer=neuron_layer, sample_size=sample_size, seed=seed)
    return spec.compute(model, data, RunOptions(batch_size=max(1, min(len(data), batch_size)), progress=progress))


def _batch_baseline(model: Model, rows: dict, L: int) -> dict:
    """One batch of :func:`measure_baseline`: per row, the counts ``[b, d_mlp]`` of negative clean
    DEs, and the clean DE vectors ``[m, d_mlp]`` at the batch's sampled instances (``rows["picked"]
    [b, seq - 1]``, row-major; CPU)."""
    batch = clean_batch(model, rows["tokens"], start=rows["start"], neuron_layers=(L,))
    dm = batch.readout.write_dir(model, "mlp", L)
    clean = neuron_effects(model, batch.clean.reads["neurons"][0][:, :-1], dm, L)  # [d_mlp, b, p]
    picked = rows["picked"].to(clean.device)
    return {"negative": (clean < 0).sum(-1).T.cpu(), "sample": clean.permute(1, 2, 0)[picked].double().cpu()}


def _in_row_order(state: list | None) -> dict | None:
    """The batches' outputs joined in row order (batches hold contiguous rows)."""
    if not state:
        return None
    outs = [out for _, out in sorted(state, key=lambda p: int(p[0][0]))]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


@dataclass(frozen=True)
class NeuronBaselineSpec(Spec):
    """Each neuron's clean direct effect on the distribution (chapter 3, App. C)."""

    kind = "neuron_baseline"
    result = NeuronBaseline

    neuron_layer: int | None = None  # None: the last MLP layer
    sample_size: int = 2000  # instances whose full clean DE vectors are kept (medians for figures)
    seed: int = 0  # which instances

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> NeuronBaseline:
        """The driver runs :func:`_batch_baseline` on every batch; the sampled instances are a
        seeded uniform draw over every (row, position)."""
        L = resolve_neuron_layer(model, self.neuron_layer)
        n, seq1 = len(data), data.seq_len - 1
        g = torch.Generator().manual_seed(int(self.seed))
        picks = torch.randperm(n * seq1, generator=g)[:self.sample_size].sort().values
        picked = torch.zeros(n * seq1, dtype=torch.bool)
        picked[picks] = True
        run = Driver(model, data, options, key=self.key())
        got = run.run(Stage("neurons on the distribution", _batch_baseline,
                            Fold(lambda s, out, items: (s or []) + [(items, out)],
                                 lambda a, b: (a or []) + (b or []), _in_row_order),
                            args=(L,), per_item={"picked": picked.view(n, seq1)}))
        return NeuronBaseline(L, got["negative"], torch.full((n,), seq1), got["sample"], picks,
                              meta=run.meta(neuron_layer=L, sample_size=len(picks)))


# -- per-cluster sums of chapter 3's statistics ----------------------------------------------------
@dataclass
class Evidence:
    """``[cluster, head, ...]`` sums over the kept instances (heads in ``res.heads`` order; the
    Fig 8 claims read the heads ``fig8``): ``anti`` (mlp_repair tokens: n, top repairing neuron an
    erasure neuron erasing less), ``heavy`` (Fig 8 heads' top-k% tokens with DE > 0: n, top neuron
    repairing at least ``tenth`` of the DE), ``repair`` (Fig 8 heads: Σ ΔDE per neuron on their
    top-k% tokens), ``in_top`` (self_repair tokens: n, how often each neuron is among the top
    :data:`TOP`), ``negative`` ([cluster, 1 + d_mlp]: tokens, negative clean DEs per neuron)."""

    clusters: Clusters
    heads: list
    fig8: list
    anti: np.ndarray
    heavy: np.ndarray
    repair: np.ndarray
    in_top: np.ndarray
    negative: np.ndarray


def evidence(res, baseline: NeuronBaseline, clusters: Clusters, fig8: list, tenth: float) -> Evidence:
    """:class:`Evidence` of a :class:`~selfrepair.neurons.NeuronResult` (``fig8``: indices of its
    Fig 8 heads) and its :class:`NeuronBaseline`, on ``clusters`` of the token set's rows."""
    seq1 = res.meta["seq_len"] - 1
    n = len(res.heads)

    def sums(selection: str, values, heads=range(n)) -> np.ndarray:
        parts = []
        for i in heads:
            row = (res.get(selection, "instance")[i] // seq1).numpy()
            parts.append(clusters.sum_tokens(row, values(i))[:, 0])
        return np.stack(parts, 1) if parts else np.zeros((clusters.n, 0, 1))

    def anti(i):
        clean, delta = res.get("mlp_repair", "clean")[i], res.get("mlp_repair", "delta")[i]
        top = delta.argmax(-1)
        at = torch.arange(len(top))
        return ((clean[at, top] < 0) & (delta[at, top] > 0)).double().numpy()

    def heavy(i):
        de, delta = res.get("direct_effect", "direct_effect")[i], res.get("direct_effect", "delta")[i]
        ok = (de > 0).double()
        return np.c_[ok.numpy(), (ok * (delta.max(-1).values >= tenth * de)).numpy()]

    def in_top(i):
        delta = res.get("self_repair", "delta")[i]
        hit = torch.zeros_like(delta, dtype=torch.float64).scatter_(
            -1, delta.topk(min(TOP, delta.shape[-1]), -1).indices, 1.0)
        return hit.numpy()

    heavy_sums = sums("direct_effect", heavy, fig8)
    rows = np.c_[baseline.positions.double().numpy(), baseline.negative.double().numpy()]
    return Evidence(clusters, list(res.heads), list(fig8), sums("mlp_repair", anti),
                    heavy_sums[..., 1:],  # n counts only DE > 0 tokens: the first value column
                    sums("direct_effect", lambda i: res.get("direct_effect", "delta")[i].double().numpy(),
                         fig8)[..., 1:],
                    sums("self_repair", in_top), clusters.sum_rows(rows))


# -- statistics of totals (a leading replicate axis) -----------------------------------------------
def mean_share(t: np.ndarray) -> np.ndarray:
    """``[R, head, 2]`` (count, hits) -> the mean over heads of each head's share of hits."""
    return mean_finite(ratio(t[..., 1], t[..., 0]), axis=-1)


def erasure_neurons(t: np.ndarray) -> np.ndarray:
    """``[R, 1 + d_mlp]`` (tokens, negative clean DEs per neuron) -> ``[R, d_mlp]``: whether each
    neuron's clean DE is negative on more than half of the tokens (its median is negative)."""
    return t[..., 1:] > 0.5 * t[..., :1]


def erasure_excess(t: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Per replicate, the mean over heads of (the share of erasure neurons among each head's
    ``top [head, k]`` neurons − their share among all neurons)."""
    e = erasure_neurons(t)
    return e[:, top].mean(-1).mean(-1) - e.mean(-1)


def top_repairers(repair: np.ndarray, k: int = TOP) -> np.ndarray:
    """``[head, d_mlp]`` summed ΔDE -> ``[head, k]`` the neurons that repair most (largest first)."""
    return np.argsort(-repair, axis=-1, kind="stable")[:, :k]


def most_frequent(in_top: np.ndarray) -> tuple[int, int, float]:
    """``[head, 1 + d_mlp]`` totals -> ``(head, neuron, share)``: the neuron most often among a
    head's top repairing neurons, over every head."""
    freq = ratio(in_top[..., 1:], in_top[..., :1])
    if not np.isfinite(freq).any():  # no token at all
        return -1, -1, float("nan")
    h, n = np.unravel_index(np.nanargmax(freq), freq.shape)
    return int(h), int(n), float(freq[h, n])


__all__ = ["Evidence", "NeuronBaseline", "NeuronBaselineSpec", "TOP", "erasure_excess",
           "erasure_neurons", "evidence", "mean_share", "measure_baseline", "most_frequent",
           "top_repairers"]
