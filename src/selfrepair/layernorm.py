"""LayerNorm self-repair (paper §3, App. A, B, D, H; Fig 4-6, 9, 10, 15-17).

The final norm divides the residual stream ``r`` by a scale ``S`` (std of ``r`` for LayerNorm, RMS
for RMSNorm). Direct effects freeze ``S`` at the clean run; an ablation changes it to ``S'``.
Conventions (see ``PAPER.md``):

- ``ratio = S / S'`` (clean over ablated, the paper's Fig 4): > 1 means the ablation shrank the
  residual, so the norm *amplifies* every existing logit — self-repair when the logit is positive;
- ``norm_ratio = S' / S`` (App. D, Fig 15): for RMSNorm ``S = sqrt(mean(r^2) + eps)``, so this is
  ``||r'|| / ||r||`` up to ``eps``; for LayerNorm it is the same ratio of the *mean-centred* residual;
- ``from_norm = u . n(r') (1/S' - 1/S)``: the final norm's part of self-repair, computed directly;
  ``from_block_norms``: the same for Gemma's sandwich norms (not in the paper);
- App. B closed form, valid for a head in the **last layer of a parallel-residual model** (nothing
  downstream but the final norm): ``delta_logit = (S/S' - 1) * logit + (S/S') * delta_DE``, where
  ``logit`` is the part of the centred clean logit that the scale multiplies, i.e. the logit minus
  the constant bias terms (final-norm bias + unembedding bias): ``Readout.logit - Readout.bias``.
  Equivalently ``self_repair = (S/S' - 1) * (logit + delta_DE)``: positive exactly when ``S/S' > 1``
  and ``logit + delta_DE`` (the logit the head's removal would leave) is positive, or both are
  below their thresholds;
- App. H: the norm boosts token A over token B by ``(S/S' - 1) * (logit_A - logit_B)``; with A the
  correct token and B its strongest competitor on the clean run, and the logits taken without the
  bias terms the scale does not multiply (the sweep's ``competitor_gap``), this is how much the
  norm's rescaling alone moves the prediction;
- norm share (§3.2, App. A): per instance ``from_norm / direct_effect``, clipped to [0, 1] (or not),
  averaged over the head's top-k% instances (or over a random sample of all instances).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .batch import clean_batch
from .data import corrupt_tokens as roll
from .heads import check_tokens
from .passes import ablate_heads
from .remote import in_session
from .results import SelfRepairResult, head_label

ABLATION_ORDER = ("resample", "mean", "zero")
TOKEN_COLUMNS = ("direct_effect", "delta_direct_effect", "delta_logit", "self_repair", "from_heads",
                 "from_mlps", "from_norm", "from_block_norms", "scale_clean", "scale_ablated", "logit")


def head_tokens(top: pd.DataFrame, sample: pd.DataFrame, head: tuple[int, int],
                results: dict[str, SelfRepairResult]) -> pd.DataFrame:
    """Per-token rows of one head on the sweep's instances (its top-k% and the random sample) under
    each ablation: ``resample`` from the sweep frames, the others from single-head ``results`` at the
    same ``(row, pos)``. Adds ``ratio = S/S'`` and ``norm_ratio = S'/S``."""
    layer, h = head
    parts = []
    for kind, frame in (("top-k%", top), ("random sample", sample)):
        rows = frame[(frame["layer"] == layer) & (frame["head"] == h)]
        base = rows[["layer", "head", "label", "row", "pos", "competitor_gap"]].assign(tokens=kind)
        if "resample" not in results:
            parts.append(base.assign(ablation="resample", **{c: rows[c].to_numpy() for c in TOKEN_COLUMNS}))
        b = torch.tensor(rows["row"].to_numpy(dtype="int64", copy=True))
        p = torch.tensor(rows["pos"].to_numpy(dtype="int64", copy=True))
        for ablation, r in results.items():
            vals = {c: (getattr(r, c)[layer, h][b, p] if getattr(r, c).dim() == 4 else getattr(r, c)[b, p])
                    for c in TOKEN_COLUMNS if c != "delta_direct_effect"}
            vals["delta_direct_effect"] = r.delta_direct_effect[layer, h][b, p]
            parts.append(base.assign(ablation=ablation, **{c: v.numpy() for c, v in vals.items()}))
    out = pd.concat(parts, ignore_index=True)
    de = out.pivot_table(index=["tokens", "row", "pos"], columns="ablation", values="direct_effect")
    spread = float((de.max(axis=1) - de.min(axis=1)).max()) if len(de) else 0.0
    if spread > 1e-3 * max(1.0, float(de.abs().max().max())):
        from .errors import SelfRepairError
        raise SelfRepairError(
            f"the clean direct effect of {head_label(*head)} differs by {spread:.3g} between the cached "
            "sweep and the single-head runs: they were computed on different tokens (was the corpus "
            "changed?). Delete the cached files under cache_dir and run again.")
    out["ratio"] = out["scale_clean"] / out["scale_ablated"]
    out["norm_ratio"] = out["scale_ablated"] / out["scale_clean"]
    return out


def relative_boost(ratio, competitor_gap):
    """App. H: how much the norm's rescaling alone raises the correct token over its strongest
    competitor, ``(S/S' - 1) * (logit_A - logit_B)`` with the logits' scale-multiplied parts
    (``competitor_gap``); tensors, arrays or scalars."""
    return (ratio - 1) * competitor_gap


def ratio_summary(tokens: pd.DataFrame, order=None) -> pd.DataFrame:
    """Per head (``label``, in ``order`` or as they appear) and ablation, on the head's top-k%
    tokens: the share with ``S/S' > 1`` (Fig 4; App. D Fig 16-17 for other heads), the median
    ratio, App. H's relative boost of the correct token over its strongest competitor
    (:func:`relative_boost`, median of its size) next to the median direct effect, and the mean
    final-norm self-repair."""
    t = tokens[tokens["tokens"] == "top-k%"]
    rows = []
    for label in (order if order is not None else t["label"].drop_duplicates()):
        h = t[t["label"] == label]
        for ablation in [a for a in ABLATION_ORDER if a in set(h["ablation"])]:
            g = h[h["ablation"] == ablation]
            boost = relative_boost(g["ratio"], g["competitor_gap"])
            rows.append({"ablation": ablation, "label": label, "n": len(g),
                         "share_ratio_above_1": float((g["ratio"] > 1).mean()),
                         "median_ratio": float(g["ratio"].median()),
                         "median_logit_gap": float(g["competitor_gap"].median()),
                         "median_abs_boost": float(boost.abs().median()),
                         "median_direct_effect": float(g["direct_effect"].median()),
                         "mean_from_norm": float(g["from_norm"].mean()),
                         "mean_self_repair": float(g["self_repair"].mean())})
    return pd.DataFrame(rows)


def appendix_b_delta_logit(ratio, logit, delta_direct_effect):
    """App. B: ``delta_logit = (S/S' - 1) * logit + (S/S') * delta_DE`` with ``ratio = S/S'`` and
    ``logit`` the scale-dependent part of the centred clean logit (``Readout.logit - Readout.bias``).
    Exact for a last-layer head of a parallel-residual model; works on tensors, arrays, scalars."""
    return (ratio - 1) * logit + ratio * delta_direct_effect


def appendix_b_check(model, tokens: torch.Tensor, head: tuple[int, int],
                     ablations=ABLATION_ORDER, corrupt_tokens: torch.Tensor | None = None) -> pd.DataFrame:
    """Per token and ablation: the model's real ``delta_logit`` for ablating ``head`` on ``tokens``
    (one batch, one clean pass; resample from ``corrupt_tokens``, default the rows rolled by one;
    mean uses this batch's mean) beside the App. B closed form, their ``error``, and the terms the
    closed form leaves out (``from_heads``, ``from_mlps``, ``from_block_norms``: zero only for a
    last-layer head of a parallel-residual model)."""
    layer, h = head
    tokens = check_tokens(model, tokens)
    corrupt = roll(tokens) if corrupt_tokens is None else check_tokens(model, corrupt_tokens)
    got = in_session(model, _appendix_b_batch, tokens, corrupt, layer, h, tuple(ablations))
    scaled_logit = got["scaled_logit"]
    frames = []
    for ablation, out in zip(ablations, got["ablations"]):
        ratio = got["scale"] / out["scale_ablated"]
        d_de = out["ablated_direct_effect"] - out["direct_effect"]
        b, p = torch.meshgrid(torch.arange(ratio.shape[0]), torch.arange(ratio.shape[1]), indexing="ij")
        frame = pd.DataFrame({
            "row": b.flatten().numpy(), "pos": p.flatten().numpy(),
            "ratio": ratio.flatten().numpy(), "scaled_logit": scaled_logit.flatten().numpy(),
            "delta_direct_effect": d_de.flatten().numpy(),
            "delta_logit": out["delta_logit"].flatten().numpy(),
            "closed_form": appendix_b_delta_logit(ratio, scaled_logit, d_de).flatten().numpy()})
        for q in ("from_heads", "from_mlps", "from_block_norms", "from_norm"):
            frame[q] = out[q].flatten().numpy()
        frames.append(frame.assign(ablation=ablation))
    frame = pd.concat(frames, ignore_index=True)
    frame["error"] = frame["closed_form"] - frame["delta_logit"]
    return frame.assign(model=model.name, parallel_residual=model.parallel_residual,
                        last_layer=layer == model.n_layers - 1, label=head_label(layer, h))


def _appendix_b_batch(model, tokens: torch.Tensor, corrupt: torch.Tensor, layer: int, h: int,
                      ablations: tuple[str, ...]) -> dict:
    """:func:`appendix_b_check`'s one batch (one request on the remote path): the clean scale and
    scaled logit ``[b, seq-1]`` and, per ablation, the head's quantities (float64, on the CPU)."""
    batch = clean_batch(model, tokens, corrupt)
    ro = batch.readout
    out = {"scale": ro.scale.double().cpu(), "scaled_logit": (ro.logit - ro.bias).double().cpu(),
           "ablations": []}
    for ablation in ablations:
        got = ablate_heads(batch, layer, [h], batch.replacement(ablation)[layer])
        out["ablations"].append({k: v[0].double().cpu() for k, v in got.tensors().items()})
    return out


def appendix_b(model, tokens: torch.Tensor, head: tuple[int, int], reference_model=None,
               reference_tokens: torch.Tensor | None = None,
               corrupt_tokens: torch.Tensor | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """:func:`appendix_b_check` under all three ablations on ``model``'s ``head`` (``batch_size``
    rows at a time, ``row`` counting every row given; mean ablation uses each batch's mean) and, if
    given, on the last layer's head 0 of ``reference_model`` (a parallel-residual model where it
    holds)."""
    step = len(tokens) if batch_size is None else max(1, batch_size)
    frames = [appendix_b_check(model, tokens[i:i + step], head,
                               corrupt_tokens=None if corrupt_tokens is None else corrupt_tokens[i:i + step])
              .assign(role="this model").eval(f"row = row + {i}") for i in range(0, len(tokens), step)]
    if reference_model is not None:
        frames.append(appendix_b_check(reference_model, reference_tokens,
                                       (reference_model.n_layers - 1, 0)).assign(role="reference"))
    return pd.concat(frames, ignore_index=True)


def appendix_b_table(check: pd.DataFrame) -> pd.DataFrame:
    """Per model and ablation: the closed form's largest and mean absolute error next to the mean
    |Δlogit|, and the largest left-out term (why it fails outside its assumptions); ``case`` names
    the model, head and block kind in one column (a phone's table has room for few)."""
    g = check.assign(abs_error=check["error"].abs(), abs_delta_logit=check["delta_logit"].abs(),
                     left_out=(check["from_heads"] + check["from_mlps"] + check["from_block_norms"]).abs())
    keys = (["role"] if "role" in g else []) + ["model", "label", "parallel_residual", "last_layer",
                                                 "ablation"]
    out = (g.groupby(keys, sort=False)
           .agg(n=("error", "size"), max_abs_error=("abs_error", "max"),
                mean_abs_error=("abs_error", "mean"), mean_abs_delta_logit=("abs_delta_logit", "mean"),
                max_left_out_term=("left_out", "max")).reset_index())
    out["relative_error"] = out["mean_abs_error"] / out["mean_abs_delta_logit"]
    out["case"] = (out["model"] + " " + out["label"] + ", "
                   + out["parallel_residual"].map({True: "parallel", False: "sequential"}))  # one short column
    return out


def norm_share(top: pd.DataFrame, sample: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per head, the share of its direct effect that the norms give back (§3.2, App. A): the mean
    over instances of ``from_norm / direct_effect`` (component "final norm"; "block norms" uses
    ``from_block_norms``, sandwich models only), clipped to [0, 1] or not, over the head's top-k%
    instances (clipped: Fig 10) and over the random sample of all instances (unclipped: Fig 9, "we
    average across the entire distribution and do not clip"). Instances with
    ``direct_effect == 0`` are left out. Long format: one row per head x variant."""
    parts = []
    for kind, frame in (("top-k%", top), ("random sample", sample)):
        if frame is None:
            continue
        f = frame[frame["direct_effect"] != 0]
        for component, col in (("final norm", "from_norm"), ("block norms", "from_block_norms")):
            if component == "block norms" and not f[col].abs().gt(0).any():
                continue
            raw = f[col] / f["direct_effect"]
            for clipping, vals in (("clipped", raw.clip(0, 1)), ("unclipped", raw)):
                g = f.assign(share=vals).groupby(["layer", "head", "label"], sort=True)["share"]
                parts.append(g.agg(share="mean", n="size").reset_index().assign(
                    tokens=kind, clipping=clipping, component=component))
    return pd.concat(parts, ignore_index=True)


def norm_repair(top: pd.DataFrame) -> pd.DataFrame:
    """Fig 6 ("we measure the LayerNorm self-repair when resample ablating individual heads"):
    per head, the mean over its top-k% instances of the final norm's self-repair in **logits**
    (``from_norm``, component "final norm"; sandwich models also ``from_block_norms``, "block
    norms"), with ``n`` instances. Long format: ``layer, head, label, component, self_repair, n``."""
    parts = []
    for component, col in (("final norm", "from_norm"), ("block norms", "from_block_norms")):
        if component == "block norms" and not top[col].abs().gt(0).any():
            continue
        g = top.groupby(["layer", "head", "label"], sort=True)[col]
        parts.append(g.agg(self_repair="mean", n="size").reset_index().assign(component=component))
    return pd.concat(parts, ignore_index=True)


def layer_shares(shares: pd.DataFrame) -> pd.DataFrame:
    """Layer means of :func:`norm_share` per variant (the lines of Fig 9-10)."""
    keys = ["tokens", "clipping", "component", "layer"]
    return shares.groupby(keys, sort=True)["share"].agg(share="mean", n_heads="size").reset_index()


# -- what chapter 2's verdicts resample: per-cluster sums per head (selfrepair.uncertainty) -------
def check_rows(clusters, n_clusters: int, max_rows: int) -> np.ndarray:
    """The first rows of a token set, in order, until they hold ``n_clusters`` clusters (documents)
    or ``max_rows`` rows: the rows App. B's check runs on (its interval resamples their clusters)."""
    seen, rows = set(), []
    for row, c in enumerate(clusters.of_row[:max_rows]):
        if len(seen) >= n_clusters and c not in seen:
            break
        seen.add(int(c))
        rows.append(row)
    return np.asarray(rows, dtype=np.int64)


def head_sums(frame: pd.DataFrame, clusters, heads, values: dict) -> np.ndarray:
    """``[cluster, head, 1 + c]`` over the rows of ``frame`` belonging to ``heads`` (a list of
    ``(layer, head)``, in that order): each cluster's count and the sums of ``values`` (name ->
    function of the frame giving one number per row)."""
    index = {tuple(h): i for i, h in enumerate(heads)}
    group = np.array([index.get((l, h), -1) for l, h in zip(frame["layer"], frame["head"])], dtype=np.int64)
    keep = group >= 0
    f = frame[keep]
    cols = np.stack([np.asarray(fn(f), dtype=np.float64) for fn in values.values()], -1) if values else \
        np.zeros((len(f), 0))
    return clusters.sum_tokens(f["row"].to_numpy(), cols, group[keep], len(heads))


def ratio_sums(tokens: pd.DataFrame, clusters, heads) -> dict[str, np.ndarray]:
    """Per ablation, ``[cluster, head, 2]``: the count of each head's top-k% tokens and how many of
    them have ``S/S' > 1`` (Fig 4's share), ``tokens`` from :func:`head_tokens`."""
    top = tokens[tokens["tokens"] == "top-k%"]
    return {a: head_sums(top[top["ablation"] == a], clusters, heads, {"above": lambda f: f["ratio"] > 1})
            for a in ABLATION_ORDER if (top["ablation"] == a).any()}


def boost_sums(top: pd.DataFrame, clusters, heads) -> np.ndarray:
    """``[cluster, head, 3]`` on each head's top-k% tokens (the resample sweep's rows): count, the
    sum of App. H's ``|relative_boost|`` and the sum of the direct effect."""
    ratio = top["scale_clean"] / top["scale_ablated"]
    return head_sums(top.assign(ratio=ratio), clusters, heads,
                     {"boost": lambda f: relative_boost(f["ratio"], f["competitor_gap"]).abs(),
                      "de": lambda f: f["direct_effect"]})


def share_sums(top: pd.DataFrame, clusters, heads) -> np.ndarray:
    """``[cluster, head, 2]``: the count of each head's top-k% tokens with a non-zero direct effect
    and the sum of the final norm's share ``from_norm / direct_effect`` clipped to [0, 1] (Fig 10,
    :func:`norm_share`)."""
    f = top[top["direct_effect"] != 0]
    return head_sums(f, clusters, heads, {"clipped": lambda g: (g["from_norm"] / g["direct_effect"]).clip(0, 1)})


def check_sums(check: pd.DataFrame, clusters, rows) -> np.ndarray:
    """``[cluster, ablation, 3]`` of App. B's check on this model (``rows[i]``: the token set's row
    of the check's row ``i``): count, sum of ``|error|`` and of ``|delta_logit|`` per ablation."""
    c = check[check["role"] == "this model"]
    ablations = [a for a in ABLATION_ORDER if (c["ablation"] == a).any()]
    group = c["ablation"].map({a: i for i, a in enumerate(ablations)}).to_numpy()
    values = np.c_[c["error"].abs().to_numpy(float), c["delta_logit"].abs().to_numpy(float)]
    return clusters.sum_tokens(np.asarray(rows)[c["row"].to_numpy()], values, group, len(ablations))
