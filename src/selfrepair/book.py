"""The book runner: execute the chapters with papermill, then build the HTML with Jupyter Book.

papermill is the only executor (``_config.yml`` sets ``execute_notebooks: "off"``). Layout under
``out`` (default ``book/_build``)::

    src/    the build source: _config.yml, _toc.yml (restricted to chapters that have been
            executed), book/*.md, book/references.bib, book/_static/ and the *executed*
            notebooks book/0N_*.ipynb written by papermill (kept between runs, so
            ``--chapters 03`` re-runs one chapter and keeps the others)
    logs/   one papermill log per chapter
    html/   the book; open html/index.html

A failing chapter keeps its partial executed notebook (the error is visible in the book), the
book is still built, and :func:`run_book` returns a non-zero exit code naming the chapter.

Offline: the pages load vega + vega-lite + vega-embed and MathJax from ``_static/vendor``, made by
:func:`vendor_assets` (the vega bundle from the installed ``vl-convert-python``; MathJax from
the npm registry once, cached under ``.cache/npm`` and checked against a pinned sha512).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import InputError

MATHJAX = {"version": "3.2.2", "license": "Apache-2.0",
           "sha512": "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="}
MATHJAX_KEEP = ("LICENSE", "es5/tex-chtml.js", "es5/output/chtml/fonts/woff-v2/",
                "es5/input/tex/extensions/", "es5/a11y/", "es5/ui/")
VEGA_LICENSE = "BSD-3-Clause"  # vega, vega-lite and vega-embed alike
STAGED = ("_config.yml", "_toc.yml", "book/references.bib")


def find_root(start: str | Path | None = None) -> Path:
    """The book's root: the first of ``start`` (default cwd) and its parents holding ``_toc.yml``
    and ``book/``, else the source checkout this package was installed from."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents, Path(__file__).resolve().parents[2]):
        if (d / "_toc.yml").is_file() and (d / "book").is_dir():
            return d
    raise InputError(f"no book found at or above {here}: run from the repository root or pass --root")


def chapter_notebooks(root: Path, wanted: Iterable[str] | None = None) -> list[Path]:
    """``book/*.ipynb`` sorted; ``wanted`` keeps those whose name starts with an item (``"01"``)."""
    notebooks = sorted((root / "book").glob("*.ipynb"))
    if not wanted:
        return notebooks
    wanted = [str(w) for w in wanted]
    picked = [nb for nb in notebooks if any(nb.stem.startswith(w) for w in wanted)]
    unknown = [w for w in wanted if not any(nb.stem.startswith(w) for nb in notebooks)]
    if unknown:
        raise InputError(f"no chapter matches {', '.join(unknown)}: have "
                         f"{', '.join(nb.stem for nb in notebooks)}")
    return picked


def load_profile(profile: str | Path | None, root: Path) -> dict:
    """Parameters of a profile (``tiny``, ``cpu``, ``paper`` or a YAML path); ``None`` -> ``{}``."""
    if profile is None:
        return {}
    path = Path(profile) if str(profile).endswith((".yaml", ".yml")) else root / "book" / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (root / "book" / "profiles").glob("*.yaml"))
        raise InputError(f"unknown profile {profile!r}: use one of {', '.join(names)} or a .yaml path")
    return yaml.safe_load(path.read_text()) or {}


@dataclass
class ChapterRun:
    """The outcome of executing one chapter."""

    name: str
    executed: Path
    ok: bool
    seconds: float
    error: str | None = None


def _error_of(executed: Path, log: Path) -> str:
    """``Ename: evalue`` of the first error output, else the log's last line."""
    if executed.is_file():
        for cell in json.loads(executed.read_text()).get("cells", []):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    return f"{out.get('ename')}: {out.get('evalue')}"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1] if lines else "papermill failed before running the notebook"


def execute_chapters(notebooks: list[Path], params: dict, out_src: Path, *, logs: Path | None = None,
                     jobs: int = 1, kernel: str = "python3", progress: bool = True) -> list[ChapterRun]:
    """Run each notebook with papermill into ``out_src/book/``; one failure does not stop the others.

    Each chapter runs in its own ``python -m papermill`` process (cwd: the source notebook's
    folder) with ``params`` injected; papermill saves after every cell, so a failing chapter keeps
    its outputs up to the error.
    """
    from tqdm import tqdm  # plain bars: no ipywidgets needed in notebooks

    dest, logs = out_src / "book", logs or out_src.parent / "logs"
    dest.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    params_file = logs / "parameters.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=True))
    bar = tqdm(total=len(notebooks), unit="chapter", desc="chapters",
               disable=not (progress and sys.stderr.isatty()))

    def one(nb: Path) -> ChapterRun:
        out, log = dest / nb.name, logs / f"{nb.stem}.log"
        started = time.time()
        if progress:  # the chapter's own progress bars go to its log; say where to follow them
            bar.write(f"  {nb.stem:<28} running (progress: tail -f {log})")
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(out), "-f",
                                 str(params_file), "-k", kernel, "--cwd", str(nb.parent),
                                 "--no-progress-bar", "--log-output"], stdout=fh,
                                stderr=subprocess.STDOUT).returncode
        run = ChapterRun(nb.stem, out, rc == 0, time.time() - started,
                         None if rc == 0 else _error_of(out, log))
        bar.write(f"  {run.name:<28} {'ok' if run.ok else 'FAILED'} ({run.seconds:.1f} s)"
                  + ("" if run.ok else f": {run.error} — log: {log}"))
        bar.update()
        return run

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # threads only wait on processes
        runs = list(pool.map(one, notebooks))
    bar.close()
    return runs


def restrict_toc(toc: dict, src: Path) -> tuple[dict, list[str]]:
    """``toc`` without entries whose file is missing under ``src`` (and without emptied parts)."""
    def present(f: str) -> bool:
        return any((src / f"{f}{ext}").is_file() for ext in ("", ".ipynb", ".md"))

    if not present(toc["root"]):
        raise InputError(f"the toc's root {toc['root']} has not been executed")
    dropped = [c["file"] for p in toc.get("parts", []) for c in p["chapters"] if not present(c["file"])]
    parts = [{**p, "chapters": [c for c in p["chapters"] if c["file"] not in dropped]}
             for p in toc.get("parts", [])]
    return {**toc, "parts": [p for p in parts if p["chapters"]]}, dropped


def stage_source(root: Path, src: Path) -> list[str]:
    """Copy config, toc, markdown, bib and ``_static`` into ``src``; drop executed copies of
    chapters that no longer exist; write the restricted toc. Returns the toc entries dropped."""
    (src / "book").mkdir(parents=True, exist_ok=True)
    for rel in STAGED:
        shutil.copy2(root / rel, src / rel)
    for md in (root / "book").glob("*.md"):
        shutil.copy2(md, src / "book" / md.name)
    shutil.rmtree(src / "book" / "_static", ignore_errors=True)
    shutil.copytree(root / "book" / "_static", src / "book" / "_static")
    for nb in (src / "book").glob("*.ipynb"):
        if not (root / "book" / nb.name).is_file():
            nb.unlink()
    toc, dropped = restrict_toc(yaml.safe_load((root / "_toc.yml").read_text()), src)
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True))
    return dropped


def vendor_assets(static: Path, npm_cache: Path, *, force: bool = False) -> dict:
    """Write ``static/vendor/``: ``vega-bundle.js`` (vega, vega-lite, vega-embed from
    ``vl_convert.javascript_bundle``) and ``mathjax/`` (MathJax from ``npm pack``, sha512-checked),
    plus ``VERSIONS.json`` with versions and licenses. Skipped when ``VERSIONS.json`` is current."""
    import altair as alt
    import vl_convert

    vendor = static / "vendor"
    vl = alt.SCHEMA_VERSION.lstrip("v")
    versions = {"vega": vl_convert.get_vega_version(), "vega-lite": vl,
                "vega-embed": vl_convert.get_vega_embed_version(), "vl-convert": vl_convert.__version__,
                "vega-license": VEGA_LICENSE, "mathjax": MATHJAX["version"],
                "mathjax-license": MATHJAX["license"]}
    stamp = vendor / "VERSIONS.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == versions:
        return versions
    vendor.mkdir(parents=True, exist_ok=True)
    bundle = vl_convert.javascript_bundle(vl_version=".".join(vl.split(".")[:2]))
    # A function scope keeps the bundle's minified top-level names off the page's global scope.
    (vendor / "vega-bundle.js").write_text(f"/* vega {versions['vega']}, vega-lite {vl}, vega-embed "
                                           f"{versions['vega-embed']} ({VEGA_LICENSE}) */\n"
                                           f"(function () {{\n{bundle}\n}})();\n")
    tgz = npm_cache / f"mathjax-{MATHJAX['version']}.tgz"
    if not tgz.is_file():
        npm_cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", f"mathjax@{MATHJAX['version']}", "--silent",
                            "--pack-destination", str(npm_cache)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise InputError(f"cannot fetch MathJax with npm ({e}); put mathjax-{MATHJAX['version']}"
                             f".tgz from the npm registry into {npm_cache}") from e
    if base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode() != MATHJAX["sha512"]:
        raise InputError(f"{tgz} does not match the pinned sha512 of mathjax {MATHJAX['version']}")
    shutil.rmtree(vendor / "mathjax", ignore_errors=True)
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            rel = member.name.removeprefix("package/")
            if member.isfile() and rel.startswith(MATHJAX_KEEP):
                target = vendor / "mathjax" / rel.removeprefix("es5/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    stamp.write_text(json.dumps(versions, indent=1) + "\n")
    return versions


def build_html(src: Path, html: Path, *, strict: bool = True) -> int:
    """``jupyter-book build`` of ``src`` into ``html`` (warnings are errors when ``strict``)."""
    import warnings

    from jupyter_book.sphinx import build_sphinx

    with warnings.catch_warnings():  # Sphinx walks gc objects; torch warns when touched
        warnings.simplefilter("ignore", FutureWarning)
        result = build_sphinx(src, html, use_external_toc=True, noconfig=True,
                              path_config=str(src / "_config.yml"),
                              confoverrides={"external_toc_path": (src / "_toc.yml").as_posix(),
                                             "latex_individualpages": False},
                              doctreedir=html.parent / ".doctrees", freshenv=True, quiet=True,
                              warningiserror=strict, keep_going=True, builder="html")
    return result if isinstance(result, int) else 1


def run_book(root: Path, out: Path, *, params: dict, chapters: Iterable[str] | None = None,
             jobs: int = 1, strict: bool = True, execute: bool = True, build: bool = True,
             progress: bool = True) -> int:
    """Execute the chapters, build the HTML and report; the exit code (0 when all went well)."""
    out, src = out.resolve(), out.resolve() / "src"
    failed: list[ChapterRun] = []
    started = time.time()
    if execute:
        notebooks = chapter_notebooks(root, chapters)
        intro = root / "book" / "00_introduction.ipynb"  # the toc's root: the book needs it
        if intro.is_file() and intro not in notebooks and not (src / "book" / intro.name).is_file():
            notebooks.insert(0, intro)
        kept = sorted(nb.stem for nb in (src / "book").glob("*.ipynb")
                      if (root / "book" / nb.name) not in notebooks)
        print(f"executing {len(notebooks)} chapter(s) with "
              + ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
              + (f"\nkept from an earlier run: {', '.join(kept)}" if kept else ""))
        failed = [r for r in execute_chapters(notebooks, params, src, logs=out / "logs", jobs=jobs,
                                              progress=progress) if not r.ok]
    if build:
        vendor_assets(root / "book" / "_static", root / ".cache" / "npm")
        dropped = stage_source(root, src)
        if dropped:
            print(f"not in this build (never executed): {', '.join(dropped)}")
        rc = build_html(src, out / "html", strict=strict)
        if rc:
            print(f"the HTML build failed (exit {rc}); see the warnings above", file=sys.stderr)
            return rc
        print(f"built in {time.time() - started:.0f} s: open {out / 'html' / 'index.html'}")
    for run in failed:
        print(f"chapter {run.name} FAILED: {run.error}\n  its executed notebook (error shown): "
              f"{run.executed}", file=sys.stderr)
    return 1 if failed else 0


# -- Sphinx extension (``_config.yml``: ``sphinx: extra_extensions: [selfrepair.book]``) ------------
VEGA_BUNDLE = "vendor/vega-bundle.js"  # under html_static_path (book/_static)


def _page_assets(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Load the vega bundle on pages that hold a chart; drop repeated and thebe ``<script>``s.

    Jupyter Book 1.0.4 registers some inline scripts twice, and a repeated top-level ``const`` is
    a SyntaxError in the browser's console on every page. Thebe (live code cells, which this book
    does not offer: it has no launch buttons) is always registered, with an inline
    ``THEBE_JS_URL = "https://unpkg.com/..."``; dropping it leaves no external address in a page.
    """
    from .figures import CHART_CLASS

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
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# -- reading aids for the introduction ----------------------------------------------------------
def demo_heads(cfg: Any, model: Any) -> list[tuple[int, int]]:
    """``cfg.featured_heads`` as ``(layer, head)``, else the first two heads of the last layer and
    head 0 of a middle layer (late heads are where the paper finds most self-repair; a middle
    one has downstream heads and MLPs, so every term of eq. 2 is exercised)."""
    from .config import parse_head

    if cfg.featured_heads:
        return [parse_head(h) for h in cfg.featured_heads]
    last = model.n_layers - 1
    return sorted({(last, h) for h in range(min(2, model.n_heads))} | {((model.n_layers - 1) // 2, 0)})


def closure_table(result: Any) -> Any:
    """Per head, the means of eq. 1 and eq. 2's terms and the largest per-token gap
    ``|self_repair - (from_heads + from_mlps + from_norm + from_block_norms)|``."""
    frame = result.to_frame()
    terms = ["from_heads", "from_mlps", "from_norm", "from_block_norms"]
    frame["eq2_gap"] = (frame["self_repair"] - frame[terms].sum(axis=1)).abs()
    agg = {q: "mean" for q in ["delta_logit", "delta_direct_effect", "self_repair", *terms]}
    return frame.groupby("label", sort=False).agg({**agg, "eq2_gap": "max"}).reset_index()


def closure_markdown(table: Any, tol: float = 1e-3) -> str:
    """One Markdown sentence on how closely eq. 2 closes in ``table`` (from :func:`closure_table`)."""
    worst = float(table["eq2_gap"].max())
    verdict = ("rounding error, as it should be when the norm term is computed directly rather "
               "than taken as a remainder" if worst <= tol else
               f"**more than the {tol:g} expected from rounding: something is wrong** (see the "
               "gotchas appendix)")
    return (f"Over {len(table)} heads and every token, the largest gap between eq. 1's self-repair "
            f"and the sum of eq. 2's terms is **{worst:.1e}** logits: {verdict}.")
