"""The book built once per test run, as the Pages workflow builds it (conftest's session fixture
``book``): the ``build`` step's ``run:`` command of ``.github/workflows/book.yml`` (``make
book``), run with the workflow's shell in a copy of the repository on the ``tiny`` profile.

tests/test_notebooks.py reads its executed notebooks, tests/test_prose.py their prose,
tests/test_book_browser.py opens its HTML and tests/test_workflows.py checks what the upload step
would publish; nothing else executes the book (the remote path runs every chapter's notebook in
the test process: tests/remote_notebooks.py).

The copy holds the working tree's files that git would check out or add (no .venv, results/,
book/_build), with ``.cache/npm`` restored as the workflow's cache step does. The job's ``env:`` is given as GitHub
gives it to a fork's run (:data:`GITHUB`: the book's buttons name that repository). Only three things
differ from the workflow: ``PROFILE=tiny`` (the workflow sets ``PROFILE: cpu``), ``VENV``, the
virtual environment running these tests (the workflow's ``setup`` step makes ``.venv``; the
Makefile reads both with ``?=``), and ``BOOK_ARGS=--jobs 2`` (two chapters at once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
BOOK = WORKFLOWS / "book.yml"
# GitHub's `shell: bash` (https://docs.github.com/actions/reference/workflow-syntax-for-github-actions#jobsjob_idstepsshell)
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]
HTML = "book/_build/html"


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as True
        data["on"] = data.pop(True)
    return data


# what GitHub gives a run of a fork (the expressions of the build job's env)
GITHUB = {"github.server_url": "https://github.com", "github.repository": "someone/selfrepair-fork",
          "github.sha": "89abcdef01234567" * 2 + "89abcdef"}


def job_env(job: dict) -> dict[str, str]:
    """The job's ``env:`` with its ``${{ github.* }}`` expressions evaluated as for :data:`GITHUB`
    (any other expression fails the test)."""
    def value(text) -> str:
        def one(m: re.Match) -> str:
            assert m[1] in GITHUB, f"the test knows no {m[1]!r}"
            return GITHUB[m[1]]
        return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", one, str(text))
    return {k: value(v) for k, v in job.get("env", {}).items()}


def step(job: dict, step_id: str) -> dict:
    found = [s for s in job["steps"] if s.get("id") == step_id]
    assert len(found) == 1, f"expected one step with id {step_id!r}, found {len(found)}"
    return found[0]


def copy_of_repository(dest: Path) -> Path:
    """The working tree's files that git would check out or add (not the ignored ones: no
    .venv, results/, book/_build), modification times kept so make judges the venv as here."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # deleted but still tracked: not in the working tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@dataclass
class ChapterRun:
    """One chapter of the build: its executed notebook, and whether it ran without an error."""

    name: str
    executed: Path
    ok: bool
    error: str | None


@dataclass
class Build:
    """The book as the workflow's build step made it, in the copy of the repository ``root``."""

    root: Path
    command: str  # what ran: the build step's `run:` (or the Makefile's book recipe, see via_make)
    via_make: bool  # False: `make setup` was not current for this venv, so `selfrepair book` ran
    returncode: int
    log: str  # the command's output
    seconds: float
    wrote_working_tree: bool  # whether the working tree's book/_build/html changed meanwhile
    params: dict = field(default_factory=dict)  # what every chapter got (the tiny profile)
    runs: dict[str, ChapterRun] = field(default_factory=dict)  # notebook stem -> its run

    @property
    def out(self) -> Path:
        return self.root / "book" / "_build"

    @property
    def html(self) -> Path:
        return self.root / HTML

    @property
    def results(self) -> Path:
        """The results cache the chapters wrote (the profile's ``cache_dir = "results"``)."""
        return self.root / "results"


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _runs(build: Build, notebooks: list[Path]) -> dict[str, ChapterRun]:
    from selfrepair.book.runner import _error_of

    runs = {}
    for nb in notebooks:
        executed, log = build.out / "src" / "book" / nb.name, build.out / "logs" / f"{nb.stem}.log"
        failed = not executed.is_file() or json.loads(executed.read_text()).get(
            "metadata", {}).get("papermill", {}).get("exception")
        runs[nb.stem] = ChapterRun(nb.stem, executed, not failed, _error_of(executed, log) if failed else None)
    return runs


def build_book(dest: Path) -> Build:
    """Run the workflow's build step on the tiny profile in a copy of the repository at ``dest``."""
    from selfrepair.book import chapter_notebooks, load_profile

    command = step(load(BOOK)["jobs"]["build"], "build")["run"]
    repo = copy_of_repository(dest)
    if (ROOT / ".cache" / "npm").is_dir():  # the workflow restores it with the results cache
        shutil.copytree(ROOT / ".cache" / "npm", repo / ".cache" / "npm")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(job_env(load(BOOK)["jobs"]["build"]), PROFILE="tiny", VENV=sys.prefix, BOOK_ARGS="--jobs 2")
    # The workflow's setup step has made the venv; here it must already be current, or `make
    # book` would reinstall this venv from the temp copy: then the Makefile's book recipe runs.
    via_make = subprocess.run(["make", "-q", "setup"], cwd=repo, env=env, capture_output=True).returncode == 0
    argv = [*BASH, command] if via_make else [sys.executable, "-m", "selfrepair.cli", "book",
                                              "--profile", "tiny", "--jobs", "2"]
    ours, started = _stamp(ROOT / HTML / "index.html"), time.time()
    run = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=2400)
    build = Build(repo, command if via_make else " ".join(argv[1:]), via_make, run.returncode,
                  f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}", time.time() - started,
                  _stamp(ROOT / HTML / "index.html") != ours,
                  {**load_profile("tiny", ROOT), "cache_dir": "results"})
    build.runs = _runs(build, chapter_notebooks(ROOT))
    return build
