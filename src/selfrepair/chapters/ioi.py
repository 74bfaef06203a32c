"""Chapter 8 — backup name movers in indirect object identification (Wang et al. 2023; the
self-repair paper's App. G).

Verdicts (:mod:`selfrepair.chapters.ioi_claims`): the prompt pairs are the units of independence
(:func:`selfrepair.name_movers.pair_clusters`); the name movers (by the rule) and the backups are
chosen on one seeded half of the pairs and every claim after "does IOI" is tested on the other, with
a cluster bootstrap over the pairs. The repair is the share of the lost direct effect that comes
back, placed among no / partial / full repair and over-correction (:data:`REGIONS`).

On the generated IOI prompts (:mod:`selfrepair.ioi`): how well the model does the task (logit
difference IO − S at the end), which heads move the name (largest direct effect on the logit
difference among the heads attending from the end to IO more than to S), what happens when they
are mean-ablated at the end (eq. 1 on the logit difference; which heads' direct effects grow:
the backups) and what the backups do when they read the residual stream the name movers read
(App. G's residual moving). :mod:`selfrepair.name_movers` measures it all in one cached spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from .. import ioi
from .. import name_movers as nm
from ..ablation import check_ablation
from ..claims import render, render_claim
from ..config import RunConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model
from ..tables import Layout
from ..uncertainty import Clusters
from ..verdict_records import recorded
from ..rules import number
from .signed import changes
from . import check, value_bias_note
from .ioi_claims import (BACKUPS, CLAIMS, DOES_IOI, MOST_PROMPTS, MOVED, PARTLY, REPAIRED,  # noqa: F401 (re-exported)
                         SIGNIFICANT_GROWTH, estimates, mean_of, pair_sums, share_back, verdicts)
from .ioi_text import FIGURES, FULL_TOL, REGIONS, findings, region, repair_outcome, shows  # noqa: F401 (the notebook's)

HEADS_TABLE = Layout(("label", "direct_effect", "delta_direct_effect", "moved_direct_effect"),
                     names={"direct_effect": "DE", "delta_direct_effect": "ΔDE ablated",
                            "moved_direct_effect": "DE moved", "attn_io": "attention to IO",
                            "attn_s": "attention to S", "attn_s1": "attention to S, first",
                            "attn_s2": "attention to S, second"},
                     caption="Logits, means over prompts. DE: direct effect on the logit difference, clean "
                             "run; ΔDE ablated: its change with the name movers ablated; DE moved: with the "
                             "residual moved (below). Attention to IO and S: in the fold under the table.")
# the backups' table has the name movers' columns: their caption is printed once, above the first
BACKUPS_TABLE = replace(HEADS_TABLE, caption="The backups, in the columns of the name movers' table above "
                                             "(logits, means over prompts).")
# columns the tables' shown ones already say (DE + ΔDE, DE moved − DE) or that every row of one
# table shares (name mover: yes / no): the fold holds only what is not shown (issue 25, read3 #18)
DERIVED = ("ablated_direct_effect", "moved_delta", "name_mover")


def heads_table(frame: pd.DataFrame, layout: Layout = HEADS_TABLE):
    """The name movers' (or, with :data:`BACKUPS_TABLE`, the backups') table: ``layout`` on the
    frame less :data:`DERIVED`, so its fold holds the attention columns only."""
    return layout(frame.drop(columns=list(DERIVED), errors="ignore"))


REPAIR_TABLE = Layout(("quantity", "mean", "share of the DE lost"), percent=("share of the DE lost",))


@dataclass(frozen=True)
class Config(RunConfig):
    n_prompts: int = 96  # generated prompts (even: each name pair in ABBA and BABA order)
    names: tuple[str, ...] = ()  # names to fill the templates with; empty: Wang et al.'s (selfrepair.ioi.NAMES)
    ablation: str = "mean"  # what replaces the name movers' outputs at the end: "mean" (Wang et al.), "resample" or "zero"
    n_name_movers: int = 3  # how many heads the selection rule takes as name movers
    name_movers: tuple[str, ...] = ()  # pin the name movers (labels like L9H9); empty: the selection rule
    n_backups: int = 3  # how many heads with the largest DE increase are shown as backups
    batch_size: int = 16  # prompts per forward pass (speed only)
    cache_dir: str = "results"  # where computed results are cached
    fold_value_biases: bool = False  # TransformerLens's convention (the paper's code and Wang et al.'s): each b_V·W_O in the layer's bias, not the head's output
    n_boot: int = 1000  # cluster-bootstrap replicates of every interval (prompt pairs resampled)

    HEAD_FIELDS = ("name_movers",)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_prompts < 4 or self.n_prompts % 2:
            raise InputError(f"n_prompts must be an even number >= 4 (each name pair in both orders), "
                             f"got {self.n_prompts}")
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")
        for name, value in (("n_name_movers", self.n_name_movers), ("n_backups", self.n_backups),
                            ("batch_size", self.batch_size)):
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")


def prompts(cfg: Config, model) -> ioi.IoiPrompts:
    """The chapter's prompt set for ``model``'s tokenizer: ``cfg.names``, or Wang et al.'s names
    (:data:`selfrepair.ioi.NAMES`) — and if the tokenizer keeps fewer than two of those whole (a
    byte-level tokenizer keeps none), the one-letter :data:`~selfrepair.ioi.LETTER_NAMES`. Given
    names of which fewer than two are single tokens: one clear error."""
    if model.tokenizer is None:
        raise InputError(f"{model.name} has no tokenizer: the IOI prompts cannot be tokenized")
    names = list(cfg.names) or list(ioi.NAMES)
    if not cfg.names and len(ioi.usable_names(model.tokenizer, names)[0]) < 2:
        names = list(ioi.LETTER_NAMES)  # e.g. a byte-level tokenizer: performance_markdown says so
    data = ioi.ioi_prompts(model.tokenizer, cfg.n_prompts, seed=cfg.seed, names=names)
    if int(data.input_ids.max()) >= model.d_vocab or int(data.end_pos.max()) >= model.n_ctx:
        raise InputError(f"the IOI prompts do not fit {model.name}: token ids beyond its "
                         f"{model.d_vocab} embeddings or prompts longer than its context")
    return data


def check_model(cfg: Config, model) -> None:
    """The prompts build with this tokenizer, and there are heads enough for ``n_name_movers``."""
    prompts(cfg, model)
    n = model.n_layers * model.n_heads
    if cfg.n_name_movers >= n:
        raise InputError(f"n_name_movers={cfg.n_name_movers} leaves no other head of {model.name}'s {n}")


@dataclass
class IoiChapter:
    """Everything chapter 8 shows."""

    performance: dict  # accuracy, mean and median logit difference
    heads: pd.DataFrame  # per head (name_movers.head_frame)
    name_movers: pd.DataFrame  # rows of `heads`
    backups: pd.DataFrame  # rows of `heads`
    repair: pd.DataFrame  # per prompt (name_movers.repair_frame; moved_gain: the later backups, name_movers.moved_gain)
    moving: pd.DataFrame  # long: backups (and name movers) under clean / ablated / moved
    prompts: dict  # counts, names kept and dropped, an example
    verdicts: list
    meta: dict
    split: Split | None = None  # prompt pairs, the halves, the backups chosen on the selection half
    result: nm.IoiResult | None = None  # the measurement
    n_boot: int = 1000  # bootstrap replicates
    seed: int = 0  # of the replicates and the halves


def spec(cfg: Config) -> nm.IoiSpec:
    """The measurement: the selection rule (unless the name movers are pinned) reads the selection
    half of the prompt pairs (``seed``), the verdicts the other half."""
    return nm.IoiSpec(ablation=cfg.ablation, n_name_movers=cfg.n_name_movers, name_movers=tuple(cfg.name_movers),
                      select_seed=None if cfg.name_movers else cfg.seed)


def backups_on(res: nm.IoiResult, prompts: np.ndarray, n: int) -> list[tuple[int, int]]:
    """The ``n`` heads (not name movers) whose mean direct effect grows most under the ablation
    (mean ΔDE > 0) over the ``prompts`` (a boolean mask), ties to the lower layer, then head —
    :func:`selfrepair.name_movers.backups` on a subset of the prompts."""
    d = (res.ablated_head_de - res.head_de)[torch.from_numpy(np.asarray(prompts, bool))].double().mean(0)
    nm_mask = res.nm_mask()
    L, H = d.shape
    cand = [(-float(d[l, h]), l, h) for l in range(L) for h in range(H) if not nm_mask[l, h] and d[l, h] > 0]
    return [(l, h) for _, l, h in sorted(cand)[:n]]


@dataclass
class Split:
    """The prompt pairs (the units of independence), the seeded halves and what the selection half
    chose: every verdict after "does IOI" reads the test half."""

    clusters: Clusters
    select: np.ndarray  # cluster indices
    test: np.ndarray
    backups: list  # (layer, head) chosen on the selection half
    pinned: bool  # the name movers were pinned (not chosen on the selection half)

    def prompts(self, half: np.ndarray) -> np.ndarray:
        return self.clusters.rows_of(half)


def moving_frame(heads: pd.DataFrame, shown: pd.DataFrame, source: int) -> pd.DataFrame:
    """Long frame of ``shown`` heads' DE in three runs: clean, name movers ablated, residual moved."""
    runs = {"clean": "direct_effect", "name movers ablated": "ablated_direct_effect",
            "residual moved": "moved_direct_effect"}
    rows = []
    for _, r in shown.iterrows():
        role = "name mover" if r["name_mover"] else "backup"
        for run, col in runs.items():
            rows.append({"layer": r["layer"], "head": r["head"], "label": r["label"], "role": role,
                         "run": run, "direct_effect": r[col], "later": r["layer"] > source})
    return pd.DataFrame(rows)


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
def measure(cfg: Config, progress: bool = True) -> IoiChapter:
    check(cfg)
    model = open_model(cfg)
    data = prompts(cfg, model)
    res = cached(cfg, spec(cfg), data, progress=progress, batch_size=cfg.batch_size)
    heads = nm.head_frame(res)
    movers = heads[heads["name_mover"]].sort_values("direct_effect", ascending=False)
    clusters = nm.pair_clusters(len(data))
    select, test = clusters.halves(cfg.seed)
    split = Split(clusters, select, test, [], bool(cfg.name_movers))
    split.backups = backups_on(res, split.prompts(select), cfg.n_backups)
    ups = heads.set_index(["layer", "head"]).loc[split.backups].reset_index()[heads.columns] if split.backups \
        else heads.iloc[:0]
    source = int(res.source_layer)
    repair = nm.repair_frame(res)
    later = [(l, h) for l, h in split.backups if l > source]
    repair["backup_gain"] = sum(((res.ablated_head_de - res.head_de)[:, l, h].double().numpy()
                                 for l, h in split.backups), np.zeros(len(data)))
    repair["moved_gain"] = nm.moved_gain(res, later)  # the backups after the source layer
    stand_in = not cfg.names and set(data.names) <= set(ioi.LETTER_NAMES)  # NAMES has no one-letter name
    info = {"n": len(data), "names": list(data.names), "dropped": list(data.dropped), "stand_in": stand_in,
            "n_templates": len(ioi.TEMPLATES), "example": data.texts[0],
            "io": model.tokenizer.decode([int(data.io_token[0])]),
            "s": model.tokenizer.decode([int(data.s_token[0])])}
    ch = IoiChapter(performance=ioi.summary(res.logit_diff), heads=heads, name_movers=movers, backups=ups,
                    repair=repair, moving=moving_frame(heads, pd.concat([movers, ups]), source),
                    prompts=info, verdicts=[], meta={**res.meta, "source_layer": source, "sandwich": model.sandwich,
                                                     "top_is_io": float((res.ml_token == res.io_token).double().mean())},
                    split=split, n_boot=cfg.n_boot, seed=cfg.seed, result=res)
    ch.verdicts = verdicts(ch)
    return ch




def performance_markdown(ch: IoiChapter) -> str:
    """How many prompts survived and how well the model does IOI on them."""
    p, f = ch.prompts, ch.performance
    dropped = (f"{len(p['dropped'])} names are not one token for this tokenizer and were dropped "
               f"({', '.join(p['dropped'][:10])}{' …' if len(p['dropped']) > 10 else ''})"
               if p["dropped"] else "every name is one token for this tokenizer")
    if p.get("stand_in"):
        dropped = (f"this tokenizer keeps fewer than two of Wang et al.'s {len(ioi.NAMES)} names whole, so "
                   f"the one-letter names {', '.join(p['names'])} stand in")
    return (f"**Prompts.** {p['n']:,} prompts from {p['n_templates']} templates and {len(p['names'])} names "
            f"({dropped}); e.g. “{p['example']}” → “{p['io']}” (S: “{p['s']}”). "
            f"**On {ch.meta.get('model')}**, IO is above S on **{f['accuracy']:.0%}** of them; the mean "
            f"logit difference is **{number(f['mean_logit_diff'], '.3g')}** (median {number(f['median_logit_diff'], '.3g')}), and "
            f"IO is the top token on {ch.meta['top_is_io']:.0%}. Every claim below is about these prompts "
            "on this model.")


def selection_markdown(ch: IoiChapter) -> str:
    """Which heads were taken as name movers and why."""
    m = ch.meta
    names = ", ".join(f"{r.label} (DE {number(r.direct_effect, '.3g')}, attention to IO {r.attn_io:.2f}, to S "
                      f"{r.attn_s:.2f})" for r in ch.name_movers.itertuples())
    if m.get("pinned"):
        rule = "pinned by the parameters"
    elif m.get("rule_found"):
        rule = ("the heads with the largest mean direct effect on the logit difference among those "
                "attending from the end more to IO than to S, both its occurrences together, on the "
                f"selection half of the prompt pairs ({len(ch.split.select)} of {ch.split.clusters.n}; the "
                "numbers here are means over every prompt)")
    else:
        rule = ("**no head** has a positive direct effect and attends more to IO than to S, so the rule "
                "finds no name mover; the heads with the largest direct effect stand in")
    h = ch.heads
    floor = ch.name_movers["direct_effect"].min() if len(ch.name_movers) else float("inf")
    left = h[~h["name_mover"] & (h["direct_effect"] > floor)].sort_values("direct_effect", ascending=False)
    out = (", ".join(f"{r.label} (DE {number(r.direct_effect, '.3g')}, attention to IO {r.attn_io:.2f}, to S {r.attn_s:.2f})"
                     for r in left.head(5).itertuples()))
    aside = (f" Heads with a larger direct effect that the rule leaves out, attending to S at least as much as "
             f"to IO: {out}." if len(left) else "")
    return f"Name movers ({rule}): {names}.{aside} The residual is moved from layer {m['source_layer']}."


def repair_table(ch: IoiChapter) -> pd.DataFrame:
    """Eq. 1 and 2 on the logit difference, means over prompts."""
    r = ch.repair
    lost, drop = -r["nm_delta_de"].mean(), -r["delta_logit"].mean()
    rows = [("name movers' direct effect lost, −ΔDE", lost),
            # labelled from the sign, so its values are never a negative drop
            ("rise of the logit difference, +Δ", -drop) if drop < 0 else ("drop of the logit difference, −Δ", drop),
            ("self-repair (eq. 1)", r["self_repair"].mean()),
            ("… other heads", r["from_heads"].mean()),
            ("… MLP layers", r["from_mlps"].mean()),
            ("… final norm", r["from_norm"].mean())]
    if ch.meta.get("sandwich"):  # only models with norms on the blocks' writes have this term
        rows.append(("… block norms", r["from_block_norms"].mean()))
    return pd.DataFrame({"quantity": [q for q, _ in rows], "mean": [v for _, v in rows],
                         "share of the DE lost": [v / lost if lost and math.isfinite(lost) else math.nan
                                                  for _, v in rows]})


def on_this_model(ch: IoiChapter) -> str:
    """The "On this model" paragraph, claims with verdicts."""
    r = ch.repair
    intro = (f"**On {ch.meta.get('model')}** ({ch.prompts['n']:,} prompts, {ch.meta.get('ablation')} ablation "
             f"of {len(ch.name_movers)} name movers at the end): the logit difference "
             f"{changes(r['delta_logit'].mean(), '.3g', unit=' logits')} where the name movers' direct effect "
             f"{changes(r['nm_delta_de'].mean(), '.3g', unit=' logits')}.")
    return render(ch.verdicts, intro, rules="ch08-rules", below=FIGURES)


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes each head's direct effect on the logit difference, hence which heads the rule"
    " picks as name movers and backups, and every zero-ablation number; the changes under "
    "mean ablation are the same either way (Wang et al. also used TransformerLens).")


def verdict(ch: IoiChapter, key: str) -> str:
    """Claim ``key``'s full verdict, which the notebook shows right after the figure
    :data:`FIGURES` names for it (the overview of :func:`on_this_model` links down to it)."""
    return render_claim(ch.verdicts, key, rules="ch08-rules")


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter's numbers."""
    from ..structure import architecture

    a = architecture(open_model(cfg))
    lines = ["- **Parallel-residual blocks.** A layer's MLP reads the same residual as its attention, "
             "so an ablated name mover's own-layer MLP is not downstream of it; the residual-moving "
             "pass skips attention and MLP of every layer in between alike." if a["parallel"] else
             "- **Sequential blocks.** A name mover's own-layer MLP reads its output, so it is "
             "downstream and its reaction is part of eq. 2's MLP term."]
    if a["sandwich"]:
        lines.append("- **Norms on each block's write.** The post-attention norm of the name movers' layer "
                     "rescales its other heads' writes when the name movers are ablated; that reaction, and "
                     "every later block norm's, is the block norms' row of the table, not part of "
                     "any head's ΔDE.")
    lines.append(value_bias_note(cfg, VALUE_BIAS))
    return "\n".join(lines)
