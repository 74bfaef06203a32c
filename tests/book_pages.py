"""Checks of a built book's pages shared by tests/test_book_files.py (the tests' shared build) and
tests/test_workflows.py (the Pages workflow's own build step): the buttons name the repository the
build was given, and every chart of a chapter offers its data (CSV) and images (SVG, PNG)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from selfrepair.figures import charts_in_notebook, spec_digest
from selfrepair.figures.export import CHART_FILES_URL, chart_tables

# (owner, repository) of GitHub links a page may hold besides the book's own repository: sources
# the book cites (chapter 6: the self-repair paper's released values).
THIRD_PARTY: set[tuple[str, str]] = {("starship006", "backup_research")}
REPOSITORY_LINK = re.compile(r"https://(?:github\.com|colab\.research\.google\.com/github|mybinder\.org/v2/gh)"
                             r"/([\w.-]+)/([\w.-]+)")


def pages(src: Path) -> dict[str, str]:
    """``{page: source suffix}`` of the staged book (``.ipynb`` for chapters, ``.md`` otherwise)."""
    import yaml

    toc = yaml.safe_load((src / "_toc.yml").read_text())
    names = [toc["root"], *(c["file"] for p in toc["parts"] for c in p["chapters"])]
    return {n: next(s for s in (".ipynb", ".md") if (src / f"{n}{s}").is_file()) for n in names}


def button_problems(html: Path, src: Path, repository: str, branch: str) -> list[str]:
    """What is missing or wrong among every page's buttons: on a chapter page the Colab and Binder
    launch links to its notebook on ``branch``; on every page the repository and issue buttons and
    the download of its source; and no link to another GitHub repository than ``repository``."""
    owner, name = repository.rstrip("/").split("/")[-2:]
    problems = []
    for page, suffix in pages(src).items():
        text = (html / f"{page}.html").read_text(encoding="utf-8")
        hrefs = set(re.findall(r'href="([^"]+)"', text))
        want = {f'{repository}', f"../_sources/{page}{suffix}"}
        if suffix == ".ipynb":
            want |= {f"https://colab.research.google.com/github/{owner}/{name}/blob/{branch}/{page}.ipynb",
                     f"https://mybinder.org/v2/gh/{owner}/{name}/{branch}?urlpath=lab/tree/{page}.ipynb"}
        problems += [f"{page}: no link {w}" for w in sorted(want - hrefs)]
        if not any(h.startswith(f"{repository}/issues/new?") for h in hrefs):
            problems.append(f"{page}: no issue button")
        others = {m for h in hrefs for m in REPOSITORY_LINK.findall(h)} - {(owner, name)} - THIRD_PARTY
        problems += [f"{page}: links github.com/{o}/{r}" for o, r in sorted(others)]
    return problems


def fields_encoded(node, out: set | None = None) -> set[str]:
    """The data fields a Vega-Lite spec's encodings and facets name (escapes removed)."""
    out = set() if out is None else out
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("encoding", "facet") and isinstance(value, dict):
                defs = [value] if "field" in value else list(value.values())
                for d in [x for v in defs for x in (v if isinstance(v, list) else [v])]:
                    for sub in (d, d.get("condition")) if isinstance(d, dict) else ():
                        if isinstance(sub, dict) and isinstance(sub.get("field"), str):
                            out.add(sub["field"].replace("\\", ""))
            fields_encoded(value, out)
    elif isinstance(node, list):
        for value in node:
            fields_encoded(value, out)
    return out


def fields_derived(node, out: set | None = None) -> set[str]:
    """The fields a spec's transforms make (``as``; a fold's default ``key``, ``value``)."""
    out = set() if out is None else out
    if isinstance(node, dict):
        for t in node.get("transform", []) if isinstance(node.get("transform"), list) else []:
            for item in [t, *[i for k in ("window", "aggregate", "joinaggregate") for i in t.get(k, [])
                              if isinstance(i, dict)]]:
                names = item.get("as", ["key", "value"] if "fold" in item else [])
                out.update([names] if isinstance(names, str) else names)
        for value in node.values():
            fields_derived(value, out)
    elif isinstance(node, list):
        for value in node:
            fields_derived(value, out)
    return out


def chart_file_problems(html: Path, executed: Path) -> tuple[int, list[str]]:
    """(charts checked, problems) for one chapter: every chart its executed notebook displays is
    linked from its page with one CSV per table it draws, whose columns are that table's fields
    (the encoded ones among them), an SVG and a PNG, all in the build."""
    page = (html / "book" / f"{executed.stem}.html").read_text(encoding="utf-8")
    charts, problems = charts_in_notebook(executed), []
    for spec in charts:
        digest, tables = spec_digest(spec), chart_tables(spec)
        names = [f"{digest}.csv" if i == 1 else f"{digest}-{i}.csv" for i in range(1, len(tables) + 1)]
        columns = set()
        for name, rows in zip(names, tables):
            path = html / "_static" / "charts" / name
            if f'href="{CHART_FILES_URL}/{name}"' not in page or not path.is_file():
                problems.append(f"{executed.stem}: chart {digest} does not offer {name}")
                continue
            header = next(csv.reader(path.open(encoding="utf-8")))
            fields = list(dict.fromkeys(k for row in rows for k in row))
            if sorted(header) != sorted(fields) or len(set(header)) != len(header):
                problems.append(f"{executed.stem}: {name} has columns {header}, the chart's data {fields}")
            columns |= set(header)
        missing = fields_encoded(spec) - columns - fields_derived(spec)
        if missing:
            problems.append(f"{executed.stem}: chart {digest} encodes {sorted(missing)}, in no CSV")
        for suffix, magic in ((".svg", b"<svg"), (".png", b"\x89PNG")):
            path = html / "_static" / "charts" / f"{digest}{suffix}"
            if f'href="{CHART_FILES_URL}/{digest}{suffix}"' not in page or not path.is_file() \
                    or magic not in path.read_bytes()[:200]:
                problems.append(f"{executed.stem}: chart {digest} has no {suffix} file")
    return len(charts), problems
