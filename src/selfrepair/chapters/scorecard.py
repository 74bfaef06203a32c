"""Chapter 9 — the scorecard: every claim of chapters 1–8 on every model whose verdicts are cached.

A notebook executed by the runner like the chapters (so ``selfrepair book`` builds it with the
book's parameters, and ``--chapters`` works for it), which **measures nothing**: it reads the
verdict records the chapters write beside their measurements (:mod:`selfrepair.verdict_records`)
and builds the table with :mod:`selfrepair.scorecard`. It loads no model: its config is not a
:class:`~selfrepair.config.RunConfig`, so the pre-flight check and the provenance table skip the
model. :data:`RUNS_LAST`: the runner executes it after every other chapter it runs, and adds it
to every run that executes a chapter and builds the book, so the page always shows the records as
they are (a ``--no-build`` run executes only the chapters it names; the next build refreshes it).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd
from IPython.display import HTML

from ..config import Config as BaseConfig
from ..build_scope import PAPER_COMMAND, PAPER_NAMES, is_paper_model, model_phrase, models_sentence, on_what
from ..errors import InputError
from ..reading import decision_rule, short_label, word_anchor, words_reading
from ..scorecard import DECIDED, STATUSES, Card, build, counted_rows, counts, redecided_rows
from ..rules import above, number
from ..tables import TABLE_CLASS, Layout, counted, listed
from ..verdict_records import model_label

RUNS_LAST = True  # executed after the other chapters (it reads what they recorded)


@dataclass(frozen=True)
class Config(BaseConfig):
    model: str = "gemma-3-270m"  # the book's model: always shown first, whether its chapters ran or not
    fold_value_biases: bool = False  # the book model's head-output convention (it names the model's numbers)
    cache_dir: str = "results"  # the results cache whose verdict records are read (nothing is written)

    def run_summary(self) -> str:
        """What this page ran on (:func:`selfrepair.setting.run_summary`): no model, the records."""
        from ..experiment import shown_path

        return ("**What ran here.**\n\n"
                f"- **Model.** None is loaded and nothing is measured: the page reads the verdicts the chapters "
                f"recorded, from the results cache (the folder `{shown_path(self.cache_dir)}/`), for every model found there, "
                f"the book's model (`{model_label(self.model, self.fold_value_biases)}`) first.\n"
                "- **Whose numbers.** Every estimate, interval and n is a chapter's, as its record keeps it; "
                "the papers' own words and numbers are in each claim's cell, from the chapters' claims data.\n"
                "- **What this can change.** Each chapter's page says where its model and data differ from the "
                "paper's (quantized weights, a corpus other than The Pile) and can move its numbers: a verdict "
                "that differs is a difference on that model and data, not a refutation of the paper.")

    def validate(self) -> None:
        super().validate()
        if not self.model.strip():
            raise InputError("model must name the book's model: a hub id, a local directory, "
                             "'gemma-3-270m' or 'tiny-<family>'")


def measure(cfg: Config, progress: bool = True) -> Card:
    """The scorecard of ``cfg.cache_dir`` (reads records only; ``progress`` is accepted for the
    runner's and ``selfrepair measure``'s call and unused)."""
    return build(cfg.cache_dir, model_label(cfg.model, cfg.fold_value_biases))


def reading_a_verdict(fmt: str = ".0%") -> str:
    """How to read *holds*, *differs* and *cannot tell*, with the two ways an interval leaves a rule
    undecided in the words every verdict uses (:meth:`~selfrepair.rules.Rule.undecided`), on a
    worked rule: an interval that straddles the threshold, and one with an end at it."""
    rule, across, end = above(0.5), (0.4, 0.6), (0.5, 0.7)

    def interval(lo: float, hi: float) -> str:
        return f"from {number(lo, fmt)} to {number(hi, fmt)}"

    return ("**Reading a verdict.** *Holds*: the whole 95% interval lies on the paper's side of the rule's "
            "threshold. *Differs*: it lies entirely on the other side. *Cannot tell*: it does neither, or it is "
            "not reliable (too few independent documents, rows or prompts). For a claim that holds when "
            f"{rule.when(fmt)}, an interval {interval(*across)} {rule.undecided(*across, fmt)}, and one "
            f"{interval(*end)} {rule.undecided(*end, fmt)}: neither lies wholly {rule.text(fmt)}, and the "
            "verdict says which of the two it is. Each claim links to its place in its chapter, where the rule, "
            "its reason and the paper's number are explained.")


def _link(row: dict) -> str:
    """The claim's statement, linked to its row of the table (raw HTML: an in-page id, not a
    Sphinx target)."""
    return f'<a href="#{_row_id(row)}">{_e(row["statement"])}</a>'


def _links(rows: pd.DataFrame) -> str:
    return ", ".join(_link(r) for r in rows.to_dict("records"))


def _row_id(row: dict) -> str:
    return f"score-{row['chapter']}-{row['claim']}"


def model_sentence(frame: pd.DataFrame, tally: dict) -> str:
    """One model's verdicts in one part: the counts of :func:`selfrepair.scorecard.counts`
    (``tally``) in words, then the claims that held and those that differed."""
    words = {"holds": ("holds", "hold"), "differs": ("differs", "differ"), "cannot tell": ("cannot tell", "cannot tell"),
             "not tested": ("was not tested", "were not tested"),
             "rule changed": ("was decided under an older rule", "were decided under an older rule")}
    said = [counted(tally[s], *words[s]) for s in STATUSES[:-1] if tally[s] or s in DECIDED]
    text = f"On **{tally['model']}**, " + ", ".join(said)
    if tally["not run"]:
        chapters = listed(sorted(set(frame.loc[frame["verdict"] == "not run", "chapter"])), "chapter")
        text += f"; {counted(tally['not run'], 'claim was', 'claims were')} not run ({chapters})"
    text += "."
    for status, lead in (("holds", "Held"), ("differs", "Differed")):
        rows = frame[frame["verdict"] == status].drop_duplicates(["chapter", "claim"])
        if len(rows):
            text += f" {lead}: {_links(rows)}."
    return text


def split_sentence(frame: pd.DataFrame) -> str:
    """The claims that hold on one model and differ on another (empty when none)."""
    decided = frame[frame["verdict"].isin(("holds", "differs"))]
    split = decided.groupby(["chapter", "claim"])["verdict"].nunique()
    claims = [c for c in dict.fromkeys(zip(decided["chapter"], decided["claim"])) if split.get(c, 0) > 1]
    if not claims:
        return ""
    parts = []
    for chapter_, claim in claims:
        g = decided[(decided["chapter"] == chapter_) & (decided["claim"] == claim)]
        how = "; ".join(f"{v} on {', '.join(dict.fromkeys(g.loc[g['verdict'] == v, 'model']))}"
                        for v in ("holds", "differs"))
        parts.append(f"{_link(g.iloc[0].to_dict())} ({how})")
    return " Decided one way on one model and the other way on another: " + "; ".join(parts) + "."


def opening(card: Card) -> str:
    """The sentences that open the page: per part of the book, what held on which model and what
    did not, computed from the table (:func:`selfrepair.scorecard.counts`: each paper claim once;
    a chapter's re-decisions of an earlier chapter's claims are said apart, out of the totals)."""
    tallies = counts(card.frame)
    out = []
    for part, g in card.frame.groupby("part", sort=False):
        kept, again = counted_rows(g), redecided_rows(g)
        sentences = []
        if len(kept):
            n_claims = len(kept.drop_duplicates(["chapter", "claim"]))
            sentences.append(f"**{part}** — {counted(n_claims, 'claim')} "
                             f"({listed(list(dict.fromkeys(kept['chapter'])), 'chapter')}) on "
                             f"{counted(kept['model'].nunique(), 'model')}.")
            sentences += [model_sentence(kept[kept["model"] == t["model"]], t)
                          for t in tallies[tallies["part"] == part].to_dict("records")]
        else:
            sentences.append(f"**{part}** —")
        if len(again):
            sentences.append(redecided_sentence(again, card.frame))
        out.append(" ".join(sentences) + split_sentence(kept))
    return "\n\n".join(out)


def agreement(again: pd.DataFrame, frame: pd.DataFrame) -> tuple[int, int]:
    """Of the decided re-decisions, how many have the verdict of the claim counted in its first
    chapter on the same model, and how many have a decided counterpart there."""
    first = frame.set_index(["chapter", "claim", "model"])["verdict"]
    pairs = [(r["verdict"], first.get((r["counted_in"], r["same_claim"], r["model"])))
             for r in again.to_dict("records") if r["verdict"] in DECIDED]
    pairs = [(a, b.iloc[0] if isinstance(b, pd.Series) else b) for a, b in pairs]
    pairs = [(a, b) for a, b in pairs if b in DECIDED]
    return sum(a == b for a, b in pairs), len(pairs)


def redecided_sentence(again: pd.DataFrame, frame: pd.DataFrame) -> str:
    """The re-decisions of one part in words: whose claims they decide again, that they are out of
    the totals, their verdicts per model, and whether they agree with the counted ones."""
    n = len(again.drop_duplicates(["chapter", "claim"]))
    text = (f"{listed(list(dict.fromkeys(again['chapter'])), 'Chapter')} decides "
            f"{counted(n, 'claim')} of {listed(sorted(set(again['counted_in'])), 'chapter')} again "
            f"({_links(again.drop_duplicates(['chapter', 'claim']))}); each paper claim is counted once, in "
            "the chapter that decides it first, so these are not in the totals.")
    for model, g in again.groupby("model", sort=False):
        said = ", ".join(counted(int((g["verdict"] == s_).sum()), *w) for s_, w in
                         (("holds", ("holds", "hold")), ("differs", ("differs", "differ")),
                          ("cannot tell", ("cannot tell", "cannot tell"))))
        same, of = agreement(g, frame)
        text += f" Decided again on **{model}**: {said}"
        text += (f"; {same} of {of} agree with the counted verdict." if of else ".")
    return text


def table(card: Card) -> HTML:
    """The scorecard as one HTML table per part: per claim (linked to its place in its chapter)
    the paper's words, the rule and the paper's number; per model our estimate with its 95%
    interval and n, and the verdict with what it rests on."""
    return HTML("".join(_part_html(part, g) for part, g in card.frame.groupby("part", sort=False)))


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def _claim_cell(r: dict, span: int) -> str:
    word = f"“{_e(r['word'])}” = " if r["word"] else ""
    paper = f'<span class="scorecard-paper">the paper: {_e(r["paper"])}</span>' if r["paper"] else ""
    reason = (f'<a class="scorecard-why" href="#{word_anchor(r["word"])}">why “{_e(r["word"])}” reads so</a>'
              if r["reason"] and r["word"] else  # each word's reason once, in the reading below the table
              f"<details><summary>why this rule</summary>{_e(r['reason'])}</details>" if r["reason"]
              else '<span class="scorecard-note">(the rule gives no reason yet)</span>')
    again = (f'<span class="scorecard-note">decided again: the claim of chapter {_e(r["counted_in"])} '
             f'(<a href="#{_row_id({"chapter": r["counted_in"], "claim": r["same_claim"]})}">its row</a>), '
             "counted there and not in this page's totals</span>" if r.get("counted_in") else "")
    return (f'<td class="text scorecard-claim" rowspan="{span}"><a href="{_e(r["href"])}">{_e(r["statement"])}</a>'
            f'<span class="scorecard-where">chapter {_e(r["chapter"])} · {_e(r["source"])}</span>{again}'
            f'<span class="scorecard-rule">the rule: {word}{_e(r["rule"])}</span>{paper}{reason}</td>')


def _estimate_cell(r: dict) -> str:
    if r["verdict"] == "not run" or not r["estimate"]:
        return '<td class="text" data-label="estimate">—</td>'
    n = f"n = {r['n']:,} {_e(r['unit'])}" if r["n"] is not None else "no n"
    parts = f'<span class="scorecard-note">decided on: {_e(r["parts"])}</span>' if r["parts"] else ""
    return (f'<td class="text" data-label="estimate">{_e(r["estimate"])}<span class="scorecard-note">{n}; '
            f'{_e(r["interval"])}</span>{parts}</td>')


def _part_html(part: str, g: pd.DataFrame) -> str:
    body = []
    for (_, _claim), rows in g.groupby(["chapter", "claim"], sort=False):
        for i, r in enumerate(rows.to_dict("records")):
            first = _claim_cell(r, len(rows)) if i == 0 else ""
            rid = f' id="{_row_id(r)}"' if i == 0 else ""
            said = r["note"] and r["note"] not in r["interval"]  # not twice: the estimate's cell gives it
            note = f'<span class="scorecard-note">{_e(r["note"])}</span>' if said else ""
            body.append(f"<tr{rid}>{first}<td class=\"text\" data-label=\"model\">{_e(r['model'])}</td>"
                        f"{_estimate_cell(r)}<td class=\"text scorecard-verdict "
                        f'verdict-{r["verdict"].replace(" ", "-")}" data-label="verdict">'
                        f"<strong>{_e(r['verdict'])}</strong>{note}</td></tr>")
    head = "".join(f'<th class="text">{h}</th>' for h in
                   ("claim: the paper's words, the rule, the paper's number", "model",
                    "our estimate (95% interval, n)", "verdict"))
    return (f'<div class="{TABLE_CLASS}-box"><table class="{TABLE_CLASS} scorecard">'
            f"<caption>{_e(part)}</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            "</table></div>")


def reading(card: Card) -> str:
    """The book's one reading of the papers' words (each word once, with its reason and the claims
    that read it, linked to their rows; every chapter's rules table and each row above link here),
    then when a verdict holds, differs or cannot tell."""
    rows = card.frame.drop_duplicates(["chapter", "claim"])
    words = [(r["word"], r["reason"], [(f"{r['chapter']} · {short_label(r['statement'])}", f"#{_row_id(r)}")])
             for r in rows.to_dict("records")]
    return words_reading(words) + "\n\n" + decision_rule()


def how_to_run(card: Card) -> str:
    """What the page read, what it set aside, and how to fill a *not run* cell."""
    runs = card.runs
    text = (f"The table reads {counted(len(runs), 'record')} of {counted(runs['model'].nunique(), 'model')} "
            f"(the latest per chapter and model; listed below).")
    if card.set_aside:
        text += (f" {counted(card.set_aside, 'record')} written by another version of the library "
                 f"{'was' if card.set_aside == 1 else 'were'} set aside: running the chapter again rewrites it.")
    if card.other_layout:
        text += (f" {counted(card.other_layout, 'record')} in an older layout "
                 f"{'was' if card.other_layout == 1 else 'were'} skipped: running the chapter again rewrites it.")
    missing = card.frame[card.frame["verdict"] == "not run"]
    if len(missing):
        first = missing.iloc[0]
        text += (f" A *not run* cell fills in when the chapter runs on that model with this cache, e.g. "
                 f"{first['note'][len('Run it: '):].rstrip('.')}; then run this page again "
                 f"(`--chapters 09`: `selfrepair book` runs it after every chapter it runs).")
    return text


RUNS_TABLE = Layout(("model", "chapter", "verdicts", "parameters", "written"),
                    names={"verdicts": "verdicts", "parameters": "parameters (other than the chapter's defaults)",
                           "written": "written"})


def shows(card: Card) -> str:
    """The closing "What this page shows": three to six plain sentences computed from the table —
    what it read, each paper claim once on the book's model, by part, the re-decisions, and the
    take-away."""
    frame, model = card.frame, card.models[0]
    kept, again = counted_rows(frame), redecided_rows(frame)
    claims = kept.drop_duplicates(["chapter", "claim"])
    chapters = list(dict.fromkeys(claims["chapter"]))
    redone = again.drop_duplicates(["chapter", "claim"])
    out = [f"This page read {counted(len(card.runs), 'record')} of {counted(card.runs['model'].nunique(), 'model')} "
           f"and counts {counted(len(claims), 'claim')} of {listed(chapters, 'chapter')}, each once"
           + (f"; {listed(list(dict.fromkeys(redone['chapter'])), 'chapter')} decides "
              f"{counted(len(redone), 'claim')} of {listed(sorted(set(redone['counted_in'])), 'chapter')} again, "
              "shown in the table but left out of these totals" if len(again) else "") + "."]
    mine = kept[kept["model"] == model].drop_duplicates(["chapter", "claim"])
    n = {s_: int((mine["verdict"] == s_).sum()) for s_ in STATUSES}
    decided = n["holds"] + n["differs"]
    if decided + n["cannot tell"]:
        out.append(f"On {model}, {n['holds']} of the {len(mine)} hold, {counted(n['differs'], 'differs', 'differ')} "
                   f"and {n['cannot tell']} cannot tell (an interval that reaches the rule's threshold, too few units, or "
                   "a claim whose assumption fails on this run: the table says which)"
                   + (f"; {n['not run']} did not run" if n["not run"] else "") + ".")
        parts = [f"{part}: {int((g['verdict'] == 'holds').sum())} of {len(g)} hold"
                 for part, g in mine.groupby("part", sort=False)]
        out.append("By part of the book, " + "; ".join(parts) + ".")
    else:
        out.append(f"No chapter has decided a claim on {model} in this cache: every row there is not run.")
    same, of = agreement(again, frame)
    if of:
        out.append(f"The re-decisions agree with the counted verdict in {same} of {of} cases.")
    if decided:
        out.append(_take_away(mine, model, card.runs))
    return " ".join(out)


def _scope(runs: pd.DataFrame, model: str | None = None, chapters=None) -> dict[str, dict[str, list[str]]]:
    """``{model: {data in words: [chapters]}}`` of the records read (``runs``, its ``data`` column),
    restricted to ``model`` and ``chapters`` when given."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in runs.to_dict("records"):
        if (model is None or r["model"] == model) and (chapters is None or r["chapter"] in chapters):
            out.setdefault(r["model"], {}).setdefault(r.get("data") or "its own inputs", []).append(r["chapter"])
    return out


def scope_markdown(card: Card) -> str:
    """On what every verdict of this page was decided: the models and data of the records read,
    whether the papers' own models are among them, and how to read a verdict that differs."""
    found = _scope(card.runs)
    if not found:
        return "**On what.** " + models_sentence(found)
    text = "**On what.** " + models_sentence(found, "The records read here were decided on", "these records")
    return text + (" A verdict that *differs* is a difference on that model and data, not a refutation of the "
                   "paper; one that *holds* is evidence on that model, not a reproduction of the paper's numbers.")


def _on(model: str, runs: pd.DataFrame, chapters) -> str:
    """``model`` and the data its counted verdicts were decided on, in words."""
    found = _scope(runs, model, set(chapters)).get(model) if "data" in runs else None
    return model_phrase(model) + (f" and {on_what(found)}" if found else "")


BEYOND = "Beyond the papers"  # the toc's part for other papers' claims (AtP, IOI), not the two papers'


def _take_away(mine: pd.DataFrame, model: str, runs: pd.DataFrame | None = None) -> str:
    """The share of decided claims that hold on ``model``: the two papers' claims apart from those of
    the part beyond them (other papers' methods and circuits), each count said with its own."""
    def tally(rows: pd.DataFrame) -> tuple[int, int, int]:
        return (int((rows["verdict"] == "holds").sum()), int(rows["verdict"].isin(["holds", "differs"]).sum()),
                len(rows))

    beyond = mine["part"] == BEYOND
    (held, decided, total), (held2, decided2, total2) = tally(mine[~beyond]), tally(mine[beyond])
    runs = runs if runs is not None else pd.DataFrame(columns=["model", "chapter"])
    papers = mine[~beyond & mine["verdict"].isin(["holds", "differs"])]
    text = f"Take-away: on {_on(model, runs, papers['chapter'] if len(papers) else mine['chapter'])}, "
    text += (f"of the two papers' {counted(total, 'claim')}, {decided} {'is' if decided == 1 else 'are'} decided "
             f"(a claim is decided when it holds or differs; the other {total - decided} cannot tell or did not run), "
             f"and {held} of those {decided} hold ({held / decided:.0%})" if decided
             else "none of the two papers' claims is decided (holds or differs)")
    if decided2:
        chapters = listed(list(dict.fromkeys(mine[beyond]["chapter"])), "chapter")
        text += (f"; of the {counted(total2, 'claim')} beyond them ({chapters}: other papers' methods and "
                 f"circuits), {decided2} {'is' if decided2 == 1 else 'are'} decided and {held2} of those hold")
    theirs = [m for m in dict.fromkeys(runs["model"]) if is_paper_model(m)]
    if not is_paper_model(model) and not theirs:
        text += (f"; none was decided on the papers' own models ({PAPER_NAMES}, …), which this cache has no "
                 f"record of (`{PAPER_COMMAND}` runs them, with the hub and a GPU), so a claim that differs "
                 "here is a difference on this model and data, not a refutation")
    elif not is_paper_model(model):
        text += f"; the papers' own models in this cache ({', '.join(theirs)}) have their own rows in the table"
    return text + "; each row of the table gives the estimate, its interval and the rule it is held to."
