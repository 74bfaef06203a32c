"""A chart's files for the book's readers: the data it draws as CSV, the chart as SVG and PNG.

The book's renderer (:func:`selfrepair.figures.render`) calls :func:`chart_files` for every chart
it displays when ``$SELFREPAIR_CHART_FILES`` names a folder — the book's runner sets it for the
chapters it executes — and shows the links it returns under the chart. The runner then copies the
files a page links into the built book (``_static/charts/``, :data:`CHART_FILES_URL` from a chapter
page). In a reader's own Jupyter the variable is unset: no file is written and no link shown.

Each file is named by the chart's digest (the same chart, the same files): ``<digest>.csv`` (one
per dataset the chart draws: ``<digest>-2.csv`` ... for a second one), ``<digest>.svg`` and
``<digest>.png``, drawn offline by vl-convert (the Vega-Lite version Altair writes). A file is
written to a temporary name and renamed: a reader never finds half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHART_FILES_ENV = "SELFREPAIR_CHART_FILES"
CHART_FILES_URL = "../_static/charts"  # the folder, from a chapter page (book/<chapter>.html)
FILES_CLASS = "selfrepair-chart-files"  # the links' element under a chart
PNG_SCALE = 2  # pixels per CSS pixel of the PNG (sharp on high-density screens)


def chart_tables(spec: dict) -> list[list[dict]]:
    """The data a Vega-Lite spec draws: each top-level dataset, then each inline ``values`` list;
    rows as dicts. The order depends on names and keys only (sorted), not on the order of a dict's
    keys, so a spec read back from a notebook (written with sorted keys) gives the same list."""
    datasets = spec.get("datasets", {})
    tables = [datasets[k] for k in sorted(datasets) if isinstance(datasets[k], list)]

    def inline(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("values"), list) and all(isinstance(r, dict) for r in node["values"]):
                tables.append(node["values"])
            for key, value in sorted(node.items()):
                if key not in ("datasets", "values"):
                    inline(value)
        elif isinstance(node, list):
            for value in node:
                inline(value)

    inline({k: v for k, v in spec.items() if k != "datasets"})
    return [t for t in tables if t]


def table_csv(rows: list[dict]) -> str:
    """Rows as CSV: one column per field, in the order the fields first appear; a missing or null
    value is empty, a nested one written as JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else
                         json.dumps(row[c]) if isinstance(row[c], (dict, list)) else row[c]
                         for c in columns])
    return out.getvalue()


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would travel into the published book
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def chart_files(spec: dict, folder: str | os.PathLike, digest: str) -> list[tuple[str, str]]:
    """Write the chart's CSV, SVG and PNG files into ``folder``; ``[(label, file name)]``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    tables = chart_tables(spec)
    for i, rows in enumerate(tables, start=1):
        name = f"{digest}.csv" if i == 1 else f"{digest}-{i}.csv"
        _write(folder / name, table_csv(rows).encode())
        files.append((f"data{f' {i}' if len(tables) > 1 else ''} (CSV)", name))
    svg, png = chart_images(spec)
    _write(folder / f"{digest}.svg", svg.encode())
    _write(folder / f"{digest}.png", png)
    return files + [("SVG", f"{digest}.svg"), ("PNG", f"{digest}.png")]


def chart_images(spec: dict, scale: float = PNG_SCALE) -> tuple[str, bytes]:
    """The chart drawn offline by vl-convert: (SVG text, PNG bytes at ``scale``)."""
    import altair as alt
    import vl_convert

    version = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    svg = vl_convert.vegalite_to_svg({k: v for k, v in spec.items() if k != "$schema"}, vl_version=version)
    return svg, bytes(vl_convert.svg_to_png(svg, scale=scale))


def files_html(files: list[tuple[str, str]]) -> str:
    """The links under a chart (``download``: the browser saves the file)."""
    links = " · ".join(f'<a href="{CHART_FILES_URL}/{name}" download="{name}">{label}</a>'
                       for label, name in files)
    return f'<p class="{FILES_CLASS}">Download: {links}</p>'
