"""Where readers open the chapters: the install cell of every notebook, and the book's repository,
launch (Colab, Binder), issue and download buttons.

The install cell is every chapter notebook's first code cell (right after its title), the same in
all of them (tests/test_notebooks.py compares it with :func:`install_cell`; ``python -m
selfrepair.book.launch`` writes it into ``book/*.ipynb``). Where ``selfrepair`` is importable (this
repository after ``make setup``) it does nothing; elsewhere it ``pip install``s the library with the
``book`` extra from ``SOURCE``: ``git+<repository>@<commit>`` in the notebooks the book publishes
(:func:`fill_source`), else the checkout above the notebook's folder (Binder, a clone without
``make setup``). The book hides it (``remove-cell``): it is for a notebook run outside the book.

The repository is never written into the repository: the Pages workflow gives it to the build as
``SELFREPAIR_REPOSITORY`` (``${{ github.server_url }}/${{ github.repository }}``) and
``SELFREPAIR_COMMIT`` (``${{ github.sha }}``), so a fork's book names the fork. With them the staged
``_config.yml`` gets the repository and the launch, repository and issue buttons
(:func:`book_config`); without them (a local build) the pages keep the download button only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REPOSITORY_ENV, COMMIT_ENV = "SELFREPAIR_REPOSITORY", "SELFREPAIR_COMMIT"
LAUNCH_BRANCH_ENV = "SELFREPAIR_LAUNCH_BRANCH"  # the branch the launch buttons open (default: the commit)
INSTALL_TAGS = ["remove-cell"]
INSTALL_CELL = '''\
# Colab, Binder or a Jupyter without the library: install it with the book's tools (here: nothing happens)
import importlib, importlib.util, pathlib, subprocess, sys
SOURCE = {source}  # the published notebooks name their repository and commit; None: the checkout above
if importlib.util.find_spec("selfrepair") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet",
                           f"selfrepair[book] @ {{SOURCE or pathlib.Path('..').resolve().as_uri()}}"])
    importlib.invalidate_caches()'''
LAUNCH = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org",
          "colab_url": "https://colab.research.google.com"}


def install_cell(source: str | None = None) -> str:
    """The install cell's code, installing ``source`` (a pip URL) or, with ``None``, the checkout."""
    return INSTALL_CELL.format(source=json.dumps(source) if source else "None")


def published_source(env: dict | None = None) -> str | None:
    """``git+<repository>@<commit>`` from the build's environment, or ``None`` outside a workflow."""
    env = os.environ if env is None else env
    repository, commit = env.get(REPOSITORY_ENV, "").rstrip("/"), env.get(COMMIT_ENV, "")
    return f"git+{repository}@{commit}" if repository and commit else None


def _install_index(cells: list[dict]) -> int | None:
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    if code and "".join(cells[code[0]]["source"]).startswith(INSTALL_CELL.splitlines()[0]):
        return code[0]
    return None


def with_install_cell(nb: dict, source: str | None = None) -> dict:
    """``nb`` (notebook JSON) whose first code cell is the install cell for ``source``: replaced
    where there is one, else inserted after the leading Markdown cells' first (the title)."""
    cells = list(nb["cells"])
    cell = {"cell_type": "code", "execution_count": None, "id": "install-selfrepair",
            "metadata": {"tags": list(INSTALL_TAGS)}, "outputs": [],
            "source": install_cell(source).splitlines(keepends=True)}
    i = _install_index(cells)
    if i is not None:
        cells[i] = {**cells[i], "source": cell["source"], "metadata": {**cells[i].get("metadata", {}),
                                                                        "tags": list(INSTALL_TAGS)}}
    else:
        cells.insert(1 if cells and cells[0]["cell_type"] == "markdown" else 0, cell)
    return {**nb, "cells": cells}


def fill_source(path: Path, source: str | None) -> bool:
    """Write ``source`` into the install cell of the notebook at ``path`` (no other change);
    whether the notebook has an install cell."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    if _install_index(nb["cells"]) is None:
        return False
    path.write_text(json.dumps(with_install_cell(nb, source), indent=1, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return True


def book_config(config: dict, env: dict | None = None) -> dict:
    """``_config.yml`` with the repository, its branch and the buttons, where the build's
    environment names them (:data:`REPOSITORY_ENV`); unchanged otherwise."""
    env = os.environ if env is None else env
    url = env.get(REPOSITORY_ENV, "").rstrip("/")
    if not url:
        return config
    if not re.fullmatch(r"https://[\w.-]+/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"{REPOSITORY_ENV}={url!r}: expected https://<host>/<owner>/<repository>")
    branch = env.get(LAUNCH_BRANCH_ENV) or env.get(COMMIT_ENV) or "main"
    return {**config, "repository": {"url": url, "branch": branch, "path_to_book": ""},
            "launch_buttons": {**LAUNCH, **config.get("launch_buttons", {})},
            "html": {**config.get("html", {}), "use_repository_button": True, "use_issues_button": True}}


def write_install_cells(root: Path) -> list[Path]:
    """Put the install cell (``SOURCE = None``) into every ``book/*.ipynb``; the notebooks changed."""
    changed = []
    for path in sorted((root / "book").glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        new = json.dumps(with_install_cell(json.loads(text)), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def _git(root: Path, *args: str, env: dict | None = None, data: str | None = None) -> str:
    import subprocess

    done = subprocess.run(["git", *args], cwd=root, env=env, input=data, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def publish_notebooks(root: Path, source: str, branch: str, remote: str = "origin") -> str:
    """Push to ``remote``'s ``branch`` one commit on top of ``HEAD``: its tree with every
    ``book/*.ipynb``'s install cell naming ``source``; the commit. The launch buttons open the
    notebooks there, so Colab installs this repository at this commit. Neither the working tree
    nor the index is touched (a temporary index), and the push replaces the branch."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index"),
               "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "selfrepair book"),
               "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "selfrepair-book@users.noreply.github.com")}
        env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
        env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
        _git(root, "read-tree", "HEAD", env=env)
        for path in _git(root, "ls-tree", "--name-only", "HEAD", "book/").splitlines():
            if path.endswith(".ipynb"):
                nb = json.loads(_git(root, "show", f"HEAD:{path}"))
                text = json.dumps(with_install_cell(nb, source), indent=1, ensure_ascii=False) + "\n"
                blob = _git(root, "hash-object", "-w", "--stdin", data=text)
                _git(root, "update-index", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = _git(root, "write-tree", env=env)
        commit = _git(root, "commit-tree", tree, "-p", "HEAD", "-m",
                      f"The book's notebooks, installing {source}", env=env)
    _git(root, "push", "--force", "--quiet", remote, f"{commit}:refs/heads/{branch}")
    return commit


def main(argv: list[str] | None = None) -> int:
    """``python -m selfrepair.book.launch``: write the install cell into ``book/*.ipynb``;
    ``--publish``: push the notebooks the launch buttons open (:func:`publish_notebooks`), from
    :data:`REPOSITORY_ENV`, :data:`COMMIT_ENV` and :data:`LAUNCH_BRANCH_ENV`."""
    import argparse

    from .runner import find_root

    ap = argparse.ArgumentParser(prog="python -m selfrepair.book.launch", description=main.__doc__)
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)
    root = find_root()
    if not args.publish:
        for p in write_install_cells(root):
            print(f"install cell written: {p}")
        return 0
    source, branch = published_source(), os.environ.get(LAUNCH_BRANCH_ENV)
    if not source or not branch:
        raise SystemExit(f"--publish needs {REPOSITORY_ENV}, {COMMIT_ENV} and {LAUNCH_BRANCH_ENV}")
    print(f"{branch}: {publish_notebooks(root, source, branch)} (notebooks installing {source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
