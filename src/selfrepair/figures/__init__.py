"""Shared figure machinery: the offline Altair renderer, the book's theme and small helpers.

Importing this package registers (and :func:`use_book_renderer` enables — importing alone does
not switch the user's renderer or theme):

- the Altair renderer ``"selfrepair"``: every displayed chart becomes a notebook output holding
  the Vega-Lite spec under ``application/vnd.vegalite.v6+json`` (the major version follows
  ``alt.SCHEMA_VERSION``; tests read it back with :func:`charts_in_notebook`) **and** a
  ``text/html`` ``<div class="selfrepair-chart">`` plus an inline ``<script>`` that calls the
  page-global ``vegaEmbed``. The HTML names no URL and uses no requirejs: the book serves one
  local bundle of vega, vega-lite and vega-embed from ``_static`` (see :mod:`selfrepair.book`),
  so the built book draws its charts offline. The script fits the chart to its column
  (:data:`FIT_JS`): a compound chart wider than the column (on a phone) is redrawn stacked, then
  widened to fill the column or narrowed to fit it; single and layered views are drawn at the column's width by Vega itself (the figure
  functions give them ``width="container"``).
- the theme ``"selfrepair"`` (system fonts only — no web fonts —, 400 x 260 views, no title
  anchor surprises).

Chapter figure modules (``figures/<chapter>.py``, one per chapter, pure ``fig_*(frame) ->
alt.Chart``) use :func:`head_tooltip`, :func:`layer_color`, :func:`diverging_color`,
the shared encodings of :mod:`selfrepair.figures.encodings` (heads grouped by layer, the heads
that matter labelled, legends listing only what is drawn; re-exported here) and
:func:`ensure_small`. This package imports no chapter module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import altair as alt

from ..errors import SelfRepairError
from .legible import DARK, SIGNED
from .encodings import (EDGE, MAX_LABELS, head_slots, labels_only, layer_axis, layer_color, layer_x, present,
                        series_color)
from .export import CHART_FILES_ENV, chart_files, files_html
from .fit import FIT_JS, LAYOUTS, NARROWEST_VIEW, WIDEN_SLACK  # noqa: F401 (the script fitting a chart to its column)

RENDERER = "selfrepair"
THEME = "selfrepair"
VEGALITE_MAJOR = alt.SCHEMA_VERSION.lstrip("v").split(".")[0]
VEGALITE_MIME = f"application/vnd.vegalite.v{VEGALITE_MAJOR}+json"
MIME_PATTERN = re.compile(r"^application/vnd\.vegalite\.v\d+\+json$")
CHART_CLASS = "selfrepair-chart"  # the container class the browser test looks for
MAX_ROWS = 5000  # rows a chart may embed: aggregate or sample before plotting
EMBED_OPTIONS = {"mode": "vega-lite", "renderer": "svg",  # svg: crisp text, easy to test for
                 "actions": {"export": True, "source": False, "compiled": False, "editor": False}}

__all__ = ["CHART_CLASS", "COLUMN_AT_1024", "ChartTooLargeError", "EDGE", "MAX_LABELS", "MAX_ROWS", "RENDERER", "THEME",
           "VEGALITE_MIME", "VIEWS_AT_1024", "chart_html", "check_width", "charts_in_notebook", "data_rows", "diverging_color", "ensure_small",
           "head_slots", "layer_axis", "head_tooltip", "labels_only", "layer_color", "layer_x", "present", "render", "series_color",
           "use_book_renderer", "validate_spec"]


class ChartTooLargeError(SelfRepairError):
    """A chart would embed more than :data:`MAX_ROWS` data rows into the book's HTML."""


# -- helpers for chapter figure modules ---------------------------------------------------------
def head_tooltip(*fields: str, fmt: str = ".3f") -> list[alt.Tooltip]:
    """Tooltips naming the head (``label`` as ``L{layer}H{head}``, ``layer``, ``head``) and then
    each quantitative field in ``fields`` (e.g. ``"self_repair"``) formatted with ``fmt``.

    A field may carry an Altair type suffix (``"ablation:N"``) to override the quantitative type.
    """
    tips = [alt.Tooltip("label:N", title="head"), alt.Tooltip("layer:O"), alt.Tooltip("head:O")]
    for name in fields:
        if ":" in name:
            tips.append(alt.Tooltip(name))
        else:
            tips.append(alt.Tooltip(f"{name}:Q", format=fmt, title=name.replace("_", " ")))
    return tips


def diverging_color(field: str, *, title: str | None = None, values=None) -> alt.Color:
    """A heat map's red-blue colour centred at 0 for signed quantities (blue positive, red negative),
    near-white at 0 (:func:`~selfrepair.figures.encodings.heat_scale`; symmetric over ``values``)."""
    from .encodings import heat_scale

    return alt.Color(f"{field}:Q", scale=heat_scale(values), title=title or field.replace("_", " "))


def data_rows(spec: dict) -> int:
    """Rows embedded anywhere in a Vega-Lite spec (top-level ``datasets`` and inline ``data``
    ``values``; an axis's ``values``, the ticks it labels, are not data)."""
    rows = sum(len(v) for v in spec.get("datasets", {}).values() if isinstance(v, list))

    def inline(node: Any) -> int:
        if isinstance(node, dict):
            data = node.get("data")
            here = data["values"] if isinstance(data, dict) and isinstance(data.get("values"), list) else []
            return len(here) + sum(inline(v) for k, v in node.items() if k != "datasets"
                                   and not (k == "data" and here))
        if isinstance(node, list):
            return sum(inline(v) for v in node)
        return 0

    return rows + inline({k: v for k, v in spec.items() if k != "datasets"})


def ensure_small(chart: alt.TopLevelMixin | dict, max_rows: int = MAX_ROWS):
    """Return ``chart`` unchanged, or raise :class:`ChartTooLargeError` if it embeds more than
    ``max_rows`` rows (every row is written into the page: aggregate per head or sample tokens)."""
    if isinstance(chart, dict):
        spec = chart
    else:
        with alt.data_transformers.disable_max_rows():  # count the rows, then raise our error
            spec = chart.to_dict()
    n = data_rows(spec)
    if n > max_rows:
        raise ChartTooLargeError(f"chart embeds {n} data rows (limit {max_rows}): aggregate the "
                                 "frame (e.g. per head) or sample tokens before plotting")
    return chart


@lru_cache(maxsize=1)
def _validator():
    import jsonschema
    from altair.vegalite.v6.schema.core import load_schema

    schema = load_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def validate_spec(spec: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``spec`` is valid against the Vega-Lite schema
    bundled with Altair (the version the book's JS bundle renders)."""
    error = next(iter(_validator().iter_errors(spec)), None)
    if error is not None:
        raise error


COLUMN_AT_1024 = 743  # px: the book's text column in a 1024 px wide window
VIEWS_AT_1024 = 600  # px of views side by side that leave room for axes and a legend in it


def check_width(spec: dict) -> None:
    """Raise ``ValueError`` unless ``spec`` is sized to fit the book's column (for tests, like
    :func:`validate_spec`): a single or layered chart takes ``width="container"`` (or discrete
    steps), a compound chart (facet, concat: Vega-Lite has no container width for them) uses no
    ``"container"`` and its views side by side are at most :data:`VIEWS_AT_1024` px wide."""
    compound = [k for k in ("hconcat", "vconcat", "concat", "facet", "repeat") if k in spec]
    if not compound:
        width = spec.get("width")
        if width != "container" and not (isinstance(width, dict) and "step" in width):
            raise ValueError(f"a single or layered chart should have width 'container', not {width!r}")
        return
    if '"container"' in json.dumps(spec):
        raise ValueError("a compound chart cannot be drawn at the container's width (Vega-Lite)")
    wide = _views_wide(spec, spec)
    if wide > VIEWS_AT_1024:
        raise ValueError(f"{compound[0]} chart: its views side by side are {wide} px wide; at most "
                         f"{VIEWS_AT_1024} px fit a 1024 px page (narrower views, wrapped facets)")


def _views_wide(node: dict, top: dict) -> int:
    if "hconcat" in node:
        return sum(_views_wide(c, top) for c in node["hconcat"])
    if "vconcat" in node:
        return max(_views_wide(c, top) for c in node["vconcat"])
    if "concat" in node:
        widths = [_views_wide(c, top) for c in node["concat"]]
        n = node.get("columns") or len(widths)
        return max(sum(widths[i:i + n]) for i in range(0, len(widths), n))
    if "facet" in node:
        facet, inner = node["facet"], _views_wide(node["spec"], top)
        if "field" in facet:
            return inner * (node.get("columns") or _levels(facet["field"], top))
        return inner * (_levels(facet["column"]["field"], top) if "column" in facet else 1)
    width = node.get("width", 400)
    return width if isinstance(width, (int, float)) else 400


def _levels(field: str, spec: dict) -> int:
    """Distinct values of ``field`` in the chart's data (the panels a facet draws)."""
    rows = [r for values in spec.get("datasets", {}).values() for r in values]
    return max(1, len({json.dumps(r.get(field)) for r in rows if field in r}))


def charts_in_notebook(nb: Any) -> list[dict]:
    """Vega-Lite specs displayed by an executed notebook (a path, an ``nbformat`` node or a dict),
    in output order — the specs the ``"selfrepair"`` renderer stored next to their HTML."""
    if isinstance(nb, (str, Path)):
        nb = json.loads(Path(nb).read_text(encoding="utf-8"))
    specs = []
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            for mime, data in output.get("data", {}).items():
                if MIME_PATTERN.match(mime):
                    specs.append(json.loads(data) if isinstance(data, str) else data)
    return specs


# -- the renderer -------------------------------------------------------------------------------
_counter = itertools.count()


def spec_digest(spec: dict) -> str:
    """12 hex digits naming a chart by its content (its element id, its files)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def chart_html(spec: dict, embed_options: dict | None = None) -> str:
    """``<div>`` + inline ``<script>`` drawing ``spec`` with the page-global ``vegaEmbed``.

    The element id comes from the spec's hash and a counter (stable across re-runs, unique on a
    page). ``</`` is escaped inside the JSON so a string in the data cannot close the script.
    """
    div = f"{CHART_CLASS}-{spec_digest(spec)}-{next(_counter)}"
    opts = {**EMBED_OPTIONS, **(embed_options or {})}
    # "$schema" is an identifier, never fetched; dropping it keeps every URL out of the page
    # (and vega-embed's version-mismatch warning out of the console).
    spec = {k: v for k, v in spec.items() if k != "$schema"}

    def js(obj: Any) -> str:
        return (json.dumps(obj, sort_keys=True).replace("</", "<\\/")
                .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))

    return (f'<div class="{CHART_CLASS}" id="{div}"></div>\n'
            '<script type="text/javascript">\n'
            "(function () {\n"
            f'  var el = document.getElementById("{div}");\n'
            '  if (typeof vegaEmbed !== "function") {\n'
            '    el.textContent = "[chart not drawn: vegaEmbed is not loaded on this page; '
            'open the book built by `selfrepair book`]";\n'
            "    return;\n"
            "  }\n"
            f"{FIT_JS}"
            f"  window.selfrepairFit(el, {js(spec)}, {js(opts)});\n"
            "})();\n"
            "</script>")


def render(spec: dict, **metadata: Any) -> dict:
    """The ``"selfrepair"`` Altair renderer: spec + offline HTML (+ a plain-text stand-in); with
    ``$SELFREPAIR_CHART_FILES`` set (the book's runner), the chart's CSV, SVG and PNG files are
    written there and linked under it (:mod:`selfrepair.figures.export`)."""
    ensure_small(spec)
    title = spec.get("title")
    title = title.get("text") if isinstance(title, dict) else title
    html = chart_html(spec, metadata.get("embed_options"))
    if os.environ.get(CHART_FILES_ENV):  # the book's runner: the chart's data and images, linked
        html += "\n" + files_html(chart_files(spec, os.environ[CHART_FILES_ENV], spec_digest(spec)))
    return {VEGALITE_MIME: spec,
            "text/html": html,
            "text/plain": f"<Vega-Lite chart{': ' + str(title) if title else ''}>"}


def _theme() -> alt.theme.ThemeConfig:
    font = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
    return {"config": {
        "font": font,
        "view": {"continuousWidth": 400, "continuousHeight": 260, "stroke": None},
        "axis": {"labelFontSize": 11, "titleFontSize": 12, "titleFontWeight": "normal",
                 "gridColor": "#e6e6e6", "domainColor": "#888", "tickColor": "#888"},
        "legend": {"labelFontSize": 11, "titleFontSize": 12, "titleFontWeight": "normal"},
        "header": {"labelFontSize": 12, "titleFontSize": 12},
        "title": {"fontSize": 14, "fontWeight": "normal", "anchor": "start", "offset": 8},
        "range": {"category": list(DARK.values())},  # every colour 3:1 on white (tableau10's orange, teal, ... are not)
        "point": {"size": 30}, "bar": {"binSpacing": 1},
    }}


alt.renderers.register(RENDERER, render)
alt.theme.register(THEME, enable=False)(_theme)


def use_book_renderer() -> None:
    """Switch Altair to the book's offline renderer and theme (every chapter's first cell calls
    this; importing :mod:`selfrepair.figures` alone changes nothing)."""
    alt.renderers.enable(RENDERER)
    alt.theme.enable(THEME)

