"""Chapter 4 — iterative inference: self-reinforcing and self-repressing heads (self-repair paper
§5.3, App. F, G; Fig 18, 19).

Every head is fed its own clean output, scaled by each alpha (the paper: 1, 3, 5), and its new
direct effect is read on its top-k% tokens by clean direct effect and over every token. The token
plot's head is the paper's GPT2-Medium L21H1 when pinned (``featured_heads``; the ``paper``
profile runs GPT2-Medium); otherwise the most self-repressing and most self-reinforcing heads with
at least the median head's direct effect (the paper shows one head "which self-represses").

**Claims** (:data:`CLAIMS`, decided on :mod:`selfrepair.repression`'s per-cluster sums): the most
self-repressing head is chosen on one half of the documents and tested on the other
(``Clusters.halves``); it self-represses when both its fall under its own output and its fall beyond
the random push of the same norm lie below 0 with their whole interval (the words table's
"decreased"); the head map's classes and the share of self-repressing heads count a change within
±10% of the direct effect (:data:`TAU`) as none. "Proportional" is a line through the origin
(``Verdict.linear``) fitted to the repression of the heads that self-repress on the first half, measured on the second. The paper
offers these heads as evidence for the iterative inference hypothesis (App. G), and the text says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import iterative as it
from .. import repression as rp
from ..claims import Claim, Signed, Verdict, paper_word, render, render_claim
from .signed import changes, fall, moved
from ..rules import NEGLIGIBLE, number
from ..config import CorpusConfig
from ..errors import InputError
from ..experiment import measure as cached, open_model, open_tokens
from ..findings import Figure, Finding, markdown, shows as _shows
from ..structure import late_start
from ..uncertainty import Bootstrap, Clusters, mean_finite
from ..verdict_records import recorded
from . import check, value_bias_note

PAPER_HEAD = "L21H1"  # GPT2-Medium (Fig 18, 19)
FEATURED_RULE = ("the most self-repressing, then the most self-reinforcing heads among the classified "
                 "heads with at least the median head's direct effect")

TAU = NEGLIGIBLE  # a change within ±10% of the DE is no change
ALL = ("every head of the model is a candidate: the one that self-represses most on one half of the "
       "documents (the paper shows GPT2-Medium's L21H1, one head 'which self-represses') is tested on "
       "the other half, so the largest of many noisy changes does not pass for an effect")
EXIST = Claim("repressing", "Self-repressing heads exist: fed their own output they write less, beyond what a "
              "random push of the same size does", "App. G, Fig 19",
              "for the head that self-represses most on one half of the documents, on the other half: the "
              "weaker of its two falls at the largest α, relative to its mean top-token direct effect — "
              "under its own output, and under its own output beyond the random push (the control)",
              paper_word("decreased"), fmt="+.0%",
              reading=Signed("Tested on documents it was not chosen on, the most self-repressing of the {n} "
                             "{unit} is fed its own output. Read cautiously, as the smaller of two falls "
                             "(its fall under its own output, and that fall beyond the fall a random push "
                             "of the same norm causes, the control), its direct effect {way}.",
                             up="rises by {value} of itself", down="falls by {value} of itself",
                             turns=" (it turns negative)"),
              rationale="both falls are required: the fall under its own output (Fig 19: 'L21H1 has a "
                        "decreased direct effect') and the fall beyond a random push of the same norm, "
                        "without which a head that any perturbation moves would count. " + ALL,
              quantity="the most self-repressing head's fall at the largest α, on held-out documents")
PROPORTIONAL = Claim("proportional", "The repression is proportional to how much output is added",
                     "App. F, Fig 18",
                     "the least-squares line, over the alphas, of the repression (minus the relative change "
                     "of the mean top-token direct effect, averaged over the heads that self-repress on one "
                     "half of the documents), measured on the other half",
                     paper_word("proportional"), fmt=".3f",
                     reading=Signed("Each unit of α {way} (the slope of the line, over {n} {unit}).",
                                    up="adds {value} of the direct effect to the repression",
                                    down="takes {value} of the direct effect off the repression",
                                    ends=("{} taken off", "{} added"), none="nothing added"),
                     rationale="App. F: 'the amount in which these heads self-repress is proportional to "
                               "the amount in which scale the heads output back into itself'; proportional "
                               "is a line through the origin, so the slope must be above 0 and the intercept "
                               "approximately zero, not merely a repression that grows",
                     quantity='the line of repression against α, on held-out documents')
CLAIMS = (EXIST, PROPORTIONAL)


@dataclass(frozen=True)
class Config(CorpusConfig):
    alphas: tuple[float, ...] = (1.0, 3.0, 5.0)  # scales of the head's own output added to its input (the paper: 1, 3, 5)
    featured_heads: tuple[str, ...] | None = None  # the token plot's heads (the paper: L21H1); None: the most extreme
    n_featured: int = 4  # heads in the token plot when featured_heads is None
    n_boot: int = 1000  # cluster-bootstrap replicates of every interval (documents resampled)

    HEAD_FIELDS = ("featured_heads",)

    def validate(self) -> None:
        super().validate()
        it.check_alphas(self.alphas)
        if self.n_featured < 1:
            raise InputError(f"n_featured must be at least 1, got {self.n_featured}")
        if self.n_boot < 10:
            raise InputError(f"n_boot must be at least 10 bootstrap resamples, got {self.n_boot}")


@dataclass
class IterativeChapter:
    result: it.IterativeResult
    classes: pd.DataFrame
    featured: list
    reason: str
    verdicts: list
    meta: dict
    clusters: Clusters | None = None  # the token set's documents (units of the bootstrap)
    sums: np.ndarray | None = None  # [cluster, head, column] per-cluster sums (selfrepair.repression)
    n_boot: int = 1000  # bootstrap replicates
    seed: int = 0  # of the replicates and of the selection / test split

    @property
    def tokens(self) -> pd.DataFrame:
        """Fig 18/19: the featured heads' top tokens at every alpha."""
        return it.token_frame(self.result, self.featured)

    @property
    def response(self) -> pd.DataFrame:
        """Every head's relative change at every alpha, with its class."""
        return it.response(self.result, self.classes)


@recorded  # its verdicts are kept beside its measurements (the scorecard reads them)
def measure(cfg: Config, progress: bool = True) -> IterativeChapter:
    check(cfg)
    model = open_model(cfg)
    spec = it.AmplifySpec(alphas=it.check_alphas(cfg.alphas), top_percent=cfg.top_percent, seed=cfg.seed)
    data = open_tokens(cfg, model, progress=progress)
    res = cached(cfg, spec, data, progress=progress)
    classes = it.classify(res, TAU, rp.MIN_EFFECT)
    labels = it.featured(classes, cfg.n_featured, cfg.featured_heads)
    reason = "pinned by featured_heads" if cfg.featured_heads else FEATURED_RULE
    clusters = Clusters.of_tokens(data.main_document, len(data))
    ch = IterativeChapter(res, classes, labels, reason, [], dict(res.meta), clusters, rp.sums(res, clusters),
                          cfg.n_boot, cfg.seed)
    ch.verdicts = verdicts(ch)
    tested = tested_head(ch)
    if not cfg.featured_heads and tested and tested not in ch.featured:  # the head the verdict rests on
        ch.featured, ch.reason = [*ch.featured, tested], f"{FEATURED_RULE}; and {tested}, the head the verdict tests"
    return ch


def tested_head(ch: IterativeChapter) -> str | None:
    """The head :data:`EXIST`'s verdict rests on: the one whose smaller fall is largest on the
    selection half (None where no head can be classified there)."""
    select, _ = ch.clusters.halves(ch.seed)
    chosen = rp.repression(ch.sums[select].sum(0)[None])[0]
    return str(ch.classes["label"].iloc[int(np.nanargmin(chosen))]) if np.isfinite(chosen).any() else None


def verdicts(ch: IterativeChapter) -> list[Verdict]:
    """:data:`EXIST` and :data:`PROPORTIONAL`: heads chosen on one half of the documents
    (``Clusters.halves``), tested on the other with a cluster bootstrap of ``ch.n_boot`` replicates."""
    select, test = ch.clusters.halves(ch.seed)
    chosen = rp.repression(ch.sums[select].sum(0)[None])[0]
    boot = Bootstrap(len(test), ch.n_boot, ch.seed, ch.clusters.unit)
    labels = list(ch.classes["label"])
    whole = Bootstrap.over(ch.clusters, ch.n_boot, ch.seed).estimate(lambda t: rp.share_repressing(t, TAU),
                                                                     ch.sums)
    every = rp.repression(ch.sums.sum(0)[None])[0]
    n_cls, n_rep = int(np.isfinite(every).sum()), int(((every <= -TAU) & np.isfinite(every)).sum())
    share = (f"The verdict rests on this one head (its panel is in the token plot above). On every document "
             f"(both halves), {n_rep} of the {n_cls} classified heads — {whole.prose('.0%')} — self-repress "
             f"this way, falling by more than {TAU:.0%} both under their own output and beyond the random "
             "push; the paragraph above counts as self-repressing every head whose fall under its own "
             "output alone does, a different number.")
    n_heads = int(np.isfinite(chosen).sum())
    if not n_heads:
        nan = boot.estimate(lambda t: np.full(len(t), np.nan), ch.sums[test])
        why = "no head has tokens on the selection half with a direct effect large enough to classify"
        return [Verdict.of(EXIST, nan, share, why=why), Verdict.of(PROPORTIONAL, nan, why=why)]
    best = int(np.nanargmin(chosen))
    unit = (f"classified heads (chosen on {len(select)} {ch.clusters.unit}, tested on the other {len(test)})")
    est = boot.estimate(lambda t: rp.repression(t)[:, best], ch.sums[test], n=n_heads, unit=unit)
    own = boot.estimate(lambda t: rp.relative(t)[0][:, best, -1], ch.sums[test])
    ctrl = boot.estimate(lambda t: rp.relative(t)[1][:, best], ch.sums[test])
    beyond = boot.estimate(lambda t: rp.relative(t)[0][:, best, -1] - rp.relative(t)[1][:, best], ch.sums[test])
    alpha = f"α = {max(ch.result.alphas):g}"
    exist = Verdict.of(EXIST, est, f"The head is {labels[best]}, chosen on the selection half as the head whose "
                       f"smaller fall is largest there ({fall(chosen[best], '.0%')}). On the test half, at {alpha}, "
                       f"under its own output its mean top-token direct effect "
                       f"{moved(own, '+.0%', relative=True)}; under the random push it "
                       f"{moved(ctrl, '+.0%', relative=True)}; {_beyond(est, own, beyond)} "
                       f"{share}{smaller_of_two(est, own, beyond)}")
    return [exist, _proportional(ch, chosen, test, boot, labels)]


def _mine(est, own, beyond):
    """Which of the two falls the verdict's value is (the smaller; None where one is not finite)."""
    if not (np.isfinite(est.value) and np.isfinite(own.value) and np.isfinite(beyond.value)):
        return None
    return own if abs(est.value - own.value) <= abs(est.value - beyond.value) else beyond


def _beyond(est, own, beyond) -> str:
    """The fall beyond the push, with its interval unless it is the verdict's value (issue 25: one
    value, one interval — the other is folded by :func:`smaller_of_two`)."""
    said = "beyond the push (the first change minus the second) it "
    if _mine(est, own, beyond) is beyond:
        return said + f"{changes(beyond.value, '+.0%')}."
    return said + f"{moved(beyond, '+.0%')}."


def smaller_of_two(est, own, beyond, fmt: str = "+.0%") -> str:
    """Why the verdict's value has the interval it has, folded (issue 25: "204% to 589%" and "204%
    to 664%" printed for one value): the verdict's interval is of the smaller fall retaken in every
    bootstrap replicate (where the smaller of the two can switch), the other of that one fall alone.
    No fold where the two intervals read the same or there is nothing to compare."""
    from ..rules import signed_interval_words

    mine = _mine(est, own, beyond)
    if mine is None:
        return " The verdict's value above is the smaller of the two falls."
    which = "under its own output" if mine is own else "beyond the push"
    said = f" The verdict's value above is the smaller of the two falls, here the fall {which}."
    if not (est.reliable and mine.reliable):
        return said
    ours = signed_interval_words(est.value, est.lo, est.hi, fmt)
    alone = signed_interval_words(mine.value, mine.lo, mine.hi, fmt)
    if ours == alone:
        return said
    return said + (f"<details><summary>Why the fall {which} has no interval of its own here</summary>The verdict's value "
            f"is the smaller of the two falls, here the fall {which}. Its interval ({ours}) is that of the "
            "smaller of the two falls, retaken in every bootstrap replicate, where the smaller one can switch; "
            f"the fall {which} alone, retaken the same way, has {alone}: the same value, another quantity's "
            "interval, so only the verdict's is shown.</details>")


def _proportional(ch: IterativeChapter, chosen: np.ndarray, test, boot: Bootstrap, labels) -> Verdict:
    heads = np.flatnonzero(chosen <= -TAU)
    alphas = ch.result.alphas
    unit = f"{'head' if len(heads) == 1 else 'heads'} self-repressing on the selection half"
    if len(heads) == 0 or len(set(alphas)) < 2:
        nan = boot.estimate(lambda t: np.full(len(t), np.nan), ch.sums[test])
        return Verdict.of(PROPORTIONAL, nan, why="no head self-represses on the selection half"
                          if len(heads) == 0 else "a line needs at least two alphas")
    slope = boot.estimate(lambda t: rp.dose_line(t, heads, alphas)[0], ch.sums[test], n=len(heads), unit=unit)
    icpt = boot.estimate(lambda t: rp.dose_line(t, heads, alphas)[1], ch.sums[test])
    y = -mean_finite(rp.relative(ch.sums[test].sum(0)[None])[0][0, heads], axis=0)
    return Verdict.linear(PROPORTIONAL, slope, icpt,
                          f"The heads: {', '.join(labels[i] for i in heads)}. Their mean repression on the test "
                          "half is " + ", ".join(f"{number(v, '.0%')} at α = {a:g}" for a, v in zip(alphas, y)) + ".")


def on_this_model(ch: IterativeChapter) -> str:
    """The paragraph: the class counts and examples, then the claims."""
    classes, res = ch.classes, ch.result
    counts = classes["class"].value_counts()
    ok = classes[classes["class"] != "weak"]
    rep = ok[ok["class"] == "self-repressing"].sort_values("relative_change")
    rein = ok[ok["class"] == "self-reinforcing"].sort_values("relative_change", ascending=False)
    late = ok[ok["layer"] >= late_start(int(res.meta["n_layers"]))]
    moved = ok[ok["class"] != "neutral"]

    def ex(df: pd.DataFrame) -> str:
        return ", ".join(f"{r.label} ({fall(r.relative_change, '.0%')})" for r in df.head(3).itertuples()) or "none"

    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.0f}%"

    same_way = ((np.sign(moved["relative_change_all"]) == np.sign(moved["relative_change"])).mean()
                if len(moved) else float("nan"))
    text = (f"**On {res.meta.get('model')}** ({len(classes)} heads, top {res.meta.get('top_percent'):g}% "
            f"tokens = {res.meta.get('k')} per head; classes at α = {max(res.alphas):g}, a change "
            f"within ±{TAU:.0%} of the head's mean direct effect counting as none): "
            f"{counts.get('self-repressing', 0)} self-repressing ({int((rep['specific']).sum())} of them "
            f"also beyond the random push), {counts.get('self-reinforcing', 0)} "
            f"self-reinforcing, {counts.get('neutral', 0)} neutral and {counts.get('weak', 0)} weak heads "
            f"(a mean top-token direct effect under {rp.MIN_EFFECT:.0%} of the median head's, too small "
            f"to classify). In the later half of the layers "
            f"{pct((late['class'] == 'self-repressing').mean() if len(late) else float('nan'))} of the "
            f"classified heads self-repress (by that class, the fall under their own output alone). "
            f"By that same quantity — the change of a head's mean top-token direct effect under its own output "
            f"at α = {max(res.alphas):g}, as a share of itself, on every document — the strongest "
            f"self-repressing are {ex(rep)}; the strongest "
            f"self-reinforcing {ex(rein) if len(rein) else 'none (no head is)'}. Over every token, not only each head's top ones, the mean "
            f"direct effect moves the same way for {pct(same_way)} of the non-neutral heads.")
    if classes["control_change"].notna().any():
        text += " " + control_sentence(classes)
    cl = ch.clusters
    text += (f" The verdicts choose heads on one half of the {cl.n:,} independent {cl.unit} and test them on "
             f"the other; every interval is a 95% cluster bootstrap over the {cl.unit} ({ch.n_boot:,} "
             f"replicates, seed {ch.seed}) that recomputes each head's relative changes.")
    return text + "\n\n" + render(ch.verdicts, rules="ch04-rules", below=FIGURES)


def medians(classes: pd.DataFrame) -> dict[str, float]:
    """Over the classified heads (not "weak"), at the largest α, on each head's top tokens: the
    median relative change under the head's own output (``own``) and under the random push
    (``control``), signed, and the median of its size (``own_size``, ``control_size``). The
    paragraph and Solution 4.2 give the sizes (:func:`specificity`), from here: one definition each."""
    ok = classes[classes["class"] != "weak"]
    own, ctrl = ok["relative_change"], ok["control_change"]
    return {"own": own.median(), "control": ctrl.median(), "own_size": own.abs().median(),
            "control_size": ctrl.abs().median(), "n": len(ok)}


def control_sentence(classes: pd.DataFrame) -> str:
    """The random-push control in words: what it is, then :func:`specificity`'s one answer."""
    alpha = float(classes["alpha"].max()) if "alpha" in classes else float("nan")
    return (f"The control is a random push: a random direction of the same norm as the head's own output at "
            f"α = {alpha:g}, added at the same place, which shows how much any push of that size moves a head. "
            + specificity(classes))


def specificity(classes: pd.DataFrame) -> str:
    """The one answer to "is the response specific to the head's own output?", which §4.3 and
    Solution 4.2 both give (issue 25: the paragraph's signed medians said "no", the solution's sizes
    "yes"): the median size of the change under the head's own output beside that under the random
    push (:func:`medians`), and how many heads respond beyond the push by more than ±τ."""
    m = medians(classes)
    ok = classes[classes["class"] != "weak"]
    rep = ok[ok["class"] == "self-repressing"]
    n_spec, rep_spec = int(ok["specific"].sum()), int(rep["specific"].sum())
    own, push = m["own_size"], m["control_size"]
    if not (math.isfinite(own) and math.isfinite(push)):
        return "Whether the response is specific cannot be said here: no classified head has a control."
    if own <= push:
        answer = "No: a random push of the same norm moves the median head at least as much as its own output does"
    elif push <= TAU:
        answer = "Yes: a random push of the same norm barely moves the median head; its own output does"
    else:
        answer = ("Only in part: its own output moves the median head more than a random push of the same "
                  "norm does, but the push alone moves it too")
    return (f"Is the response specific to the head's own output? {answer}. Over the {m['n']} classified heads, "
            f"the median size of the change of a head's mean top-token direct effect (ignoring its sign) is "
            f"{own:.0%} of itself under its own output and {push:.0%} under the push; {n_spec} of the {m['n']} "
            f"respond to their own output beyond the push by more than ±{TAU:.0%}, {rep_spec} of the "
            f"{len(rep)} self-repressing among them. This is why the verdict below counts a head as "
            "self-repressing only when it also falls beyond the push.")


def verdict(ch: IterativeChapter, key: str) -> str:
    """Claim ``key``'s full verdict, which the notebook shows right after the figure
    :data:`FIGURES` names for it (the overview of :func:`on_this_model` links down to it)."""
    return render_claim(ch.verdicts, key, rules="ch04-rules")


FIGURES = dict.fromkeys(("repressing", "proportional"), Figure("ch04-map", "the head map and response curves"))


def findings(ch: IterativeChapter) -> list[Finding]:
    """"What this chapter shows": where it ran, the claims by outcome, and the take-away (from
    :data:`EXIST`: does a head self-repress on documents it was not chosen on)."""
    cl, model = ch.clusters, str(ch.result.meta.get("model"))
    n_heads, alphas = len(ch.classes), ", ".join(f"{a:g}" for a in ch.result.alphas)
    where = Finding(f"This chapter fed each of the {n_heads} heads of {model} its own output (scaled by "
                    f"α = {alphas}) on {cl.n:,} independent {cl.unit}, choosing heads on one half of them "
                    "and testing them on the other.", values=(n_heads, cl.n, *ch.result.alphas))
    exist = next(v for v in ch.verdicts if v.claim is EXIST)
    if exist.why:
        text = f"Take-away: this run cannot test for self-repressing heads on this model ({exist.why})."
        values = ()
    else:
        change = changes(exist.value, '.0%', relative=True)
        values = (exist.value,)
        if exist.holds:
            text = (f"Take-away: on this model a head fed its own output writes less beyond a random push "
                    f"(its direct effect {change} on held-out documents), as the iterative inference "
                    "hypothesis expects; it is evidence for the hypothesis, not a measured mechanism of self-repair.")
        elif exist.holds is False:
            text = (f"Take-away: on this model no head self-represses beyond a random push on held-out "
                    f"documents (the most self-repressing head's direct effect {change}), so this evidence for the "
                    "iterative inference hypothesis is not seen here.")
        else:
            text = (f"Take-away: this run cannot say whether a head self-represses beyond a random push on "
                    f"this model (its direct effect {change} on held-out documents); a run on more tokens would narrow the interval.")
        text += (" That change is the smaller of the head's two falls, under its own output and beyond the "
                 "random push.")
    return _shows(where, ch.verdicts, FIGURES, model, Finding(text, (FIGURES["repressing"],), values))


def shows(ch: IterativeChapter) -> str:
    """The "What this chapter shows" paragraph."""
    return markdown(findings(ch))


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes the head's output that is added back (a folded head's output has no b_V·W_O) "
    "and the head's top-k% tokens by direct effect.")


def model_notes(cfg: Config) -> str:
    """What the architecture of the model that ran means for this chapter."""
    from ..structure import architecture

    if architecture(open_model(cfg))["sandwich"]:
        text = ("- **What \"the head's output\" is here.** This model normalizes each attention write "
                "(a post-attention norm with gain g and scale s), so a head adds g ⊙ z_h·W_O[h] / s "
                "to the residual stream, with s frozen at its clean value — its share of the block's "
                "write. Adding the raw z_h·W_O[h] instead would be a different push, much smaller "
                "wherever g/s ≫ 1.")
    else:
        text = ("- **What \"the head's output\" is here.** As in the paper's models, a head adds "
                "z_h·W_O[h] to the residual stream, and that is what is fed back.")
    return text + "\n" + value_bias_note(cfg, VALUE_BIAS)
