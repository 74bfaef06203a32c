"""The Hydra effect: whole-layer ablations on factual recall (McGrath et al. 2023, §2.3-2.5, §4).

For each prompt the readout token is the clean run's maximum-likelihood token ``i`` at the last
position (Hydra §2.3.1, not the dataset's target), and every quantity is the centered logit of
``i`` at that position. Components are the attention and MLP *writes* of every layer: what the
block adds to the residual stream — in sandwich-norm models (Gemma-2/3) the output of the
post-attention / post-feedforward norm (sites ``attn_write`` / ``mlp_write``), elsewhere the raw
attention / MLP output. Component ``c = 2 * layer + (0 attention, 1 MLP)``.

- **Direct effect** ``DE_c = dir . write_c`` with ``dir`` the final norm's readout of ``i`` at the
  clean scale ``S`` (Hydra eq. 10 ``Δ_unembed``; eq. 28). Embedding + all ``DE_c`` + bias terms
  = the centered clean logit.
- **Ablation** (Hydra §2.4, App. A): the write of component ``m`` *at the last position only*
  (``do(A_t^m = a_t^m(x'))``, eq. 11) is replaced by the same component's last-position write on
  ``n_patches`` other prompts (resample; seeded), by its mean over the prompts (mean) or zeros.
  Every quantity below is computed per patch; frames average over patches (eq. 39).
- **Total effect** ``Δ_ablate = logit' - logit`` from the model's real final-norm output (eq. 12,
  18). ``ΔDE_c = dir . (write'_c - write_c)``, clean scale ``S`` (eq. 34).
- **Compensatory effect** (eq. 33) ``CE = Σ_{c downstream of m} ΔDE_c`` — later attention layers
  and MLP layers from ``m`` on for an attention ablation (sequential blocks; in parallel-residual
  blocks the same layer's MLP is not downstream and its ΔDE is exactly 0), later layers only for
  an MLP ablation. ``from_norm = u . n(r') (1/S' - 1/S)`` is computed directly, so
  ``Δ_ablate = ΔDE_m + CE + from_norm`` is an identity the tests check.

Prompts are right-padded (exact in a causal model: every read and edit is at a prompt's last real
position, which never attends to the padding after it). Each ablated pass starts at the ablated
block from the clean residual (nnsight ``skip``) and stops at the final norm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

from .ablation import check_ablation
from .direct_effect import Readout
from .errors import InputError
from .intervene import Pass, run
from .models import Model
from .results import load_tensors, save_tensors

KINDS = ("attn", "mlp")
WRITE_SITES = ("attn_write", "mlp_write")


def component_label(kind: str, layer: int) -> str:
    return f"{'A' if kind == 'attn' else 'M'}{layer}"


def at_last(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [batch, seq, ...]`` at each row's last real position ``pos [batch]`` -> ``[batch, ...]``."""
    return x[torch.arange(len(pos), device=x.device), pos.to(x.device)]


def last_readout(model: Model, clean: Pass, pos: torch.Tensor,
                 targets: torch.Tensor | None = None) -> Readout:
    """Frozen-final-norm readout at each row's last real position ``pos``; ``targets`` default to
    the max-likelihood token there (the real unembedding applied to the real final-norm output)."""
    norm = model.module(model.adapter.final_norm)
    normed = at_last(clean.final_normed, pos)
    if targets is None:
        with torch.no_grad():
            targets = model.module(model.adapter.unembed)(normed).argmax(-1)
    u = model.centered_unembed(targets)
    b, cb = model.norm_bias(norm), model.centered_unembed_bias(targets)
    return Readout(targets=targets, u=u, d=model.readout(norm, u),
                   scale=model.norm_scale(norm, at_last(clean.final_resid, pos)),
                   logit=(u * model.acc(normed)).sum(-1) + cb, bias=cb + (0.0 if b is None else u @ b))


def choose_patches(n: int, n_patches: int, seed: int = 0) -> torch.Tensor:
    """``[n, n_patches]``: for each prompt, distinct *other* prompts (seeded) as resample sources."""
    if n_patches < 1 or n_patches > n - 1:
        raise InputError(f"n_patches must be in [1, {n - 1}] for {n} prompts, got {n_patches}")
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n - 1, generator=g)[:n_patches] for _ in range(n)]
    return torch.stack([r + (r >= i).long() for i, r in enumerate(rows)])  # skip prompt i itself


@dataclass
class HydraResult:
    """Per-prompt clean and per-patch ablated effects; ``P`` patches, ``C = 2 * n_layers``."""

    clean_de: torch.Tensor  # [n, C] direct effect of each component (clean)
    ablated_de: torch.Tensor  # [n, C ablated, P, C readout] direct effects after the ablation
    delta_logit: torch.Tensor  # [n, C, P] total effect Δ_ablate
    from_norm: torch.Tensor  # [n, C, P] final-norm scale term
    embed_de: torch.Tensor  # [n] embeddings' direct effect
    constant: torch.Tensor  # [n] final-norm bias + unembedding bias terms
    logit: torch.Tensor  # [n] centered clean logit of the max-likelihood token
    ml_token: torch.Tensor  # [n] the max-likelihood token (the readout token)
    target: torch.Tensor  # [n] first token of the dataset's target
    patch_index: torch.Tensor  # [n, P] source prompt of each patch (-1: mean/zero)
    parallel_residual: torch.Tensor  # [] bool
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.clean_de.shape[1] // 2

    @property
    def delta_de(self) -> torch.Tensor:
        """``[n, C ablated, P, C readout]`` ΔDE (eq. 34)."""
        return self.ablated_de - self.clean_de[:, None, None, :]

    def downstream(self) -> torch.Tensor:
        """``[ablated, readout]`` bool: is the readout component causally after the ablated one."""
        c = torch.arange(self.clean_de.shape[1])
        if bool(self.parallel_residual):  # attention and MLP of a block read the same residual
            return (c[None, :] // 2) > (c[:, None] // 2)
        return c[None, :] > c[:, None]

    def save(self, path) -> None:
        save_tensors(path, {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"},
                     self.meta)

    @classmethod
    def load(cls, path) -> "HydraResult":
        t, meta = load_tensors(path)
        return cls(**t, meta=meta)


def _ablate(model: Model, tok: torch.Tensor, pos: torch.Tensor, clean: Pass, ro: Readout,
            clean_de: torch.Tensor, m: int, repl: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Replace component ``m``'s write at ``pos`` by ``repl [P * batch, d]`` (patch-major rows):
    direct effects of every component ``[P * batch, C]`` (the clean ``clean_de [batch, C]`` for
    components the ablated pass does not run), total effect and norm term ``[P * batch]``."""
    layer, kind = divmod(m, 2)
    P = len(repl) // len(tok)
    rows, pos = torch.arange(len(repl), device=tok.device), pos.repeat(P).to(tok.device)
    got: dict[int, torch.Tensor] = {}

    def watch(site: str, j: int, value: torch.Tensor) -> None:
        got[2 * j + WRITE_SITES.index(site)] = model.acc(value[rows, pos]).clone()

    def edit(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[rows, pos] = repl.to(value.dtype)
        return value

    resume = clean.reads["block"][layer - 1].repeat(P, 1, 1) if layer > 0 else None
    a = run(model, tok.repeat(P, 1), start_layer=layer, resume=resume, watch=watch,
            watch_sites=WRITE_SITES, edits={(WRITE_SITES[kind], layer): edit})
    dr, de = ro.dir.repeat(P, 1), clean_de.to(tok.device).repeat(P, 1)
    for c, w in got.items():
        de[:, c] = (w * dr).sum(-1)
    resid, normed = model.acc(a.final_resid[rows, pos]), model.acc(a.final_normed[rows, pos])
    scale = model.norm_scale(model.module(model.adapter.final_norm), resid)
    logit = (ro.u.repeat(P, 1) * normed).sum(-1) + model.centered_unembed_bias(ro.targets).repeat(P)
    from_norm = (ro.d.repeat(P, 1) * resid).sum(-1) * (1 / scale - 1 / ro.scale.repeat(P))
    return de, logit - ro.logit.repeat(P), from_norm


def hydra_effect(model: Model, input_ids: torch.Tensor, last_pos: torch.Tensor, *,
                 targets: torch.Tensor | None = None, ablation: str = "resample",
                 n_patches: int = 5, seed: int = 0, patch_index: torch.Tensor | None = None,
                 max_rows: int = 128, progress: bool = True) -> HydraResult:
    """Ablate every attention and MLP layer of ``model`` on each prompt (see module docstring).

    ``input_ids [n, max_len]`` right-padded prompts whose last real token is ``last_pos [n]``
    (:func:`selfrepair.data.prompt_tokens`). Right padding is exact in a causal model: real
    positions never attend to the padding after them, and every read and edit is at ``last_pos``.
    Prompts are sorted by length and run ``max_rows // n_patches`` at a time, so that one ablated
    pass holds at most ``max_rows`` (prompt, patch) rows (prompts are short: wide passes are cheap).
    ``patch_index [n, P]`` overrides the seeded resample sources (a prompt's own index is an
    identity patch); ``targets`` (the dataset's answers) are only kept to count correct prompts.
    """
    check_ablation(ablation)
    n, C = len(input_ids), 2 * model.n_layers
    if ablation == "resample":
        patch_index = choose_patches(n, n_patches, seed) if patch_index is None else patch_index
    else:
        patch_index = torch.full((n, 1), -1, dtype=torch.long)
    P = patch_index.shape[1]
    order = torch.argsort(last_pos, stable=True)
    per = max(1, max_rows // P)
    chunks = [order[i:i + per] for i in range(0, n, per)]
    acc = model.effect_dtype

    def clean_chunk(idx: torch.Tensor):  # -> tokens, positions, clean pass, readout
        tok = input_ids[idx, :int(last_pos[idx].max()) + 1]
        real = torch.arange(tok.shape[1], device=tok.device) <= last_pos[idx, None].to(tok.device)
        tok = torch.where(real, tok, tok[:, :1])
        tok = tok.to(model.device)  # padding -> BOS: it is never read, and HF warns about pad ids
        p = run(model, tok, read=WRITE_SITES + ("block",), read_embed=True)
        return tok, last_pos[idx], p, last_readout(model, p, last_pos[idx])

    # pass 1: clean last-position writes of every prompt (the resample sources) and clean effects
    writes = torch.zeros(2, n, model.n_layers, model.d_model, dtype=acc)
    clean_de, ml_token = torch.zeros(n, C, dtype=acc), torch.zeros(n, dtype=torch.long)
    out = {k: torch.zeros(n, dtype=acc) for k in ("embed_de", "constant", "logit")}
    cleans = [clean_chunk(idx) for idx in tqdm(chunks, desc="clean", disable=not progress)]
    for idx, (tok, pos, p, ro) in zip(chunks, cleans):
        for k, site in enumerate(WRITE_SITES):
            w = model.acc(p.reads[site][:, torch.arange(len(idx)), pos.to(model.device)])  # [L, b, d]
            writes[k, idx] = w.transpose(0, 1).cpu()
            clean_de[idx, k::2] = (w * ro.dir).sum(-1).T.cpu()
        out["embed_de"][idx] = (model.acc(at_last(p.embed, pos)) * ro.dir).sum(-1).cpu()
        out["constant"][idx], out["logit"][idx], ml_token[idx] = ro.bias.cpu(), ro.logit.cpu(), ro.targets.cpu()
    if ablation == "resample":
        repl_all = writes[:, patch_index]  # [2, n, P, L, d]
    else:
        mean = writes.mean(1) if ablation == "mean" else torch.zeros_like(writes[:, 0])
        repl_all = mean[:, None, None].expand(2, n, 1, *mean.shape[1:])
    # pass 2: every component ablated, the patches of a chunk stacked along the batch
    ablated_de = torch.zeros(n, C, P, C, dtype=acc)
    delta_logit, from_norm = torch.zeros(n, C, P, dtype=acc), torch.zeros(n, C, P, dtype=acc)
    bar = tqdm(total=len(chunks) * C, desc=f"{ablation} layer ablations", disable=not progress)
    for idx, (tok, pos, p, ro) in zip(chunks, cleans):
        for m in range(C):
            repl = repl_all[m % 2, idx, :, m // 2].transpose(0, 1).reshape(P * len(idx), -1)
            de, dl, fn = _ablate(model, tok, pos, p, ro, clean_de[idx], m, repl.to(model.device))
            ablated_de[idx, m] = de.unflatten(0, (P, len(idx))).transpose(0, 1).cpu()
            delta_logit[idx, m] = dl.unflatten(0, (P, len(idx))).T.cpu()
            from_norm[idx, m] = fn.unflatten(0, (P, len(idx))).T.cpu()
            bar.update()
    bar.close()
    return HydraResult(clean_de, ablated_de, delta_logit, from_norm, ml_token=ml_token,
                       target=(targets if targets is not None else ml_token).clone(),
                       patch_index=patch_index, parallel_residual=torch.tensor(model.parallel_residual),
                       **out, meta={**model.describe(), "ablation": ablation, "n_patches": P,
                                    "seed": seed, "write_sites": list(WRITE_SITES)})


# -- tidy frames (means over patches, eq. 39) ---------------------------------------------------
def effects_frame(res: HydraResult) -> pd.DataFrame:
    """One row per (prompt, ablated component): ``direct_effect`` (Δ_unembed), ``total_effect``
    (Δ_ablate), ``ablation_drop = -total_effect``, ``delta_direct_effect`` of the ablated
    component, ``compensatory_effect`` (eq. 33) split into ``ce_attn`` / ``ce_mlp``, ``from_norm``."""
    n, C = res.clean_de.shape
    dde = res.delta_de.mean(2)  # [n, C, C]
    mask = res.downstream()[None]
    is_attn = (torch.arange(C) % 2 == 0)[None, None]
    eye = torch.arange(C)
    df = pd.DataFrame({
        "prompt": np.repeat(np.arange(n), C), "layer": np.tile(np.arange(C) // 2, n),
        "kind": np.tile([KINDS[c % 2] for c in range(C)], n),
        "direct_effect": res.clean_de.reshape(-1).numpy(),
        "ablated_direct_effect": res.ablated_de.mean(2)[:, eye, eye].reshape(-1).numpy(),
        "total_effect": res.delta_logit.mean(2).reshape(-1).numpy(),
        "compensatory_effect": (dde * mask).sum(-1).reshape(-1).numpy(),
        "ce_attn": (dde * (mask & is_attn)).sum(-1).reshape(-1).numpy(),
        "ce_mlp": (dde * (mask & ~is_attn)).sum(-1).reshape(-1).numpy(),
        "from_norm": res.from_norm.mean(2).reshape(-1).numpy()})
    df.insert(3, "label", [component_label(k, l) for k, l in zip(df["kind"], df["layer"])])
    df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
    df["ablation_drop"] = -df["total_effect"]
    df["correct"] = np.repeat((res.ml_token == res.target).numpy(), C)
    return df


def impact_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """Hydra Fig 2: per (kind, layer) and measure ("unembed" = DE, "ablate" = logit drop) the
    mean and 10-90% range over prompts, their correlation and how often DE > drop."""
    rows = []
    for (kind, layer), g in effects.groupby(["kind", "layer"], sort=True):
        corr = g["direct_effect"].corr(g["ablation_drop"]) if len(g) > 2 else np.nan
        frac = float((g["direct_effect"] > g["ablation_drop"]).mean())
        for measure, col in (("unembed", "direct_effect"), ("ablate", "ablation_drop")):
            q = g[col].quantile([0.1, 0.9]).to_numpy()
            rows.append({"kind": kind, "layer": layer, "measure": measure, "mean": g[col].mean(),
                         "lo": q[0], "hi": q[1], "corr": corr, "frac_de_gt_drop": frac})
    return pd.DataFrame(rows)


def featured_layer(res: HydraResult) -> int:
    """The attention layer with the largest mean clean direct effect (Hydra Fig 1 and 3)."""
    return int(res.clean_de[:, 0::2].mean(0).argmax())


def before_after(res: HydraResult, layer: int | None = None, kind: str = "attn",
                 prompt: int | None = None) -> pd.DataFrame:
    """Hydra Fig 1/3: every component's DE on one prompt, clean and after ablating ``(kind,
    layer)`` (per patch and the mean over patches). Defaults: :func:`featured_layer` and the
    prompt on which that component's direct effect is largest."""
    layer = featured_layer(res) if layer is None else layer
    m = 2 * layer + KINDS.index(kind)
    prompt = int(res.clean_de[:, m].argmax()) if prompt is None else prompt
    C, P = res.clean_de.shape[1], res.ablated_de.shape[2]
    runs = [("clean", res.clean_de[prompt])] + [("ablated (mean)", res.ablated_de[prompt, m].mean(0))]
    runs += [(f"patch {k}", res.ablated_de[prompt, m, k]) for k in range(P)]
    prompts = res.meta.get("prompts") or [""] * len(res.clean_de)
    return pd.DataFrame([{"layer": c // 2, "kind": KINDS[c % 2], "label": component_label(KINDS[c % 2], c // 2),
                          "run": name, "direct_effect": float(v[c]), "ablated": component_label(kind, layer),
                          "ablated_layer": layer, "ablated_kind": kind,
                          "prompt": prompts[prompt]} for name, v in runs for c in range(C)])


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept`` and R² (NaN when x or y is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return np.nan, np.nan, np.nan
    slope, intercept = np.polyfit(x, y, 1)
    ss = ((y - y.mean()) ** 2).sum()
    r2 = 1 - ((y - slope * x - intercept) ** 2).sum() / ss if ss > 0 else np.nan
    return float(slope), float(intercept), float(r2)


def pooled_slope(effects: pd.DataFrame, layers, kind: str = "attn") -> float:
    """Within-layer slope of compensation on direct effect pooled over ``layers`` (Σ cov / Σ var):
    each layer keeps its own intercept (its indirect breakage), layers whose direct effect varies
    more weigh more."""
    g = effects[(effects["kind"] == kind) & effects["layer"].isin(list(layers))]
    g = g.assign(x=g.groupby("layer")["direct_effect"].transform(lambda v: v - v.mean()))
    var = (g["x"] ** 2).sum()
    return float((g["x"] * g["compensatory_effect"]).sum() / var) if var > 0 else float("nan")


def regression(effects: pd.DataFrame) -> pd.DataFrame:
    """Hydra Fig 7d / 8: per ablated (kind, layer), the regression of the compensatory effect
    (and its attention / MLP parts) on the direct effect across prompts; ``restored`` = mean CE /
    mean lost direct effect (``-delta_direct_effect``)."""
    rows = []
    for (kind, layer), g in effects.groupby(["kind", "layer"], sort=True):
        slope, intercept, r2 = fit_line(g["direct_effect"], g["compensatory_effect"])
        lost = -g["delta_direct_effect"].mean()
        rows.append({"kind": kind, "layer": layer, "label": component_label(kind, layer),
                     "n": len(g), "slope": slope, "intercept": intercept, "r2": r2,
                     "slope_attn": fit_line(g["direct_effect"], g["ce_attn"])[0],
                     "slope_mlp": fit_line(g["direct_effect"], g["ce_mlp"])[0],
                     "mean_direct_effect": g["direct_effect"].mean(),
                     "restored": g["compensatory_effect"].mean() / lost if lost > 0 else np.nan})
    return pd.DataFrame(rows)


def late_mlp_layers(n_layers: int) -> list[int]:
    """The last quarter of the layers (at least one): the "late MLPs" of the erasure claim."""
    return list(range(n_layers - max(1, n_layers // 4), n_layers))


def erasure(res: HydraResult) -> pd.DataFrame:
    """Hydra §2.5.2: per (ablated attention layer, MLP layer) the MLP's mean clean DE and its mean
    ΔDE after the ablation (0 where the MLP is not downstream)."""
    L = res.n_layers
    dde = res.delta_de.mean((0, 2))[0::2, 1::2]  # [attn ablated, mlp readout]
    clean = res.clean_de[:, 1::2].mean(0)
    late = set(late_mlp_layers(L))
    return pd.DataFrame([{"ablated_layer": a, "mlp_layer": l, "label": component_label("mlp", l),
                          "clean_direct_effect": float(clean[l]), "delta_direct_effect": float(dde[a, l]),
                          "late": l in late} for a in range(L) for l in range(L)])


# -- the computed "On this model" paragraph -----------------------------------------------------
PAPER_SLOPE_FROM = 13 / 32  # Hydra §4.2: slope < 1 at every layer past 13 of Chinchilla-7B's 32


def summary(res: HydraResult) -> dict:
    """The numbers behind the chapter's claims (Hydra §2.5, §4.2, §6)."""
    eff, L = effects_frame(res), res.n_layers
    reg = regression(eff)
    attn = reg[reg["kind"] == "attn"].set_index("layer")
    mid = list(range(round(L / 4), max(round(L / 4) + 1, round(3 * L / 4))))
    slopes = attn["slope"].dropna()
    above = slopes[slopes >= 1].index
    late = late_mlp_layers(L)
    dde = res.delta_de.mean(2)
    ablated = [2 * m for m in range(late[0])]
    late_sum = dde[:, ablated][:, :, [2 * l + 1 for l in late]].sum(-1)
    self_d = dde[:, ablated, ablated]
    att_eff = eff[eff["kind"] == "attn"]
    best = attn["r2"].idxmax() if attn["r2"].notna().any() else None
    return {"n_prompts": len(res.clean_de), "n_correct": int((res.ml_token == res.target).sum()),
            "n_layers": L, "n_patches": res.ablated_de.shape[2],
            "corr": float(att_eff["direct_effect"].corr(att_eff["ablation_drop"])),
            "frac_de_gt_drop": float((att_eff["direct_effect"] > att_eff["ablation_drop"]).mean()),
            "mid_layers": mid, "slope_mid": pooled_slope(eff, mid),
            "slope_from": (int(above.max()) + 1 if len(above) else int(slopes.index.min()))
            if len(slopes) else None,
            "r2_layer": None if best is None else int(best),
            "r2": None if best is None else float(attn.loc[best, "r2"]),
            "late": late, "late_negative": int((res.clean_de[:, 1::2][:, late].mean(0) < 0).sum()),
            "late_clean_de": float(res.clean_de[:, 1::2][:, late].sum(1).mean()),
            "opposite": float((late_sum * self_d < 0).float().mean()) if late[0] else float("nan"),
            "erasure_slope": fit_line(self_d.flatten(), late_sum.flatten())[0] if late[0] else float("nan")}


def _verdict(ok: bool, *values: float) -> str:
    if not all(np.isfinite(v) for v in values):
        return "**not testable here**"
    return "**holds**" if ok else "**differs**"


def _span(layers: list[int]) -> str:
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _f(value: float, fmt: str) -> str:
    return format(value, fmt) if np.isfinite(value) else "n/a"


def summary_markdown(res: HydraResult) -> str:
    """The computed "On this model" paragraphs: each Hydra claim, this model's numbers, verdict."""
    s, L = summary(res), res.n_layers
    mid, late = s["mid_layers"], s["late"]
    r2 = ("" if s["r2_layer"] is None else f" Variance explained peaks at attention layer "
          f"{s['r2_layer']} of {L} (R² = {s['r2']:.2f}; Chinchilla-7B: layer 23 of 32, R² = 0.92).")
    erasure_ok = s["late_negative"] > len(late) / 2 and s["opposite"] > 0.5
    frm = s["slope_from"]
    slope = ("No attention layer has a defined regression slope." if frm is None else
             f"The slope is below 1 at every attention layer from layer {frm} of {L} on ({frm / L:.0%} "
             f"of the depth). Paper: past layer 13 of 32 ({PAPER_SLOPE_FROM:.0%}) — "
             f"{_verdict(frm / L <= 0.5)}.")
    return "\n\n".join([
        f"**On {res.meta.get('model', 'this model')}** ({L} layers, {s['n_prompts']} factual prompts, "
        f"{s['n_patches']} resample source(s) per prompt) the model completes **{s['n_correct']} of "
        f"{s['n_prompts']}** prompts correctly (its top token is the first token of the answer); as in "
        "the Hydra paper, every number below reads the top token, right or wrong.",
        f"*Unembedding vs ablation (Fig 2).* Over prompts and attention layers, the direct effect and "
        f"the logit drop correlate with r = {_f(s['corr'], '.2f')}, and the direct effect exceeds the drop in "
        f"{s['frac_de_gt_drop']:.0%} of cases. Paper: Δ_unembed > Δ_ablate for most prompts and layers "
        f"— {_verdict(s['frac_de_gt_drop'] > 0.5)}.",
        f"*Compensation (eq. 33, Fig 7).* When a middle attention layer ({_span(mid)}) is ablated, "
        f"the downstream layers give back **{_f(s['slope_mid'], '.0%')}** of its direct effect (slope of "
        f"the compensatory effect on the direct effect, pooled within these layers). Paper: ≈70% — "
        f"{_verdict(0.5 <= s['slope_mid'] <= 0.9, s['slope_mid'])}. {slope}{r2}",
        f"*Erasure by late MLPs (§2.5.2).* {s['late_negative']} of the last {len(late)} MLP layers "
        f"({_span(late)}) push the top token down on average (together {s['late_clean_de']:+.2f}); "
        f"after an earlier attention layer is ablated, their change has the sign opposite to that "
        f"layer's change in {_f(s['opposite'], '.0%')} of cases (slope {_f(s['erasure_slope'], '+.2f')}). "
        f"Paper: late MLPs erase and relax with the attention layer they counter — "
        f"{_verdict(erasure_ok, s['opposite'])}."])


# -- from a RunConfig -----------------------------------------------------------------------------
def hydra_run(cfg, n_prompts: int | None = 40, n_patches: int = 3, *, max_rows: int = 128,
              progress: bool = True) -> HydraResult:
    """The chapter's measurement for ``cfg`` on ``n_prompts`` factual prompts (seeded subset of
    ``data/factual_prompts.csv``; ``None`` = all), cached under ``cfg.cache_dir``."""
    from .data import load_prompts, prompt_tokens
    from .experiment import cache_params, cache_path, cached, open_model

    model = open_model(cfg)
    prompts = load_prompts()
    n = len(prompts) if n_prompts is None else min(int(n_prompts), len(prompts))
    keep = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
    prompts = prompts.iloc[keep.numpy()].reset_index(drop=True)
    digest = hashlib.sha256(prompts.to_csv().encode()).hexdigest()[:16]
    params = cache_params(cfg, model, kind="hydra", ablation=cfg.ablation, n_prompts=n, max_rows=max_rows,
                          n_patches=n_patches, prompts_sha=digest)

    def compute(path) -> HydraResult:
        pt = prompt_tokens(prompts, model.tokenizer)
        res = hydra_effect(model, pt.input_ids, pt.last_pos, targets=pt.target_ids,
                           ablation=cfg.ablation, n_patches=n_patches, seed=cfg.seed,
                           max_rows=max_rows, progress=progress)
        dec = model.tokenizer.decode
        res.meta.update(params=params, prompts=list(prompts["prompt"]),
                        ml_text=[dec([int(t)]) for t in res.ml_token], target_text=list(prompts["target"]))
        res.save(path)
        return res

    return cached(cache_path(cfg, f"hydra-{cfg.ablation}", params), compute, HydraResult.load)
