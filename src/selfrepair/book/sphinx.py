"""The book's Sphinx extension (``_config.yml``: ``sphinx: extra_extensions: [selfrepair.book.sphinx]``).

It puts the offline vega bundle on the pages that hold a chart and removes duplicated and thebe
``<script>`` tags (see :func:`_page_assets`), and :data:`BOOK_JS` on every page (it marks display
math that scrolls in its box, so the CSS can say so under it).
"""

from __future__ import annotations

from typing import Any

VEGA_BUNDLE = "vendor/vega-bundle.js"  # under html_static_path (book/_static)
BOOK_JS = "selfrepair.js"  # book/_static/selfrepair.js


def _page_assets(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Load the vega bundle on pages that hold a chart; drop repeated and thebe ``<script>``s.

    Jupyter Book 1.0.4 registers some inline scripts twice, and a repeated top-level ``const`` is
    a SyntaxError in the browser's console on every page. Thebe (live code cells, which this book
    does not offer: it has no launch buttons) is always registered, with an inline
    ``THEBE_JS_URL = "https://unpkg.com/..."``; dropping it leaves no external address in a page.
    """
    from ..figures import CHART_CLASS

    if CHART_CLASS in context.get("body", ""):
        app.add_js_file(VEGA_BUNDLE)  # inside html-page-context: this page only
    seen, unique = set(), []
    for js in context.get("script_files", []):
        name = getattr(js, "filename", js) or ""  # inline scripts: None or "" (same thing)
        attributes = getattr(js, "attributes", {})
        if "thebe" in str(name).lower() or "THEBE" in attributes.get("body", ""):
            continue
        key = (str(name), tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app: Any) -> dict:
    app.connect("html-page-context", _page_assets, priority=900)
    app.add_js_file(BOOK_JS)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
