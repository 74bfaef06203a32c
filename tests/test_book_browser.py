"""Open every page of a built book in headless Chromium: charts drawn, math typeset, no console
errors, and no request to any host but the local server (the book works offline); read at 1440,
1024 and 390 px: no chart wider than its column at any of them, no table wider than its column on
a laptop, no page that scrolls sideways on a phone (see the test's docstring); the parameters cells
shown and the boilerplate folded; and no page naming a folder of the machine that built it.

Builds from the notebooks executed on the ``tiny`` profile by conftest's ``executed_book`` plus a
synthetic page with a few charts (so the renderer is checked even before chapters exist), serves
the HTML with ``python -m http.server`` on 127.0.0.1 and drives Chromium through the DevTools
protocol (``websocket-client``). Needs Debian's ``chromium`` (``apt-get install -y chromium``);
skipped, with that message, where no Chromium can be found.
"""

from __future__ import annotations

import json
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
from selfrepair.book import build_html, stage_source, vendor_assets

pytestmark = pytest.mark.browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHECK_PAGE = "book/chart_check"
WIDTHS = {"laptop": 1440, "small laptop": 1024, "phone": 390}  # viewport widths (px) every page is read at
HEIGHT = 900
PAGE_STATE = """(() => {
  const charts = Array.from(document.querySelectorAll('.%(chart)s'));
  // what a reader sees without a click: not inside a closed <details> (a folded cell, the
  // full frame under a table), laid out and of some height
  const shown = el => !el.closest('details:not([open])') && el.offsetParent !== null
    && el.getBoundingClientRect().height > 0;
  const px = r => Math.round(r.width);
  const tables = Array.from(document.querySelectorAll('.cell_output table')).filter(shown);
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
    table_overflow: tables.map(t => [t, t.closest('.cell_output')])
      .filter(([t, box]) => t.getBoundingClientRect().width > box.clientWidth + 2)
      .map(([t, box]) => `${px(t.getBoundingClientRect())} px table in a ${box.clientWidth} px column: `
                         + t.textContent.trim().slice(0, 60)),
    page_width: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    parameters_shown: Array.from(document.querySelectorAll(
      '.tag_parameters .cell_input, .tag_injected-parameters .cell_input')).map(shown),
    folded_shown: Array.from(document.querySelectorAll('.tag_hide-input .cell_input')).map(shown),
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    ready: document.readyState,
    url: location.href,
  });
})()""" % {"chart": figures.CHART_CLASS}


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
                                      "\\Delta\\text{DE}_{\\text{head}}$$"),
        nbformat.v4.new_code_cell("charts", outputs=outputs, execution_count=1)])


@pytest.fixture(scope="module")
def built_book(executed_book) -> Path:
    """The HTML of the executed chapters plus the chart-check page, built with warnings as errors."""
    root, src = executed_book.root, executed_book.out / "src"
    vendor_assets(root / "book" / "_static", root / ".cache" / "npm")
    stage_source(root, src)
    nbformat.write(_chart_check_notebook(), src / f"{CHECK_PAGE}.ipynb")
    toc = yaml.safe_load((src / "_toc.yml").read_text())
    toc["parts"][-1]["chapters"].append({"file": CHECK_PAGE})
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True))
    html = executed_book.out / "html"
    started = time.time()
    assert build_html(src, html, strict=True) == 0, "the book build failed (warnings are errors)"
    print(f"tiny book built in {time.time() - started:.1f} s")
    return html


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
    return json.loads(tools.evaluate(PAGE_STATE) or "{}")


@pytest.mark.parametrize("screen", list(WIDTHS))
def test_every_page_draws_charts_and_math_offline(browser, built_book, screen):
    """Every page at each width: charts drawn, math typeset, no console error, no request to
    another host; the parameters cells shown and the boilerplate folded.

    At 1440 and 1024 px (laptops) no chart and no table is wider than its column, and every chart
    is drawn as its figure function designed it (single and layered views at the column's width,
    compound charts at widths that fit). At phone width (390 px, mobile emulation) the renderer may
    redraw a compound chart stacked (views one under the other, facets in one column) and narrowed;
    there no chart may be wider than its column either, and the page must not scroll sideways
    (a table wider than the phone scrolls inside its output box, which the page check allows)."""
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
        if width >= 1024 and state.get("refitted"):
            problems.append(f"charts not drawn as designed at {width} px: {state['refitted']} "
                            "(make the fig_* function fit a 1024 px page)")
        if width >= 1024 and state.get("table_overflow"):
            problems.append(f"tables wider than their column at {width} px: {state['table_overflow']}")
        # wider content makes a phone's layout viewport wider than the screen (innerWidth grows)
        if max(state.get("page_width", 0), state.get("viewport", 0)) > width + 1:
            problems.append(f"the page is wider than the {width} px screen: {state['page_width']} px")
        if not all(state.get("parameters_shown", [])):
            problems.append(f"a parameters cell is hidden: {state.get('parameters_shown')}")
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


def machine_paths(executed_book) -> dict[str, str]:
    """Folders of the machine that built the book, which no page may name."""
    import os

    paths = {"the repository root": executed_book.root, "the build folder": executed_book.out,
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


def test_no_page_names_a_path_of_the_building_machine(built_book, executed_book):
    """The injected parameters (cache_dir), the provenance table and every other output: no page
    names the repository's folder, the build folder, $HOME or the Python environment."""
    paths = machine_paths(executed_book)
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
        if path.suffix == ".html":  # outside links, a page names no other host at all (thebe did)
            rest = re.sub(r"<a\b[^>]*>.*?</a>", "", text, flags=re.S)
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
