"""The book runner: execute the chapters with papermill, then build the HTML with Jupyter Book.

papermill is the only executor (``_config.yml`` sets ``execute_notebooks: "off"``). Layout under
``out`` (default ``book/_build``)::

    src/    the build source: _config.yml, _toc.yml (restricted to chapters that have been
            executed), book/*.md, book/references.bib, book/_static/ and the *executed*
            notebooks book/0N_*.ipynb written by papermill (kept between runs, so
            ``--chapters 03`` re-runs one chapter and keeps the others)
    logs/   one papermill log per chapter
    html/   the book; open html/index.html

A failing chapter keeps its partial executed notebook (the error is visible in the book), the
book is still built, and :func:`run_book` returns a non-zero exit code naming the chapter.

Offline: the pages load vega + vega-lite + vega-embed and MathJax from ``_static/vendor``, made by
:func:`selfrepair.book.assets.vendor_assets`; the Sphinx extension :mod:`selfrepair.book.sphinx`
puts the bundle on chart pages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from ..errors import InputError, SelfRepairError
from ..tables import counted
from .assets import vendor_assets

STAGED = ("_config.yml", "_toc.yml", "book/references.bib")


def find_root(start: str | Path | None = None) -> Path:
    """The book's root: the first of ``start`` (default cwd) and its parents holding ``_toc.yml``
    and ``book/``, else the source checkout this package was installed from."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents, Path(__file__).resolve().parents[3]):
        if (d / "_toc.yml").is_file() and (d / "book").is_dir():
            return d
    raise InputError(f"no book found at or above {here}: run from the repository root or pass --root")


def chapter_notebooks(root: Path, wanted: Iterable[str] | None = None) -> list[Path]:
    """``book/*.ipynb`` sorted; ``wanted`` keeps those whose name starts with an item (``"01"``)."""
    notebooks = sorted((root / "book").glob("*.ipynb"))
    if not wanted:
        return notebooks
    wanted = [str(w) for w in wanted]
    picked = [nb for nb in notebooks if any(nb.stem.startswith(w) for w in wanted)]
    unknown = [w for w in wanted if not any(nb.stem.startswith(w) for nb in notebooks)]
    if unknown:
        raise InputError(f"no chapter matches {', '.join(unknown)}: have "
                         f"{', '.join(nb.stem for nb in notebooks)}")
    return picked


def runs_last(notebook: Path) -> bool:
    """Whether a notebook reads what the other chapters record (its chapter module's
    ``RUNS_LAST``: the introduction's "What this build ran" and the scorecard), so it runs after
    them and with every run that executes one and builds the book (a ``--no-build`` run executes
    only the chapters it names)."""
    from ..chapters import CHAPTERS, chapter_module

    return notebook.stem[:2] in CHAPTERS and bool(getattr(chapter_module(notebook.stem), "RUNS_LAST", False))


def stale_last(src: Path) -> list[str]:
    """The executed notebooks under ``src/book`` that :func:`runs_last` and are older than another
    executed chapter (a ``--no-build`` run executes only the chapters it names): the next build
    runs them again."""
    executed = sorted((src / "book").glob("*.ipynb"))
    last = [nb for nb in executed if runs_last(nb)]
    newest = max((nb.stat().st_mtime_ns for nb in executed if nb not in last), default=None)
    return [nb.name for nb in last if newest is not None and nb.stat().st_mtime_ns < newest]


def load_profile(profile: str | Path | None, root: Path) -> dict:
    """Parameters of a profile (``tiny``, ``cpu``, ``paper`` or a YAML path); ``None`` -> ``{}``.

    A profile holds parameters for every chapter and, under ``chapters:``, per-chapter overrides
    keyed by the chapter's two-digit prefix (the ``paper`` profile runs each chapter on the paper's
    model for its figures, with the paper's heads)."""
    if profile is None:
        return {}
    path = Path(profile) if str(profile).endswith((".yaml", ".yml")) else root / "book" / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (root / "book" / "profiles").glob("*.yaml"))
        raise InputError(f"unknown profile {profile!r}: use one of {', '.join(names)} or a .yaml path")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("chapters", {}), dict):
        raise InputError(f"{path}: a profile is a mapping of parameter names to values (and an "
                         "optional 'chapters:' mapping of chapter prefixes to overrides)")
    if "chapters" in data:  # YAML reads an unquoted 01 as the integer 1
        data["chapters"] = {(f"{k:02d}" if isinstance(k, int) else str(k)): v or {}
                            for k, v in data["chapters"].items()}
    return data


def config_class(notebook: Path):
    """The config type of a chapter notebook (:data:`selfrepair.chapters.CHAPTERS`)."""
    from ..chapters import chapter_module

    return chapter_module(notebook.stem).Config


def chapter_params(notebook: Path, params: dict, per_chapter: dict | None = None) -> dict:
    """The parameters one chapter takes: ``params`` (with the chapter's own overrides from
    ``per_chapter[prefix]`` applied on top) restricted to its config's fields."""
    merged = {**params, **(per_chapter or {}).get(notebook.stem[:2], {})}
    names = set(config_class(notebook).field_names())
    return {k: v for k, v in merged.items() if k in names}


def plan(notebooks: list[Path], params: dict, per_chapter: dict | None = None, *,
         check: bool = True) -> dict[str, dict]:
    """Validate every chapter's parameters before anything runs; ``{stem: parameters}``.

    Fails with one :class:`InputError` for a parameter no chapter of the book takes (listing the
    ones they do), a bad value (naming the chapter), or — with ``check`` — anything about the model, the
    corpus, the prompts or the heads that would otherwise only fail inside a chapter
    (:func:`selfrepair.chapters.check`)."""
    from ..chapters import CHAPTERS, check as check_chapter

    per_chapter = per_chapter or {}
    bad_keys = [k for k in per_chapter if k not in CHAPTERS]
    if bad_keys:
        raise InputError(f"the profile's chapters: section names unknown chapters {bad_keys}")
    # a profile's parameters are for the whole book: one that only chapters not selected take is fine
    book = sorted({p for nb in notebooks for p in nb.parent.glob("*.ipynb")} | set(notebooks))
    known = sorted(set().union(*(config_class(nb).field_names() for nb in book)))
    given = set(params) | {k for nb in notebooks for k in per_chapter.get(nb.stem[:2], {})}
    unknown = sorted(given - set(known))
    if unknown:
        raise InputError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                         f"the book's chapters take {', '.join(known)}")
    out = {}
    for nb in notebooks:
        sub = chapter_params(nb, params, per_chapter)
        try:
            cfg = config_class(nb).from_params(**sub)
            if check:
                check_chapter(cfg)
        except SelfRepairError as e:  # the same error type, naming the chapter
            raise type(e)(f"chapter {nb.stem}: {e}") from None
        out[nb.stem] = sub
    return out


@dataclass
class ChapterRun:
    """The outcome of executing one chapter."""

    name: str
    executed: Path
    ok: bool
    seconds: float
    error: str | None = None


def _error_of(executed: Path, log: Path) -> str:
    """``Ename: evalue`` of the first error output, else the log's last line."""
    if executed.is_file():
        for cell in json.loads(executed.read_text()).get("cells", []):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    return f"{out.get('ename')}: {out.get('evalue')}"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1] if lines else "papermill failed before running the notebook"


def relative_paths(params: dict, workdir: Path) -> dict:
    """``params`` with every absolute path under ``workdir`` written relative to it (``cache_dir``
    ``/repo/results`` -> ``results``); other values unchanged.

    papermill writes the injected parameters into the executed notebook, and so into the book: a
    reader sees the parameters that were used, not the folders of the machine that built the book.
    A path outside ``workdir`` (an explicit ``--cache-dir /scratch/...``) is kept as given."""
    out = {}
    for name, value in params.items():
        if isinstance(value, str) and os.path.isabs(value):
            path = Path(value).resolve()
            if path.is_relative_to(workdir):
                value = path.relative_to(workdir).as_posix() or "."
        out[name] = value
    return out


def execute_chapters(notebooks: list[Path], params: dict, out_src: Path, *, logs: Path | None = None,
                     jobs: int = 1, kernel: str = "python3", progress: bool = True,
                     workdir: Path | None = None, charts: Path | None = None) -> list[ChapterRun]:
    """Run each notebook with papermill into ``out_src/book/``; one failure does not stop the others.

    Each chapter runs in its own ``python -m papermill`` process whose kernel works in ``workdir``
    (default: the book's root, the folder above ``book/``; relative paths such as the default
    ``cache_dir = "results"`` resolve against it), with its parameters injected: ``params[stem]``
    when ``params`` is keyed by notebook stem (:func:`plan`), else the entries of ``params`` that
    the chapter's config takes; absolute paths under ``workdir`` are injected relative to it
    (:func:`relative_paths`). papermill writes the executed notebook once, when the chapter ends
    (after an error too, so a failing chapter keeps its outputs up to the error), not at every
    cell's start and end: on the embedded default those saves of a growing notebook (up to 7 MB)
    cost about a minute per build; a chapter's progress is in its log. Every chart a chapter
    displays writes its CSV, SVG and PNG into ``charts`` (default ``out_src/../charts``; :mod:`selfrepair.figures.export`), which
    :func:`stage_source` copies into the book. Notebooks that read the others' records
    (:func:`runs_last`) start only when every other one has finished.
    """
    from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

    from ..figures.export import CHART_FILES_ENV

    dest, logs = out_src / "book", logs or out_src.parent / "logs"
    env = {**os.environ, CHART_FILES_ENV: str(Path(charts or out_src.parent / "charts").resolve())}
    workdir = Path(workdir or (notebooks[0].parent.parent if notebooks else Path.cwd())).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    by_stem = params if notebooks and all(nb.stem in params for nb in notebooks) else {
        nb.stem: chapter_params(nb, params) for nb in notebooks}
    bar = tqdm(total=len(notebooks), unit="chapter", desc="chapters",
               disable=not (progress and sys.stderr.isatty()))

    def one(nb: Path) -> ChapterRun:
        out, log = dest / nb.name, logs / f"{nb.stem}.log"
        params_file = logs / f"{nb.stem}.parameters.yaml"
        params_file.write_text(yaml.safe_dump(relative_paths(by_stem[nb.stem], workdir), sort_keys=True))
        started = time.time()
        if progress:  # the chapter's own progress bars go to its log; say where to follow them
            bar.write(f"  {nb.stem:<28} running (progress: tail -f {log})")
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(out), "-f",
                                 str(params_file), "-k", kernel, "--cwd", str(workdir),
                                 "--no-progress-bar", "--log-output", "--no-request-save-on-cell-execute"],
                                stdout=fh,
                                stderr=subprocess.STDOUT, env=env).returncode
        run = ChapterRun(nb.stem, out, rc == 0, time.time() - started,
                         None if rc == 0 else _error_of(out, log))
        bar.write(f"  {run.name:<28} {'ok' if run.ok else 'FAILED'} ({run.seconds:.1f} s)"
                  + ("" if run.ok else f": {run.error} — log: {log}"))
        bar.update()
        return run

    last = [nb for nb in notebooks if runs_last(nb)]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # threads only wait on processes
        runs = {r.name: r for r in pool.map(one, [nb for nb in notebooks if nb not in last])}
        runs.update({r.name: r for r in pool.map(one, last)})  # after every other chapter
    bar.close()
    return [runs[nb.stem] for nb in notebooks]


def restrict_toc(toc: dict, src: Path) -> tuple[dict, list[str]]:
    """``toc`` without entries whose file is missing under ``src`` (and without emptied parts)."""
    def present(f: str) -> bool:
        return any((src / f"{f}{ext}").is_file() for ext in ("", ".ipynb", ".md"))

    if not present(toc["root"]):
        raise InputError(f"the toc's root {toc['root']} has not been executed")
    dropped = [c["file"] for p in toc.get("parts", []) for c in p["chapters"] if not present(c["file"])]
    parts = [{**p, "chapters": [c for c in p["chapters"] if c["file"] not in dropped]}
             for p in toc.get("parts", [])]
    return {**toc, "parts": [p for p in parts if p["chapters"]]}, dropped


def stage_chart_files(src: Path, charts: Path) -> int:
    """Copy the chart files the executed notebooks under ``src/book`` link (and only those) from
    ``charts`` into ``src/book/_static/charts``; how many. A linked file that is missing is an
    error naming the chapter to run again."""
    from ..figures.export import CHART_FILES_URL

    dest = src / "book" / "_static" / "charts"
    dest.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(CHART_FILES_URL) + r"/([0-9a-f]{12}(?:-\d+)?\.(?:csv|svg|png))")
    copied = set()
    for nb in sorted((src / "book").glob("*.ipynb")):
        for name in sorted(set(pattern.findall(nb.read_text(encoding="utf-8"))) - copied):
            if not (charts / name).is_file():
                raise InputError(f"{nb.stem} links the chart file {name}, which is not in {charts}: "
                                 f"run that chapter again (--chapters {nb.stem[:2]})")
            shutil.copy2(charts / name, dest / name)
            copied.add(name)
    return len(copied)


def stage_source(root: Path, src: Path, charts: Path | None = None) -> list[str]:
    """Copy config, toc, markdown, bib and ``_static`` into ``src``, and the chart files the
    executed chapters link (from ``charts``, default ``src/../charts``: :func:`stage_chart_files`);
    drop executed copies of chapters that no longer exist; write the restricted toc. Returns the
    toc entries dropped.

    Where the build's environment names the repository (the Pages workflow), the staged
    ``_config.yml`` gets it with the launch, repository and issue buttons, and the executed
    notebooks' install cell installs it at the commit (:mod:`selfrepair.book.launch`). Every executed
    notebook's cells are tagged for the HTML by the rule of :mod:`selfrepair.book.cells`."""
    from .cells import stage_cells
    from .launch import book_config, fill_source, published_source

    (src / "book").mkdir(parents=True, exist_ok=True)
    for rel in STAGED:
        shutil.copy2(root / rel, src / rel)
    config = book_config(yaml.safe_load((root / "_config.yml").read_text()))
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    for md in (root / "book").glob("*.md"):
        shutil.copy2(md, src / "book" / md.name)
    shutil.rmtree(src / "book" / "_static", ignore_errors=True)
    shutil.copytree(root / "book" / "_static", src / "book" / "_static")
    for nb in (src / "book").glob("*.ipynb"):
        if not (root / "book" / nb.name).is_file():
            nb.unlink()
        else:
            fill_source(nb, published_source())
            stage_cells(nb)
    stage_chart_files(src, Path(charts or src.parent / "charts"))
    toc, dropped = restrict_toc(yaml.safe_load((root / "_toc.yml").read_text()), src)
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True))
    return dropped


def build_html(src: Path, html: Path, *, strict: bool = True) -> int:
    """``jupyter-book build`` of ``src`` into ``html`` (warnings are errors when ``strict``)."""
    import warnings

    from jupyter_book.sphinx import build_sphinx

    with warnings.catch_warnings():  # Sphinx walks gc objects; torch warns when touched
        warnings.simplefilter("ignore", FutureWarning)
        result = build_sphinx(src, html, use_external_toc=True, noconfig=True,
                              path_config=str(src / "_config.yml"),
                              confoverrides={"external_toc_path": (src / "_toc.yml").as_posix(),
                                             "latex_individualpages": False},
                              doctreedir=html.parent / ".doctrees", freshenv=True, quiet=True,
                              warningiserror=strict, keep_going=True, builder="html")
    return result if isinstance(result, int) else 1


def run_book(root: Path, out: Path, *, params: dict, chapters: Iterable[str] | None = None,
             per_chapter: dict | None = None, jobs: int = 1, strict: bool = True,
             execute: bool = True, build: bool = True, progress: bool = True) -> int:
    """Validate every chapter's parameters (:func:`plan`), execute the chapters, build the HTML and
    report; the exit code (0 when all went well). Bad parameters raise before anything runs."""
    out, src = out.resolve(), out.resolve() / "src"
    failed: list[ChapterRun] = []
    started = time.time()
    if execute:
        notebooks = chapter_notebooks(root, chapters)
        if build:  # a --no-build run executes the chapters named and nothing else
            intro = root / "book" / "00_introduction.ipynb"  # the toc's root: the book needs it
            if intro.is_file() and intro not in notebooks and not (src / "book" / intro.name).is_file():
                notebooks.insert(0, intro)
            # the scorecard reads what every chapter recorded: it runs again (last) whenever one
            # runs (so also after a --no-build run of other chapters: see stale_last)
            notebooks += [nb for nb in chapter_notebooks(root) if runs_last(nb) and nb not in notebooks]
        # in the order they run: the chapters, then those that read their records
        notebooks = [nb for nb in notebooks if not runs_last(nb)] + [nb for nb in notebooks if runs_last(nb)]
        kept = sorted(nb.stem for nb in (src / "book").glob("*.ipynb")
                      if (root / "book" / nb.name) not in notebooks)
        print(f"checking the parameters of {counted(len(notebooks), 'chapter')} ...", flush=True)
        by_stem = plan(notebooks, params, per_chapter)
        print(f"executing {counted(len(notebooks), 'chapter')} with "
              + ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
              + (f" (per-chapter overrides: {per_chapter})" if per_chapter else "")
              + (f"\nkept from an earlier run: {', '.join(kept)}" if kept else ""))
        failed = [r for r in execute_chapters(notebooks, by_stem, src, logs=out / "logs", jobs=jobs,
                                              progress=progress, workdir=root) if not r.ok]
    elif build and (stale := stale_last(src)):
        print(f"note: executed before a chapter that a --no-build run executed after them: "
              f"{', '.join(stale)}; run `selfrepair book` without --no-execute to refresh them",
              file=sys.stderr)
    if build:
        vendor_assets(root / "book" / "_static", root / ".cache" / "npm")
        dropped = stage_source(root, src)
        if dropped:
            print(f"not in this build (never executed): {', '.join(dropped)}")
        rc = build_html(src, out / "html", strict=strict)
        if rc:
            print(f"the HTML build failed (exit {rc}); see the warnings above", file=sys.stderr)
            return rc
        print(f"built in {time.time() - started:.0f} s: open {out / 'html' / 'index.html'}")
    for run in failed:
        print(f"chapter {run.name} FAILED: {run.error}\n  its executed notebook (error shown): "
              f"{run.executed}", file=sys.stderr)
    return 1 if failed else 0
