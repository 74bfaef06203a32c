"""Chapter 8 — backup name movers in indirect object identification (Wang et al. 2023; the
self-repair paper's App. G).

Verdicts: the prompt pairs are the units of independence (:func:`selfrepair.name_movers.pair_clusters`);
the name movers (by the rule) and the backups are chosen on one seeded half of the pairs and every
claim after "does IOI" is tested on the other, with a cluster bootstrap over the pairs. The repair
is the share of the lost direct effect that comes back, placed among no / partial / full repair and
over-correction (:data:`REGIONS`).

On the generated IOI prompts (:mod:`selfrepair.ioi`): how well the model does the task (logit
difference IO − S at the end), which heads move the name (largest direct effect on the logit
difference among the heads attending from the end to IO more than to S), what happens when they
are mean-ablated at the end (eq. 1 on the logit difference; which heads' direct effects grow:
the backups) and what the backups do when they read the residual stream the name movers read
(App. G's residual moving). :mod:`selfrepair.name_movers` measures it all in one cached spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import ioi
from .. import name_movers as nm
from ..ablation import check_ablation
from ..claims import Claim, Rule, Verdict, paper_word, render
from ..config import RunConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model
from ..results import head_label
from ..tables import Layout
from ..uncertainty import Bootstrap, Clusters, Estimate, ratio
from ..verdict_records import recorded
from . import check, value_bias_note
from .ioi_text import FULL_TOL, REGIONS, findings, region, repair_outcome, shows  # noqa: F401 (the notebook's)

MOST_PROMPTS = ("Wang et al. measure the task by the logit difference IO − S at the end; a model does the task "
                "when it prefers IO to S, which we read as preferring it on most prompts (the table's 'most': "
                "more than half)")
DOES_IOI = Claim("does_ioi", "The model does IOI: at the end it prefers the indirect object to the subject on "
                 "most prompts", "Wang et al. 2023, §2",
                 "the share of prompts with logit(IO) − logit(S) > 0 at the end, over every prompt",
                 paper_word("most"), fmt=".0%", rationale=MOST_PROMPTS,
                 reading="On {value} of the {n} {unit} the model's logit of IO is above that of S.")
PARTLY = Rule("between", (0.0, 1 - FULL_TOL), "not fully restored",
              "the self-repair paper: 'self-repair is imperfect, as the original direct effect of the head is "
              "not fully restored', 'sometimes overcorrecting beyond the original effect' (abstract). The "
              "share of the direct effect lost that comes back tells four outcomes apart: below 0, no repair "
              "(the logit difference falls by more than the direct effect lost); from 0 to "
              f"{1 - FULL_TOL:.0%}, partial repair; within ±{FULL_TOL:.0%} of 100%, full repair (the remaining "
              "loss is approximately zero, the table's tolerance); above "
              f"{1 + FULL_TOL:.0%}, over-correction. The claim is partial repair")
REPAIRED = Claim("repaired", "Ablating the name movers is partly repaired: the logit difference falls, by less "
                 "than the direct effect they lose, which is not fully restored",
                 "Wang et al. 2023, §3.4; self-repair paper, App. G",
                 "the share of the name movers' lost direct effect that comes back, Σ self-repair (eq. 1) / "
                 "Σ (−ΔDE of the name movers) over the test half's prompts", PARTLY, fmt=".0%",
                 reading="Of the direct effect the name movers lose, {value} comes back ({n} {unit}).",
                 rationale="the name movers are chosen on the other half of the prompt pairs: chosen for a "
                           "large direct effect, they would lose more of it, by chance, on the prompts "
                           "that chose them")
SIGNIFICANT_GROWTH = ("Wang et al. call backup name movers heads that take over when the name movers are "
                      "knocked out; the paper gives no size, so the growth must be significant (the "
                      "table's reading: the whole 95% interval above 0)")
BACKUPS = Claim("backups", "Backup heads take over: their direct effect on the logit difference grows "
                "(significant growth) when the name movers are ablated", "Wang et al. 2023, §3.4 (backup name movers)",
                "the mean over the test half's prompts of the summed ΔDE of the backups, the heads (not name "
                "movers) whose mean direct effect grows most on the selection half",
                paper_word("significant"), fmt="+.3g", rationale=SIGNIFICANT_GROWTH,
                reading="On prompts they were not chosen on, the backups' direct effect on the logit "
                        "difference changes by {value} logits in sum ({n} {unit}).")
MOVED = Claim("moved", "Reading the residual stream the name movers read, the backups begin name moving "
              "(a significant gain)", "self-repair paper, App. G",
              "the mean over the test half's prompts of the later backups' summed change of direct effect "
              "(logits) when their layer reads the residual that entered the first name mover's layer "
              "(backups chosen on the selection half, in layers after it)", paper_word("significant"),
              fmt="+.3g", rationale="App. G: 'the backup heads begin performing name moving as well'; no size "
                                    "is given, so the gain must be significant",
              reading="On prompts they were not chosen on, the backups' direct effect on the logit difference "
                      "changes by {value} logits in sum ({n} {unit}).")
CLAIMS = (DOES_IOI, REPAIRED, BACKUPS, MOVED)
HEADS_TABLE = Layout(("label", "direct_effect", "attn_io", "attn_s", "ablated_direct_effect",
                      "delta_direct_effect", "moved_direct_effect"),
                     names={"direct_effect": "DE on logit diff", "attn_io": "attention to IO",
                            "attn_s": "attention to S", "ablated_direct_effect": "DE, name movers ablated",
                            "delta_direct_effect": "ΔDE", "moved_direct_effect": "DE, residual moved"})
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


def mean_of(t: np.ndarray) -> np.ndarray:
    """Per replicate, column 1 over column 0 of totals ``[R, 2]``: a mean over prompts when column 0
    counts them."""
    return ratio(t[:, 1], t[:, 0])


def share_back(t: np.ndarray) -> np.ndarray:
    """Per replicate, Σ self-repair / Σ direct effect lost (columns 0 and 1 of totals ``[R, 2]``)."""
    return ratio(t[:, 0], t[:, 1])


def pair_sums(ch: IoiChapter, *columns) -> np.ndarray:
    """Per-prompt ``columns`` of ``ch.repair`` (names, or arrays) summed per prompt pair ``[pair, k]``."""
    r = ch.repair
    values = [np.asarray(c, float) if not isinstance(c, str) else np.ones(len(r)) if c == "n" else r[c].to_numpy(float)
              for c in columns]
    return ch.split.clusters.sum_rows(np.stack(values, 1))


def estimates(ch: IoiChapter) -> dict[str, Estimate]:
    """Each claim's statistic with its 95% interval over resampled prompt pairs: "does IOI" over
    every pair, the others over the test half (with pinned name movers, the repair over every pair:
    nothing was chosen there)."""
    r, sp = ch.repair, ch.split
    every = Bootstrap.over(sp.clusters, ch.n_boot, ch.seed)
    test = Bootstrap(len(sp.test), ch.n_boot, ch.seed, sp.clusters.unit)
    rep_half, rep_boot = (slice(None), every) if sp.pinned else (sp.test, test)
    n_test = int(sp.prompts(sp.test).sum())
    unit = f"prompts of the test half ({len(sp.test)} of {sp.clusters.n} prompt pairs)"
    lost = -r["nm_delta_de"].to_numpy()
    return {
        "does_ioi": every.estimate(mean_of, pair_sums(ch, "n", r["logit_diff"] > 0), n=len(r), unit="prompts"),
        "repaired": rep_boot.estimate(share_back, pair_sums(ch, "self_repair", lost)[rep_half],
                                      n=len(r) if sp.pinned else n_test, unit="prompts" if sp.pinned else unit),
        "drop": rep_boot.estimate(share_back, pair_sums(ch, -r["delta_logit"], lost)[rep_half]),
        "backups": test.estimate(mean_of, pair_sums(ch, "n", "backup_gain")[sp.test], n=n_test, unit=unit),
        "from_heads": test.estimate(mean_of, pair_sums(ch, "n", "from_heads")[sp.test]),
        "moved": test.estimate(mean_of, pair_sums(ch, "n", "moved_gain")[sp.test], n=n_test, unit=unit),
    }


def verdicts(ch: IoiChapter) -> list[Verdict]:
    e, sp = estimates(ch), ch.split
    acc = ch.performance["accuracy"]
    does = Verdict.of(DOES_IOI, e["does_ioi"], f"Mean logit difference {ch.performance['mean_logit_diff']:.3g} "
                      f"(median {ch.performance['median_logit_diff']:.3g}); IO is the top token on "
                      f"{ch.meta['top_is_io']:.0%}.")
    fails = "" if does.holds else (f"the model is not shown to do IOI on these prompts (IO above S on "
                                   f"{acc:.0%}), so there is no name moving to repair")
    source = ch.meta["source_layer"]
    later = [(l, h) for l, h in sp.backups if l > source]
    labels = lambda heads: ", ".join(head_label(l, h) for l, h in heads)  # noqa: E731
    rep = e["repaired"]
    outcome = (f"Outcome: **{repair_outcome(rep.lo, rep.hi)}** (the whole 95% interval). " if rep.reliable else "")
    chosen = ("The name movers are pinned; " if sp.pinned else
              f"The name movers and backups were chosen on the other {len(sp.select)} pairs; ")
    return [
        does,
        Verdict.of(REPAIRED, rep, outcome + f"The logit difference falls by {e['drop'].prose('.0%')} of the direct "
                   f"effect lost. {chosen}the name movers' lost direct effect is summed over the same prompts.",
                   why=fails),
        Verdict.of(BACKUPS, e["backups"], (f"Backups: {labels(sp.backups)}. " if sp.backups else
                   "No other head's direct effect grows on the selection half. ")
                   + f"Every other head together changes by {e['from_heads'].prose('+.3g')} logits (eq. 2's "
                   "other heads).", why=fails or ("" if sp.backups else "no backup was found on the selection half")),
        Verdict.of(MOVED, e["moved"], f"Backups in later layers: {labels(later)}." if later else "",
                   why=fails or ("" if later else f"no backup is in a layer after the first name mover's "
                                                  f"(layer {source}): nothing is skipped")),
    ]


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
            f"logit difference is **{f['mean_logit_diff']:.3g}** (median {f['median_logit_diff']:.3g}), and "
            f"IO is the top token on {ch.meta['top_is_io']:.0%}. Every claim below is about these prompts "
            "on this model.")


def selection_markdown(ch: IoiChapter) -> str:
    """Which heads were taken as name movers and why."""
    m = ch.meta
    names = ", ".join(f"{r.label} (DE {r.direct_effect:.3g}, attention to IO {r.attn_io:.2f}, to S "
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
    out = (", ".join(f"{r.label} (DE {r.direct_effect:.3g}, attention to IO {r.attn_io:.2f}, to S {r.attn_s:.2f})"
                     for r in left.head(5).itertuples()))
    aside = (f" Heads with a larger direct effect that the rule leaves out, attending to S at least as much as "
             f"to IO: {out}." if len(left) else "")
    return f"Name movers ({rule}): {names}.{aside} The residual is moved from layer {m['source_layer']}."


def repair_table(ch: IoiChapter) -> pd.DataFrame:
    """Eq. 1 and 2 on the logit difference, means over prompts."""
    r = ch.repair
    lost = -r["nm_delta_de"].mean()
    rows = [("name movers' direct effect lost, −ΔDE", lost),
            ("drop of the logit difference, −Δ", -r["delta_logit"].mean()),
            ("self-repair (eq. 1)", r["self_repair"].mean()),
            ("… other heads (from_heads)", r["from_heads"].mean()),
            ("… MLP layers (from_mlps)", r["from_mlps"].mean()),
            ("… final norm (from_norm)", r["from_norm"].mean())]
    if ch.meta.get("sandwich"):  # only models with norms on the blocks' writes have this term
        rows.append(("… block norms (from_block_norms)", r["from_block_norms"].mean()))
    return pd.DataFrame({"quantity": [q for q, _ in rows], "mean": [v for _, v in rows],
                         "share of the DE lost": [v / lost if lost and math.isfinite(lost) else math.nan
                                                  for _, v in rows]})


def on_this_model(ch: IoiChapter) -> str:
    """The "On this model" paragraph, claims with verdicts."""
    r = ch.repair
    intro = (f"**On {ch.meta.get('model')}** ({ch.prompts['n']:,} prompts, {ch.meta.get('ablation')} ablation "
             f"of {len(ch.name_movers)} name movers at the end): the logit difference changes by "
             f"{r['delta_logit'].mean():+.3g} where the name movers' direct effect changes by "
             f"{r['nm_delta_de'].mean():+.3g}.")
    return render(ch.verdicts, intro, rules="ch08-rules")


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes each head's direct effect on the logit difference, hence which heads the rule"
    " picks as name movers and backups, and every zero-ablation number; the changes under "
    "mean ablation are the same either way (Wang et al. also used TransformerLens).")


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
                     "every later block norm's, is the `from_block_norms` row of the table, not part of "
                     "any head's ΔDE.")
    lines.append(value_bias_note(cfg, VALUE_BIAS))
    return "\n".join(lines)
