"""The scorecard (chapter 9): generated from the chapters' claims and the verdict records they write
beside their measurements, for every model with records, and measuring nothing.

- records: written by each chapter's ``measure`` (atomically, keyed by its parameters), read back
  as they were decided; the latest per chapter and model wins; a record of another library
  version is set aside and one of an older layout skipped, each with a note; a damaged one
  (not JSON, or missing what a record holds) is skipped with a warning; a verdict decided under
  another rule is shown as such; a recorded verdict of a claim its chapter does not list appears
  as recorded;
- chapter 1 run on two tiny families: the scorecard's rows are the verdicts ``measure`` returned
  (value, interval, n, unit, verdict: nothing typed), both models appear, every decided row's
  cell shows its interval and n;
- the page on the tiny profile (conftest's ``book``: built as the Pages workflow builds it): every
  claim of every chapter (``CLAIMS`` of each chapter module) for the tiny model, each decided one
  with an interval and n or the reason it has none, linked to its anchor in its chapter; the opening sentences' numbers
  equal the table's counts;
- a second tiny family run of one chapter: both models appear, and every other chapter says
  *not run* on the second, with the command that runs it;
- nothing is recomputed: no model is loaded, no forward pass runs and the cache is unchanged;
- the runner: the scorecard runs after every other chapter, and with every run that executes one.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from selfrepair import __version__
from selfrepair.book import load_profile
from selfrepair.book import runner
from selfrepair.chapters import CHAPTERS, chapter_module
from selfrepair.chapters import scorecard as chapter
from selfrepair.claims import Claim, Verdict, above, anchor, paper_word
from selfrepair.scorecard import DECIDED, REDECIDES, STATUSES, Card, build, chapter_claims, claim_fields, counts
from selfrepair.uncertainty import Estimate
from selfrepair.verdict_records import FORMAT, latest, read, record_path, save

ROOT = Path(__file__).resolve().parents[1]
TINY = load_profile("tiny", ROOT)
SECOND = "tiny-gpt2"  # a second tiny family


def tiny_config(prefix: str, cache_dir: Path, **over):
    """Chapter ``prefix``'s config on the tiny profile (as the runner passes it)."""
    nb = next((ROOT / "book").glob(f"{prefix}_*.ipynb"))
    params = {**runner.chapter_params(nb, {**TINY, "cache_dir": str(cache_dir)}), **over}
    return chapter_module(prefix).Config.from_params(**params)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its size, modification time and SHA-256."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


CLAIMED = [p for p in sorted(CHAPTERS) if chapter_claims(chapter_module(p))]


# -- records ------------------------------------------------------------------------------------
MOST = Claim("most", "Most tokens do it", "§1", "the share of tokens that do it", paper_word("most"),
             fmt=".0%", rationale="the paper says most")


class _Cfg:
    """A stand-in config: what a record keeps of a chapter's config."""

    def __init__(self, cache_dir, model="m", **params):
        self.cache_dir, self.model, self.params = str(cache_dir), model, params

    def as_dict(self):
        return {"model": self.model, "cache_dir": self.cache_dir, **self.params}


def _estimate(value, lo, hi, clusters=40, why=""):
    return Estimate(value, lo, hi, 36, "heads", clusters, "documents", 3, 500, why)


def test_a_record_keeps_what_each_verdict_was_decided_on(tmp_path):
    v = Verdict.of(MOST, _estimate(0.7, 0.6, 0.8))
    few = Verdict.of(replace(MOST, key="few"), _estimate(0.7, 0.1, 0.9, clusters=6, why="only 6 documents"))
    path = save(_Cfg(tmp_path, n_tokens=512), "01", [v, few])
    assert path == record_path(_Cfg(tmp_path, n_tokens=512), "01") and path.parent.name == "m"
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically
    record = json.loads(path.read_text())
    assert record["version"] == __version__ and record["params"] == {"model": "m", "n_tokens": 512}
    row, unreliable = record["verdicts"]
    assert (row["claim"], row["verdict"], row["value"], row["lo"], row["hi"], row["n"], row["unit"]) == \
        ("most", "holds", 0.7, 0.6, 0.8, 36, "heads")
    assert row["word"] == "most" and row["reason"] == paper_word("most").reason and row["rule"] == "above 50%"
    assert row["interval"] == "cluster bootstrap over 40 documents, 500 replicates, seed 3"
    assert unreliable["verdict"] == "cannot tell" and not unreliable["reliable"] and "6 documents" in unreliable["why"]
    # other parameters: another record beside it; the speed knobs are not part of the name
    assert record_path(_Cfg(tmp_path, n_tokens=1024), "01") != path
    assert record_path(_Cfg(tmp_path, n_tokens=512, batch_size=2), "01") == \
        record_path(_Cfg(tmp_path, n_tokens=512, batch_size=64), "01")


def test_the_latest_record_per_chapter_and_model_wins_and_old_versions_are_set_aside(tmp_path):
    save(_Cfg(tmp_path, n_tokens=512), "01", [Verdict(MOST, 0.2, 10, "heads")])
    time.sleep(0.01)
    newer = save(_Cfg(tmp_path, n_tokens=1024), "01", [Verdict(MOST, 0.9, 10, "heads")])
    chosen = latest(read(tmp_path))
    assert chosen[("01", "m")][0]["path"] == newer and chosen[("01", "m")][1][0]["value"] == 0.9
    old = json.loads(newer.read_text())
    (newer.parent / "verdicts-01-0000000000000000.json").write_text(
        json.dumps({**old, "version": "0.0.0", "written": time.time() + 60}))
    (newer.parent / "verdicts-02-broken.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = build(tmp_path, "m", ROOT)
    assert any("verdicts-02-broken.json" in str(w.message) for w in caught)
    assert card.set_aside == 1 and "another version" in chapter.how_to_run(card)
    # "most" is no claim of chapter 1's CLAIMS: shown as its record has it, and said so
    most = card.frame[card.frame["claim"] == "most"]
    assert list(most["value"]) == [0.9] and list(most["verdict"]) == ["holds"]
    assert "does not list this claim" in most["note"].iloc[0] and most["statement"].iloc[0] == MOST.statement
    listed = card.frame[(card.frame["chapter"] == "01") & (card.frame["claim"] != "most")]
    assert len(listed) and set(listed["verdict"]) == {"not tested"}


def test_a_damaged_record_is_skipped_with_a_warning_and_an_older_layout_with_a_note(tmp_path):
    good = save(_Cfg(tmp_path), "01", [Verdict.of(MOST, _estimate(0.7, 0.6, 0.8))])
    record = json.loads(good.read_text())
    damaged = {"no-verdicts": {k: v for k, v in record.items() if k != "verdicts"},
               "row-without-n": {**record, "verdicts": [{k: v for k, v in record["verdicts"][0].items() if k != "n"}]},
               "a-list": [record], "no-time": {**record, "written": "yesterday"}}
    for name, text in damaged.items():
        (good.parent / f"verdicts-03-{name}.json").write_text(json.dumps(text))
    (good.parent / "verdicts-04-old.json").write_text(json.dumps({**record, "format": FORMAT - 1, "chapter": "04"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = build(tmp_path, "m", ROOT)
    said = [str(w.message) for w in caught if "verdict record" in str(w.message)]
    assert sorted(n for n in damaged if any(f"verdicts-03-{n}.json" in m for m in said)) == sorted(damaged), said
    assert not any("verdicts-04-old" in m for m in said)  # an older layout is expected: a note, no warning
    assert card.other_layout == 1 and "1 record in an older layout was skipped" in chapter.how_to_run(card)
    assert list(card.runs["record"]) == [good.name]
    assert set(card.frame.loc[card.frame["chapter"].isin(["03", "04"]), "verdict"]) == {"not run"}
    assert list(card.frame.loc[card.frame["claim"] == "most", "value"]) == [0.7]


def test_a_verdict_decided_under_another_rule_is_shown_as_such(tmp_path):
    from selfrepair.chapters import existence

    many = existence.MANY
    save(_Cfg(tmp_path), "01", [Verdict(replace(many, rule=above(0.5)), 0.6, 20, "late-layer heads")])
    row = build(tmp_path, "m", ROOT).frame.query("chapter == '01' and claim == @many.key").iloc[0]
    assert row["verdict"] == "rule changed" and "above 50%" in row["note"] and "holds" in row["note"]
    assert "Run chapter 01 again" in row["note"]


def test_a_proportional_verdict_shows_the_slope_and_intercept_it_was_decided_on(tmp_path):
    from selfrepair.chapters.iterative import PROPORTIONAL

    v = Verdict.linear(PROPORTIONAL, _estimate(0.8, 0.6, 1.0), _estimate(0.02, -0.05, 0.3))
    save(_Cfg(tmp_path), "04", [v])
    row = build(tmp_path, "m", ROOT).frame.query("chapter == '04' and claim == 'proportional'").iloc[0]
    assert row["verdict"] == v.word == "cannot tell"  # the intercept's interval straddles ±10%
    assert "slope 0.800 (95% interval 0.600 to 1.000" in row["parts"]
    assert "intercept / mean y 0.020 (95% interval −0.050 to 0.300" in row["parts"]
    assert "decided on: slope" in chapter.table(build(tmp_path, "m", ROOT)).data


def test_a_verdict_about_another_model_is_filed_under_it(tmp_path):
    """Chapter 6 decides every cached run: its record, made on one model, holds verdicts on others."""
    from selfrepair.chapters import across

    save(_Cfg(tmp_path, model="a"), "06", [Verdict(across.MANY, 0.5, 8, "late heads of a", model="a"),
                                           Verdict(across.MANY, 0.7, 8, "late heads of b", model="b")])
    frame = build(tmp_path, "a", ROOT).frame
    six = frame[(frame["chapter"] == "06") & (frame["claim"] == across.MANY.key)].set_index("model")
    assert six.loc["a", "value"] == 0.5 and six.loc["b", "value"] == 0.7
    assert set(frame.loc[(frame["model"] == "b") & (frame["chapter"] == "01"), "verdict"]) == {"not run"}


# -- chapter 1 on two tiny families (no book needed) ----------------------------------------------
@pytest.fixture(scope="module")
def chapter1_twice(tmp_path_factory):
    """Chapter 1 measured on the tiny profile's model and on a second tiny family, into one cache:
    ``(cache, {model label: the verdicts measure returned})``."""
    from selfrepair.chapters import existence

    cache = tmp_path_factory.mktemp("ch1") / "results"
    got = {}
    for model in (TINY["model"], SECOND):
        cfg = tiny_config("01", cache, model=model)
        got[model] = existence.measure(cfg, progress=False).verdicts
    return cache, got


def test_the_rows_are_the_verdicts_the_chapter_returned(chapter1_twice):
    cache, got = chapter1_twice
    card = build(cache, TINY["model"], ROOT)
    assert card.models == [TINY["model"], SECOND]  # both cached models appear, the book's first
    for model, verdicts in got.items():
        assert verdicts, model
        rows = card.frame[(card.frame["chapter"] == "01") & (card.frame["model"] == model)]
        assert set(rows["claim"]) == {c.key for c in chapter_claims(chapter_module("01"))}
        for v in verdicts:
            r = rows[rows["claim"] == v.claim.key]
            assert len(r) == 1, (model, v.claim.key)
            r = r.iloc[0]
            assert r["verdict"] == v.word and r["n"] == v.n and r["unit"] == v.unit, (model, v.claim.key)
            for field_ in ("value", "lo", "hi"):
                want = getattr(v, field_)
                assert (r[field_] is None and (want is None or want != want)) or r[field_] == pytest.approx(want)
            assert r["rule"] == v.claim.rule.text(v.claim.fmt) and r["word"] == v.claim.rule.word
        decided = set(got[model]) and {v.claim.key for v in verdicts}
        assert set(rows.loc[~rows["claim"].isin(decided), "verdict"]) <= {"not tested"}
    assert set(card.frame.loc[card.frame["chapter"] != "01", "verdict"]) == {"not run"}


def test_every_decided_row_shows_its_interval_and_n_on_the_page(chapter1_twice):
    cache, _ = chapter1_twice
    card = build(cache, TINY["model"], ROOT)
    html = chapter.table(card).data
    decided = card.frame[card.frame["verdict"].isin(DECIDED)]
    assert len(decided) and set(decided["model"]) == {TINY["model"], SECOND}
    cells = re.findall(r'<td class="text" data-label="estimate">(.*?)</td>', html)
    assert len(cells) == len(card.frame)
    for r, cell in zip(card.frame.to_dict("records"), cells):
        if r["verdict"] not in DECIDED:
            continue
        shown = "(95% interval " in cell or "no reliable interval" in cell or "no interval: computed exactly" in cell
        assert shown and f"n = {r['n']:,} " in cell, (r["claim"], r["model"], cell)
    for model in card.models:
        assert html.count(f'data-label="model">{model}</td>') == (card.frame["model"] == model).sum()


# -- the page on the tiny profile -----------------------------------------------------------------
def _executed(book) -> dict:
    run = book.runs["09_scorecard"]
    assert run.ok, run.error
    return json.loads(run.executed.read_text(encoding="utf-8"))


def _html(nb: dict) -> str:
    return "".join("".join(o.get("data", {}).get("text/html", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def book_card(book):
    """The scorecard of the tiny book's cache, built here from its records (the page's own)."""
    return build(book.results, TINY["model"], ROOT)


def test_the_page_lists_every_claim_of_every_chapter_for_the_tiny_model(book, book_card):
    html = _html(_executed(book))
    frame = book_card.frame
    for prefix in CLAIMED:
        for claim in chapter_claims(chapter_module(prefix)):
            rows = frame[(frame["chapter"] == prefix) & (frame["claim"] == claim.key)]
            assert len(rows) and set(rows["model"]) == {TINY["model"]}, (prefix, claim.key)
            assert f'id="score-{prefix}-{claim.key}"' in html, (prefix, claim.key)
            page = next(p for p in book.runs if p.startswith(prefix))
            assert f'href="{page}.html#{anchor(claim)}"' in html
    assert "not run" not in set(frame["verdict"])  # every chapter ran in the book
    # each decided claim's anchor is on its chapter's page
    for r in frame[frame["verdict"].isin(DECIDED)].to_dict("records"):
        text = book.runs[r["page"]].executed.read_text(encoding="utf-8")
        assert f'id=\\"{r["href"].split("#")[1]}\\"' in text, r["href"]


def test_every_verdict_shows_an_interval_and_n_or_why_it_has_none(book_card):
    decided = book_card.frame[book_card.frame["verdict"].isin(DECIDED)]
    assert len(decided)
    for r in decided.to_dict("records"):
        has = "(95% interval " in r["estimate"] and r["interval"]
        why = r["interval"].startswith(("no interval: computed exactly", "no reliable interval: "))
        assert has or why or r["estimate"] == "no value", r
        assert r["n"] is not None and r["unit"] or r["estimate"] == "no value", r


def _said(text: str, model: str) -> dict:
    """The counts the opening sentence of one model states (``On **model**, 3 hold, 1 differs, ...``)."""
    m = re.search(rf"On \*\*{re.escape(model)}\*\*, (.*?)\.(?: |$)", text)
    assert m, f"no sentence for {model} in {text!r}"
    got = {s: 0 for s in STATUSES}
    for n, what in re.findall(r"(\d+) (holds?|differs?|cannot tell|claims? (?:was|were) not run|"
                              r"(?:was|were) not tested|(?:was|were) decided under an older rule)", m.group(1)):
        key = ("holds" if what.startswith("hold") else "differs" if what.startswith("differ") else
               "cannot tell" if what == "cannot tell" else "not run" if "not run" in what else
               "not tested" if "not tested" in what else "rule changed")
        got[key] = int(n)
    return got


def _check_opening(card):
    text = chapter.opening(card)
    tallies = counts(card.frame)
    for part, paragraph in zip(dict.fromkeys(card.frame["part"]), text.split("\n\n")):
        assert paragraph.startswith(f"**{part}**")
        for t in tallies[tallies["part"] == part].to_dict("records"):
            by_hand = card.frame[(card.frame["part"] == part) & (card.frame["model"] == t["model"])
                                 & (card.frame["counted_in"] == "")]  # each paper claim once
            want = {s: int((by_hand["verdict"] == s).sum()) for s in STATUSES}
            assert _said(paragraph, t["model"]) == want == {s: t[s] for s in STATUSES}
    return text


def test_the_opening_sentences_count_the_table(book, book_card):
    text = _check_opening(book_card)
    page = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in _executed(book)["cells"]
                   if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert text in page  # the page says what the card built from the same records says


@pytest.fixture(scope="module")
def two_models(book, tmp_path_factory):
    """The tiny book's cache plus chapter 1 run on a second tiny family."""
    from selfrepair.chapters import existence

    cache = tmp_path_factory.mktemp("two") / "results"
    shutil.copytree(book.results, cache)
    existence.measure(tiny_config("01", cache, model=SECOND), progress=False)
    return cache


def test_a_second_model_appears_and_what_did_not_run_on_it_says_so(two_models):
    card = build(two_models, TINY["model"], ROOT)
    assert card.models == [TINY["model"], SECOND]
    second = card.frame[card.frame["model"] == SECOND]
    assert set(second.loc[second["chapter"] == "01", "verdict"]) <= set(DECIDED)
    rest = second[second["chapter"] != "01"]
    assert len(rest) and set(rest["verdict"]) == {"not run"}
    assert all(f"--model {SECOND} --chapters {p}" in n for p, n in zip(rest["chapter"], rest["note"]))
    for prefix in CLAIMED:  # every claim, on both models
        keys = {c.key for c in chapter_claims(chapter_module(prefix))}
        for model in card.models:
            got = card.frame[(card.frame["chapter"] == prefix) & (card.frame["model"] == model)]
            assert set(got["claim"]) == keys, (prefix, model)
    _check_opening(card)
    html = chapter.table(card).data
    assert html.count(f'data-label="model">{SECOND}</td>') == len(second)


def test_the_page_recomputes_nothing(two_models, monkeypatch):
    """No model is loaded, no forward pass runs, no cache entry is read as a measurement, and
    the cache is the same file for file afterwards."""
    import selfrepair.experiment as experiment
    import selfrepair.intervene as intervene
    import selfrepair.measure as measure
    import selfrepair.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the scorecard must not run or load a model")

    for module, name in ((loading, "load_model"), (experiment, "_model"), (experiment, "open_model"),
                         (intervene, "run"), (measure.Cache, "get"), (measure.Cache, "load")):
        monkeypatch.setattr(module, name, refuse)
    before = snapshot(two_models)
    cfg = chapter.Config.from_params(model=TINY["model"], cache_dir=str(two_models))
    runner.plan([ROOT / "book" / "09_scorecard.ipynb"], {"model": TINY["model"], "cache_dir": str(two_models)})
    card = chapter.measure(cfg)
    chapter.opening(card), chapter.table(card), chapter.how_to_run(card), chapter.RUNS_TABLE(card.runs)
    from selfrepair.experiment import provenance
    from selfrepair.figures.scorecard import fig_verdicts

    fig_verdicts(card.frame).to_dict()
    prov = provenance(cfg, time.time())
    assert "param:model" in set(prov.frame["item"]) and "n_layers" not in set(prov.frame["item"])
    assert prov.summary.startswith("Ran, loading no model, in ")
    assert snapshot(two_models) == before


# -- the runner -----------------------------------------------------------------------------------
def test_the_scorecard_runs_after_every_other_chapter_and_with_every_run(tmp_path, monkeypatch):
    notebooks = runner.chapter_notebooks(ROOT)
    assert notebooks[-1].stem == "09_scorecard" and runner.runs_last(notebooks[-1])
    # the introduction's "What this build ran" reads the chapters' records too
    assert [nb.stem for nb in notebooks if runner.runs_last(nb)] == ["00_introduction", "09_scorecard"]
    events = []

    def papermill(cmd, stdout=None, stderr=None, **_):
        name = Path(cmd[3]).stem
        events.append(("start", name))
        time.sleep(0.05 if name != "01_self_repair_exists" else 0.3)  # chapter 1 finishes last
        Path(cmd[4]).write_text("{}")
        events.append(("end", name))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(runner.subprocess, "run", papermill)
    picked = [notebooks[1], notebooks[-1], notebooks[2]]  # 01, 09, 02: the scorecard not last here
    runs = runner.execute_chapters(picked, {"model": "m"}, tmp_path / "src", jobs=3, progress=False)
    assert [r.name for r in runs] == [nb.stem for nb in picked] and all(r.ok for r in runs)
    start = events.index(("start", "09_scorecard"))
    assert {("end", nb.stem) for nb in picked if nb.stem != "09_scorecard"} <= set(events[:start])



def test_a_build_runs_the_scorecard_with_every_chapter_and_a_no_build_run_only_the_chapters_named(
        tmp_path, monkeypatch, capsys):
    ran, built = [], []

    def execute(nbs, by_stem, src, **_):
        for nb in nbs:
            ran.append(nb.stem)
            (src / "book").mkdir(parents=True, exist_ok=True)
            (src / "book" / nb.name).write_text("{}")
            time.sleep(0.01)  # each executed copy newer than the one before
        return []

    monkeypatch.setattr(runner, "execute_chapters", execute)
    monkeypatch.setattr(runner, "plan", lambda nbs, *a, **k: {nb.stem: {} for nb in nbs})
    monkeypatch.setattr(runner, "vendor_assets", lambda *a: None)
    monkeypatch.setattr(runner, "stage_source", lambda root, src: [])
    monkeypatch.setattr(runner, "build_html", lambda src, html, strict=True: built.append(src) or 0)
    out, src = tmp_path / "out", tmp_path / "out" / "src"

    def book(**kw):
        ran.clear()
        assert runner.run_book(ROOT, out, params={}, progress=False, **kw) == 0
        return list(ran)

    last = ["00_introduction", "09_scorecard"]  # they read what the chapters recorded
    # a build: the chapter, then the introduction (the toc's root) and the scorecard
    assert book(chapters=["03"]) == ["03_anti_erasure", *last]
    assert runner.stale_last(src) == []
    # --no-build: only what is named; the executed introduction and scorecard are now older than chapter 5
    assert book(chapters=["05"], build=False) == ["05_hydra"]
    assert runner.stale_last(src) == [f"{nb}.ipynb" for nb in last]
    assert book(chapters=["00", "09"], build=False) == last and runner.stale_last(src) == []
    book(chapters=["05"], build=False)
    # a build without executing says they are stale; one that executes a chapter refreshes them
    capsys.readouterr()
    assert book(execute=False) == [] and len(built) == 2  # the --no-build runs built nothing
    assert "00_introduction.ipynb, 09_scorecard.ipynb; run `selfrepair book`" in capsys.readouterr().err
    assert book(chapters=["03"]) == ["03_anti_erasure", *last] and runner.stale_last(src) == []


def test_the_scorecard_parameters_are_the_books(tmp_path):
    cfg = chapter.Config.from_params(model="tiny-gpt2", fold_value_biases=True, cache_dir=str(tmp_path))
    card = chapter.measure(cfg)
    assert card.models == ["tiny-gpt2 (value biases folded)"]
    assert set(card.frame["verdict"]) == {"not run"}
    assert "--model tiny-gpt2 --fold-value-biases --chapters 01" in card.frame["note"].iloc[0]
    with pytest.raises(Exception, match="model must name"):
        chapter.Config.from_params(model=" ")
    assert pd.api.types.is_object_dtype(card.runs["model"]) or card.runs.empty


# -- each paper claim once; the closing paragraph -----------------------------------------------------
def test_every_redecision_names_a_claim_its_first_chapter_decides():
    for (prefix, key), (first, same) in REDECIDES.items():
        assert key in {c.key for c in chapter_claims(chapter_module(prefix))}, (prefix, key)
        assert same in {c.key for c in chapter_claims(chapter_module(first))}, (first, same)
        assert first < prefix


def _card(verdicts: dict[tuple[str, str], str], model: str = "m") -> Card:
    """A card of (chapter, claim) -> verdict rows on one model, built as :func:`build` builds rows."""
    from selfrepair.scorecard import _claim_row

    parts = {"01": "Self-repair", "02": "Self-repair", "05": "Hydra", "06": "Across models", "07": chapter.BEYOND}
    rows = []
    for (prefix, key), verdict in verdicts.items():
        claim = claim_fields(next(c for c in chapter_claims(chapter_module(prefix)) if c.key == key))
        page = {"part": parts[prefix], "chapter": prefix, "page": f"{prefix}_x", "title": prefix}
        rows.append({**_claim_row(claim, page, model), "verdict": verdict, "estimate": "0.5", "n": 3,
                     "unit": "heads", "interval": "x"})
    runs = pd.DataFrame([{"model": model, "chapter": p} for p in dict.fromkeys(p for p, _ in verdicts)])
    return Card(pd.DataFrame(rows), runs, [model])


def test_a_redecided_claim_is_shown_apart_and_counted_once():
    """Chapter 6 decides chapter 1's claims again: its rows stay in the table, marked and linked to
    the counted row, and no count (the opening's, the closing's) includes them."""
    card = _card({("01", "many"): "holds", ("01", "exists"): "holds", ("05", "unembed"): "differs",
                  ("06", "many"): "holds", ("06", "between"): "differs"})
    tallies = counts(card.frame)
    assert list(tallies["part"]) == ["Self-repair", "Hydra"]  # the re-decisions' part has no count
    assert tallies.set_index("part").loc["Self-repair", "holds"] == 2
    text = chapter.opening(card)
    across = text.split("\n\n")[2]
    assert across.startswith("**Across models**") and "not in the totals" in across
    assert "Decided again on **m**: 1 holds, 1 differs, 0 cannot tell; 1 of 2 agree with the counted verdict" in across
    html = chapter.table(card).data
    assert html.count("decided again: the claim of chapter 01") == 2 and 'href="#score-01-exists"' in html
    closing = chapter.shows(card)
    assert "counts 3 claims of chapters 01 and 05, each once" in closing
    assert "chapter 06 decides 2 claims of chapter 01 again" in closing
    assert "On m, 2 of the 3 hold, 1 differs and 0 cannot" in closing and "1 of 2 cases" in closing
    # read4 #12: a claim whose assumption fails (chapter 8's backups without the circuit) is no "near the threshold"
    assert "cannot be told apart from the rule's threshold" not in closing and "whose assumption fails" in closing
    assert ("on m, of the two papers' 3 claims, 3 are decided (a claim is decided when it holds or differs; the "
            "other 0 cannot tell or did not run), and 2 of those 3 hold (67%)") in closing and "beyond them" not in closing
    assert 3 <= closing.count(". ") + 1 <= 6  # three to six plain sentences


def test_the_take_away_counts_other_papers_claims_apart_from_the_two_papers():
    """Chapters 7-8 test other papers' claims (AtP, IOI): the take-away's share is the two papers'
    claims only, and the others are counted beside it."""
    card = _card({("01", "many"): "holds", ("01", "exists"): "differs", ("07", "ranks"): "holds",
                  ("07", "top"): "holds", ("07", "blind"): "cannot tell"})
    closing = chapter.shows(card)
    assert "of the two papers' 2 claims, 2 are decided (a claim is decided when it holds or differs" in closing
    assert "and 1 of those 2 hold (50%)" in closing
    # read3 #14: the denominator changed unexplained ("13 of the 30 hold", then "10 of ... 20 decided claims")
    assert ("of the 3 claims beyond them (chapter 07: other papers' methods and circuits), 2 are decided "
            "and 2 of those hold") in closing


def test_the_take_away_says_on_what_model_and_data_and_whether_the_papers_models_ran():
    """The headline count names, in its own sentence, the model and the data its verdicts were
    decided on (from the records read), and says when none was decided on the papers' own models."""
    card = _card({("01", "many"): "holds", ("01", "exists"): "differs", ("05", "unembed"): "differs"},
                 model="gemma-3-270m")
    card.runs["data"] = ["8,192 tokens of the embedded corpus", "the bundled factual-recall prompts"]
    closing = chapter.shows(card)
    assert ("Take-away: on gemma-3-270m (4-bit, dequantized) and 8,192 tokens of the embedded corpus "
            "(chapter 05: the bundled factual-recall prompts), of the two papers' 3 claims, 3 are decided") in closing
    assert "none was decided on the papers' own models (Pythia, GPT-2" in closing
    assert "--profile paper" in closing and "not a refutation" in closing
    scope = chapter.scope_markdown(card)
    assert "**gemma-3-270m (4-bit, dequantized)** (chapters 01 and 05)" in scope
    assert "None of the papers' own models" in scope
    paper = _card({("01", "many"): "holds"}, model="EleutherAI/pythia-410m")
    paper.runs["data"] = ["1,000,000 tokens of `NeelNanda/pile-10k`"]
    assert "none was decided on the papers' own models" not in chapter.shows(paper)
    assert "among the papers' own models" in chapter.scope_markdown(paper)


def test_the_closing_says_so_when_nothing_ran_on_the_books_model():
    card = _card({("01", "many"): "not run", ("05", "unembed"): "not run"})
    closing = chapter.shows(card)
    assert "No chapter has decided a claim on m" in closing and "Take-away" not in closing


def test_the_introduction_says_what_this_build_ran(tmp_path):
    """The introduction's top: the models and data of the records in the cache, none of the
    papers' own models, how to run them; an empty cache says so and points to the scorecard."""
    from selfrepair.chapters import intro

    empty = intro.build_markdown(intro.Config.from_params(model="tiny-gpt2", cache_dir=str(tmp_path)))
    assert "no chapter had recorded a verdict" in empty and "none of the papers' own models" in empty
    assert "--profile paper" in empty and "09_scorecard.html" in empty
    from selfrepair.build_scope import is_paper_model
    assert is_paper_model("EleutherAI/pythia-410m") and is_paper_model("gpt2-medium (value biases folded)")
    assert not is_paper_model("tiny-gpt2") and not is_paper_model("gemma-3-270m")


def test_reading_a_verdict_says_cannot_tell_in_the_rules_words():
    """Issue 25: the page's hand-written "Cannot tell: the interval straddles the threshold, or it
    is not reliable" was untrue of an interval with an end at the threshold, which the verdicts say
    "has its lower end at the rule's threshold". The paragraph is generated, with both cases in the
    words Rule.undecided gives every verdict, and the notebook holds no hand-written copy."""
    from selfrepair.chapters import scorecard as page
    from selfrepair.rules import above

    text = page.reading_a_verdict()
    rule = above(0.5)
    assert rule.decide(0.4, 0.6) is None and rule.decide(0.5, 0.7) is None  # both cannot tell
    assert f"from 40% to 60% {rule.undecided(0.4, 0.6, '.0%')}" in text
    assert f"from 50% to 70% {rule.undecided(0.5, 0.7, '.0%')}" in text
    assert "has its lower end at the rule's threshold, 50%" in text and "straddles the rule's threshold, 50%" in text
    assert "*Cannot tell*: it does neither, or it is not reliable" in text
    nb = json.loads((Path(__file__).resolve().parents[1] / "book" / "09_scorecard.ipynb").read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in nb["cells"]]
    assert not any("Reading a verdict" in s for s in sources if not s.startswith("display("))
    assert sum("chapter.reading_a_verdict()" in s for s in sources) == 1


def test_what_ran_names_the_cache_folder_without_a_template_echo():
    """read3 #35: "recorded in the results cache results" (the folder's name pasted after its kind)."""
    text = chapter.Config(cache_dir="results").run_summary()
    assert "results cache results" not in text and "the results cache (the folder `results/`)" in text


def test_the_scorecard_says_each_words_reading_once_and_its_rows_link_there():
    """read3 #10: each row of the table repeated its word's reason in a "why this rule" fold
    ("many" six times). Now the reason is said once, in the page's reading of the papers' words,
    and each row links to it by the word."""
    from selfrepair.reading import decision_rule, word_anchor

    card = _card({("01", "many"): "holds", ("01", "exists"): "differs", ("01", "noisy"): "holds"})
    html_ = chapter.table(card).data
    assert "why this rule" not in html_ and html_.count(f'href="#{word_anchor("many")}"') == 3
    reading = chapter.reading(card)
    reason = card.frame.loc[card.frame["claim"] == "many", "reason"].iloc[0]
    assert reading.count(f'id="{word_anchor("many")}"') == 1 and reading.count(html.escape(reason, quote=False)) == 1
    assert "Read by 3 claims" in reading and reading.endswith(decision_rule())
