"""The scorecard: every claim the book tests, on every model whose verdicts are cached, in one table.

It is generated, never typed: the claims come from each chapter module's ``CLAIMS``
(:func:`chapter_claims`; a claim added to a chapter appears here) and from whatever verdicts the
chapters recorded (a recorded verdict of a claim its chapter does not list is shown as recorded,
with the words its record keeps), the verdicts from the records the chapters write beside their
measurements (:mod:`selfrepair.verdict_records`), the chapters' titles and the parts they belong
to from the book's ``_toc.yml`` and notebooks. Nothing is measured: a chapter with no record for a
model is *not run* there. Records of another layout or library version are skipped and counted
(the page says so); a damaged record is skipped with a warning.

Per claim and model a row holds one of :data:`STATUSES`:

- **holds / differs / cannot tell** — the chapter's verdict, with its value, 95% interval (or
  why it has none), n and unit;
- **not tested** — the chapter ran on the model but did not decide this claim (its verdicts list
  has no entry for it: an ablation that was not run, a test that does not apply);
- **rule changed** — the record was decided under another rule than the claim's rule today (its
  side, threshold or the paper's word): the old verdict is in the note, and the chapter must run
  again to decide it under today's;
- **not run** — no record of the chapter for this model.

:func:`counts` tallies them per part of the book and model; :func:`opening` writes the sentences
that open the page from those tallies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from .build_scope import data_phrase
from .claims import Claim, anchor
from .claims import Signed, number, interval_words  # the claims' own number format (1.9×10⁻⁶, not 1.9e-06)
from .verdict_records import FOLDED, latest, rule_id, scan, this_version

STATUSES = ("holds", "differs", "cannot tell", "not tested", "rule changed", "not run")
DECIDED = STATUSES[:3]
# claims a chapter decides again that an earlier chapter decides first: (chapter, claim) -> the
# (chapter, claim) whose decision is counted. Chapter 6 re-decides chapters 1 and 2's claims on
# every cached sweep; the same paper claim is counted once, in its first chapter.
REDECIDES = {("06", "many"): ("01", "many"), ("06", "between"): ("01", "exists"),
             ("06", "norm_share"): ("02", "norm_share")}


def chapter_claims(module) -> list[Claim]:
    """A chapter's claims: its ``CLAIMS`` where it defines them, else every :class:`Claim` it
    defines at module level (constants, and tuples or dicts of them), in definition order."""
    if hasattr(module, "CLAIMS"):
        return list(module.CLAIMS)
    found: dict[int, Claim] = {}
    for value in vars(module).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
        found.update({id(c): c for c in values if isinstance(c, Claim)})
    return list(found.values())


def notebook_title(path: Path) -> str:
    """The first ``# `` heading of a notebook's Markdown (its title in the book), else its stem."""
    for cell in json.loads(Path(path).read_text(encoding="utf-8"))["cells"]:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            for line in src.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return Path(path).stem


def chapter_pages(root: Path, recorded: set[str] = frozenset()) -> pd.DataFrame:
    """One row per chapter with claims (or with records: ``recorded`` holds their prefixes), in
    the book's order: ``chapter`` (prefix), ``module``, ``page`` (the notebook's stem), ``title``
    and ``part`` (its part's caption in ``_toc.yml``)."""
    from .book import chapter_notebooks
    from .chapters import CHAPTERS, chapter_module

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    part_of = {Path(c["file"]).name: p.get("caption", "") for p in toc.get("parts", []) for c in p["chapters"]}
    rows = []
    for nb in chapter_notebooks(root):
        module = chapter_module(nb.stem)
        if nb.stem[:2] in CHAPTERS and (chapter_claims(module) or nb.stem[:2] in recorded):
            rows.append({"chapter": nb.stem[:2], "module": module, "page": nb.stem,
                         "title": notebook_title(nb), "part": part_of.get(nb.stem, "")})
    return pd.DataFrame(rows, columns=["chapter", "module", "page", "title", "part"])


def estimate_text(row: dict, signed: Signed | None = None) -> tuple[str, str]:
    """``(estimate, interval)``: the value with its 95% interval, or why it has none; and how the
    interval was made (or why there is none). ``signed``: the claim's reading in the words of the
    value's sign (its chapter's :class:`~selfrepair.rules.Signed`), so the table says it as the
    chapter does ("a fall of 456% (95% interval 204% to 589%)", not "-456% (-589% to -204%)")."""
    fmt, value = row["fmt"], row["value"]
    if value is None:
        return "no value", row["why"] or "the metric is undefined on this run"
    shown = number(value, fmt) if signed is None else signed.said(value, fmt)
    if row["interval"] == "exact":
        return shown, "no interval: computed exactly, without sampling"
    if not row["reliable"]:
        return shown, "no reliable interval: " + (row["why"] or "too few to give one")
    if signed is not None:
        return f"{shown} ({signed.interval(value, row['lo'], row['hi'], fmt)})", row["interval"]
    return f"{shown} ({interval_words(row['lo'], row['hi'], fmt)})", row["interval"]


def run_command(model: str, chapter: str) -> str:
    """How to run ``chapter`` on the model labelled ``model`` (:func:`~selfrepair.verdict_records.model_label`),
    with the commands this install has."""
    from .cli import parser

    commands = next(a.choices for a in parser()._actions if getattr(a, "choices", None))
    flags = (f"--model {model.removesuffix(FOLDED)} --fold-value-biases" if model.endswith(FOLDED)
             else f"--model {model}")
    text = f"`selfrepair book {flags} --chapters {chapter}`"
    if "measure" in commands:
        text += f" (or only its measurements: `selfrepair measure {flags} --chapters {chapter}`)"
    return text


def claim_fields(claim: Claim) -> dict:
    """What the scorecard shows of a claim, from the chapter's :class:`Claim` (today's words)."""
    paper = ("" if claim.paper is None else number(claim.paper, claim.fmt)
             + (f" ({claim.paper_context})" if claim.paper_context else ""))
    return {"claim": claim.key, "statement": claim.statement, "source": claim.source, "word": claim.rule.word,
            "rule": claim.rule.text(claim.fmt), "reason": claim.rule.reason, "paper": paper,
            "anchor": anchor(claim), "rule_id": rule_id(claim.rule), "listed": True,
            "signed": claim.reading if isinstance(claim.reading, Signed) else None}


def recorded_fields(row: dict) -> dict:
    """The same from a recorded verdict (a claim its chapter's ``CLAIMS`` does not list)."""
    paper = ("" if row["paper"] is None else number(row["paper"], row["fmt"])
             + (f" ({row['paper_context']})" if row["paper_context"] else ""))
    return {"claim": row["claim"], "statement": row["statement"], "source": row["source"], "word": row["word"],
            "rule": row["rule"], "reason": row["reason"], "paper": paper, "anchor": f"claim-{row['claim']}",
            "rule_id": row["rule_id"], "listed": False, "signed": None}


def _claim_row(claim: dict, page: dict, model: str) -> dict:
    counted_in, same_claim = REDECIDES.get((page["chapter"], claim["claim"]), ("", ""))
    return {"part": page["part"], "chapter": page["chapter"], "page": page["page"], "title": page["title"],
            "counted_in": counted_in, "same_claim": same_claim,
            **{k: claim[k] for k in ("claim", "statement", "source", "word", "rule", "reason", "paper")},
            "model": model, "href": f"{page['page']}.html#{claim['anchor']}",
            "verdict": "not run", "value": None, "lo": None, "hi": None, "n": None, "unit": "",
            "estimate": "", "interval": "", "parts": "", "detail": "", "note": ""}


def parts_text(row: dict) -> str:
    """A verdict decided on several estimates (a "proportional" rule's slope and intercept): each
    with its 95% interval and the rule it must meet."""
    fmt = row["fmt"]
    return "; ".join(f"{p['name']} {number(p['value'], fmt)} ({interval_words(p['lo'], p['hi'], fmt)}"
                     f"{'' if p['reliable'] else ', not reliable'}; must be {p['rule']})"
                     for p in row["parts"])


def _rows(claim: dict, page: dict, model: str, got) -> list[dict]:
    """The scorecard's rows of one claim on one model (one per verdict the chapter recorded)."""
    base = _claim_row(claim, page, model)
    if got is None:
        return [{**base, "note": "Run it: " + run_command(model, page["chapter"]) + "."}]
    record, verdicts = got
    mine = [v for v in verdicts if v["claim"] == claim["claim"]]
    if not mine:
        return [{**base, "verdict": "not tested",
                 "note": "The chapter ran on this model but did not decide this claim."}]
    out = []
    for v in mine:
        estimate, interval = estimate_text(v, claim.get("signed"))
        row = {**base, "verdict": v["verdict"], "value": v["value"], "lo": v["lo"], "hi": v["hi"],
               "n": v["n"], "unit": v["unit"], "estimate": estimate, "interval": interval,
               "parts": parts_text(v), "detail": v["detail"], "note": v["why"]}
        if v["rule_id"] != claim["rule_id"]:
            row.update(verdict="rule changed",
                       note=f"Decided under the rule then ({v['rule']}{', “' + v['word'] + '”' if v['word'] else ''}): "
                            f"{v['verdict']}. Run chapter {page['chapter']} again to decide it under today's.")
        elif not claim["listed"]:
            row["note"] = " ".join(filter(None, [v["why"], "(As recorded: the chapter's CLAIMS does not list "
                                                           "this claim today.)"]))
        out.append(row)
    return out


def page_claims(module, chapter: str, chosen: dict) -> list[dict]:
    """A chapter's claims (:func:`chapter_claims`), then those its recorded verdicts decide that
    its ``CLAIMS`` does not list, in the order recorded."""
    claims = {c.key: claim_fields(c) for c in chapter_claims(module)}
    for (ch, _), (_, verdicts) in chosen.items():
        for v in verdicts if ch == chapter else ():
            claims.setdefault(v["claim"], recorded_fields(v))
    return list(claims.values())


@dataclass
class Card:
    """The scorecard of one results cache: ``frame`` (one row per claim, model and verdict),
    ``runs`` (the records read: model, chapter, and ``data``, what the chapter ran on, in words) and ``models`` (the page's own model first)."""

    frame: pd.DataFrame
    runs: pd.DataFrame
    models: list[str]
    set_aside: int = 0  # records of another library version, not shown
    other_layout: int = 0  # record files of another layout (verdict_records.FORMAT), skipped
    pages: pd.DataFrame = field(default_factory=pd.DataFrame)  # the chapters with claims


def build(cache_dir: str | Path, model: str, root: str | Path | None = None) -> Card:
    """The :class:`Card` of ``cache_dir``: every chapter's claims (:func:`chapter_pages`) on
    ``model`` (the book's, always shown) and on every model with a cached record."""
    from .book import find_root

    root = find_root(root)
    found, other_layout = scan(cache_dir)
    records, set_aside = this_version(found)
    chosen = latest(records)
    models = [model] + sorted({m for _, m in chosen} - {model})
    pages = chapter_pages(root, {ch for ch, _ in chosen})
    rows = [r for page in pages.to_dict("records")
            for claim in page_claims(page["module"], page["chapter"], chosen)
            for m in models for r in _rows(claim, page, m, chosen.get((page["chapter"], m)))]
    frame = pd.DataFrame(rows)
    runs = pd.DataFrame([{"model": m, "chapter": ch, "written": pd.Timestamp(rec["written"], unit="s",
                                                                          tz="UTC").strftime("%Y-%m-%d %H:%M UTC"),
                          "verdicts": len(v), "parameters": _parameters(rec), "record": Path(rec["path"]).name,
                          "data": data_phrase(rec.get("params", {}))}
                         for (ch, m), (rec, v) in sorted(chosen.items())],
                        columns=["model", "chapter", "written", "verdicts", "parameters", "record", "data"])
    return Card(frame, runs, models, set_aside, len(other_layout), pages.drop(columns="module"))


def _parameters(record: dict) -> str:
    """A record's parameters that differ from its chapter's defaults, ``name=value``."""
    from .chapters import chapter_module

    try:
        defaults = chapter_module(record["chapter"]).Config().as_dict()
    except Exception:  # a chapter removed since: show every parameter
        defaults = {}
    return ", ".join(f"{k}={v}" for k, v in sorted(record["params"].items())
                     if k != "model" and defaults.get(k, object()) != v) or "the chapter's defaults"


def counted_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows the totals count: each paper claim once, so not a re-decision (:data:`REDECIDES`)
    of a claim an earlier chapter decides."""
    return frame[frame["counted_in"] == ""] if "counted_in" in frame else frame


def redecided_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The re-decisions (:data:`REDECIDES`), shown on the page and out of the totals."""
    return frame[frame["counted_in"] != ""] if "counted_in" in frame else frame.iloc[:0]


def counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows per part, model and status (:data:`STATUSES`, every one a column), in the book's order,
    over :func:`counted_rows` (a part holding only re-decisions has no row)."""
    order = {p: i for i, p in enumerate(dict.fromkeys(frame["part"]))} if not frame.empty else {}
    models = {m: i for i, m in enumerate(dict.fromkeys(frame["model"]))} if not frame.empty else {}
    frame = counted_rows(frame)
    if frame.empty:
        return pd.DataFrame(columns=["part", "model", *STATUSES])
    out = (frame.groupby(["part", "model"])["verdict"].value_counts().unstack(fill_value=0)
           .reindex(columns=list(STATUSES), fill_value=0).reset_index())
    out.columns.name = None
    return out.sort_values(["part", "model"], key=lambda s: s.map(order if s.name == "part" else models),
                           ignore_index=True)


__all__ = ["Card", "DECIDED", "REDECIDES", "STATUSES", "build", "chapter_claims", "chapter_pages", "claim_fields",
           "counted_rows", "counts", "redecided_rows",
           "estimate_text", "notebook_title", "page_claims", "parts_text", "recorded_fields", "run_command"]

