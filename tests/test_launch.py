"""Where readers open a chapter (selfrepair.book.launch): the install cell does nothing where the
library is importable and otherwise installs the published repository at its commit (or the
checkout above the notebook); the book's config names the repository only when the build's
environment gives it. The built pages' buttons are checked in tests/test_book_files.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from selfrepair.book.launch import (COMMIT_ENV, REPOSITORY_ENV, book_config, fill_source, install_cell,
                                    published_source)

ROOT = Path(__file__).resolve().parents[1]
ENV = {REPOSITORY_ENV: "https://github.com/someone/a-fork", COMMIT_ENV: "0123abcd" * 5}


def run_cell(source, monkeypatch, *, importable: bool) -> list[list[str]]:
    """Execute the install cell with ``source``; the pip commands it ran."""
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kw: calls.append(cmd) or 0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "selfrepair" and not importable else real(name, *a))
    exec(compile(install_cell(source), "install-cell", "exec"), {})
    return calls


def test_install_cell_does_nothing_where_the_library_is_importable(monkeypatch):
    assert run_cell(None, monkeypatch, importable=True) == []
    assert run_cell("git+https://github.com/o/r@abc", monkeypatch, importable=True) == []


def test_install_cell_installs_the_published_commit_or_the_checkout(monkeypatch, tmp_path):
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")  # a notebook runs in its folder
    [published] = run_cell(published_source(ENV), monkeypatch, importable=False)
    assert published[1:] == ["-m", "pip", "install", "--quiet",
                             f"selfrepair[book] @ git+https://github.com/someone/a-fork@{'0123abcd' * 5}"]
    [checkout] = run_cell(None, monkeypatch, importable=False)
    assert checkout[-1] == f"selfrepair[book] @ {tmp_path.resolve().as_uri()}"


def test_published_source_needs_repository_and_commit():
    assert published_source({}) is None and published_source({REPOSITORY_ENV: "https://github.com/a/b"}) is None
    assert published_source({**ENV, REPOSITORY_ENV: "https://github.com/someone/a-fork/"}).startswith(
        "git+https://github.com/someone/a-fork@")


def test_book_config_names_the_repository_only_when_given():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "repository" not in config, "_config.yml names a repository: the build's environment does"
    assert book_config(config, {}) == config
    given = book_config(config, ENV)
    assert given["repository"] == {"url": ENV[REPOSITORY_ENV], "branch": ENV[COMMIT_ENV], "path_to_book": ""}
    assert given["launch_buttons"]["colab_url"] and given["launch_buttons"]["binderhub_url"]
    assert given["html"]["use_repository_button"] and given["html"]["use_issues_button"]
    assert given["html"]["home_page_in_navbar"] == config["html"]["home_page_in_navbar"]
    with pytest.raises(ValueError, match="expected https://"):
        book_config(config, {**ENV, REPOSITORY_ENV: "someone/a-fork"})


def test_fill_source_changes_only_the_install_cell(tmp_path):
    committed = ROOT / "book" / "01_self_repair_exists.ipynb"
    path = tmp_path / committed.name
    path.write_text(committed.read_text(encoding="utf-8"), encoding="utf-8")
    assert fill_source(path, published_source(ENV))
    filled, before = json.loads(path.read_text()), json.loads(committed.read_text())
    changed = [i for i, (a, b) in enumerate(zip(filled["cells"], before["cells"])) if a != b]
    assert changed == [1] and f'SOURCE = "git+{ENV[REPOSITORY_ENV]}@' in "".join(filled["cells"][1]["source"])
    assert fill_source(path, None)
    assert path.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8")
