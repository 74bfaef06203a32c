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
  the constant bias terms (final-norm bias + unembedding bias): ``Readout.logit - Readout.bias``;
- norm share (§3.2, App. A): per instance ``from_norm / direct_effect``, clipped to [0, 1] (or not),
  averaged over the head's top-k% instances (or over a random sample of all instances).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .results import SelfRepairResult, head_label

# Pythia-160M L11H2, top-2% tokens (§3.2): share of tokens with S/S' > 1 per ablation.
PAPER_RATIO_SHARE = {"resample": 0.9066, "mean": 0.9875, "zero": 1.0}
PAPER_NORM_SHARE = 0.30  # "LayerNorm can explain around 30% of the direct effect" (§3.2, Fig 10)
ABLATION_ORDER = ("resample", "mean", "zero")
TOKEN_COLUMNS = ("direct_effect", "delta_direct_effect", "delta_logit", "self_repair", "from_heads",
                 "from_mlps", "from_norm", "from_block_norms", "scale_clean", "scale_ablated", "logit")


def featured_head(per_head: pd.DataFrame, override=None) -> tuple[int, int]:
    """The chapter's head: the first of ``override`` (``cfg.featured_heads``) if given, else the
    last-layer head with the largest mean top-k% direct effect (lowest head index on ties)."""
    from .config import parse_head

    if override:
        return parse_head(override[0])
    last = per_head[per_head["layer"] == per_head["layer"].max()]
    row = last.sort_values(["direct_effect", "head"], ascending=[False, True], kind="mergesort").iloc[0]
    return int(row["layer"]), int(row["head"])


def single_head(cfg, head: tuple[int, int], ablation: str, progress: bool = True) -> SelfRepairResult:
    """Self-repair of one head on the chapter's tokens under ``ablation``, cached on disk."""
    from .experiment import cache_params, cache_path, cached, open_model, open_tokens
    from .heads import self_repair

    model = open_model(cfg)
    label = head_label(*head)
    path = cache_path(cfg, f"head-{label}-{ablation}",
                      cache_params(cfg, model, ablation=ablation, head=label, kind="single_head"))

    def compute(p):
        r = self_repair(model, open_tokens(cfg, model), ablation=ablation, heads=[head],
                        batch_size=cfg.batch_size, progress=progress)
        r.save(p)
        return r

    return cached(path, compute, SelfRepairResult.load)


def head_tokens(top: pd.DataFrame, sample: pd.DataFrame, head: tuple[int, int],
                results: dict[str, SelfRepairResult]) -> pd.DataFrame:
    """Per-token rows of one head on the sweep's instances (its top-k% and the random sample) under
    each ablation: ``resample`` from the sweep frames, the others from single-head ``results`` at the
    same ``(row, pos)``. Adds ``ratio = S/S'`` and ``norm_ratio = S'/S``."""
    layer, h = head
    parts = []
    for kind, frame in (("top-k%", top), ("random sample", sample)):
        rows = frame[(frame["layer"] == layer) & (frame["head"] == h)]
        base = rows[["layer", "head", "label", "row", "pos"]].assign(tokens=kind)
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


def ratio_summary(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per ablation, on the head's top-k% tokens: the share with ``S/S' > 1`` (beside the paper's
    Pythia-160M L11H2 numbers), the median ratio, and App. H's point — the median size of the
    "norm on existing logits" term ``(S/S' - 1) * logit`` next to the median direct effect and the
    mean final-norm self-repair."""
    t = tokens[tokens["tokens"] == "top-k%"]
    rows = []
    for ablation in [a for a in ABLATION_ORDER if a in set(t["ablation"])]:
        g = t[t["ablation"] == ablation]
        rows.append({"ablation": ablation, "label": g["label"].iloc[0], "n": len(g),
                     "share_ratio_above_1": float((g["ratio"] > 1).mean()),
                     "paper_share_pythia160m_L11H2": PAPER_RATIO_SHARE[ablation],
                     "median_ratio": float(g["ratio"].median()),
                     "median_existing_logit_term": float(((g["ratio"] - 1) * g["logit"]).median()),
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
                     ablations=ABLATION_ORDER) -> pd.DataFrame:
    """Per token and ablation: the model's real ``delta_logit`` for ablating ``head`` on ``tokens``
    (one batch, one clean pass; resample pairs rows as the batch rolled by one, mean uses this
    batch's mean) beside the App. B closed form, their ``error``, and the terms the closed form
    leaves out (``from_heads``, ``from_mlps``, ``from_block_norms``: zero only for a last-layer
    head of a parallel-residual model)."""
    from .ablation import default_corrupt_tokens, replacement_z
    from .direct_effect import readout
    from .intervene import run
    from .heads import ablate_heads, check_tokens, clean_pass

    layer, h = head
    tokens = check_tokens(model, tokens)
    frames = []
    with torch.no_grad():
        clean = clean_pass(model, tokens)
        ro = readout(model, tokens, clean)
        scaled_logit = (ro.logit - ro.bias).double().cpu()  # the part the scale multiplies
        for ablation in ablations:
            corrupt = (run(model, default_corrupt_tokens(tokens), read=("z",)).reads["z"]
                       if ablation == "resample" else None)
            repl = replacement_z(model, ablation, clean.reads["z"], corrupt)
            out = {k: v[0].double().cpu() for k, v in
                   ablate_heads(model, tokens, clean, ro, layer, [h], repl[layer]).items()}
            ratio = ro.scale.double().cpu() / out["scale_ablated"]
            d_de = out["ablated_direct_effect"] - out["direct_effect"]
            b, p = torch.meshgrid(torch.arange(ratio.shape[0]), torch.arange(ratio.shape[1]),
                                  indexing="ij")
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


def appendix_b(model, tokens: torch.Tensor, head: tuple[int, int], reference_model=None,
               reference_tokens: torch.Tensor | None = None) -> pd.DataFrame:
    """:func:`appendix_b_check` under all three ablations on ``model``'s ``head`` and, if given,
    on the last layer's head 0 of ``reference_model`` (a parallel-residual model where it holds)."""
    frames = [appendix_b_check(model, tokens, head).assign(role="this model")]
    if reference_model is not None:
        frames.append(appendix_b_check(reference_model, reference_tokens,
                                       (reference_model.n_layers - 1, 0)).assign(role="reference"))
    return pd.concat(frames, ignore_index=True)


def appendix_b_table(check: pd.DataFrame) -> pd.DataFrame:
    """Per model and ablation: the closed form's largest and mean absolute error next to the mean
    |Δlogit|, and the largest left-out term (why it fails outside its assumptions)."""
    g = check.assign(abs_error=check["error"].abs(), abs_delta_logit=check["delta_logit"].abs(),
                     left_out=(check["from_heads"] + check["from_mlps"] + check["from_block_norms"]).abs())
    keys = (["role"] if "role" in g else []) + ["model", "label", "parallel_residual", "last_layer",
                                                 "ablation"]
    out = (g.groupby(keys, sort=False)
           .agg(n=("error", "size"), max_abs_error=("abs_error", "max"),
                mean_abs_error=("abs_error", "mean"), mean_abs_delta_logit=("abs_delta_logit", "mean"),
                max_left_out_term=("left_out", "max")).reset_index())
    out["relative_error"] = out["mean_abs_error"] / out["mean_abs_delta_logit"]
    return out


def norm_share(top: pd.DataFrame, sample: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per head, the share of its direct effect that the norms give back (§3.2, App. A): the mean
    over instances of ``from_norm / direct_effect`` (component "final norm"; "block norms" uses
    ``from_block_norms``, sandwich models only), clipped to [0, 1] or not, over the head's top-k%
    instances (Fig 6/10) and over the random sample of all instances (Fig 9). Instances with
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


def layer_shares(shares: pd.DataFrame) -> pd.DataFrame:
    """Layer means of :func:`norm_share` per variant (the lines of Fig 6 / Fig 9-10)."""
    keys = ["tokens", "clipping", "component", "layer"]
    return shares.groupby(keys, sort=True)["share"].agg(share="mean", n_heads="size").reset_index()


# -- the chapter in one call ----------------------------------------------------------------------
class LayerNormChapter:
    """Everything chapter 02 shows, computed once from the cached sweep and single-head runs."""

    def __init__(self, cfg, progress: bool = True, reference: bool = True):
        from .existence import sweep_frames
        from .experiment import head_sweep, open_model, open_tokens
        from .models import load_model

        sweep = head_sweep(cfg, "resample", progress=progress)
        self.per_head, self.top, self.sample = sweep_frames(sweep)
        self.meta = sweep.meta
        self.head = featured_head(self.per_head, cfg.featured_heads)
        self.label = head_label(*self.head)
        runs = {a: single_head(cfg, self.head, a, progress) for a in ("mean", "zero")}
        self.tokens = head_tokens(self.top, self.sample, self.head, runs)
        self.ratios = ratio_summary(self.tokens)
        self.shares = norm_share(self.top, self.sample)
        self.layers = layer_shares(self.shares)
        model = open_model(cfg)
        self.model = model
        ref = ref_tokens = None
        if reference and not (model.parallel_residual and self.head[0] == model.n_layers - 1):
            ref = load_model("tiny-gpt_neox", dtype="float64")
            g = torch.Generator().manual_seed(cfg.seed)
            ref_tokens = torch.randint(0, ref.d_vocab, (4, 32), generator=g)
        rows = open_tokens(cfg, model)[:max(2, cfg.batch_size)]
        self.check = appendix_b(model, rows, self.head, ref, ref_tokens)
        self.check_table = appendix_b_table(self.check)


def measure(cfg, progress: bool = True) -> LayerNormChapter:
    """Chapter 02: the resample sweep (shared, cached), mean and zero ablation of the featured head
    (cached), norm shares of every head, and the App. B check (here and on tiny-gpt_neox)."""
    return LayerNormChapter(cfg, progress=progress)


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def on_this_model(ch: LayerNormChapter, model: str = "this model") -> str:
    """The "On this model" paragraph: §3's claims re-tested, numbers interpolated.

    Verdict rules: *S/S' > 1 on most top tokens* holds when the share exceeds 50% under every
    ablation and grows resample -> mean -> zero (weakly); *norm share ~30%* holds when the mean
    clipped top-k% final-norm share over all layers is within 15-45%;
    *App. B* holds when its mean relative error is below 1e-3.
    """
    r = ch.ratios.set_index("ablation")
    shares = [r.loc[a, "share_ratio_above_1"] for a in ABLATION_ORDER if a in r.index]
    most = all(s > 0.5 for s in shares)
    ordered = all(a <= b + 1e-9 for a, b in zip(shares, shares[1:]))
    first = int(ch.per_head["layer"].max() + 1) // 2
    fin = ch.layers[(ch.layers["tokens"] == "top-k%") & (ch.layers["clipping"] == "clipped")]
    final = fin[fin["component"] == "final norm"]
    overall, late = final["share"].mean(), final[final["layer"] >= first]["share"].mean()
    block = fin[fin["component"] == "block norms"]["share"].mean()
    near = 0.15 <= overall <= 0.45
    t = ch.check_table
    here, ref = t[t["role"] == "this model"], t[t["role"] == "reference"]
    holds_here = bool((here["relative_error"] < 1e-3).all())
    v = {True: "**holds**", False: "**differs**"}
    ratio_txt = ", ".join(f"{_pct(r.loc[a, 'share_ratio_above_1'])} {a} (paper: "
                          f"{100 * PAPER_RATIO_SHARE[a]:g}%)" for a in ABLATION_ORDER if a in r.index)
    text = (f"**On {model}** (head {ch.label}, top {ch.meta.get('top_percent', 'k')}% tokens). "
            f"*The ablated residual is smaller, S/S′ > 1* {v[most]}{'' if ordered else ' (but not in the paper’s order resample < mean < zero)'}: "
            f"{ratio_txt}. *The final norm gives back about 30% of the direct effect* {v[near]}: "
            f"the clipped top-k% share averages {_pct(overall)} over all layers (layer means "
            f"{_pct(final['share'].min())}–{_pct(final['share'].max())}; {_pct(late)} over layers "
            f"{first}–{int(ch.per_head['layer'].max())})")
    if np.isfinite(block):
        text += (f"; this model's sandwich (post-attention/post-feedforward) norms, which the paper "
                 f"does not have, give back a further {_pct(block)}")
    text += (f". *Appendix B's closed form* {v[holds_here]} here: mean relative error "
             f"{here['relative_error'].mean():.2g} (largest left-out term "
             f"{here['max_left_out_term'].max():.3g} logits)")
    if not (ch.model.parallel_residual and here["last_layer"].all()):
        why = ("the head is not in the last layer, so later layers also respond"
               if not here["last_layer"].all() else "the block is sequential, so the last MLP"
               + (" and the sandwich norms" if ch.model.sandwich else "") + " also respond")
        text += (" — expected, because the closed form assumes nothing but the final norm sits "
                 f"downstream of the head; here {why}")
    if len(ref):
        text += (f"; on {ref['model'].iloc[0]} (parallel residual, last-layer head) it holds to a "
                 f"largest error of {ref['max_abs_error'].max():.1e} logits")
    return text + (". (Verdict rules: S/S′ > 1 on more than half the tokens under every ablation; "
                   "clipped share over all layers within 15–45%; App. B relative error < 1e-3.)")
