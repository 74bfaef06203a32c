"""Every chapter runs as a reader's Jupyter runs it — ``jupyter execute`` (nbclient) on the notebook
in its folder ``book/``, with no runner and no papermill — and finds the cache entries the runner
wrote.

Each notebook is copied into a checkout-shaped folder (``_toc.yml``, ``book/``) with the tiny
profile's values written into its parameters cell, every other parameter at the notebook's own
default: ``cache_dir = "results"`` included, which a kernel working in ``book/`` must resolve to
the book's root, where ``selfrepair book`` keeps it (:func:`selfrepair.measure.results_root`).
That folder starts with a copy of the entries the runner computed for the same parameters
(conftest's ``book``). Same cache entries means same keys: if a chapter computed any key
differently here (a parameter read otherwise, another data fingerprint) or looked in another
folder, it would write a new file. So the test asserts that every chapter ran without an error
and that the results folder holds exactly the runner's files, unchanged, and nothing was written
under ``book/``.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfrepair.book import chapter_notebooks, load_profile
from selfrepair.book.runner import chapter_params

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).parent / "jupyter"


def with_parameters(nb: dict, values: dict) -> dict:
    """``nb`` with ``values`` written into its parameters cell (each ``name = literal  # comment``
    line replaced, its comment kept)."""
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    for stmt in reversed(ast.parse(source).body):
        name = stmt.targets[0].id
        if name in values:
            lines[stmt.lineno - 1:stmt.end_lineno] = [f"{name} = {values[name]!r}  {comments[stmt.end_lineno]}"]
    cell["source"] = "\n".join(lines)
    return nb


def digests(folder: Path) -> dict[str, str]:
    """Every file's SHA-256; a verdict record's without its ``written`` time (a chapter rewrites its
    record each time it runs: the verdicts it holds must be the same)."""
    def content(p: Path) -> bytes:
        if p.name.startswith("verdicts-") and p.suffix == ".json":
            record = json.loads(p.read_text(encoding="utf-8"))
            record.pop("written", None)
            return json.dumps(record, sort_keys=True).encode()
        return p.read_bytes()

    return {p.relative_to(folder).as_posix(): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_parameters_are_written_into_the_cell():
    nb = json.loads((ROOT / "book" / "01_self_repair_exists.ipynb").read_text())
    cell = next(c for c in with_parameters(nb, {"model": "tiny-gpt2", "n_tokens": 64})["cells"]
                if "parameters" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    assert 'model = \'tiny-gpt2\'  # hub id' in source and "\nn_tokens = 64  # tokens measured" in source
    assert source.count("\n") + 1 == len(ast.parse(source).body), "one line per parameter"


def test_every_chapter_runs_in_jupyter_and_reuses_the_runners_entries(book, tmp_path):
    assert all(run.ok for run in book.runs.values()), "the tiny book's build failed"
    repo = tmp_path / "repo"
    (repo / "book").mkdir(parents=True)
    shutil.copy2(ROOT / "_toc.yml", repo / "_toc.yml")
    shutil.copytree(book.results, repo / "results")
    before = digests(repo / "results")
    tiny = load_profile("tiny", ROOT)
    names = []
    for nb in chapter_notebooks(ROOT):
        values = chapter_params(nb, tiny)  # the runner's values but cache_dir: the notebook's default
        text = json.dumps(with_parameters(json.loads(nb.read_text(encoding="utf-8")), values), indent=1)
        (repo / "book" / nb.name).write_text(text, encoding="utf-8")
        names.append(nb.name)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SELFREPAIR_CHART_FILES", "SELFREPAIR_DATA_DIR", "PYTHONPATH")}

    def execute(group: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([str(JUPYTER), "execute", "--timeout=900", "--output={notebook_name}-run",
                               *group], cwd=repo / "book", env=env, capture_output=True, text=True,
                              timeout=1800)

    with ThreadPoolExecutor(2) as pool:  # two kernels at a time, as the runner's tests run them
        done = list(pool.map(execute, [names[0::2], names[1::2]]))
    for run in done:
        assert run.returncode == 0, f"jupyter execute failed:\n{run.stderr[-6000:]}"
    for name in names:
        nb = json.loads((repo / "book" / name.replace(".ipynb", "-run.ipynb")).read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert digests(repo / "results") == before, \
        "a chapter wrote a cache entry (or decided a verdict) the runner did not"
    written = sorted(p.name for p in (repo / "book").iterdir() if p.suffix != ".ipynb")
    assert not written, f"written beside the notebooks instead of the book's root: {written}"


@pytest.mark.parametrize("cwd", ["root", "book", "elsewhere"])
def test_relative_cache_dir_is_the_books_root(cwd, tmp_path, monkeypatch):
    from selfrepair.measure import Cache, results_root

    repo = tmp_path / "repo"
    (repo / "book").mkdir(parents=True)
    (repo / "_toc.yml").write_text("root: book/00_introduction\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir({"root": repo, "book": repo / "book", "elsewhere": tmp_path / "elsewhere"}[cwd])
    want = repo / "results" if cwd != "elsewhere" else Path("results")
    assert results_root("results") == want and Cache("results").root == want
    assert results_root(tmp_path / "abs") == tmp_path / "abs"
