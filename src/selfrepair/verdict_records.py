"""Each chapter's verdicts, kept beside its measurements so the scorecard reads them without
running anything.

When a chapter's ``measure(cfg)`` returns (in a notebook, or under ``selfrepair measure``), the
:func:`recorded` wrapper writes its verdicts — per claim the paper's word and number, the rule
and its reason, the value with its 95% interval, n and unit, how the interval was made, the
verdict word and why it could not be decided — as one small JSON file in the results cache::

    <cache_dir>/<model slug>/verdicts-<chapter>-<16 hex digits of sha256(chapter, parameters, version)>.json

written atomically (:func:`selfrepair.results.atomic_write`): a reader never sees half a file,
and a run with other parameters writes another file beside it. The parameters in the name are
the chapter's config without the knobs that do not change its numbers (:data:`NOT_NUMBERS`).

A verdict is about the chapter's model, or — for a chapter that decides several models' cached
runs, such as chapter 6 — about the model its ``Verdict.model`` names. :func:`scan` returns every
record of a cache in this layout (:data:`FORMAT`) and the files of another layout, which the
scorecard skips with a note (the chapter rewrites them when it runs again); a damaged file
(unreadable, not JSON, or missing what a record holds) is skipped with a warning. :func:`latest`
keeps, per chapter and model, the verdicts of the most recently written record that holds that
model: the scorecard (:mod:`selfrepair.scorecard`) shows those. Only rank 0 of a ``torchrun``
launch writes a record.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

FORMAT = 2  # the record's layout; a record of another layout is skipped (the chapter rewrites it)
PATTERN = "*/verdicts-*.json"
NOT_NUMBERS = ("cache_dir", "device", "remote", "batch_size")  # knobs, never part of a record's name
FOLDED = " (value biases folded)"  # a model's label when its value biases were folded


def model_label(model: str, fold_value_biases: bool = False) -> str:
    """How the book names a model's numbers: the model as given (a path under the book's root
    relative to it, any other as ``…/<name>``) and, when folded, the head-output convention."""
    from .experiment import shown_path

    return str(shown_path(model)) + (FOLDED if fold_value_biases else "")


def _number(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for a missing or non-finite value."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def rule_id(rule) -> str:
    """What identifies a rule across runs (its side, bounds and the paper's word): a record made
    under another rule of the same claim is marked as such, not shown as today's verdict."""
    return json.dumps([rule.op, [float(b) for b in rule.bounds], rule.word])


def verdict_row(v, model: str) -> dict:
    """One verdict (:class:`selfrepair.claims.Verdict`) as a flat JSON-able dict; ``model`` is the
    label of the model it is about unless the verdict names its own (``Verdict.model``)."""
    c, e = v.claim, v.estimate
    if v.lo is None:
        interval = "exact"  # the chapter computed it without sampling: no interval to give
    elif e is not None:
        interval = e.describe()
    else:  # the older helpers (Verdict.share / Verdict.mean) resample units as independent draws
        interval = "an interval that treats each of them as an independent draw"
    parts = [{"name": name, "value": _number(p.value), "lo": _number(p.lo), "hi": _number(p.hi),
              "reliable": p.reliable, "rule": rule.text(c.fmt), "word": rule.word} for name, p, rule in v.parts]
    return {"claim": c.key, "model": getattr(v, "model", "") or model, "statement": c.statement,
            "source": c.source, "metric": c.metric, "word": c.rule.word, "rule": c.rule.text(c.fmt),
            "reason": c.rule.reason, "rule_id": rule_id(c.rule), "paper": _number(c.paper),
            "paper_context": c.paper_context, "fmt": c.fmt, "value": _number(v.value),
            "lo": _number(v.lo), "hi": _number(v.hi), "interval": interval,
            "reliable": e.reliable if e is not None else None not in (_number(v.lo), _number(v.hi)),
            "n": v.n, "unit": v.unit, "verdict": v.word, "why": v.why, "detail": v.detail, "parts": parts}


RECORD_KEYS = frozenset(("format", "chapter", "model", "version", "written", "params", "verdicts"))
ROW_KEYS = frozenset(("claim", "model", "statement", "source", "metric", "word", "rule", "reason", "rule_id",
                      "paper", "paper_context", "fmt", "value", "lo", "hi", "interval", "reliable", "n", "unit",
                      "verdict", "why", "detail", "parts"))  # what verdict_row writes


def chapter_of(module: str) -> str:
    """The two-digit prefix of a chapter module (``selfrepair.chapters.existence`` -> ``"01"``)."""
    from .chapters import CHAPTERS

    name = module.rsplit(".", 1)[-1]
    found = [k for k, v in CHAPTERS.items() if v == name]
    if not found:
        raise ValueError(f"{module} is not a chapter module of selfrepair.chapters.CHAPTERS")
    return found[0]


def record_path(cfg, chapter: str) -> Path:
    """Where ``cfg``'s verdicts of ``chapter`` are kept (module docstring)."""
    from . import __version__
    from .measure import _slug, results_root

    params = {k: v for k, v in cfg.as_dict().items() if k not in NOT_NUMBERS}
    digest = hashlib.sha256(json.dumps([chapter, params, __version__], sort_keys=True, default=str)
                            .encode()).hexdigest()[:16]
    return results_root(cfg.cache_dir) / _slug(cfg.model) / f"verdicts-{chapter}-{digest}.json"


def save(cfg, chapter: str, verdicts: list) -> Path:
    """Write ``verdicts`` of ``chapter`` run with ``cfg`` atomically; returns the file."""
    from . import __version__
    from .results import atomic_write

    fold = bool(getattr(cfg, "fold_value_biases", False))
    label = model_label(cfg.model, fold)
    record = {"format": FORMAT, "chapter": chapter, "model": label, "version": __version__,
              "written": time.time(), "params": {k: v for k, v in cfg.as_dict().items() if k not in NOT_NUMBERS},
              "verdicts": [verdict_row(v, label) for v in verdicts]}
    path = record_path(cfg, chapter)
    text = json.dumps(record, indent=1, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def recorded(measure: Callable) -> Callable:
    """Wrap a chapter's ``measure(cfg, ...)`` so that the verdicts of what it returns
    (``result.verdicts``) are saved beside its measurements (:func:`save`); the result is
    returned unchanged. A chapter whose result has no ``verdicts`` records nothing."""
    chapter = chapter_of(measure.__module__)

    @functools.wraps(measure)
    def run(cfg, *args, **kwargs):
        result = measure(cfg, *args, **kwargs)
        verdicts = getattr(result, "verdicts", None)
        main = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank measures, rank 0 writes
        if verdicts is not None and getattr(cfg, "cache_dir", None) and main:
            save(cfg, chapter, list(verdicts))
        return result

    return run


def _damage(record) -> str:
    """What a record of this layout lacks ('' when it is whole)."""
    if not isinstance(record, dict):
        return "not a record"
    missing = RECORD_KEYS - set(record)
    if missing:
        return f"no {', '.join(sorted(missing))}"
    if not isinstance(record["verdicts"], list) or not all(isinstance(r, dict) for r in record["verdicts"]):
        return "its verdicts are not a list of verdicts"
    missing = set().union(*(ROW_KEYS - set(r) for r in record["verdicts"])) if record["verdicts"] else set()
    if missing:
        return f"a verdict without {', '.join(sorted(missing))}"
    try:
        float(record["written"])
    except (TypeError, ValueError):
        return "no time of writing"
    return ""


def scan(cache_dir: str | Path) -> tuple[list[dict], list[Path]]:
    """``(records, other_layout)``: every record under ``cache_dir`` of this layout
    (:data:`FORMAT`), oldest first, each with ``path``; and the files written in another layout
    (skipped: the chapter rewrites them when it runs again). A damaged file is skipped with a
    warning that names it and what is wrong."""
    out, other = [], []
    from .measure import results_root

    for path in sorted(results_root(cache_dir).glob(PATTERN)):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping unreadable verdict record {path}: {e}", stacklevel=2)
            continue
        if isinstance(record, dict) and record.get("format") != FORMAT:
            other.append(path)
            continue
        damage = _damage(record)
        if damage:
            warnings.warn(f"skipping damaged verdict record {path}: {damage}", stacklevel=2)
            continue
        out.append({**record, "path": path})
    return sorted(out, key=lambda r: (float(r["written"]), str(r["path"]))), other


def read(cache_dir: str | Path) -> list[dict]:
    """The records of :func:`scan` (those of another layout left out)."""
    return scan(cache_dir)[0]


def latest(records: list[dict]) -> dict[tuple[str, str], tuple[dict, list[dict]]]:
    """``{(chapter, model): (record, rows)}``: per chapter and model the verdict rows of the most
    recently written record holding that model (a later run replaces an earlier one)."""
    out: dict[tuple[str, str], tuple[dict, list[dict]]] = {}
    for record in records:  # oldest first: a newer record overwrites
        by_model: dict[str, list[dict]] = {}
        for row in record["verdicts"]:
            by_model.setdefault(row["model"], []).append(row)
        by_model.setdefault(record["model"], [])  # ran on its own model, even with no verdict
        for model, rows in by_model.items():
            out[(record["chapter"], model)] = (record, rows)
    return out


def this_version(records: list[dict]) -> tuple[list[dict], int]:
    """The records written by this library's version, and how many others were set aside (their
    numbers came from other code; the chapter writes a new record when it runs again)."""
    from . import __version__

    keep = [r for r in records if r.get("version") == __version__]
    return keep, len(records) - len(keep)


__all__ = ["FOLDED", "FORMAT", "NOT_NUMBERS", "RECORD_KEYS", "ROW_KEYS", "chapter_of", "latest", "model_label",
           "read", "record_path", "recorded", "rule_id", "save", "scan", "this_version", "verdict_row"]
