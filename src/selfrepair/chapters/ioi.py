"""Chapter 8 — backup name movers in indirect object identification (Wang et al. 2023; the
self-repair paper's App. G).

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

import pandas as pd

from .. import ioi
from .. import name_movers as nm
from ..ablation import check_ablation
from ..claims import Claim, Verdict, above, render
from ..config import RunConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model
from ..tables import Layout
from . import check

DOES_IOI = Claim("does_ioi", "The model does IOI: at the end it prefers the indirect object to the subject",
                 "Wang et al. 2023, §2", "the share of prompts with logit(IO) − logit(S) > 0 at the end",
                 above(0.5), fmt=".0%",
                 reading="On {value} of the {n} {unit} the model's logit of IO is above that of S.")
REPAIRED = Claim("repaired", "Ablating the name movers is partly repaired: the logit difference falls by "
                 "less than the direct effect they lose", "Wang et al. 2023, §3.4; self-repair paper, "
                 "App. G", "the mean over prompts of eq. 1's self-repair, Δ logit diff − ΔDE of the "
                 "name movers (logits)", above(0.0), fmt=".3g",
                 reading="Over the {n} {unit}, eq. 1's self-repair of the logit difference averages "
                         "{value} logits (positive: it falls by less than the direct effect lost).")
BACKUPS = Claim("backups", "Other heads take over: their direct effect on the logit difference grows when "
                "the name movers are ablated", "Wang et al. 2023, §3.4 (backup name movers)",
                "the mean over prompts of the summed ΔDE of every other head (eq. 2's from_heads, "
                "logits)", above(0.0), fmt=".3g",
                reading="Over the {n} {unit}, the other heads' direct effect on the logit difference "
                        "changes by {value} logits in sum.")
MOVED = Claim("moved", "Reading the residual stream the name movers read, the backups begin name moving",
              "self-repair paper, App. G", "the mean over prompts of the backups' summed change of "
              "direct effect (logits) when their layer reads the residual that entered the first name "
              "mover's layer (backups in later layers only)", above(0.0), fmt=".3g",
              reading="Over the {n} {unit}, the backups' direct effect on the logit difference changes "
                      "by {value} logits in sum.")
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

    HEAD_FIELDS = ("name_movers",)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.n_prompts < 4 or self.n_prompts % 2:
            raise InputError(f"n_prompts must be an even number >= 4 (each name pair in both orders), "
                             f"got {self.n_prompts}")
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


def spec(cfg: Config) -> nm.IoiSpec:
    return nm.IoiSpec(ablation=cfg.ablation, n_name_movers=cfg.n_name_movers, name_movers=tuple(cfg.name_movers))


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


def measure(cfg: Config, progress: bool = True) -> IoiChapter:
    check(cfg)
    model = open_model(cfg)
    data = prompts(cfg, model)
    res = cached(cfg, spec(cfg), data, progress=progress, batch_size=cfg.batch_size)
    heads = nm.head_frame(res)
    movers = heads[heads["name_mover"]].sort_values("direct_effect", ascending=False)
    ups = nm.backups(heads, cfg.n_backups)
    source = int(res.source_layer)
    repair = nm.repair_frame(res)
    later = [(int(b.layer), int(b.head)) for b in ups.itertuples() if b.layer > source]
    repair["moved_gain"] = nm.moved_gain(res, later)  # the backups after the source layer
    stand_in = not cfg.names and set(data.names) <= set(ioi.LETTER_NAMES)  # NAMES has no one-letter name
    info = {"n": len(data), "names": list(data.names), "dropped": list(data.dropped), "stand_in": stand_in,
            "n_templates": len(ioi.TEMPLATES), "example": data.texts[0],
            "io": model.tokenizer.decode([int(data.io_token[0])]),
            "s": model.tokenizer.decode([int(data.s_token[0])])}
    ch = IoiChapter(performance=ioi.summary(res.logit_diff), heads=heads, name_movers=movers, backups=ups,
                    repair=repair, moving=moving_frame(heads, pd.concat([movers, ups]), source),
                    prompts=info, verdicts=[], meta={**res.meta, "source_layer": source, "sandwich": model.sandwich,
                                                     "top_is_io": float((res.ml_token == res.io_token).double().mean())})
    ch.verdicts = verdicts(ch)
    return ch


def verdicts(ch: IoiChapter) -> list[Verdict]:
    r = ch.repair
    acc = ch.performance["accuracy"]
    does = Verdict.share(DOES_IOI, r["logit_diff"] > 0, "prompts",
                         f"Mean logit difference {ch.performance['mean_logit_diff']:.3g} "
                         f"(median {ch.performance['median_logit_diff']:.3g}); IO is the top token on "
                         f"{ch.meta['top_is_io']:.0%}.")
    fails = "" if does.holds else (f"the model is not shown to do IOI on these prompts (IO above S on "
                                   f"{acc:.0%}), so there is no name moving to repair")
    source = ch.meta["source_layer"]
    later = ch.backups[ch.backups["layer"] > source]
    lost = -r["nm_delta_de"].mean()
    return [
        does,
        Verdict.mean(REPAIRED, r["self_repair"], "prompts",
                     f"The name movers lose {lost:.3g} logits of direct effect on average; the logit "
                     f"difference changes by {r['delta_logit'].mean():+.3g}.", why=fails),
        Verdict.mean(BACKUPS, r["from_heads"], "prompts",
                     "Backups: " + ", ".join(f"{b.label} ({b.delta_direct_effect:+.3g})"
                                              for b in ch.backups.itertuples()) + "." if len(ch.backups)
                     else "No other head's direct effect grows.", why=fails),
        Verdict.mean(MOVED, r["moved_gain"] if len(later) else [], "prompts",
                     "Backups in later layers, mean DE clean → residual moved: " + "; ".join(
                         f"{b.label} {b.direct_effect:.3g} → {b.moved_direct_effect:.3g}" for b in later.itertuples())
                     + "." if len(later) else "",
                     why=fails or ("" if len(later) else f"no backup is in a layer after the first name "
                                                         f"mover's (layer {source}): nothing is skipped")),
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
                "attending from the end more to IO than to S, both its occurrences together")
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
    return render(ch.verdicts, intro)


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
    return "\n".join(lines)
