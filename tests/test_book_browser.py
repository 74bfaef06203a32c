"""Open every page of a built book in headless Chromium: charts drawn, math typeset, no console
errors, and no request to any host but the local server (the book works offline); read at 1440,
1024 and 390 px: no chart wider than its column or narrower than 200 px (or shrunk to views under
100 px), no facet panel without marks and no axis under an empty facet slot, no legend entry whose
colour no mark draws, no inline math wider than its paragraph, no table wider than its column (one
that must scroll says why), at any of them; no page that scrolls sideways on a phone (see the
test's docstring); the
parameters cells, the boilerplate and every display-only cell's code folded, papermill's injected
parameters removed and "What ran here" right after the opening; and no page naming a folder of the machine that
built it.
The built pages' text: no "draw(s)" / "patch(es)" templates, no emoji, no integer column printed
with a decimal point.

Reads the book conftest's ``book`` built (once per test run, as the Pages workflow builds it, on
the ``tiny`` profile) and, beside it, a synthetic page with a few charts built on its own (so the
renderer is checked whatever the chapters draw), serves both with ``python -m http.server`` on
127.0.0.1 and drives Chromium through the DevTools
protocol (``websocket-client``). Needs Debian's ``chromium`` (``apt-get install -y chromium``);
skipped, with that message, where no Chromium can be found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import altair as alt
import nbformat
import pandas as pd
import pytest
import yaml

from selfrepair import figures
from selfrepair.book import build_html

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHECK_PAGE = "chart_check/book/chart_check"
WIDTHS = {"laptop": 1440, "small laptop": 1024, "phone": 390}  # viewport widths (px) every page is read at
HEIGHT = 900
# Reading a drawn chart (Vega's SVG): a view's plot area is the background of the root group, or of
# each facet cell / concatenated view; a facet cell's marks are its `role-mark` items; a column
# footer holds the x-axis drawn under the last panel of each column; a legend's symbols carry the
# colour of the marks they name (a colour legend has several colours; shape legends are skipped).
CHART_JS = """
  const title = svg => (svg.querySelector('g.role-title text') || {}).textContent || '(untitled)';
  const plotWidths = svg => {
    const bg = sel => Array.from(svg.querySelectorAll(sel)).map(p => Math.round(p.getBoundingClientRect().width));
    const views = bg('g.role-scope.cell > g > path.background').concat(
      bg('g.role-scope[class*="concat_"] > g > path.background'));
    return views.length ? views : bg('g.role-frame.root > g > path.background');
  };
  const emptyPanels = svg => {
    const cells = Array.from(svg.querySelectorAll('g.role-scope.cell > g'));
    const out = cells.filter(c => !c.querySelector('g.role-mark > *')).map(() => 'a facet panel without marks');
    const boxes = cells.map(c => (c.querySelector('path.background') || c).getBoundingClientRect());
    svg.querySelectorAll('g.role-column-footer > g').forEach(f => {
      const r = f.getBoundingClientRect();
      const above = boxes.filter(b => b.left < r.right - 2 && b.right > r.left + 2 && b.bottom <= r.top + 2);
      if (!above.length || r.top - Math.max(...above.map(b => b.bottom)) > 20)
        out.push('an axis under an empty facet slot');
    });
    return out;
  };
  const paint = e => {
    const f = (e.getAttribute('fill') || '').toLowerCase();
    return f && f !== 'none' && f !== 'transparent' ? f : (e.getAttribute('stroke') || '').toLowerCase();
  };
  const unmarkedLegend = svg => {
    const drawn = new Set();
    svg.querySelectorAll('g.role-mark > *').forEach(e => ['fill', 'stroke'].forEach(a => {
      const v = (e.getAttribute(a) || '').toLowerCase(); if (v) drawn.add(v); }));
    const out = [];
    svg.querySelectorAll('g.role-legend').forEach(lg => {
      if (lg.querySelector('g.role-legend-gradient')) return;  // a continuous scale: no entries
      const colours = Array.from(lg.querySelectorAll('g.role-legend-symbol > path')).map(paint);
      const labels = Array.from(lg.querySelectorAll('g.role-legend-label > text')).map(t => t.textContent);
      if (colours.length > 1 && new Set(colours).size < 2) return;  // shapes, not colours
      colours.forEach((c, i) => { if (!drawn.has(c)) out.push(labels[i]); });
    });
    return out;
  };
"""
# px: no chart narrower; its widest view not narrower (a single view shrunk to make room for a long
# title or legend), and no view collapsed (a one-column strip beside a heatmap may be narrow)
CHART_MIN, VIEW_MIN = 200, figures.NARROWEST_VIEW
WHAT_RAN_GAP = 300  # px: folded parameters, set-up and summary cells (one line each) above "What ran here"
PAGE_STATE = """(() => {
  const charts = Array.from(document.querySelectorAll('.%(chart)s'));
%(chart_js)s
  // what a reader sees without a click: not inside a closed <details> (a folded cell, the
  // full frame under a table), laid out and of some height
  const shown = el => !el.closest('details:not([open])') && el.offsetParent !== null
    && el.getBoundingClientRect().height > 0;
  const px = r => Math.round(r.width);
  // every table a reader sees, in a chapter's output or a page's Markdown, and the box that would
  // scroll it sideways (a paper-style table's, the theme's around a Markdown table, the output's)
  const tables = Array.from(document.querySelectorAll('.bd-article table')).filter(shown);
  const scroller = t => t.closest(
    '.selfrepair-table-scroll, .selfrepair-table-box, .pst-scrollable-table-container, .cell_output') || t.parentElement;
  const scrolls = ([t, box]) => px(t.getBoundingClientRect()) > box.clientWidth + 1 || box.scrollWidth > box.clientWidth + 1;
  // a table allowed to scroll says why, on itself or a box around it
  const reason = t => (t.closest('[data-scrolls]') || {dataset: {}}).dataset.scrolls;
  return JSON.stringify({
    charts: charts.length,
    drawn: charts.filter(el => el.querySelector('svg, canvas')).length,
    laid_out: charts.filter(el => el.dataset.layout).length,
    failed: charts.filter(el => el.textContent.includes('[chart')).map(el => el.textContent),
    overflow: charts.map(el => [el.clientWidth, el.querySelector('svg, canvas')])
      .filter(([w, d]) => d && d.getBoundingClientRect().width > w + 2)
      .map(([w, d]) => `${px(d.getBoundingClientRect())} px chart in a ${w} px column`),
    refitted: charts.map(el => el.dataset.layout).filter(l => l && l !== 'as designed'),
    tables: tables.length,
    table_overflow: tables.map(t => [t, scroller(t)]).filter(scrolls).filter(([t]) => !reason(t))
      .map(([t, box]) => `${Math.max(px(t.getBoundingClientRect()), box.scrollWidth)} px table in a `
                         + `${box.clientWidth} px column: ` + t.textContent.trim().replace(/\s+/g, ' ').slice(0, 60)),
    table_scrolls: tables.map(t => [t, scroller(t)]).filter(scrolls).filter(([t]) => reason(t))
      .map(([t, box]) => `${box.scrollWidth} px in ${box.clientWidth} px (${reason(t)})`),
    too_narrow: charts.map(el => el.querySelector('svg.marks')).filter(svg => svg)
      .map(svg => [svg, plotWidths(svg)])
      .filter(([svg, widths]) => svg.getBoundingClientRect().width < %(chart_min)d
              || Math.max(0, ...widths) < %(view_min)d || widths.some(w => w < 10))
      .map(([svg, widths]) => `${px(svg.getBoundingClientRect())} px chart, views ${widths.join(', ')} px`
                              + `: ${title(svg)}`),
    // a small multiple (facet panel) narrower than CHART_MIN: read only at a phone's width, where
    // the renderer stacks a grid in one column and widens its panels (a grid's panels of 150 px kept
    // that width in a 358 px column: the check above reads the whole chart and its widest view)
    narrow_panels: charts.map(el => el.querySelector('svg.marks')).filter(svg => svg)
      .map(svg => [svg, Array.from(svg.querySelectorAll('g.role-scope.cell > g > path.background'))
                          .map(p => Math.round(p.getBoundingClientRect().width))])
      .filter(([svg, widths]) => widths.some(w => w < %(chart_min)d))
      .map(([svg, widths]) => `panels ${widths.join(', ')} px: ${title(svg)}`),
    empty_panels: charts.map(el => el.querySelector('svg.marks')).filter(svg => svg)
      .flatMap(svg => emptyPanels(svg).map(what => `${what}: ${title(svg)}`)),
    unmarked_legend: charts.map(el => el.querySelector('svg.marks')).filter(svg => svg)
      .flatMap(svg => unmarkedLegend(svg).map(label => `"${label}": ${title(svg)}`)),
    math_overflow: Array.from(document.querySelectorAll('mjx-container:not([display="true"])')).filter(shown)
      .map(m => [m, m.closest('p, li, dd, td, th, .cell_output, .admonition, section')])
      .filter(([m, box]) => box && m.getBoundingClientRect().right > box.getBoundingClientRect().right + 2)
      .map(([m, box]) => `${px(m.getBoundingClientRect())} px of math in a ${px(box.getBoundingClientRect())} px `
                         + `box: ${(m.getAttribute('aria-label') || m.textContent).slice(0, 60)}`),
    // display math wider than its column must scroll in its own box with a cue (the scroll shadow
    // of book/_static/selfrepair.css): cut at the screen's edge, or scrolling with no cue, a reader
    // takes the cut for the end of the equation (chapter 7's underbraces on a phone)
    display_math_cut: Array.from(document.querySelectorAll('mjx-container[display="true"]')).filter(shown)
      .map(m => [m, m.closest('li, dd, td, th, .cell_output, .admonition, section, article'), getComputedStyle(m)])
      .filter(([m, box, cs]) => m.getBoundingClientRect().right > Math.min(window.innerWidth,
                                  box ? box.getBoundingClientRect().right : Infinity) + 2
              || (m.scrollWidth > m.clientWidth + 1
                  && (!/auto|scroll/.test(cs.overflowX) || !cs.backgroundImage.includes('gradient')
                      // and a cue in words under it (book/_static/selfrepair.js + css): the shadow
                      // alone at a phone's edge read as the equation cut off (read3 #20)
                      || !getComputedStyle(m.closest('div.math') || m, '::after').content.includes('continues'))))
      .map(([m, box]) => `${m.scrollWidth} px of display math in ${m.clientWidth} px `
                         + `(right edge at ${Math.round(m.getBoundingClientRect().right)} px): `
                         + (m.getAttribute('aria-label') || m.textContent).slice(0, 60)),
    page_width: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    // the build's cell rule (selfrepair.book.cells): the parameters folded, papermill's injected
    // cell removed, every display-only cell's input folded (a verdict's `display(Markdown(...))`)
    parameters_shown: Array.from(document.querySelectorAll('.tag_parameters .cell_input')).map(shown),
    injected: document.querySelectorAll('.tag_injected-parameters').length,
    folded_shown: Array.from(document.querySelectorAll('.tag_hide-input .cell_input')).map(shown),
    display_code_shown: Array.from(document.querySelectorAll('.cell_input')).filter(shown)
      .map(el => el.textContent.trim()).filter(t => /^display\\(Markdown\\(chapter\\.verdict\\(/.test(t)),
    // "What ran here" (run_summary) right after the chapter's opening: the px between the top of
    // the first cell the page shows and the top of what ran (read3 #8: ~1,500 px of parameters,
    // injected parameters and code before it)
    what_ran_gap: (() => {
      const ran = Array.from(document.querySelectorAll('.cell_output strong'))
        .find(el => el.textContent.trim() === 'What ran here.');
      const first = Array.from(document.querySelectorAll('.bd-article .cell')).find(c => c.offsetParent !== null);
      return ran && first ? Math.round(ran.getBoundingClientRect().top - first.getBoundingClientRect().top) : null;
    })(),
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    ready: document.readyState,
    url: location.href,
  });
})()""" % {"chart": figures.CHART_CLASS, "chart_js": CHART_JS, "chart_min": CHART_MIN, "view_min": VIEW_MIN}


def _browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chart_check_notebook() -> nbformat.NotebookNode:
    """A page with a point chart (tooltips), a layered chart and a faceted chart, already
    'executed': its outputs are what the renderer returns."""
    frame = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                          "label": ["L0H0", "L0H1", "L1H0", "L1H1"],
                          "direct_effect": [0.5, 0.1, 0.9, 0.2], "self_repair": [0.1, -0.2, 0.3, 0.05]})
    base = alt.Chart(frame).mark_point().encode(
        x="direct_effect:Q", y="self_repair:Q", color=figures.layer_color(),
        tooltip=figures.head_tooltip("self_repair"))
    charts = [base, base + alt.Chart(frame).mark_rule().encode(y="mean(self_repair):Q"),
              base.properties(width=150, height=120).facet(column="layer:O")]
    outputs = [nbformat.v4.new_output("display_data", data=figures.render(c.to_dict())) for c in charts]
    return nbformat.v4.new_notebook(metadata={"language_info": {"name": "python"}}, cells=[
        nbformat.v4.new_markdown_cell("# Chart check\n\nInline math $x^2$ and a display:\n\n"
                                      "$$\\text{self-repair} = \\Delta\\text{logit} - "
                                      "\\Delta\\text{DE}_{\\text{head}}$$\n\n"
                                      # wider than a phone: it must scroll in its box, with a cue
                                      "$$\\text{exact} - \\text{AtP} = \\underbrace{(\\text{from\\_norm} - "
                                      "\\text{AtP}_\\text{norm})}_{\\text{final norm}} + \\underbrace{"
                                      "(\\text{downstream} - \\text{AtP}_\\text{downstream})}_{\\text{later "
                                      "layers}}$$"),
        nbformat.v4.new_code_cell("charts", outputs=outputs, execution_count=1)])


@pytest.fixture(scope="module")
def built_book(book, tmp_path_factory) -> Path:
    """The site served: the book's HTML (linked, not copied) and, under ``chart_check/``, the
    chart-check page built as a book of its own with the book's config and assets (warnings are
    errors)."""
    assert (book.html / "index.html").is_file(), f"the book was not built:\n{book.log}"
    site, src = tmp_path_factory.mktemp("site") / "html", tmp_path_factory.mktemp("chart_check")
    shutil.copytree(book.html, site, copy_function=os.link)
    for rel in ("_config.yml", "book/references.bib"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(book.root / rel, src / rel)
    shutil.copytree(book.root / "book" / "_static", src / "book" / "_static")
    nbformat.write(_chart_check_notebook(), src / "book" / "chart_check.ipynb")
    (src / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "book/chart_check"}))
    started = time.time()
    assert build_html(src, site / "chart_check", strict=True) == 0, "the check page's build failed"
    print(f"chart-check page built in {time.time() - started:.1f} s")
    return site


class DevTools:
    """A minimal Chrome DevTools protocol client for one page target."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def browser(built_book, tmp_path_factory):
    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium found: install it with `apt-get install -y chromium` (Debian)")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(built_book)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    profile = tmp_path_factory.mktemp("chromium")
    chrome = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu",
                               "--disable-dev-shm-usage", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               "--no-default-browser-check", f"--user-data-dir={profile}",
                               "--remote-debugging-port=0", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.time() < deadline and chrome.poll() is None, "Chromium did not start"
            time.sleep(0.1)
        cdp = int(port_file.read_text().split()[0])
        req = urllib.request.Request(f"http://127.0.0.1:{cdp}/json/new?about:blank", method="PUT")
        target = json.loads(urllib.request.urlopen(req, timeout=10).read())
        tools = DevTools(target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable")
        yield tools, f"http://127.0.0.1:{port}"
        tools.close()
    finally:
        chrome.terminate()
        server.terminate()
        chrome.wait(timeout=10)
        server.wait(timeout=10)


def _pages(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if "_static" not in p.parts and "_sources" not in p.parts)


REDIRECT = re.compile(r'^\s*<meta http-equiv="Refresh" content="0; url=([^"]+)"\s*/?>\s*$', re.I)


def _redirect(path: Path) -> str | None:
    """The page a redirect stub (the book's index.html) sends the reader to, else None."""
    m = REDIRECT.match(path.read_text(encoding="utf-8", errors="replace"))
    return (path.parent / m.group(1)).resolve().as_posix() if m else None


def _problems(events: list[dict], origin: str) -> list[str]:
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if "favicon.ico" in json.dumps(p):  # the browser asks every server for one; not the book's
            continue
        if method == "Runtime.exceptionThrown":
            details = p["exceptionDetails"]
            out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                    for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if urlparse(url).scheme in ("http", "https", "ws", "wss") and not url.startswith(origin):
                out.append(f"external request: {url}")
        elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
    return out


# a table's full frame and every other table folded behind a click, opened to be measured too (a
# fold's scroll box says why it may scroll: selfrepair.tables.scroll_box); no other fold is opened
OPEN_TABLE_FOLDS = "document.querySelectorAll('details').forEach(d => { if (d.querySelector('table')) d.open = true; })"


def _visit(tools: DevTools, url: str) -> dict:
    """Load ``url`` and wait until every chart is drawn and laid out (the renderer sets
    ``data-layout`` when its last drawing is done) and MathJax has typeset the math."""
    tools.events.clear()
    tools.call("Page.navigate", url=url)
    deadline, state = time.time() + 30, {}
    while time.time() < deadline:
        state = json.loads(tools.evaluate(PAGE_STATE) or "{}")
        if (state.get("url") == url and state.get("ready") == "complete"  # the new page, not the last one
                and state["laid_out"] + len(state["failed"]) == state["charts"]
                and (state["math"] == 0 or state["typeset"] > 0)):
            break
        time.sleep(0.2)
    time.sleep(0.3)  # let late console messages arrive
    state = json.loads(tools.evaluate(PAGE_STATE) or "{}")
    tools.evaluate(OPEN_TABLE_FOLDS)
    opened = json.loads(tools.evaluate(PAGE_STATE) or "{}")
    return {**state, **{k: opened.get(k) for k in ("tables", "table_overflow", "table_scrolls")}}


@pytest.mark.parametrize("screen", list(WIDTHS))
def test_every_page_draws_charts_and_math_offline(browser, built_book, screen):
    """Every page at each width: charts drawn, math typeset, no console error, no request to
    another host; the parameters cells, the boilerplate and every display-only cell's code folded
    (selfrepair.book.cells), papermill's injected parameters removed, "What ran here" at most
    WHAT_RAN_GAP px below the first cell; display math that scrolls says so in words under it.

    At 1440 and 1024 px (laptops) no chart is wider than its column, and every chart is drawn as
    its figure function designed it (single and layered views at the column's width, compound
    charts at widths that fit). At phone width (390 px, mobile emulation) the renderer may redraw
    a compound chart stacked (views one under the other, facets in one column), then widened to
    fill the column or narrowed to fit it; there no chart may be wider than its column either, no
    facet panel narrower than 200 px (issue 25: a grid's 150 px histograms), and the page must not
    scroll sideways.

    At every width no table (chapter outputs and Markdown alike, those folded behind a click
    opened) is wider than its column: nothing scrolls sideways inside its box (``scrollWidth`` of
    the box that would scroll it at most its ``clientWidth`` + 1). On a phone a table fits by its
    shape (selfrepair.tables: a ``phone`` choice of columns, the rest one click away; ``stacked``
    rows of text) and the phone CSS (tighter, wrapping). A table that must scroll (the full frame
    in a fold, every column under its own name) says why in a ``data-scrolls`` attribute on itself
    or a box around it; those are printed."""
    tools, origin = browser
    width = WIDTHS[screen]
    tools.call("Emulation.setDeviceMetricsOverride", width=width, height=HEIGHT, deviceScaleFactor=1,
               mobile=width < 600)
    pages = _pages(built_book)
    assert f"{CHECK_PAGE}.html" in pages and "book/00_introduction.html" in pages
    targets = {p: _redirect(built_book / p) for p in pages}
    assert all(t is None or t in {(built_book / q).resolve().as_posix() for q in pages}
               for t in targets.values()), targets
    pages = [p for p in pages if targets[p] is None]  # a stub's target is read in its own right
    report, totals = {}, {"charts": 0, "refitted": 0, "tables": 0}
    for page in pages:
        state = _visit(tools, f"{origin}/{page}")
        tools.evaluate("1")
        problems = _problems(tools.events, origin)
        if state.get("charts") != state.get("drawn"):
            problems.append(f"{state.get('drawn')} of {state.get('charts')} charts drawn {state.get('failed')}")
        if state.get("overflow"):  # a chart that scrolls or is cut off does not fit
            problems.append(f"charts wider than their column at {width} px: {state['overflow']}")
        for key, what in (("too_narrow", f"charts narrower than {CHART_MIN} px (widest view under {VIEW_MIN} px, "
                                         "or a view collapsed)"),
                          ("empty_panels", "facet panels without marks"),
                          ("unmarked_legend", "legend entries no mark draws"),
                          ("math_overflow", "inline math wider than its paragraph"),
                          ("display_math_cut", "display math cut off or scrolling without a cue")):
            if state.get(key):
                problems.append(f"{what} at {width} px: {state[key]}")
        if width < 600 and state.get("narrow_panels"):
            problems.append(f"facet panels narrower than {CHART_MIN} px at {width} px: {state['narrow_panels']}")
        if width >= 1024 and state.get("refitted"):
            problems.append(f"charts not drawn as designed at {width} px: {state['refitted']} "
                            "(make the fig_* function fit a 1024 px page)")
        if state.get("table_overflow"):  # at every width, a phone's included: it would scroll sideways
            problems.append(f"tables wider than their column at {width} px: {state['table_overflow']}")
        if state.get("table_scrolls"):
            print(f"{width} px {page}: tables allowed to scroll: {state['table_scrolls']}")
        # wider content makes a phone's layout viewport wider than the screen (innerWidth grows)
        if max(state.get("page_width", 0), state.get("viewport", 0)) > width + 1:
            problems.append(f"the page is wider than the {width} px screen: {state['page_width']} px")
        if any(state.get("parameters_shown", [])) or state.get("injected"):
            problems.append(f"a parameters cell shows its input ({state.get('parameters_shown')}) or papermill's "
                            f"injected parameters are on the page ({state.get('injected')})")
        if state.get("display_code_shown"):
            problems.append(f"display-only code shown: {state['display_code_shown'][:2]}")
        if state.get("what_ran_gap") is not None and state["what_ran_gap"] > WHAT_RAN_GAP:
            problems.append(f"'What ran here' is {state['what_ran_gap']} px below the first cell "
                            f"(at most {WHAT_RAN_GAP} px: the chapter's opening, then what ran)")
        if any(state.get("folded_shown", [])):
            problems.append("a cell tagged hide-input shows its input without a click")
        if state.get("math") and not state.get("typeset"):
            problems.append(f"{state['math']} math elements but MathJax typeset none")
        for key in totals:
            totals[key] += len(state.get(key) or []) if key == "refitted" else state.get(key, 0)
        print(f"{width} px {page}: {state.get('drawn')}/{state.get('charts')} charts drawn "
              f"({len(state.get('refitted') or [])} refitted), {state.get('tables')} tables, "
              f"{state.get('typeset')} formulas typeset, {len(problems)} problems")
        if problems:
            report[page] = problems
    print(f"{width} px: {totals}")
    assert not report, json.dumps(report, indent=1, ensure_ascii=False)
    assert totals["charts"] >= 3


def machine_paths(book) -> dict[str, str]:
    """Folders of the machine that built the book, which no page may name."""
    paths = {"the repository root": ROOT, "the repository copy built": book.root, "the build folder": book.out,
             "$HOME": Path.home(), "the Python environment": Path(sys.prefix),
             "the interpreter": Path(sys.executable).parent}
    out = {}
    for what, path in paths.items():
        for form in {str(path), os.path.realpath(path)}:
            if len(form) > 1:  # "/" names nothing
                out[form] = what
    return out


def paths_named(text: str, paths: dict[str, str]) -> list[str]:
    """Which of ``paths`` ``text`` names (as a whole folder: followed by a separator, a quote, a
    tag or a space, so /root does not match /rooted)."""
    return sorted({f"{what} ({p})" for p, what in paths.items()
                   if re.search(re.escape(p) + r"(?=[/\\\"'<\s&]|$)", text)})


def test_paths_named_finds_folders():
    paths = {"/home/ann": "$HOME", "/tmp/book0": "the build folder"}
    assert paths_named('<td>/home/ann/results</td> cache_dir = "/tmp/book0"', paths) == [
        "$HOME (/home/ann)", "the build folder (/tmp/book0)"]
    assert paths_named("<p>/home/anne and /tmp/book01 and results</p>", paths) == []


def test_no_page_names_a_path_of_the_building_machine(built_book, book):
    """The injected parameters (cache_dir), the provenance table and every other output: no page
    names the repository's folder, the build folder, $HOME or the Python environment."""
    paths = machine_paths(book)
    pages = _pages(built_book)
    assert len(pages) > 5
    found = {page: named for page in pages
             if (named := paths_named((built_book / page).read_text(encoding="utf-8"), paths))}
    assert not found, json.dumps(found, indent=1)


def test_html_names_no_external_script_style_or_font(built_book):
    """Static check of the same: no <script src>, <link href> or CSS url() to another host."""
    bad = []
    for path in built_book.rglob("*"):
        if path.suffix not in (".html", ".css") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        bad += [f"{path.name}: {m}" for m in re.findall(r"<script[^>]+src=\"https?://[^\"]+\"", text)]
        bad += [f"{path.name}: {m}" for m in re.findall(r"<link[^>]+href=\"https?://[^>]+>", text)]
        bad += [f"{path.name}: {m}" for m in re.findall(r"url\(['\"]?https?://[^)]+\)", text)]
        if path.suffix == ".html":  # outside links and text shown as code (a BibTeX entry's url, an
            # address to fill in), a page names no other host at all (thebe did, in a script)
            rest = re.sub(r"<a\b[^>]*>.*?</a>|<(pre|code)\b[^>]*>.*?</\1>", "", text, flags=re.S)
            bad += [f"{path.name}: {m}" for m in re.findall(r"https?://[^\s\"'<>]+", rest)]
    assert not bad, "\n".join(bad[:20])


TEX_LEFTOVERS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|\\(?:mathrm|frac|Delta|text|cdot|odot|lVert|left|right)\b")


def unrendered_tex(html: str) -> list[str]:
    """TeX left as text in a page: delimiters or commands outside the math elements MathJax
    typesets (scripts, styles and code blocks, where such characters are legitimate, are skipped)."""
    body = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", html, flags=re.S | re.I)
    body = re.sub(r'<(span|div)[^>]*class="[^"]*\bmath\b[^"]*"[^>]*>.*?</\1>', " ", body, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", body)
    text = text.replace("&#36;", "$").replace("&dollar;", "$")
    return [text[max(0, m.start() - 40):m.end() + 40].strip() for m in TEX_LEFTOVERS.finditer(text)]


def test_unrendered_tex_is_found():
    broken = ('<p>so self-repair happens <span class="math notranslate">\\(x\\)</span>'
              '$\\(\\Delta\\mathrm{logit} = 1\\)\\( when \\)S/S\' &gt; 1$</p>')
    assert unrendered_tex(broken)
    fine = ('<p>the head <span class="math notranslate nohighlight">\\(\\Delta\\mathrm{DE}\\)</span> '
            'costs <code>$HOME</code></p><script>var a = "$";</script>')
    assert unrendered_tex(fine) == []


def test_no_page_has_unrendered_tex(built_book):
    pages = sorted(built_book.rglob("*.html"))
    assert any("layernorm" in p.name for p in pages)
    leftovers = {str(p.relative_to(built_book)): found[:3] for p in pages
                 if (found := unrendered_tex(p.read_text(encoding="utf-8")))}
    assert not leftovers, json.dumps(leftovers, indent=1, ensure_ascii=False)


def test_local_links_of_every_page_resolve(built_book):
    """Every relative link of every built page (the landing page's chapter map is plain HTML, which
    Sphinx does not check) points to a file of the build."""
    broken = []
    for page in _pages(built_book):
        text = (built_book / page).read_text(encoding="utf-8")
        for href in re.findall(r'<a [^>]*href="([^"#]+)[^"]*"', text):
            if urlparse(href).scheme or href.startswith(("/", "mailto:")):
                continue
            if not (built_book / page).parent.joinpath(href).resolve().is_file():
                broken.append(f"{page}: {href}")
    assert not broken, broken


TEMPLATE = re.compile(r"[A-Za-z]\((?:s|es)\)")  # "draw(s)", "patch(es)": a count's noun left unchosen
EMOJI = re.compile("[\u2600-\u27bf\U0001f300-\U0001faff\ufe0f]")  # a missing-glyph box on many systems
WHOLE = re.compile(r"^(?:[−-]?\d{1,3}(?:,\d{3})*|[−-]?\d+|—)$")  # an integer as a table prints it


def page_text(html: str) -> str:
    """What a reader reads: the page without scripts, styles and code (where "f(s)" is Python)."""
    import html as markup

    body = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return markup.unescape(re.sub(r"<[^>]+>", " ", body))


def decimal_integers(html: str) -> list[str]:
    """Cells of paper-style tables whose numeric column counts or indexes (``selfrepair.tables.
    integer_name`` of the frame's column name, the header's ``title``) but which print a decimal
    point."""
    from html.parser import HTMLParser

    from selfrepair.tables import TABLE_CLASS, integer_name

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.bad, self.names, self.col, self.cell, self.table = [], [], 0, None, False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.table, self.names = TABLE_CLASS in (attrs.get("class") or ""), []
            elif tag == "tr":
                self.col = 0
            elif tag == "th" and self.table:  # a numeric column (class "num") of an integer name
                self.names.append(attrs.get("title") or "" if "num" in (attrs.get("class") or "") else "")
            elif tag == "td" and self.table:
                self.cell = []

        def handle_endtag(self, tag):
            if tag == "td" and self.cell is not None:
                name = self.names[self.col] if self.col < len(self.names) else ""
                text = "".join(self.cell).strip()
                if integer_name(name) and not WHOLE.match(text):
                    self.bad.append(f"{name} = {text}")
                self.col, self.cell = self.col + 1, None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Cells()
    parser.feed(html)
    return parser.bad


def test_leftovers_are_found():
    page = ('<p>3 resample source(s), 1 draw(s) ✅ and layers 0, 5 and 16</p><pre>def f(s): pass</pre>'
            '<table class="selfrepair-table"><thead><tr><th class="num" title="layer">layer</th>'
            '<th class="num" title="abs_error">e</th><th class="text" title="layers">layers</th></tr></thead>'
            '<tbody><tr><td>1.00</td><td>0.5</td><td>0-1</td></tr><tr><td>10</td><td>2</td><td>2-3</td></tr></tbody></table>')
    text = page_text(page)
    assert TEMPLATE.findall(text) == ["e(s)", "w(s)"] and EMOJI.findall(text) == ["✅"]
    assert decimal_integers(page) == ["layer = 1.00"]


def test_no_page_has_plural_templates_emoji_or_decimal_integers(built_book):
    """The generated text of every page: counts with their noun in the right number (not
    "patch(es)"), no emoji (a missing-glyph box where the font has none), and integer table
    columns (layer, head, n_*, ...) printed as integers."""
    found = {}
    for page in _pages(built_book):
        html = (built_book / page).read_text(encoding="utf-8")
        text = page_text(html)
        bad = ([f"template: …{text[max(0, m.start() - 40):m.end()]}" for m in TEMPLATE.finditer(text)]
               + [f"emoji: …{text[max(0, m.start() - 40):m.end()]}" for m in EMOJI.finditer(text)]
               + [f"integer column with a decimal point: {c}" for c in decimal_integers(html)])
        if bad:
            found[page] = bad[:5]
    assert not found, json.dumps(found, indent=1, ensure_ascii=False)
