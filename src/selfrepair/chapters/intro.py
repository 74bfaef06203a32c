"""Chapter 0 — the introduction's live check: eq. 1 and eq. 2 on a few heads and tokens.

A few rows of the corpus (each with its resample source from another document of a larger token
set, as everywhere in the book), a few heads, every term of eq. 2 computed directly and the largest
per-token gap between the two sides of the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..ablation import check_ablation
from ..batch import TokenSet
from ..config import CorpusConfig, RunConfig, parse_head
from ..errors import InputError
from ..experiment import open_model, open_tokens, shown_path
from ..findings import Figure, Finding, markdown
from ..heads import self_repair
from ..rules import is_zero, number
from ..structure import architecture_markdown
from ..tables import Layout, Table, format_number, table
from . import check, value_bias_note
from .signed import changes, fall, gives_back

POOL_ROWS = 64  # rows the demo rows' resample sources are drawn from (several documents)
# executed after the other chapters a run executes (selfrepair.book.runner.runs_last): its "What this
# build ran" reads the verdict records they write, so a fresh build's first page names what ran
RUNS_LAST = True


@dataclass(frozen=True)
class Config(RunConfig):
    dataset: str = "embedded"  # "embedded", "tiny", a local file/dir or a hub dataset id
    ablation: str = "resample"  # "resample", "mean" or "zero"
    featured_heads: tuple[str, ...] | None = None  # e.g. ["L17H3"]; None: two last-layer heads and one mid-layer head
    demo_rows: int = 2  # rows in the live check
    demo_positions: int = 16  # positions per row in the live check
    fold_value_biases: bool = False  # TransformerLens's convention (the paper's code): each b_V·W_O in the layer's bias, not the head's output
    cache_dir: str = "results"  # the results cache whose verdict records say what this build ran (read only)

    HEAD_FIELDS = ("featured_heads",)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.demo_rows < 1 or self.demo_positions < 2:
            raise InputError(f"demo_rows must be >= 1 and demo_positions >= 2, got {self.demo_rows}, "
                             f"{self.demo_positions}")
        if self.demo_rows > POOL_ROWS:
            raise InputError(f"demo_rows must be at most {POOL_ROWS}, got {self.demo_rows}")


def demo_heads(cfg: Any, model: Any) -> list[tuple[int, int]]:
    """``cfg.featured_heads`` as ``(layer, head)``, else the first two heads of the last layer and
    head 0 of a middle layer (late heads are where the paper finds most self-repair; a middle
    one has downstream heads and MLPs, so every term of eq. 2 is exercised)."""
    if cfg.featured_heads:
        return [parse_head(h) for h in cfg.featured_heads]
    last = model.n_layers - 1
    return sorted({(last, h) for h in range(min(2, model.n_heads))} | {((model.n_layers - 1) // 2, 0)})


def demo_tokens(cfg: Config, model: Any) -> TokenSet:
    """The first ``demo_rows`` rows of a :data:`POOL_ROWS`-row token set of ``demo_positions``
    tokens each, with their resample sources."""
    pool = open_tokens(CorpusConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                                    dataset=cfg.dataset, n_tokens=POOL_ROWS * cfg.demo_positions,
                                    seq_len=cfg.demo_positions, top_percent=100), model, progress=False)
    rows = slice(0, cfg.demo_rows)
    return TokenSet.from_tensor(pool.tokens[rows], pool.corrupt_tokens[rows])


VALUE_BIAS = (  # what fold_value_biases changes in this chapter
    "It changes each head's direct effect in the live check below and every zero-ablation number; "
    "resample and mean Δlogit and self-repair are the same either way.")


def value_bias_markdown(cfg: Config) -> str:
    """Which head-output convention this page ran with and what it changes here."""
    return value_bias_note(cfg, VALUE_BIAS, where="#value-biases")


def build_markdown(cfg: Config) -> str:
    """What this build ran, near the top of the book: the models and data of the chapters' verdict
    records in ``cfg.cache_dir`` (read when this page runs: :func:`selfrepair.build_scope.read_scope`),
    whether the papers' own models are among them and how to run those, and how to read a verdict."""
    from ..build_scope import PAPER_COMMAND, PAPER_NAMES, is_paper_model, models_sentence, read_scope

    found = read_scope(cfg.cache_dir)
    if not found:  # no chapter has run on this cache (this page runs after those that do: RUNS_LAST)
        own = "one of the papers' own models" if is_paper_model(cfg.model) else "none of the papers' own models"
        return (f"**What this build ran.** When this page ran, no chapter had recorded a verdict in the results "
                f"cache `{cfg.cache_dir}` yet; this page ran on `{cfg.model}`, {own} ({PAPER_NAMES}, …), which "
                f"run with `{PAPER_COMMAND}` on a machine with the Hugging Face hub and a GPU. The "
                "<a href=\"09_scorecard.html\">scorecard</a> says on which models and data every verdict was "
                "decided; a claim that *differs* on a model other than the paper's is a difference on that model "
                "and data, not a refutation of the paper.")
    text = "**What this build ran.** " + models_sentence(found)
    if found and not any(is_paper_model(m) for m in found):
        text += (" Every verdict in this book is therefore decided on the model and data above, not on the "
                 f"papers' ({PAPER_NAMES}, 1M tokens of The Pile): a claim that *differs* here is a difference on "
                 "this model and data, not a refutation of the paper, and one that *holds* is evidence on this "
                 "model, not a reproduction of the paper's numbers. The papers' own numbers appear only where a "
                 "page says so (“the paper reports …”, the released values of chapter 6).")
    elif found:
        text += (" A claim that *differs* on a model is a difference on that model and data, not by itself a "
                 f"refutation of the paper; the papers' own models run with `{PAPER_COMMAND}`.")
    return text


def closure_table(result: Any) -> pd.DataFrame:
    """Per head, the means of eq. 1 and eq. 2's terms and the largest per-token gap
    ``|self_repair - (from_heads + from_mlps + from_norm + from_block_norms)|``."""
    frame = result.to_frame()
    terms = ["from_heads", "from_mlps", "from_norm", "from_block_norms"]
    frame["eq2_gap"] = (frame["self_repair"] - frame[terms].sum(axis=1)).abs()
    capped = ["delta_logit_capped"] if "delta_logit_capped" in frame else []
    agg = {q: "mean" for q in ["delta_logit", "delta_direct_effect", "self_repair", *terms, *capped]}
    return frame.groupby("label", sort=False).agg({**agg, "eq2_gap": "max"}).reset_index()


def closure_markdown(table: pd.DataFrame, tol: float = 1e-3) -> str:
    """One Markdown sentence on how closely eq. 2 closes in ``table`` (from :func:`closure_table`)."""
    worst = float(table["eq2_gap"].max())
    verdict = ("rounding error, as it should be when the norm term is computed directly rather "
               "than taken as a remainder" if worst <= tol else
               f"**more than the {tol:g} expected from rounding: something is wrong** (see the "
               "gotchas appendix)")
    text = (f"Over {len(table)} heads and every token, the largest gap between eq. 1's self-repair "
            f"and the sum of eq. 2's terms is **{format_number(worst)}** logits: {verdict}.")
    if "delta_logit_capped" in table:  # Gemma-2: logits = c tanh(x / c)
        text += (" This model soft-caps its final logits, `c tanh(x / c)`: every Δlogit here is the "
                 "change of `x`, the centered logit *before* the cap — the linear quantity the direct "
                 "effects and eq. 2's terms sum to. After the cap the listed heads' mean Δlogit is "
                 + ", ".join(f"{number(c, '+.3g')} ({number(x, '+.3g')} before it) for {l}" for l, c, x in zip(
                     table["label"], table["delta_logit_capped"], table["delta_logit"])) + ".")
    return text


PARTS = {"from_heads": "the later heads", "from_mlps": "the later MLPs", "from_norm": "the final norm",
         "from_block_norms": "the block norms"}  # eq. 2's terms as the live check's table heads them


def example_rows(table: pd.DataFrame) -> tuple[pd.Series, list[pd.Series]]:
    """The live check's rows its text walks through: the clearest example of self-repair (of the
    heads whose ablation removes direct effect and whose self-repair is positive, the one that
    loses most; else the head that loses most; else the first), then every other head whose
    self-repair is negative at the digits shown (the rest of the network made the loss worse),
    most negative first."""
    fmt = ".3g"
    loses = table[table["delta_direct_effect"] < 0]
    clear = loses[loses["self_repair"] > 0]
    pick = clear if len(clear) else loses if len(loses) else table.iloc[:1]
    first = pick.loc[pick["delta_direct_effect"].idxmin()]
    odd = table[(table["self_repair"] < 0) & (table["label"] != first["label"])]
    odd = [r for _, r in odd.sort_values("self_repair").iterrows() if not is_zero(r["self_repair"], fmt)]
    return first, odd


def _largest_part(row: pd.Series) -> tuple[str, float]:
    parts = {q: float(row[q]) for q in PARTS if q in row and pd.notna(row[q])}
    top = max(parts, key=lambda q: abs(parts[q]))
    return PARTS[top], parts[top]


def reading_markdown(table: pd.DataFrame) -> str:
    """How to read a row of the live check (:func:`closure_table`), on the clearest example
    (:func:`example_rows`), and, where a head's self-repair is negative, what such a row means: the
    rest of the network made the loss worse rather than making up for it."""
    first, odd = example_rows(table)
    part, size = _largest_part(first)
    text = (f"**Reading a row.** Take {first['label']}: ablated, its own direct effect "
            f"{changes(first['delta_direct_effect'], '.3g')} (ΔDE), while the logit "
            f"{changes(first['delta_logit'], '.3g')} (Δlogit). So what lies downstream of it must "
            f"{gives_back(first['self_repair'], '.3g', ' logits')}: that difference is eq. 1's self-repair, "
            f"and eq. 2 finds the largest part of it in {part} ({number(size, '.3g')} logits).")
    if odd:
        r = odd[0]
        part, size = _largest_part(r)
        others = [o["label"] for o in odd[1:]]
        also = f" ({', '.join(others)} {'reads' if len(others) == 1 else 'read'} the same way.)" if others else ""
        text += (f" A row can also read the other way. {r['label']}'s self-repair is **negative** "
                 f"({number(r['self_repair'], '.3g')}): its own direct effect {changes(r['delta_direct_effect'], '.3g')}, "
                 f"yet the logit {changes(r['delta_logit'], '.3g')}, so the rest of the network makes the loss "
                 f"worse rather than making up for it — most of all {part} ({number(size, '.3g')} logits). Self-repair "
                 f"is a tendency of averages, not a rule every head obeys on every token; the chapters measure "
                 f"how often and how much.{also}")
    return text


@dataclass
class Intro:
    result: Any
    table: pd.DataFrame


def measure(cfg: Config, progress: bool = False) -> Intro:
    check(cfg)
    model = open_model(cfg)
    r = self_repair(model, demo_tokens(cfg, model), ablation=cfg.ablation, heads=demo_heads(cfg, model),
                    progress=progress)
    return Intro(r, closure_table(r))


TOY_COMPONENTS = {"embedding": (1.0, 0.5, 0.0), "head A": (2.0, 1.0, 0.5), "head B": (1.5, -0.5, 1.0),
                  "MLP": (0.5, 0.2, -0.3)}
TOY_U = (1.0, 0.0, 0.5)  # the correct token's (centered) unembedding direction


@dataclass
class WorkedExample:
    table: pd.DataFrame  # per component: its vector, its direct effect, its direct effect after the ablation
    numbers: dict  # S, S', logit, logit', delta_logit, delta_de, self_repair, norm_term
    text: str  # the example told step by step, every number computed


def worked_example(components: dict | None = None, u=TOY_U, removed: str = "head B") -> WorkedExample:
    """A residual stream of a few components in three dimensions, read out through an RMS norm
    (no gain, no bias) with the correct token's direction ``u``; ``removed`` is zero-ablated.
    Nothing is downstream of it but the norm, so all of its self-repair is the norm's — eq. 1,
    eq. 2 and App. B's closed form on numbers small enough to check by hand."""
    import numpy as np

    comps = {k: np.asarray(v, dtype=float) for k, v in (components or TOY_COMPONENTS).items()}
    if removed not in comps:
        raise InputError(f"{removed!r} is not one of the components {list(comps)}")
    u = np.asarray(u, dtype=float)

    def rms(x) -> float:  # the norm's scale, by hand
        return float(np.sqrt((x ** 2).mean()))

    def vec(x) -> str:
        return "(" + ", ".join(number(float(v), ".3g") for v in x) + ")"

    def f(x) -> str:
        return number(x, "+.3f")

    r = sum(comps.values())
    S = rms(r)
    r2 = r - comps[removed]
    S2 = rms(r2)
    logit, logit2 = float(u @ r / S), float(u @ r2 / S2)
    de = {k: float(u @ v / S) for k, v in comps.items()}
    d_de = -de[removed]
    n = {"S": S, "S_ablated": S2, "logit": logit, "logit_ablated": logit2,
         "delta_logit": logit2 - logit, "delta_de": d_de, "self_repair": (logit2 - logit) - d_de,
         "norm_term": float(u @ r2) * (1 / S2 - 1 / S), "frozen_logit": logit + d_de,
         "closed_form": (S / S2 - 1) * logit + (S / S2) * d_de}
    table = pd.DataFrame({"component": list(comps), "vector": [vec(v) for v in comps.values()],
                          "direct_effect": [de[k] for k in comps],
                          "after_ablation": [0.0 if k == removed else de[k] for k in comps]})
    text = (
        f"**A worked example.** Four components write into a three-dimensional residual stream; they "
        f"sum to r = {vec(r)}. The final norm divides r by its root mean square, "
        f"S = {S:.3f}, and the correct token's logit is u·r/S = **{logit:.3f}** with u = "
        f"{vec(u)}. Freezing S, each component's *direct effect* u·c/S is its share of that logit "
        f"(the table: they add up to {sum(de.values()):.3f}).\n\n"
        f"Now remove {removed} (zero ablation). Its direct effect was {de[removed]:.3f}, so with nothing "
        f"reacting the logit would fall to {n['frozen_logit']:.3f} (ΔDE = {f(d_de)}). But the residual is "
        f"now r′ = {vec(r2)}, whose root mean square is S′ = {S2:.3f}: "
        f"S/S′ = {S / S2:.3f}. The real logit is u·r′/S′ = **{logit2:.3f}**, a change of "
        f"Δlogit = {f(n['delta_logit'])}.\n\n"
        f"The difference, self-repair = Δlogit − ΔDE = {f(n['self_repair'])} (eq. 1), came from nothing "
        f"but the norm: u·r′·(1/S′ − 1/S) = {f(n['norm_term'])} (eq. 2's norm term). And App. B's "
        f"closed form (S/S′ − 1)·logit + (S/S′)·ΔDE gives {f(n['closed_form'])}, the same Δlogit: the "
        f"norm {'amplified' if S / S2 > 1 else 'shrank'} every existing logit by {abs(S / S2 - 1):.1%}.")
    return WorkedExample(table, n, text)


FIGURES = {"worked": Figure("intro-worked", "the worked example"), "live": Figure("intro-live", "the live check")}
TERMS = {"from_heads": "the other heads'", "from_mlps": "the MLPs'", "from_norm": "the final norm's",
         "from_block_norms": "the block norms'"}


def largest_term(key: str, mean: float) -> str:
    """The sentence on eq. 2's term largest in size (``key`` of :data:`TERMS`, its ``mean`` over the
    heads) in words of its sign: a negative term makes the ablation's loss worse, it repairs nothing."""
    who = TERMS[key].removesuffix("'s").rstrip("'")
    many = who.endswith("s")  # "the MLPs give back", "the final norm gives back"
    verb = (lambda v: v) if many else (lambda v: v.replace("give ", "gives ").replace("take ", "takes ").replace("make ", "makes "))
    way = changes(mean, ".3f", verb("give back"), verb("take away a further"), verb("give back nothing"), unit=" logits")
    they = "they" if many else "it"
    what = (verb(f"so {they} make up for part of the loss") if mean > 0 else
            verb(f"so {they} make the ablation's loss worse rather than repairing it"))
    return (f"On those heads, the term of eq. 2 largest in size is {TERMS[key]}: on average over the heads "
            f"{who} {way}" + ("." if "nothing" in way else f", {what}."))


def findings(live: Intro, toy: WorkedExample, model: str, tol: float = 1e-3) -> list[Finding]:
    """"What this chapter shows" of the introduction: the worked example's self-repair, eq. 2's
    closure on the model and which term gave back most on the heads of the live check."""
    n, t = toy.numbers, live.table
    worst = float(t["eq2_gap"].max())
    terms = [c for c in TERMS if c in t]
    means = t[terms].mean()
    top = str(means.abs().idxmax())
    closes = ("to rounding error" if worst <= tol else f"only to {format_number(worst)} logits, more than the {tol:g} "
              "rounding allows: something is wrong")
    return [
        Finding(f"In the worked example, removing one component "
                f"{changes(n['delta_logit'], '.3f', 'raises the logit by', 'lowers the logit by', 'leaves the logit unchanged')}"
                f" where its direct effect predicted {fall(n['delta_de'], '.3f')}: the norm alone "
                f"{changes(n['self_repair'], '.3f', 'gives back', 'takes away a further', 'gives back nothing')}, "
                "eq. 1's self-repair.", (FIGURES["worked"],),
                (n["delta_logit"], n["delta_de"], n["self_repair"])),
        Finding(f"On {model}, ablating {len(t)} heads, eq. 1 and the sum of eq. 2's terms agree {closes} "
                f"(largest per-token gap {format_number(worst)} logits).", (FIGURES["live"],), (len(t), worst)),
        Finding(largest_term(top, float(means[top])), (FIGURES["live"],), (float(means[top]),)),
        Finding("Take-away: self-repair is what an ablation's effect lacks of the direct effect it removes, and "
                "eq. 2 splits it exactly among what lies downstream; every chapter measures it so, on many "
                "more heads and tokens."),
    ]


def shows(live: Intro, toy: WorkedExample, model: str) -> str:
    """The introduction's "What this chapter shows" paragraph."""
    return markdown(findings(live, toy, model))


# -- the tables this chapter shows (selfrepair.tables): the columns its text discusses -----------
TOY_TABLE = Layout(("component", "vector", "direct_effect", "after_ablation"))
CLOSURE_TABLE = Layout(("label", "delta_logit", "delta_direct_effect", "self_repair", "from_heads",
                        "from_mlps", "from_norm", "from_block_norms", "eq2_gap"),
                       names={"self_repair": "self-repair (eq. 1)"}, optional=("from_block_norms",),
                       # a phone: eq. 1 and how closely eq. 2 closes; eq. 2's terms one click away
                       phone=("label", "delta_logit", "delta_direct_effect", "self_repair", "eq2_gap"))


# the rows of :func:`shape_table` in words (read3 #18: not `model_type`, `n_layers`, `revision_sha256`)
SHAPE_NAMES = {"model": "model", "revision": "revision on the hub", "family": "family",
               "model_type": "architecture (Hugging Face's name)", "n_layers": "layers",
               "n_heads": "attention heads per layer", "d_model": "residual stream width",
               "d_head": "head width", "d_mlp": "MLP width", "d_vocab": "vocabulary size",
               "dtype": "number format", "parallel_residual": "attention and MLP in parallel",
               "weights": "weights", "revision_sha256": "weights file's SHA-256 (first 12 hex digits)",
               "adapter": "adapter"}


def shape_table(model: Any) -> Table:
    """The model's identity and shape (:meth:`selfrepair.models.Model.describe`) as a table, each
    row named in words (:data:`SHAPE_NAMES`; another key with its underscores as spaces); a value
    not set (a revision of None: the hub's default) is "—", as in the provenance table."""
    described = model.describe()
    return table(pd.Series({SHAPE_NAMES.get(k, k.replace("_", " ")): shown_path(v) for k, v in described.items()},
                           name="value"), names={"item": "", "value": ""})


__all__ = ["CLOSURE_TABLE", "Config", "Intro", "TOY_TABLE", "WorkedExample",
           "architecture_markdown", "build_markdown", "closure_markdown", "closure_table", "demo_heads",
           "demo_tokens", "example_rows", "findings", "measure", "reading_markdown", "shows", "shape_table", "value_bias_markdown", "worked_example"]
