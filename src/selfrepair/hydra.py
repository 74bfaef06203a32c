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
  ``n_patches`` other prompts (resample; seeded), by its mean over the prompts (mean), zeros, or
  (noise) the write itself plus Gaussian noise, ``n_patches`` draws of ``N(0, σ²)`` per prompt,
  seeded by (seed, prompt), with ``σ = noise_scale x`` the RMS of that component's clean write
  over the prompt set (:func:`noise_sigma`, :func:`noisy_writes`). Eq. 37 puts the noise on the
  *input* (causal tracing, Meng et al., whose σ is 3x the embeddings' std); here it is on the
  layer's write, so that it is a control of this one layer, as resample is. Every quantity below is computed per patch; frames average over
  patches (eq. 39).
- **Total effect** ``Δ_ablate = logit' - logit`` from the model's real final-norm output (eq. 12,
  18). ``ΔDE_c = dir . (write'_c - write_c)``, clean scale ``S`` (eq. 34).
- **Compensatory effect** (eq. 33) ``CE = Σ_{c downstream of m} ΔDE_c`` — later attention layers
  and MLP layers from ``m`` on for an attention ablation (sequential blocks; in parallel-residual
  blocks the same layer's MLP is not downstream and its ΔDE is exactly 0), later layers only for
  an MLP ablation (:func:`selfrepair.structure.component_reads`). In sandwich-norm models a
  downstream component's ΔDE reads its raw output through its block norm at the **clean** scale,
  as everywhere in this library; the rescaling by the downstream block norms' changed scales is its
  own term, ``from_block_norms`` (as in the head decomposition of chapters 1-2), not compensation.
  ``from_norm = u . n(r') (1/S' - 1/S)`` is computed directly, so
  ``Δ_ablate = ΔDE_m + CE + from_block_norms + from_norm`` is an identity the tests check.

Prompts are right-padded (exact in a causal model: every read and edit is at a prompt's last real
position, which never attends to the padding after it). Each ablated pass
(:func:`selfrepair.passes.ablate_writes`) starts at the ablated block from the clean residual
(nnsight ``skip``) and stops at the final norm. On the remote path every pass runs on the server,
one request per chunk of prompts (:func:`hydra_effect`), and only per-prompt effects come back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from .ablation import ABLATIONS
from .batch import PromptSet, clean_batch
from .direct_effect import at_positions
from .driver import Driver, Stage, collect
from .errors import InputError
from .intervene import Pass, run
from .measure import RunOptions, Spec
from .models import Model
from .passes import WRITE_SITES, ablate_writes
from .results import Result
from .structure import KINDS, component_reads


HYDRA_ABLATIONS = ABLATIONS + ("noise",)  # what can replace a whole layer's write
NOISE_DRAWS = "per prompt, numpy default_rng([seed, prompt])"  # how noisy_writes draws (in a noise key)
TERMS = ("delta_logit", "from_norm", "from_block_norms")  # an ablated pass's scalar terms per (prompt, patch)


def check_hydra_ablation(ablation: str, noise_scale: float | None = None) -> str:
    """``ablation`` is one of :data:`HYDRA_ABLATIONS`; ``noise`` needs a ``noise_scale >= 0``."""
    if ablation not in HYDRA_ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}: use one of {', '.join(HYDRA_ABLATIONS)}")
    if ablation == "noise" and (noise_scale is None or not noise_scale >= 0):
        raise InputError(f"noise ablation needs noise_scale >= 0 (σ as a multiple of the write's RMS), "
                         f"got {noise_scale!r}")
    return ablation


def noise_sigma(sq_sum: torch.Tensor, count: int, noise_scale: float) -> torch.Tensor:
    """``[2, L]``: ``σ = noise_scale x`` the RMS of each (kind, layer)'s write, from the sum of its
    squares ``sq_sum [2, L]`` over ``count`` values (every prompt's last-position write, every
    dimension)."""
    return noise_scale * (sq_sum.double() / count).sqrt()


def noisy_writes(writes: torch.Tensor, prompts: torch.Tensor, n_patches: int, sigma: torch.Tensor,
                 seed: int = 0) -> torch.Tensor:
    """``[2, L, P, b, d]``: the clean last-position writes ``writes [2, L, b, d]`` of the prompts
    numbered ``prompts [b]``, each plus ``P`` draws of ``N(0, σ²)`` (``sigma [2, L]``, from
    :func:`noise_sigma`). Prompt ``i``'s draws ``[P, 2, L, d]`` come from a generator seeded by
    ``(seed, i)`` (numpy's ``default_rng``), so they depend neither on how prompts are batched nor on
    the other prompts — a chunk draws only its own — and the first draws stay the same when ``P``
    grows; ``σ = 0`` returns the writes unchanged."""
    shape = (n_patches, *writes.shape[:2], writes.shape[-1])
    eps = torch.stack([torch.from_numpy(np.random.default_rng([seed, int(i)]).standard_normal(shape))
                       for i in prompts]).permute(2, 3, 1, 0, 4).to(writes.device)  # [2, L, P, b, d]
    sigma = sigma.to(writes.device, torch.float64)[:, :, None, None, None]
    return (writes.double()[:, :, None] + sigma * eps).to(writes.dtype)


def component_label(kind: str, layer: int) -> str:
    return f"{'A' if kind == 'attn' else 'M'}{layer}"


def choose_patches(n: int, n_patches: int, seed: int = 0) -> torch.Tensor:
    """``[n, n_patches]``: for each prompt, distinct *other* prompts (seeded) as resample sources."""
    if n_patches < 1 or n_patches > n - 1:
        raise InputError(f"n_patches must be in [1, {n - 1}] for {n} prompts, got {n_patches}")
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n - 1, generator=g)[:n_patches] for _ in range(n)]
    return torch.stack([r + (r >= i).long() for i, r in enumerate(rows)])  # skip prompt i itself


@dataclass
class HydraResult(Result):
    """Per-prompt clean and per-patch ablated effects; ``P`` patches, ``C = 2 * n_layers``."""

    clean_de: torch.Tensor  # [n, C] direct effect of each component (clean)
    ablated_de: torch.Tensor  # [n, C ablated, P, C readout] direct effects after the ablation
    delta_logit: torch.Tensor  # [n, C, P] total effect Δ_ablate
    from_norm: torch.Tensor  # [n, C, P] final-norm scale term
    from_block_norms: torch.Tensor  # [n, C, P] downstream block norms' scale terms (sandwich models)
    mean_write_de: torch.Tensor  # [n, C] DE of each component's mean write (mean ablation's own DE)
    source_mean_de: torch.Tensor  # [n, C] own DE averaged over every other prompt as source (eq. 39, P = n-1)
    embed_de: torch.Tensor  # [n] embeddings' direct effect
    constant: torch.Tensor  # [n] final-norm bias + unembedding bias terms
    logit: torch.Tensor  # [n] centered clean logit of the max-likelihood token
    ml_token: torch.Tensor  # [n] the max-likelihood token (the readout token)
    target: torch.Tensor  # [n] first token of the dataset's target
    patch_index: torch.Tensor  # [n, P] source prompt of each patch (-1: mean/zero)
    parallel_residual: torch.Tensor  # [] bool
    input_ids: torch.Tensor | None = None  # [n, max_len] the prompts measured

    @property
    def n_layers(self) -> int:
        return self.clean_de.shape[1] // 2

    @property
    def delta_de(self) -> torch.Tensor:
        """``[n, C ablated, P, C readout]`` ΔDE (eq. 34)."""
        return self.ablated_de - self.clean_de[:, None, None, :]

    def downstream(self) -> torch.Tensor:
        """``[ablated, readout]`` bool: is the readout component causally after the ablated one."""
        return component_reads(bool(self.parallel_residual), self.n_layers)

    def to_frame(self) -> pd.DataFrame:
        return effects_frame(self)


def hydra_effect(model: Model, prompts: PromptSet, *, ablation: str = "resample", n_patches: int = 5,
                 seed: int = 0, patch_index: torch.Tensor | None = None, max_rows: int = 128,
                 noise_scale: float | None = None, progress: bool = True) -> HydraResult:
    """Ablate every attention and MLP layer of ``model`` on each prompt (see module docstring).

    ``prompts`` are right-padded (:class:`~selfrepair.batch.PromptSet`); right padding is exact in a
    causal model: real positions never attend to the padding after them, and every read and edit is
    at each prompt's last real position. Prompts are sorted by length and run ``max_rows //
    n_patches`` at a time, so that one ablated pass holds at most ``max_rows`` (prompt, patch) rows.
    ``patch_index [n, P]`` overrides the seeded resample sources (a prompt's own index is an identity
    patch). ``noise``: ``n_patches`` noise draws per prompt, ``σ = noise_scale x`` RMS of the write.
    """
    spec = HydraSpec(ablation=ablation, n_patches=n_patches, seed=seed, noise_scale=noise_scale)
    return effects(spec, model, prompts, RunOptions(max_rows=max_rows, progress=progress), patch_index)


def effects(spec: "HydraSpec", model: Model, prompts: PromptSet, options: RunOptions,
            patch_index: torch.Tensor | None = None) -> HydraResult:
    """``spec`` through the driver, two stages over the prompts sorted by length: the sums over
    every prompt of the last-position writes and of their squares (:func:`write_sums`,
    ``max_rows`` prompts a request: a clean pass has no patches; for the mean, σ and the
    own-effect controls), then one request per chunk of ``max_rows // P`` prompts
    (:func:`_chunk_effects`: the chunk's clean pass, its resample sources, the replacements and the
    ``2 * n_layers`` ablated passes), back only per-prompt effects. No activation and no per-prompt
    ``d_model`` vector comes back."""
    check_hydra_ablation(spec.ablation, spec.noise_scale)
    if spec.seed < 0:
        raise InputError(f"seed must be >= 0, got {spec.seed}")
    n, ablation = len(prompts), spec.ablation
    if ablation == "resample":
        patch_index = choose_patches(n, spec.n_patches, spec.seed) if patch_index is None else patch_index
    else:
        patch_index = torch.full((n, spec.n_patches if ablation == "noise" else 1), -1, dtype=torch.long)
    P = patch_index.shape[1]
    run = Driver(model, prompts, options, key=spec.key())
    order = torch.argsort(prompts.last_pos, stable=True)
    sums = run.run(Stage("clean", write_sums, order=order, batch_size=options.max_rows, unit="prompt"))
    out = run.run(Stage(f"{ablation} layer ablations", _chunk_effects, collect(),
                        args=(ablation, P, n, sums, spec.noise_scale, spec.seed), order=order,
                        sources=patch_index if ablation == "resample" else False,
                        batch_size=max(1, options.max_rows // P), unit="prompt"))
    return HydraResult(**out, target=prompts.target_ids.clone(), patch_index=patch_index,
                       parallel_residual=torch.tensor(model.parallel_residual), input_ids=prompts.input_ids,
                       meta=run.meta(ablation=ablation, n_patches=P, seed=spec.seed,
                                     noise_scale=spec.noise_scale, write_sites=list(WRITE_SITES)))


def last_writes(model: Model, clean: Pass, pos: torch.Tensor) -> torch.Tensor:
    """``[2, L, b, d]``: every layer's attention and MLP write (:data:`WRITE_SITES`) at each row's
    position ``pos`` of a pass that read them."""
    return torch.stack([model.acc(at_positions(clean.reads[site], pos)) for site in WRITE_SITES])


def hydra_chunks(prompts: PromptSet, n_patches: int, max_rows: int) -> list[torch.Tensor]:
    """The prompts sorted by length, ``max_rows // n_patches`` at a time (one ablated pass holds
    at most ``max_rows`` (prompt, patch) rows): each chunk's prompt indices."""
    order = torch.argsort(prompts.last_pos, stable=True)
    per = max(1, max_rows // n_patches)
    return [order[i:i + per] for i in range(0, len(order), per)]


def _sums(writes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum [2, L, d]`` of last-position writes ``writes [2, L, b, d]`` over the prompts and
    ``sq [2, L]``, the sum of their squares over prompts and dimensions (fp64)."""
    w = writes.double()
    return {"sum": w.sum(2), "sq": w.pow(2).sum((2, 3))}


def clean_writes(model: Model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[2, L, b, d]``: :func:`last_writes` of a clean pass of ``tokens`` that reads nothing else."""
    return last_writes(model, run(model, tokens.to(model.device), read=WRITE_SITES), pos)


def write_sums(model: Model, rows: dict) -> dict[str, torch.Tensor]:
    """One chunk's clean pass reduced to :func:`_sums` of its prompts' last-position writes (CPU)."""
    return {k: v.cpu() for k, v in _sums(clean_writes(model, rows["tokens"], rows["last_pos"])).items()}


def _replacements(model: Model, writes: torch.Tensor, idx: torch.Tensor, ablation: str, n_patches: int,
                  n: int, sums: dict, sources: dict | None, noise_scale: float | None,
                  seed: int) -> torch.Tensor:
    """``[2, L, P * b, d]`` (patch-major rows): what replaces each layer's write on each prompt of a
    chunk whose clean writes are ``writes [2, L, b, d]``: its resample sources' writes (one clean
    pass of those outside the chunk), the mean over every prompt (``sums["sum"] / n``), zero, or
    the write plus noise (:func:`noisy_writes`, σ from ``sums["sq"]``)."""
    if ablation == "resample":
        if sources["rows"] is not None:
            writes = torch.cat([writes, clean_writes(model, *sources["rows"])], 2)
        return writes[:, :, sources["at"].T.reshape(-1).to(writes.device)]
    if ablation == "noise":
        sigma = noise_sigma(sums["sq"], n * model.d_model, noise_scale)
        return noisy_writes(writes, idx, n_patches, sigma, seed).flatten(2, 3)
    if ablation == "zero":
        return torch.zeros_like(writes)
    return (sums["sum"].to(writes.device) / n).to(writes.dtype)[:, :, None].expand_as(writes)


def _chunk_effects(model: Model, rows: dict, ablation: str, n_patches: int, n: int, sums: dict,
                   noise_scale: float | None, seed: int) -> dict[str, torch.Tensor]:
    """One chunk of prompts (the driver's ``rows``: ``tokens``, ``last_pos``, ``index``, resample
    sources in ``pool``) of :func:`hydra_effect`: its clean pass, every component ablated (one
    stacked pass of its ``P`` patches each), and back only the per-prompt fields of
    :class:`HydraResult` (``[b, ...]``, CPU). ``sums``: :func:`_sums` over all ``n`` prompts, for
    the mean, σ and the own-effect controls."""
    tokens, pos, idx, sources = rows["tokens"], rows["last_pos"], rows["index"], rows.get("pool")
    batch = clean_batch(model, tokens, last_pos=pos, extra_reads=WRITE_SITES)
    ro, b, C = batch.readout, len(pos), 2 * model.n_layers
    w = last_writes(model, batch.clean, pos)
    clean_de = (w * ro.dir).sum(-1).permute(2, 1, 0).reshape(b, C)  # c = 2 * layer + kind
    total = torch.einsum("kld,bd->blk", sums["sum"].to(w), ro.dir).reshape(b, C)
    out = {"clean_de": clean_de, "mean_write_de": total / n, "source_mean_de": (total - clean_de) / max(1, n - 1),
           "embed_de": (model.acc(at_positions(batch.clean.embed, pos)) * ro.dir).sum(-1),
           "constant": ro.bias, "logit": ro.logit, "ml_token": ro.targets}
    repl = _replacements(model, w, idx, ablation, n_patches, n, sums, sources, noise_scale, seed)
    per = [ablate_writes(batch, pos, m, repl[m % 2, m // 2], clean_de) for m in range(C)]
    out["ablated_de"] = torch.stack([g.direct_effect.unflatten(0, (-1, b)).transpose(0, 1) for g in per], 1)
    for key in TERMS:
        out[key] = torch.stack([getattr(g, key).unflatten(0, (-1, b)).T for g in per], 1)  # [b, C, P]
    return {k: v.cpu() for k, v in out.items()}


@dataclass(frozen=True)
class HydraSpec(Spec):
    """Every attention and MLP layer ablated at each prompt's last position (chapter 5)."""

    kind = "hydra"
    result = HydraResult

    ablation: str = "resample"  # what replaces a layer's write (HYDRA_ABLATIONS)
    n_patches: int = 3  # resample sources (or noise draws) per prompt, averaged
    seed: int = 0  # which prompts are each prompt's sources; the noise draws
    noise_scale: float | None = None  # noise: σ as a multiple of the write's RMS (None otherwise)

    def key(self) -> dict:
        """A noise result's key also names how its draws are made (:data:`NOISE_DRAWS`), so an
        entry drawn another way (before the draws were per prompt) is recomputed, not reused."""
        key = super().key()
        return {**key, "noise_draws": NOISE_DRAWS} if self.ablation == "noise" else key

    def compute(self, model: Model, data: PromptSet, options: RunOptions) -> HydraResult:
        res = effects(self, model, data, replace(options, max_rows=max(options.max_rows, 128)))
        dec = model.tokenizer.decode if model.tokenizer is not None else str
        res.meta.update(prompts=list(data.prompts), target_text=list(data.targets),
                        ml_text=[dec([int(t)]) for t in res.ml_token])
        return res


# -- tidy frames (means over patches, eq. 39) ---------------------------------------------------
def effects_frame(res: HydraResult) -> pd.DataFrame:
    """One row per (prompt, ablated component): ``direct_effect`` (Δ_unembed), ``total_effect``
    (Δ_ablate), ``ablation_drop = -total_effect``, ``delta_direct_effect`` of the ablated
    component, ``compensatory_effect`` (eq. 33) split into ``ce_attn`` / ``ce_mlp``, ``from_norm``
    and ``from_block_norms``."""
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
        "from_norm": res.from_norm.mean(2).reshape(-1).numpy(),
        "from_block_norms": res.from_block_norms.mean(2).reshape(-1).numpy()})
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
