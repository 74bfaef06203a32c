"""Anti-erasure neurons: which neurons of one MLP layer repair an ablated head (paper §4, App. C;
Hydra §2.5.2 "erasure" MLPs).

A head ``(l, h)`` is ablated as in :mod:`selfrepair.self_repair` (resample by default). Neuron ``n``
of the measured MLP layer ``L`` (the last) writes ``act_n * W_out[n]``; its direct effect
is ``DE_n = dir . (act_n W_out[n])`` at the **clean** scales (final norm ``S``; in sandwich models
also the clean post-feedforward scale ``s``), so the neurons plus the layer's output bias sum to the
layer's DE. Signs: ``delta = ablated - clean``; a neuron *repairs* when ``delta > 0``. A neuron with
a negative clean DE is an *erasure* neuron (it was pushing the correct logit down); when it repairs
it performs **anti-erasure**: it erases less once the head is gone (§4).

Only heads upstream of ``L`` are measured (:func:`selfrepair.structure.reads`: layer < L, or = L in a
sequential block). In sandwich
models the change of the layer's norm scale ``s`` is not a neuron's and is left out here (it is in
``from_block_norms`` of the head decomposition).

Per featured head and per *selection* every one of the top-k% instances (``top_percent``; an
optional ``max_instances`` caps them at the highest, off by default) is kept by a streamed running
top-k, each with its full neuron vectors (clean DE and change, ``2 x d_mlp`` floats):

- ``"direct_effect"``: the head's top-k% tokens by clean DE (§4.2: Fig 8, App. C Fig 11-14);
- ``"self_repair"``: the tokens where the head is self-repaired most (eq. 1; §4.2.2);
- ``"mlp_repair"``: the tokens where layer ``L`` repairs most (its summed neuron ``delta``; Fig 7).

Memory, for the ``paper`` profile (1M tokens of Pythia-160M in rows of 128: 7,813 rows x 127 =
992,251 instances; top 2% = 19,846 per head and selection; ``d_mlp`` = 3,072, fp32): 19,846 x 2 x
3,072 x 4 B = 0.49 GB per head and selection, 2.9 GB for its two heads (L10H11, L7H8) and three
selections, twice that at the moment a batch's rows are merged in — within a GPU machine's memory,
so the paper's full 2% is kept, not a sample. (A cap of 2,048, the earlier default, kept the top
~0.2% there.) The saved entry is the same 2.9 GB.

Each batch is one request on the remote path (:func:`_batch_neurons`): it is given each
selection's current ``k``-th best score per head (:func:`kth_best`) and returns only the rows that
can still enter the running top-k (:func:`entrants`), never every instance's neuron vectors; the
merge (:func:`keep_top`) happens here, with the same result as merging every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch

from .ablation import check_ablation
from .batch import CleanBatch, TokenSet, clean_batch
from .direct_effect import neuron_effects
from .errors import InputError
from .driver import Driver, Fold, Stage
from .heads import check_heads, token_set
from .measure import RunOptions, Spec
from .models import Model
from .passes import ablate_heads
from .results import Result, head_label
from .selection import TIE_RULE, entrants, keep_top, kth_best, take  # noqa: F401 - re-exported
from .structure import reads, top_k

SELECTIONS = ("direct_effect", "self_repair", "mlp_repair")
SCALARS = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair",
           "layer_clean", "layer_delta")  # layer_*: the whole MLP layer (neurons + bias)
SCORE_OF = {"direct_effect": "direct_effect", "self_repair": "self_repair", "mlp_repair": "layer_delta"}


@dataclass
class NeuronResult(Result):
    """Per featured head and selection: ``{sel}/{name}`` -> ``[head, k]`` (``instance``, ``score``
    and :data:`SCALARS`) or ``[head, k, d_mlp]`` (``clean``: neuron clean DE, ``delta``)."""

    heads: list
    neuron_layer: int
    data: dict
    tokens: torch.Tensor | None = None  # [rows, seq] the rows measured
    corrupt_tokens: torch.Tensor | None = None  # their resample sources

    def get(self, selection: str, name: str) -> torch.Tensor:
        if selection not in SELECTIONS:
            raise InputError(f"unknown selection {selection!r}: use one of {', '.join(SELECTIONS)}")
        return self.data[f"{selection}/{name}"]

    def to_frame(self) -> pd.DataFrame:
        return instances(self, "direct_effect")


def upstream(model: Model, layer: int, neuron_layer: int) -> bool:
    """Whether a head of ``layer`` can change the neurons of MLP layer ``neuron_layer``."""
    return reads(model.parallel_residual, "attn", layer, "mlp", neuron_layer)


def last_upstream_layer(model: Model, neuron_layer: int | None = None) -> int:
    """The last layer whose heads feed MLP layer ``neuron_layer`` (default the last): the paper's
    "attention head right before the final MLP layer" (§4.1)."""
    L = model.n_layers - 1 if neuron_layer is None else neuron_layer
    return L if upstream(model, L, L) else L - 1


def resolve_neuron_layer(model: Model, neuron_layer: int | None) -> int:
    L = model.n_layers - 1 if neuron_layer is None else neuron_layer + (model.n_layers if neuron_layer < 0 else 0)
    if not 0 <= L < model.n_layers:
        raise InputError(f"neuron_layer={neuron_layer} is out of range: {model.name} has MLP layers "
                         f"0 .. {model.n_layers - 1}")
    return L


def check_dense_mlp(model: Model) -> None:
    """Neurons are those of one dense MLP layer; a mixture-of-experts model is refused."""
    if model.adapter.moe:
        raise InputError(
            f"{model.name} has mixture-of-experts MLPs: the paper's neurons (§4.2) are the hidden "
            "units of one dense MLP layer, while here each token's MLP is a few routed experts "
            "whose choice the ablation itself can change, so this library defines no neurons for "
            "it; every other chapter takes its MLP's write whole.")


def measure_neurons(model: Model, tokens: torch.Tensor | TokenSet, heads: list[tuple[int, int]], *,
                    ablation: str = "resample", top_percent: float = 2.0, batch_size: int = 8,
                    neuron_layer: int | None = None, max_instances: int | None = None,
                    progress: bool = True) -> NeuronResult:
    """Clean and ablated DE of every neuron of MLP layer ``neuron_layer`` (default last) for each
    head in ``heads``, on each selection's top-k% instances of ``tokens [rows, seq]`` (a tensor,
    resampled from its rows rolled by one, or a :class:`~selfrepair.batch.TokenSet`): all of them,
    or the highest ``max_instances`` when given."""
    check_ablation(ablation)
    spec = NeuronSpec(heads=tuple(check_heads(model, heads)), ablation=ablation, top_percent=top_percent,
                      neuron_layer=neuron_layer, max_instances=max_instances)
    return spec.compute(model, token_set(model, tokens), RunOptions(batch_size=batch_size, progress=progress))


def _merge(a: dict | None, b: dict | None, *, k: int) -> dict | None:
    """Two runs' running top-``k`` of every selection joined (``a``'s rows first)."""
    if b is None:
        return a
    return {sel: keep_top(None if a is None else a[sel], b[sel], k) for sel in SELECTIONS}


def _floors(state: dict | None, k: int, n_heads: int) -> dict[str, torch.Tensor]:
    """What a row must reach to enter each selection's running top-``k`` (per head)."""
    return {sel: kth_best(None if state is None else state[sel], k, n_heads) for sel in SELECTIONS}


def _scored(out: dict) -> dict:
    """A batch's entrants of each selection with their ``score``."""
    return {sel: {**out[sel], "score": out[sel][SCORE_OF[sel]]} for sel in SELECTIONS}


def _batch_neurons(model: Model, rows: dict, ablation: str, mz: torch.Tensor | None,
                   heads: list[tuple[int, int]], L: int, floors: dict[str, torch.Tensor], k: int) -> dict:
    """One batch of :func:`measure_neurons` (inside its request): per selection only the
    :func:`~selfrepair.selection.entrants` of its running top-``k`` given ``floors[sel]`` (each
    head's ``k``-th best score so far) among the batch's rows (:func:`neuron_rows`), on the CPU."""
    batch = clean_batch(model, rows["tokens"], rows["corrupt"], start=rows["start"], neuron_layers=(L,))
    new = neuron_rows(batch, heads, L, batch.replacement(ablation, mz))
    return {sel: {key: v.cpu() for key, v in entrants(new, new[SCORE_OF[sel]], floors[sel], k).items()}
            for sel in SELECTIONS}


def neuron_rows(batch: CleanBatch, heads: list[tuple[int, int]], L: int, repl: torch.Tensor) -> dict:
    """Every head of ``heads`` ablated with ``repl`` (one stacked pass per layer) on every instance
    of ``batch``: ``[head, instance]`` :data:`SCALARS` and ``instance``, ``[head, instance, d_mlp]``
    ``clean`` (each neuron of MLP layer ``L``'s clean DE) and ``delta`` (its change), on the
    model's device."""
    model = batch.model
    dm = batch.readout.write_dir(model, "mlp", L)
    clean_n = neuron_effects(model, batch.clean.reads["neurons"][0][:, :-1], dm, L)  # [d_mlp, b, p]
    bias = model.mlp_out_bias(L)
    layer_clean = clean_n.sum(0) + (0.0 if bias is None else dm @ bias)
    parts = []
    for layer in sorted({l for l, _ in heads}):
        hs = [h for l, h in heads if l == layer]
        out = ablate_heads(batch, layer, hs, repl[layer], neuron_layer=L)
        delta = neuron_effects(model, out.neurons, dm, L) - clean_n[:, None]  # [d_mlp, k, b, p]
        q = {name: getattr(out, name) for name in SCALARS[:4]}
        q["layer_clean"] = layer_clean.expand_as(q["direct_effect"])
        q["layer_delta"] = delta.sum(0)
        q = {name: v.flatten(1) for name, v in q.items()}  # [k, instance]
        q["clean"] = clean_n.flatten(1).T.expand(len(hs), -1, -1)
        q["delta"] = delta.flatten(2).permute(1, 2, 0)  # [k, instance, d_mlp]
        parts.append(q)
    new = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    new["instance"] = batch.instances().to(new["delta"].device).expand(len(heads), -1)
    return new


@dataclass(frozen=True)
class NeuronSpec(Spec):
    """The neurons of one MLP layer under the ablation of each listed head (chapter 3)."""

    kind = "neurons"
    result = NeuronResult

    heads: tuple[tuple[int, int], ...]  # the ablated heads, upstream of the neuron layer
    ablation: str = "resample"
    top_percent: float = 2.0  # per head and selection, the top k% of tokens kept
    neuron_layer: int | None = None  # None: the last MLP layer
    max_instances: int | None = None  # None: every top-k% token; an int keeps only the highest (memory)

    def key(self) -> dict:
        """Also the tie rule of the top-k% selections (:data:`~selfrepair.selection.TIE_RULE`)."""
        return {**super().key(), "ties": TIE_RULE}

    def compute(self, model: Model, data: TokenSet, options: RunOptions) -> NeuronResult:
        """The driver runs :func:`_batch_neurons` on every batch, given each selection's current
        ``k``-th best scores; what comes back is merged into the running top-k (:func:`_merge`)."""
        check_ablation(self.ablation)
        check_dense_mlp(model)
        L = resolve_neuron_layer(model, self.neuron_layer)
        heads = check_heads(model, self.heads)
        if not heads:
            raise InputError("no heads to measure: pass at least one (layer, head)")
        bad = [head_label(*h) for h in heads if not upstream(model, h[0], L)]
        if bad:
            raise InputError(f"heads {bad} are not upstream of MLP layer {L} (parallel residual: the same "
                             "layer's MLP does not read its heads): pick earlier heads")
        if self.max_instances is not None and self.max_instances < 1:
            raise InputError(f"max_instances must be at least 1 (or None: every top-k% token), got "
                             f"{self.max_instances}")
        run = Driver(model, data, options, key=self.key(), sources=self.ablation == "resample")
        k = top_k(data.n_instances, self.top_percent)
        k = k if self.max_instances is None else min(self.max_instances, k)
        mz = run.mean_z() if self.ablation == "mean" else None
        merge = partial(_merge, k=k)
        states = run.run(Stage("neurons", _batch_neurons, Fold(lambda s, out, items: merge(s, _scored(out)), merge),
                               args=lambda s: (self.ablation, mz, heads, L, _floors(s, k, len(heads)), k),
                               sources=self.ablation == "resample"))
        rec = run.record()
        return NeuronResult(heads, L, {f"{sel}/{key}": v.contiguous() for sel, st in states.items()
                                       for key, v in st.items()},
                            tokens=rec["tokens"], corrupt_tokens=rec.get("corrupt_tokens"),
                            meta=run.meta(ablation=self.ablation, top_percent=self.top_percent,
                                          seq_len=data.seq_len, n_rows=len(data), k=k,
                                          capped=k < top_k(data.n_instances, self.top_percent)))


# -- tidy frames (plain torch/pandas over a NeuronResult) --------------------------------------
def _ids(res: NeuronResult, i: int) -> dict:
    l, h = res.heads[i]
    return {"label": head_label(l, h), "layer": l, "head": h}


def instances(res: NeuronResult, selection: str = "mlp_repair") -> pd.DataFrame:
    """One row per head x selected instance (Fig 7): the head's quantities, the whole layer's clean
    DE and ``delta``, and the instance's top repairing neuron (largest ``delta``) with its clean and
    ablated DE."""
    seq1, frames = res.meta["seq_len"] - 1, []
    for i in range(len(res.heads)):
        inst, clean, delta = (res.get(selection, x)[i] for x in ("instance", "clean", "delta"))
        top = delta.argmax(-1)
        at = torch.arange(len(top))
        f = pd.DataFrame({"row": (inst // seq1).numpy(), "pos": (inst % seq1).numpy(),
                          **{q: res.get(selection, q)[i].numpy() for q in SCALARS},
                          "neuron": top.numpy(), "neuron_clean_de": clean[at, top].numpy(),
                          "neuron_ablated_de": (clean + delta)[at, top].numpy()})
        frames.append(f.assign(**_ids(res, i), selection=selection))
    cols = ["label", "layer", "head", "selection"]
    out = pd.concat(frames, ignore_index=True)
    return out[cols + [c for c in out.columns if c not in cols]]


def sparsity(res: NeuronResult, selection: str = "direct_effect",
             ranks: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50),
             percents: tuple[float, ...] = (50, 10, 5, 2, 1)) -> pd.DataFrame:
    """Fig 8. Per instance (with clean head DE > 0) neurons are sorted by ``delta`` (largest repair
    first). ``kind="nth"``: share of instances where the rank-N neuron *alone* repairs at least
    ``percent``% of the head's clean DE (the paper's "top Nth neuron"); ``kind="top_n"``: where the
    top N neurons *together* do."""
    rows = []
    for i in range(len(res.heads)):
        de, delta = res.get(selection, "direct_effect")[i], res.get(selection, "delta")[i]
        keep = de > 0
        frac = delta[keep].sort(-1, descending=True).values / de[keep, None]
        for kind, f in (("nth", frac), ("top_n", frac.cumsum(-1))):
            rows += [{**_ids(res, i), "kind": kind, "rank": r, "percent": p,
                      "share": float((f[:, r - 1] >= p / 100).double().mean()) if len(f) else float("nan"),
                      "n_instances": int(keep.sum())}
                     for r in ranks if r <= f.shape[-1] for p in percents]
    return pd.DataFrame(rows)


def cumulative(res: NeuronResult, selection: str = "direct_effect", dense: int = 50,
               points: int = 100) -> pd.DataFrame:
    """App. C Fig 11-14. Neurons ranked by their absolute ``delta`` summed over the instances;
    ``cumulative_share`` = share of the layer's total absolute change carried by the top ``rank``
    neurons; coloured in the book by each neuron's median clean DE. Ranks 1..``dense`` and
    ``points`` log-spaced ranks after them are kept (a curve, not every neuron)."""
    frames = []
    for i in range(len(res.heads)):
        clean, delta = res.get(selection, "clean")[i], res.get(selection, "delta")[i]
        absd = delta.abs().double().sum(0)
        order = absd.argsort(descending=True)
        d_mlp = len(order)
        ranks = np.union1d(np.arange(1, min(dense, d_mlp) + 1),
                           np.geomspace(min(dense, d_mlp), d_mlp, points).round().astype(int))
        idx = torch.as_tensor(ranks - 1)
        n = order[idx]
        total = absd.sum().clamp_min(1e-30)
        frames.append(pd.DataFrame({
            **_ids(res, i), "rank": ranks, "neuron": n.numpy(),
            "cumulative_share": (absd[order].cumsum(0)[idx] / total).numpy(),
            "share": (absd[n] / total).numpy(), "mean_delta_de": delta.mean(0)[n].numpy(),
            "median_clean_de": clean.median(0).values[n].numpy()}))
    return pd.concat(frames, ignore_index=True)


def neurons_for_share(res: NeuronResult, share: float, selection: str = "direct_effect") -> list[int]:
    """Per head, the fewest neurons whose summed absolute ``delta`` reaches ``share`` of the total."""
    out = []
    for i in range(len(res.heads)):
        absd = res.get(selection, "delta")[i].abs().double().sum(0).sort(descending=True).values
        cum = absd.cumsum(0) / absd.sum().clamp_min(1e-30)
        out.append(int((cum < share - 1e-12).sum()) + 1)
    return out


def top_frequency(res: NeuronResult, selection: str = "self_repair", top: int = 10,
                  keep: int = 10) -> pd.DataFrame:
    """§4.2.2: for each neuron, the share of instances on which it is among the ``top`` largest
    ``delta`` (the top repairing neurons); the ``keep`` most frequent neurons per head."""
    frames = []
    for i in range(len(res.heads)):
        clean, delta = res.get(selection, "clean")[i], res.get(selection, "delta")[i]
        idx = delta.topk(min(top, delta.shape[-1]), -1).indices
        freq = torch.bincount(idx.flatten(), minlength=delta.shape[-1]).double() / max(1, len(delta))
        best = freq.argsort(descending=True)[:keep]
        frames.append(pd.DataFrame({**_ids(res, i), "rank": np.arange(1, len(best) + 1),
                                    "neuron": best.numpy(), "frequency": freq[best].numpy(),
                                    "median_clean_de": clean.median(0).values[best].numpy(),
                                    "n_instances": len(delta)}))
    return pd.concat(frames, ignore_index=True)


def summary(res: NeuronResult, top: int = 10) -> pd.DataFrame:
    """One row per head. On the head's top-k% tokens by DE: mean ``direct_effect``, ``self_repair``
    and ``layer_delta`` (the neuron layer's repair), median top-1 neuron repair / head DE,
    ``erasure_top`` = share of the top-``top`` repairing neurons (delta > 0) with negative clean DE,
    against ``negative_baseline`` = share of all neurons with negative clean DE,
    ``erasure_repair_share`` = share of all positive ``delta`` from negative-clean-DE neurons,
    ``layer_positive`` = share of tokens where the whole layer's clean DE is positive,
    ``neurons_50`` / ``neurons_90``; ``fig7_anti_erasure`` = share of the ``mlp_repair`` tokens whose
    top repairing neuron has negative clean DE; ``max_top_frequency`` (§4.2.2, ``self_repair``)."""
    sel = "direct_effect"
    n50, n90 = neurons_for_share(res, 0.5), neurons_for_share(res, 0.9)
    freq = top_frequency(res, top=top, keep=1)
    fig7 = instances(res, "mlp_repair")
    rows = []
    for i in range(len(res.heads)):
        de, clean, delta = (res.get(sel, x)[i] for x in ("direct_effect", "clean", "delta"))
        t = delta.topk(min(top, delta.shape[-1]), -1)
        rep = t.values > 0
        neg = clean.gather(-1, t.indices) < 0
        pos = delta.clamp_min(0)
        ids = _ids(res, i)
        f7 = fig7[fig7["label"] == ids["label"]]
        rows.append({**ids, "n_instances": len(de),
                     **{q: float(res.get(sel, q)[i].mean()) for q in
                        ("direct_effect", "self_repair", "layer_delta")},
                     "top1_fraction": float((t.values[:, 0] / de).median()),
                     "erasure_top": float((neg & rep).sum() / rep.sum().clamp_min(1)),
                     "negative_baseline": float((clean < 0).double().mean()),
                     "erasure_repair_share": float(pos[clean < 0].sum() / pos.sum().clamp_min(1e-30)),
                     "layer_positive": float((res.get(sel, "layer_clean")[i] > 0).double().mean()),
                     "neurons_50": n50[i], "neurons_90": n90[i], "d_mlp": delta.shape[-1],
                     "fig7_anti_erasure": float(((f7["neuron_clean_de"] < 0)
                                                 & (f7["neuron_ablated_de"] > f7["neuron_clean_de"])).mean()),
                     "max_top_frequency": float(freq["frequency"].iloc[i]),
                     "max_top_neuron": int(freq["neuron"].iloc[i])})
    return pd.DataFrame(rows)
