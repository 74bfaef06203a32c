"""The README is a front door (short; every link and path inside the repository, none of this or
any machine), and the book's Cite page gives the same BibTeX as references.bib and CITATION.cff."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_LINES = 120
# a path of a particular machine, or one that leaves the repository
OUTSIDE = re.compile(r"(?<![\w.])(\.\./|~/|/work/|/home/|/root/|/tmp/|/Users/|/mnt/|/opt/|[A-Z]:\\)")


def outside_paths(text: str) -> list[str]:
    return [text[max(0, m.start() - 30):m.end() + 30].replace("\n", " ") for m in OUTSIDE.finditer(text)]


def test_outside_paths_are_found():
    assert outside_paths("see ../shared/PAPER.md and /work/main/x and ~/.cache/y and C:\\Users")
    assert len(outside_paths("see ../shared/PAPER.md")) == 1
    assert outside_paths("book/01.ipynb, docs/DEVELOPING.md, https://ndif.us/x, /path/to/a/folder") == []


def test_readme_is_short_and_stays_in_the_repository():
    assert len(README.splitlines()) <= MAX_LINES, f"README.md has {len(README.splitlines())} lines"
    assert not outside_paths(README), outside_paths(README)
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        url = urlparse(target)
        if url.scheme:
            assert url.scheme == "https", target
            continue
        assert (ROOT / url.path).is_file(), f"README links {target}, which is not in the repository"


def test_readme_keeps_the_two_commands_and_names_every_chapter():
    assert re.search(r"^make book\b", README, re.M) and re.search(r"^make test\b", README, re.M)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"], *(c["file"] for p in toc["parts"] for c in p["chapters"])]
    missing = [p for p in pages if not re.search(re.escape(p) + r"\.(ipynb|md)\)", README)]
    assert not missing, f"the README does not link {missing}"
    assert "from selfrepair import load_model, run_sweep, self_repair" in README


def bibtex(text: str) -> dict[str, str]:
    """``{key: entry}`` of every BibTeX entry in ``text`` (whitespace normalised)."""
    out = {}
    for m in re.finditer(r"@\w+\{([\w:-]+),(.*?)\n\}", text, re.S):
        out[m.group(1)] = " ".join(m.group(0).split())
    return out


def test_cite_page_gives_the_bibliography_entries():
    page = bibtex((ROOT / "book" / "appendix_cite.md").read_text(encoding="utf-8"))
    bib = bibtex((ROOT / "book" / "references.bib").read_text(encoding="utf-8"))
    assert set(page) == {"selfrepair", "rushing2024selfrepair", "mcgrath2023hydra"}
    for key, entry in page.items():
        assert entry == bib[key], f"the Cite page's {key} differs from references.bib"


def test_citation_cff_and_pyproject_agree():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert cff["version"] == version and cff["license"] == "MIT" and 'license = "MIT"' in pyproject
    assert f"version = {{{version}}}" in (ROOT / "book" / "references.bib").read_text()
    titles = {r["title"] for r in cff["references"]}
    assert {"Explorations of Self-Repair in Language Models",
            "The Hydra Effect: Emergent Self-repair in Language Model Computations"} <= titles
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Gemma Terms of Use" in license_text
    assert "data/SOURCES.md" in license_text
