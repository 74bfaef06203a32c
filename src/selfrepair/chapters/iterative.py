"""Chapter 4 — iterative inference: self-reinforcing and self-repressing heads (self-repair paper
§5.3, App. F, G; Fig 18, 19).

Every head is fed its own clean output, scaled by each alpha (the paper: 1, 3, 5), and its new
direct effect is read on its top-k% tokens by clean direct effect and over every token. The token
plot's head is the paper's GPT2-Medium L21H1 when pinned (``featured_heads``; the ``paper``
profile runs GPT2-Medium); otherwise the most self-repressing and most self-reinforcing heads with
at least the median head's direct effect (the paper shows one head "which self-represses").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import iterative as it
from ..claims import Claim, Verdict, above, at_least, render
from ..config import CorpusConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model, open_tokens
from ..structure import late_start
from . import check

PAPER_HEAD = "L21H1"  # GPT2-Medium (Fig 18, 19)
FEATURED_RULE = ("the most self-repressing, then the most self-reinforcing heads among the classified "
                 "heads with at least the median head's direct effect")

EXIST = Claim("repressing", "Self-repressing heads exist: fed their own output they write less",
              "App. G, Fig 19", "the number of heads classified self-repressing that respond to their "
              "own output beyond a random push of the same size (specific)", at_least(1), fmt=".0f",
              reading="{value} of the {n} {unit} write less when fed their own output, by more than "
                      "a random push of the same size changes them.")
PROPORTIONAL = Claim("proportional", "The repression is proportional to how much output is added",
                     "App. F, Fig 18", "the share of the self-repressing heads whose top-token direct "
                     "effect falls monotonically as alpha grows", above(0.5), fmt=".0%",
                     reading="For {value} of the {n} {unit}, each larger dose of their own output "
                             "lowers their direct effect further.")


@dataclass(frozen=True)
class Config(CorpusConfig):
    alphas: tuple[float, ...] = (1.0, 3.0, 5.0)  # scales of the head's own output added to its input (the paper: 1, 3, 5)
    threshold: float = 0.1  # relative change of mean top-token DE, at the largest alpha, that makes a class
    featured_heads: tuple[str, ...] | None = None  # the token plot's heads (the paper: L21H1); None: the most extreme
    n_featured: int = 4  # heads in the token plot when featured_heads is None

    HEAD_FIELDS = ("featured_heads",)

    def validate(self) -> None:
        super().validate()
        it.check_alphas(self.alphas)
        if not 0 < self.threshold < 10:
            raise InputError(f"threshold must be a positive relative change such as 0.1, got {self.threshold}")
        if self.n_featured < 1:
            raise InputError(f"n_featured must be at least 1, got {self.n_featured}")


@dataclass
class IterativeChapter:
    result: it.IterativeResult
    classes: pd.DataFrame
    featured: list
    reason: str
    verdicts: list
    meta: dict

    @property
    def tokens(self) -> pd.DataFrame:
        """Fig 18/19: the featured heads' top tokens at every alpha."""
        return it.token_frame(self.result, self.featured)

    @property
    def response(self) -> pd.DataFrame:
        """Every head's relative change at every alpha, with its class."""
        return it.response(self.result, self.classes)


def measure(cfg: Config, progress: bool = True) -> IterativeChapter:
    check(cfg)
    model = open_model(cfg)
    spec = it.AmplifySpec(alphas=it.check_alphas(cfg.alphas), top_percent=cfg.top_percent, seed=cfg.seed)
    res = cached(cfg, spec, open_tokens(cfg, model, progress=progress), progress=progress)
    classes = it.classify(res, cfg.threshold)
    labels = it.featured(classes, cfg.n_featured, cfg.featured_heads)
    reason = "pinned by featured_heads" if cfg.featured_heads else FEATURED_RULE
    ch = IterativeChapter(res, classes, labels, reason, [], dict(res.meta))
    ch.verdicts = verdicts(ch)
    return ch


def verdicts(ch: IterativeChapter) -> list[Verdict]:
    ok = ch.classes[ch.classes["class"] != "weak"]
    rep = ok[ok["class"] == "self-repressing"]
    resp = it.response(ch.result, ch.classes)
    falling = []
    for label in rep["label"]:
        g = resp[resp["label"] == label].sort_values("alpha")
        falling.append(bool((np.diff(g["new_direct_effect"].to_numpy()) <= 0).all()))
    return [  # a count of heads: exact, no sampling interval
        Verdict(EXIST, float(rep["specific"].sum()), len(ok), "classified heads",
                f"{len(rep)} heads are classified self-repressing and "
                f"{int((ok['class'] == 'self-reinforcing').sum())} self-reinforcing."),
        Verdict.share(PROPORTIONAL, falling, "self-repressing heads"),
    ]


def on_this_model(ch: IterativeChapter, threshold: float) -> str:
    """The paragraph: the class counts and examples, then the claims."""
    classes, res = ch.classes, ch.result
    counts = classes["class"].value_counts()
    ok = classes[classes["class"] != "weak"]
    rep = ok[ok["class"] == "self-repressing"].sort_values("relative_change")
    rein = ok[ok["class"] == "self-reinforcing"].sort_values("relative_change", ascending=False)
    late = ok[ok["layer"] >= late_start(int(res.meta["n_layers"]))]
    moved = ok[ok["class"] != "neutral"]

    def ex(df: pd.DataFrame) -> str:
        return ", ".join(f"{r.label} ({100 * r.relative_change:+.0f}%)" for r in df.head(3).itertuples()) or "none"

    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.0f}%"

    same_way = ((np.sign(moved["relative_change_all"]) == np.sign(moved["relative_change"])).mean()
                if len(moved) else float("nan"))
    text = (f"**On {res.meta.get('model')}** ({len(classes)} heads, top {res.meta.get('top_percent'):g}% "
            f"tokens = {res.meta.get('k')} per head; classes at alpha = {max(res.alphas):g} with a "
            f"threshold of ±{100 * threshold:.0f}% of the head's mean direct effect): "
            f"{counts.get('self-repressing', 0)} self-repressing, {counts.get('self-reinforcing', 0)} "
            f"self-reinforcing, {counts.get('neutral', 0)} neutral and {counts.get('weak', 0)} weak heads "
            f"(direct effect too small to classify). In the later half of the layers "
            f"{pct((late['class'] == 'self-repressing').mean() if len(late) else float('nan'))} of the "
            f"classified heads self-repress. Strongest self-repressing: {ex(rep)}; strongest "
            f"self-reinforcing: {ex(rein)}. Over every token, not only each head's top ones, the mean "
            f"direct effect moves the same way for {pct(same_way)} of the non-neutral heads.")
    if classes["control_change"].notna().any():
        text += (f" A random push of the same norm changes the classified heads' top-token direct "
                 f"effect by a median {100 * ok['control_change'].median():+.0f}% (their own output: "
                 f"{100 * ok['relative_change'].median():+.0f}%).")
    return text + "\n\n" + render(ch.verdicts)


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter."""
    from ..structure import architecture

    if architecture(open_model(cfg))["sandwich"]:
        return ("- **What \"the head's output\" is here.** This model normalizes each attention write "
                "(a post-attention norm with gain g and scale s), so a head adds g ⊙ z_h·W_O[h] / s "
                "to the residual stream, with s frozen at its clean value — its share of the block's "
                "write. Adding the raw z_h·W_O[h] instead would be a different push, much smaller "
                "wherever g/s ≫ 1.")
    return ("- **What \"the head's output\" is here.** As in the paper's models, a head adds "
            "z_h·W_O[h] to the residual stream, and that is what is fed back.")
