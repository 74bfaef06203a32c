"""Chapter 7 — attribution patching against the exact ablation (Kramár et al. 2024, AtP; beside
the self-repair paper's eq. 1 and 2).

For every head, AtP's first-order estimate of its whole-set mean Δlogit (one clean forward and
one backward per batch, :mod:`selfrepair.atp`) next to the exact value from the cached all-heads
sweep of chapter 1 (the same tokens, the same resample sources: the config repeats chapter 1's
corpus parameters, so the sweep is not recomputed). Where they disagree, eq. 2 says why: the gap
is exactly the self-repair AtP does not see, split into the final norm's part and the downstream
heads', MLPs' and block norms' part.

Rank agreement: Spearman's correlation of the heads' ``|Δlogit|`` under AtP and exactly, and the
overlap of the two top-``k`` sets (``k = min(top_heads, half the heads)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .. import atp as at
from ..ablation import check_ablation
from ..claims import Claim, Verdict, at_least, at_most, render
from ..config import CorpusConfig
from ..errors import InputError
from ..experiment import head_sweep, measure as cached, open_model, open_tokens
from ..tables import Layout
from . import check

RANKS = Claim("ranks", "AtP ranks components like the exact ablation it approximates",
              "Kramár et al. 2024", "Spearman's correlation over every head of |Δlogit| by AtP "
              "and by the exact ablation (whole-set means)", at_least(0.8), fmt=".2f",
              reading="Over the {n} {unit} the two rankings by |Δlogit| correlate at {value}.")
TOP = Claim("top", "AtP, used as a prefilter, finds the components that matter most", "Kramár et al. 2024",
            "the share of the exact top-k heads by |Δlogit| that are also in AtP's top k",
            at_least(0.5), fmt=".0%",
            reading="{value} of the exact top {n} {unit} are also in AtP's top {n}.")
BLIND = Claim("blind", "Self-repair is what a linear estimate cannot see", "this book (eq. 1, 2)",
              "the share of the heads' self-repair that AtP's estimate of it (AtP − ΔDE) explains, "
              "1 − Σ(self-repair − AtP's self-repair)² / Σ self-repair² over the heads (1: all of it; "
              "0: no better than assuming no self-repair; negative: worse)", at_most(0.5), fmt=".2f",
              reading="Against the exact self-repair of the {n} {unit}, AtP's estimate of it has "
                      "R² = {value} (1: AtP sees all of it; 0 or below: none).")
CLAIMS = (RANKS, TOP, BLIND)


@dataclass(frozen=True)
class Config(CorpusConfig):
    ablation: str = "resample"  # what replaces a head's output, as in chapter 1's sweep
    top_heads: int = 10  # k of the top-k heads by |Δlogit| compared (at most half the heads)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.top_heads < 1:
            raise InputError(f"top_heads must be at least 1, got {self.top_heads}")


@dataclass
class AtpChapter:
    """Everything chapter 7 shows."""

    heads: pd.DataFrame  # per head: exact, AtP, error and its decomposition (whole-set means)
    layers: pd.DataFrame  # per layer: mean |exact|, |error|, signed error and its parts
    ranks: dict  # Spearman, k, overlap and the two top-k sets
    cost: pd.DataFrame  # wall time of the sweep and of AtP, and their ratio
    verdicts: list
    meta: dict


COST_TABLE = Layout(("measurement", "passes per batch", "wall time (s)", "sweep / AtP"))
LAYERS_TABLE = Layout(("layer", "n_heads", "abs_exact", "abs_error", "error_norm", "error_downstream"),
                      names={"abs_exact": "mean |exact Δlogit|", "abs_error": "mean |exact − AtP|",
                             "error_norm": "final norm's part", "error_downstream": "downstream part"})


def cost_table(sweep_meta: dict, atp: at.Atp, n_layers: int) -> pd.DataFrame:
    """The two measurements' recorded wall times (the results cache stamps each with its own; a
    cached result keeps the time of the run that computed it) and their ratio."""
    sweep_s = (sweep_meta.get("run") or {}).get("wall_time_s")
    atp_s = atp.seconds_atp
    rows = [
        {"measurement": "exact: all-heads sweep",
         "passes per batch": f"1 clean + {n_layers} ablated (one per layer, its heads stacked)",
         "wall time (s)": sweep_s},
        {"measurement": "AtP",
         "passes per batch": "1 forward of the sources + 1 clean forward and backward",
         "wall time (s)": atp_s},
    ]
    out = pd.DataFrame(rows)
    ratio = sweep_s / atp_s if sweep_s and atp_s else float("nan")
    return out.assign(**{"sweep / AtP": [ratio, float("nan")]})


def measure(cfg: Config, progress: bool = True) -> AtpChapter:
    """Chapter 7 from the (cached) sweep of chapter 1 and the (cached) AtP of the same tokens."""
    check(cfg)
    model = open_model(cfg)
    sweep = head_sweep(cfg, cfg.ablation, progress=progress)
    atp = cached(cfg, at.AtpSpec(ablation=cfg.ablation), open_tokens(cfg, model, progress=progress),
                 progress=progress)
    heads = at.compare(sweep.per_head(), atp)
    k = min(cfg.top_heads, max(1, len(heads) // 2))
    ranks = at.rank_agreement(heads, k)
    ch = AtpChapter(heads=heads, layers=at.layer_errors(heads), ranks=ranks,
                    cost=cost_table(sweep.meta, atp, model.n_layers), verdicts=[],
                    meta={**sweep.meta, "atp_wall_time_s": atp.seconds_atp})
    ch.verdicts = verdicts(ch)
    return ch


def explained_share(heads: pd.DataFrame) -> float:
    """``1 − Σ(self_repair − atp_self_repair)² / Σ self_repair²`` over the heads: how much of the
    heads' self-repair AtP's first-order estimate of it explains (``self_repair − atp_self_repair``
    is exactly ``exact − atp``)."""
    total = float((heads["self_repair"] ** 2).sum())
    miss = float(((heads["self_repair"] - heads["atp_self_repair"]) ** 2).sum())
    return 1 - miss / total if total > 0 else math.nan


def verdicts(ch: AtpChapter) -> list[Verdict]:
    h, r = ch.heads, ch.ranks
    err = h["error"].abs().sum()
    norm_share = h["error_norm"].abs().sum() / (h["error_norm"].abs().sum() + h["error_downstream"].abs().sum()) \
        if err > 0 else math.nan
    return [
        Verdict(RANKS, r["spearman"], len(h), "heads",
                f"AtP's mean |error| is {h['error'].abs().mean():.3g} logits against a mean |Δlogit| of "
                f"{h['exact'].abs().mean():.3g}."),
        Verdict(TOP, r["overlap"], r["k"], "heads",
                f"Exact top {r['k']}: {', '.join(r['top_exact'])}; AtP's: {', '.join(r['top_atp'])}."),
        Verdict(BLIND, explained_share(h), len(h), "heads",
                f"Of what AtP gets wrong (Σ|error_norm| + Σ|error_downstream|), {norm_share:.0%} is the "
                "final norm's part." if math.isfinite(norm_share) else ""),
    ]


def on_this_model(ch: AtpChapter) -> str:
    """The "On this model" paragraph: AtP against the exact ablation, numbers computed."""
    m = ch.meta
    worst = ch.heads.loc[ch.heads["error"].abs().idxmax()]
    c = ch.cost
    ratio = c["sweep / AtP"].iloc[0]
    if math.isfinite(ratio):
        faster = (f"AtP was {ratio:,.1f}× faster" if ratio >= 1 else
                  f"AtP was {1 / ratio:,.1f}× slower")
        cost = (f" The sweep took {c['wall time (s)'].iloc[0]:,.1f} s and AtP {c['wall time (s)'].iloc[1]:,.2f} s: "
                f"{faster}.")
    else:
        cost = " The sweep's wall time is not recorded, so the cost ratio is not available."
    intro = (f"**On {m.get('model')}** ({m.get('n_tokens', 0):,} tokens in rows of {m.get('seq_len')}, "
             f"{m.get('ablation')} ablation; whole-set means per head). The largest gap is "
             f"{worst['label']}: exact Δlogit {worst['exact']:+.3g}, AtP {worst['atp']:+.3g}, of which "
             f"{worst['error_norm']:+.3g} is the final norm's part and {worst['error_downstream']:+.3g} "
             f"the downstream components'.{cost}")
    return render(ch.verdicts, intro)


def consistency(ch: AtpChapter) -> str:
    """That AtP and the sweep read the same tokens and sources: the head's own ΔDE, which both
    compute and which is linear in ``z``, agrees (``error_direct``)."""
    dev = float(ch.heads["error_direct"].abs().max())
    scale = float(ch.heads["delta_direct_effect"].abs().max())
    return (f"Check: the heads' own ΔDE from AtP's pass and from the sweep agree to {dev:.1e} logits "
            f"(largest |ΔDE| {scale:.3g}), so the two measurements read the same tokens and the same "
            "replacements.")


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for AtP's error."""
    from ..structure import architecture

    a = architecture(open_model(cfg))
    lines = ["- **Parallel-residual blocks.** A last-layer head has nothing downstream but the final "
             "norm, so its whole error is the norm's part." if a["parallel"] else
             "- **Sequential blocks.** Even a last-layer head is followed by its layer's MLP, so its "
             "error has a downstream part as well as the norm's."]
    if a["sandwich"]:
        lines.append("- **Norms on each block's write.** The post-attention norm of the head's own layer "
                     "rescales its write; that reaction (and every downstream block norm's) is in the "
                     "downstream part, as `from_block_norms` is in eq. 2.")
    return "\n".join(lines)
