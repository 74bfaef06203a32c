"""Name movers and backup name movers in IOI (Wang et al. 2023 §3.2-3.4; self-repair paper
App. G), measured on the logit difference ``IO − S`` at each prompt's end position.

- **Readout.** ``u = u_IO − u_S`` (:func:`diff_readout`): every direct effect is on the logit
  difference, the final norm (and in sandwich models the block norms) frozen at the clean
  scales. All components' DEs (heads, attention output biases, MLP layers, embeddings) plus the
  constant terms sum to the clean logit difference.
- **Name movers** (:func:`select_name_movers`): among the heads whose attention from the end goes
  more to IO than to S (both of S's occurrences together; means over prompts), the ``n`` with the
  largest mean DE on the logit difference (positive DE only); or heads given by label. With
  ``select_seed`` the rule reads only the prompts of one seeded half of the prompt pairs
  (:func:`selection_prompts`), so that what the name movers do can be tested on the other half.
- **Ablation**: the name movers' outputs (``z`` slices) at the end position together, replaced
  by their mean over the prompt set (Wang et al.'s mean ablation; here the mean over these
  prompts' end positions), by the end-position ``z`` of the prompt two on (resample: another name
  pair, as prompts come in ABBA/BABA pairs) or by zeros. Every head's DE is read again:
  backups are heads whose DE grows. ``self_repair = delta_logit − ΔDE_name_movers`` (eq. 1), and
  ``delta_logit = ΔDE_name_movers + from_heads + from_mlps + from_norm + from_block_norms``.
- **Residual moving** (App. G): layer ``target``'s heads read the clean residual that entered the
  first name mover's layer ``source`` (every attention and MLP layer in between skipped, i.e.
  zero-ablated, at every position); ``moved_de [n, layer, head]`` (NaN before ``source``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .ablation import check_ablation
from .batch import CleanBatch, clean_batch, source_pool
from .driver import Driver, Stage, collect
from .direct_effect import Readout, at_positions, last_readout
from .intervene import run
from .ioi import IoiPrompts
from .measure import RunOptions, Spec
from .models import Model
from .prompt_passes import (ablate_heads_at, clean_head_de, clean_mlp_de, end_pattern, moved_residual_de,
                            watched_pattern)
from .results import Result, head_label
from .uncertainty import Clusters


def diff_readout(model: Model, clean, pos: torch.Tensor, io: torch.Tensor, s: torch.Tensor) -> Readout:
    """The frozen-norm readout of ``logit(IO) − logit(S)`` at ``pos`` (linear in ``u``: the
    difference of the two tokens' readouts)."""
    a, b = last_readout(model, clean, pos, io), last_readout(model, clean, pos, s)
    return Readout(targets=a.targets, u=a.u - b.u, d=a.d - b.d, scale=a.scale, logit=a.logit - b.logit,
                   bias=a.bias - b.bias, attn_scale=a.attn_scale, mlp_scale=a.mlp_scale)


@dataclass
class IoiResult(Result):
    """Per prompt ``n``: clean and ablated direct effects on the logit difference, attention from
    the end, and the residual-moving pass."""

    logit_diff: torch.Tensor  # [n] clean logit difference IO − S (the model's real output)
    head_de: torch.Tensor  # [n, layer, head] clean DE on the logit difference
    mlp_de: torch.Tensor  # [n, layer]
    attn_bias_de: torch.Tensor  # [n, layer] output-projection biases
    embed_de: torch.Tensor  # [n]
    constant: torch.Tensor  # [n] final-norm bias + unembedding bias terms
    attn_io: torch.Tensor  # [n, layer, head] attention from the end to IO
    attn_s1: torch.Tensor  # [n, layer, head] ... to S's first occurrence
    attn_s2: torch.Tensor  # [n, layer, head] ... to S's second occurrence
    ml_token: torch.Tensor  # [n] the clean run's top token at the end
    io_token: torch.Tensor  # [n]
    name_movers: torch.Tensor  # [k, 2] (layer, head)
    ablated_head_de: torch.Tensor  # [n, layer, head] after the name movers' ablation
    ablated_mlp_de: torch.Tensor  # [n, layer]
    delta_logit: torch.Tensor  # [n] change of the real logit difference
    from_norm: torch.Tensor  # [n]
    from_block_norms: torch.Tensor  # [n]
    moved_de: torch.Tensor  # [n, layer, head] reading the residual that entered `source`
    source_layer: torch.Tensor  # [] the first name mover's layer

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [tuple(map(int, r)) for r in self.name_movers]

    def nm_mask(self) -> torch.Tensor:
        m = torch.zeros(self.head_de.shape[1:], dtype=torch.bool)
        for l, h in self.heads:
            m[l, h] = True
        return m

    def to_frame(self) -> pd.DataFrame:
        return head_frame(self)


def select_name_movers(head_de: torch.Tensor, attn_io: torch.Tensor, attn_s: torch.Tensor,
                       n: int) -> tuple[list[tuple[int, int]], bool]:
    """(name movers, whether the rule found any): the ``n`` heads with the largest mean DE among
    those with a positive mean DE that attend more to IO than to S from the end (means over
    prompts, ``[n_prompts, layer, head]`` inputs). If none qualifies, the ``n`` heads with the
    largest mean DE (so later steps still run; the flag says the rule failed)."""
    de, io, s = head_de.mean(0), attn_io.mean(0), attn_s.mean(0)
    H = de.shape[1]
    ok = (de > 0) & (io > s)
    score = torch.where(ok, de, torch.full_like(de, -float("inf"))).flatten()
    k = min(n, int(ok.sum()))
    found = k > 0
    idx = score.topk(k).indices if found else de.flatten().topk(min(n, de.numel())).indices
    return [(int(i) // H, int(i) % H) for i in idx], found


def pair_clusters(n: int) -> Clusters:
    """The units of independence of ``n`` IOI prompts: one cluster per ABBA/BABA pair (the two
    prompts of a pair share names, place, object and template, :func:`selfrepair.ioi.ioi_prompts`)."""
    return Clusters(np.arange(int(n)) // 2, "prompt pairs")


def selection_prompts(n: int, seed: int) -> torch.Tensor:
    """The prompts of the selection half of the pairs (``pair_clusters(n).halves(seed)[0]``): where
    the name movers are chosen when the test is to be made on the other half."""
    clusters = pair_clusters(n)
    return torch.from_numpy(np.flatnonzero(clusters.rows_of(clusters.halves(seed)[0])))


def ioi_measure(model: Model, data: IoiPrompts, *, ablation: str = "mean", n_name_movers: int = 3,
                name_movers: tuple[tuple[int, int], ...] = (), batch_size: int = 16,
                progress: bool = True, select_seed: int | None = None) -> IoiResult:
    """The clean pass, the name movers' ablation and the residual-moving passes (module docstring).
    ``select_seed``: the selection rule reads only :func:`selection_prompts` (None: every prompt)."""
    spec = IoiSpec(ablation=ablation, n_name_movers=n_name_movers,
                   name_movers=tuple(head_label(*h) for h in name_movers), select_seed=select_seed)
    return measure_ioi(spec, model, data, RunOptions(batch_size=batch_size, progress=progress))


def measure_ioi(spec: "IoiSpec", model: Model, data: IoiPrompts, options: RunOptions) -> IoiResult:
    """``spec`` through the driver, two stages over the prompts (two requests per chunk of
    ``batch_size`` prompts on the remote path): the clean pass with its per-prompt reductions
    (:func:`clean_chunk`), then, once the name movers are chosen from every prompt's, the ablation
    and residual-moving passes (:func:`ablated_chunk`, which runs the chunk's clean pass again
    there; resample sources: :func:`resample_rows`). Only ``[b, layer, head]``-sized values and,
    for mean ablation, each chunk's ``z`` sum at the end come back. Locally the same code, plain
    calls."""
    from .config import parse_head

    check_ablation(spec.ablation)
    run = Driver(model, data, options, key=spec.key())
    n = len(data)
    per_item = {"io": data.io_token, "s": data.s_token,
                "at": torch.stack([data.io_pos, data.s1_pos, data.s2_pos], 1)}
    got = run.run(Stage("IOI clean", clean_chunk, collect(summed=("z_sum",)), args=(spec.ablation == "mean",),
                        per_item=per_item, unit="prompt"))
    out = _joined(model, got, CLEAN_KEYS)
    found, heads = True, [parse_head(h) for h in spec.name_movers]
    if not heads:
        sel = slice(None) if spec.select_seed is None else selection_prompts(n, spec.select_seed)
        heads, found = select_name_movers(out["head_de"][sel], out["attn_io"][sel],
                                          (out["attn_s1"] + out["attn_s2"])[sel], spec.n_name_movers)
    layers = sorted({l for l, _ in heads})
    mean = {j: (got["z_sum"][j] / n)[None].to(model.dtype) for j in layers} if spec.ablation == "mean" else None
    source = min(layers)
    ab = run.run(Stage(f"{spec.ablation} ablation, residual moving", ablated_chunk, collect(),
                       args=(heads, spec.ablation, mean, source),
                       sources=resample_sources(n) if spec.ablation == "resample" else False,
                       per_item={"io": data.io_token, "s": data.s_token}, unit="prompt"))
    return IoiResult(**out, **_joined(model, ab, ABLATED_KEYS), io_token=data.io_token.clone(),
                     name_movers=torch.tensor(heads, dtype=torch.long).reshape(-1, 2),
                     source_layer=torch.tensor(source),
                     meta=run.meta(ablation=spec.ablation, rule_found=found, pinned=bool(spec.name_movers),
                                   n_name_movers=spec.n_name_movers, select_seed=spec.select_seed))


CLEAN_KEYS = ("logit_diff", "head_de", "mlp_de", "attn_bias_de", "embed_de", "constant", "attn_io",
              "attn_s1", "attn_s2", "ml_token")
ABLATED_KEYS = ("ablated_head_de", "ablated_mlp_de", "delta_logit", "from_norm", "from_block_norms",
                "moved_de")


def resample_sources(n: int) -> torch.Tensor:
    """``[n, 1]``: each prompt's resample source, the prompt two on (another name pair, as prompts
    come in ABBA/BABA pairs)."""
    return ((torch.arange(n) + 2) % n)[:, None]


def resample_rows(data: IoiPrompts, idx: torch.Tensor) -> tuple:
    """Where the resample sources of prompts ``idx`` (each the prompt two on: another name pair)
    are: ``which [b]``, an index into ``idx`` followed by the sources outside the chunk, and those
    outside sources' prompts ``(tokens, end positions)`` (``None`` when every source is inside).
    A source inside the chunk is read off the chunk's own clean pass, the others need a pass of
    their own, so a chunk's request runs only the few rows past its end again
    (:func:`~selfrepair.batch.source_pool`, as Hydra's chunks do; the driver gives a chunk's request
    this pool as ``rows["pool"]``)."""
    pool = source_pool(data, idx, resample_sources(len(data))[idx])
    tok, pos = pool["rows"] if pool["rows"] is not None else (None, None)
    return pool["at"][:, 0], tok, pos


def _joined(model: Model, got: dict, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The per-prompt values ``keys`` of a stage (in prompt order), effects in the effect dtype."""
    return {k: got[k] if k == "ml_token" else got[k].to(model.effect_dtype) for k in keys}


def _clean(model: Model, tok: torch.Tensor, pos: torch.Tensor, io: torch.Tensor, s: torch.Tensor,
           **kw) -> tuple[CleanBatch, torch.Tensor]:
    """The clean pass of a chunk with the logit-difference readout, and the clean top token."""
    batch = clean_batch(model, tok, last_pos=pos, **kw)
    ml = batch.readout.targets
    batch.readout = diff_readout(model, batch.clean, pos, io, s)
    return batch, ml


def clean_chunk(model: Model, rows: dict, with_z_sum: bool) -> dict[str, torch.Tensor]:
    """One chunk's clean pass (the attention from the end watched in it) and its per-prompt
    reductions ``[b, ...]`` (on the CPU): every head's, MLP layer's, output bias's and the
    embeddings' DE on the logit difference, the constant terms, the logit difference, the top
    token, the attention from the end to ``rows["at"]`` (IO, S1, S2 positions ``[b, 3]``); with
    ``with_z_sum``, every layer's ``z`` at the end summed over the chunk ``[layer, n_heads*d_head]``
    (fp64: the mean ablation's numerator)."""
    tok, pos, io, s, at = rows["tokens"], rows["last_pos"], rows["io"], rows["s"], rows["at"].T
    batch, ml = _clean(model, tok, pos, io, s, watch=end_pattern(model, pos), watch_sites=("pattern",))
    ro, L = batch.readout, model.n_layers
    bias = [model.attn_out_bias(j) for j in range(L)]
    out = {"ml_token": ml.cpu(), "logit_diff": ro.logit.cpu(), "constant": ro.bias.cpu(),
           "head_de": clean_head_de(batch, pos).permute(2, 0, 1).cpu(),
           "mlp_de": clean_mlp_de(batch, pos).T.cpu(),
           "attn_bias_de": torch.stack([torch.zeros_like(ro.logit) if b is None else ro.write_dir(model, "attn", j) @ b
                                        for j, b in enumerate(bias)], 1).cpu(),
           "embed_de": (model.acc(at_positions(batch.clean.embed, pos)) * ro.dir).sum(-1).cpu()}
    pat = watched_pattern(model, batch.clean.watched)  # [L, b, H, key]
    for key, where in zip(("attn_io", "attn_s1", "attn_s2"), at.to(pat.device)):
        index = where[None, :, None, None].expand(L, -1, model.n_heads, 1)
        out[key] = pat.gather(-1, index)[..., 0].permute(1, 0, 2).cpu()
    if with_z_sum:
        out["z_sum"] = at_positions(batch.clean.reads["z"], pos).double().sum(1).cpu()
    return out


def ablated_chunk(model: Model, rows: dict, heads: list[tuple[int, int]], ablation: str,
                  mean: dict[int, torch.Tensor] | None, source: int) -> dict:
    """One chunk's clean pass again, ``heads`` ablated together at the end (:func:`ablate_heads_at`;
    ``mean[layer]`` the mean ablation's ``z``; resample: each prompt's source from ``rows["pool"]``,
    :func:`resample_rows`) and every layer from ``source`` on reading the residual that entered
    ``source`` (:func:`moved_residual_de`). Per prompt ``[b, ...]`` on the CPU: the ablated head and
    MLP DEs, eq. 1's terms, ``moved_de`` (NaN before ``source``)."""
    tok, pos, io, s = rows["tokens"], rows["last_pos"], rows["io"], rows["s"]
    batch, _ = _clean(model, tok, pos, io, s)
    L, H = model.n_layers, model.n_heads
    layers = sorted({l for l, _ in heads})
    if ablation == "mean":
        repl = {j: mean[j].to(model.device) for j in layers}
    elif ablation == "resample":
        src_tok, src_pos = rows["pool"]["rows"] or (None, None)
        repl = _resampled(batch, pos, layers, rows["pool"]["at"][:, 0], src_tok, src_pos)
    else:
        repl = {j: torch.zeros(1, H * model.d_head, dtype=model.dtype, device=model.device) for j in layers}
    got = ablate_heads_at(batch, pos, heads, repl)
    out = {"ablated_head_de": got.head_de.permute(2, 0, 1).cpu(), "ablated_mlp_de": got.mlp_de.T.cpu(),
           **{k: getattr(got, k).cpu() for k in ("delta_logit", "from_norm", "from_block_norms")}}
    moved = torch.full((len(pos), L, H), float("nan"), dtype=model.effect_dtype)
    for target in range(source, L):
        moved[:, target] = moved_residual_de(batch, pos, source, target).T.cpu()
    out["moved_de"] = moved
    return out


def _resampled(batch: CleanBatch, pos: torch.Tensor, layers: list[int], which: torch.Tensor,
               src_tok: torch.Tensor | None, src_pos: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Each ablated layer's resample replacement at the end ``[b, n_heads*d_head]``: the clean ``z``
    at the end of each row's source (:func:`resample_rows`), from the chunk's own clean pass or,
    for the sources past the chunk, from a pass of theirs up to the last ablated layer."""
    model = batch.model
    z = {j: at_positions(batch.clean.reads["z"][j], pos.to(model.device)) for j in layers}
    if src_tok is not None:
        more = run(model, src_tok.to(model.device), read=("z",), read_layers={"z": layers},
                   stop_after=("z", max(layers))).reads["z"]
        z = {j: torch.cat([z[j], at_positions(more[k], src_pos.to(model.device))]) for k, j in enumerate(layers)}
    return {j: z[j][which.to(model.device)] for j in layers}


@dataclass(frozen=True)
class IoiSpec(Spec):
    """Chapter 8: IOI's name movers, their mean ablation and the residual-moving passes."""

    kind = "ioi"
    result = IoiResult

    ablation: str = "mean"  # what replaces the name movers' outputs at the end
    n_name_movers: int = 3  # how many heads the selection rule takes
    name_movers: tuple[str, ...] = ()  # pinned heads (labels); empty: the selection rule
    select_seed: int | None = None  # the rule reads one seeded half of the prompt pairs (None: every prompt)

    def compute(self, model: Model, data: IoiPrompts, options: RunOptions) -> IoiResult:
        res = measure_ioi(self, model, data, options)
        res.meta.update(prompts=list(data.texts), names=list(data.names), dropped=list(data.dropped))
        return res


# -- frames ----------------------------------------------------------------------------------------
def head_frame(res: IoiResult) -> pd.DataFrame:
    """One row per head: mean clean DE on the logit difference, attention from the end to IO and to
    S (``attn_s``: both occurrences, ``attn_s1`` + ``attn_s2``),
    DE after the name movers' ablation and its change, DE reading the moved residual."""
    L, H = res.head_de.shape[1:]
    nm = res.nm_mask()
    mean = lambda t: t.double().mean(0).flatten().numpy()  # noqa: E731
    moved = res.moved_de.double().mean(0).flatten().numpy()
    df = pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)], "head": list(range(H)) * L})
    df.insert(2, "label", [head_label(l, h) for l, h in zip(df["layer"], df["head"])])
    df = df.assign(direct_effect=mean(res.head_de), attn_io=mean(res.attn_io),
                   attn_s=mean(res.attn_s1 + res.attn_s2), attn_s1=mean(res.attn_s1), attn_s2=mean(res.attn_s2),
                   ablated_direct_effect=mean(res.ablated_head_de),
                   moved_direct_effect=moved, name_mover=nm.flatten().numpy())
    df["delta_direct_effect"] = df["ablated_direct_effect"] - df["direct_effect"]
    df["moved_delta"] = df["moved_direct_effect"] - df["direct_effect"]
    return df


def repair_frame(res: IoiResult) -> pd.DataFrame:
    """One row per prompt: the name movers' clean DE and its change, Δ logit difference, eq. 1's
    self-repair and its parts (other heads, MLP layers, final norm, block norms)."""
    nm = res.nm_mask()
    dde = res.ablated_head_de - res.head_de
    nm_dde = dde[:, nm].sum(-1)
    return pd.DataFrame({
        "prompt": range(len(res.logit_diff)), "logit_diff": res.logit_diff.numpy(),
        "nm_direct_effect": res.head_de[:, nm].sum(-1).numpy(), "nm_delta_de": nm_dde.numpy(),
        "delta_logit": res.delta_logit.numpy(), "self_repair": (res.delta_logit - nm_dde).numpy(),
        "from_heads": dde[:, ~nm].sum(-1).numpy(),
        "from_mlps": (res.ablated_mlp_de - res.mlp_de).sum(-1).numpy(),
        "from_norm": res.from_norm.numpy(), "from_block_norms": res.from_block_norms.numpy()})


def moved_gain(res: IoiResult, heads: list[tuple[int, int]]):
    """Per prompt, the summed change of ``heads``' direct effects when their layers read the moved
    residual (``moved_de − head_de``); zeros for no heads. ``heads`` must be at or after the source
    layer (earlier ones have no moved value)."""
    out = torch.zeros(len(res.logit_diff), dtype=torch.float64)
    for l, h in heads:
        out += (res.moved_de[:, l, h] - res.head_de[:, l, h]).double()
    return out.numpy()


def backups(heads: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` heads (not name movers) whose mean DE grows most under the ablation (ΔDE > 0)."""
    up = heads[~heads["name_mover"] & (heads["delta_direct_effect"] > 0)]
    return up.sort_values(["delta_direct_effect", "layer", "head"], ascending=[False, True, True]).head(n)


__all__ = ["IoiResult", "IoiSpec", "ablated_chunk", "backups", "clean_chunk", "diff_readout", "head_frame",
           "ioi_measure", "measure_ioi", "moved_gain", "pair_clusters", "repair_frame", "select_name_movers",
           "selection_prompts"]
