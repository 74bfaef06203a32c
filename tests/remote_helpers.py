"""Helpers shared by the remote-path tests (tests/test_remote*.py): a model saved as a
``save_pretrained`` directory, the largest difference of (nested) results, the cache's tensors,
the bytes of a returned value, and the ``ndif_server`` fixture (``remote=True`` against the
in-process server of tests/ndif_fake.py). Import the fixture into a test file to use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfrepair.models import tiny_model, tiny_tokenizer
from selfrepair.results import load_tensors

from families import CORE as FAMILIES
TOL = 1e-6


def saved_dir(tmp_path: Path, family: str, **config) -> Path:
    """A tiny random ``family`` model and the tiny tokenizer saved under ``tmp_path / family``."""
    path = tmp_path / family
    tiny_model(family, **config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def here_and_there(path: Path, log: list):
    """``path`` loaded here and with ``remote=True`` (the ``ndif_server`` fixture serving it):
    the remote load's check of its adapter (selfrepair/adapter_check.py) ran on the server as one
    request that brought back a few numbers only (an error and a scale per piece and layer)."""
    from selfrepair import load_model

    log.clear()
    here, there = load_model(path), load_model(path, remote=True)
    assert len(log) == 1 and log[0].down < 20_000, log
    log.clear()
    return here, there


def max_diff(a, b) -> float:
    """The largest absolute difference of two tensors, or of dicts of them (same keys), or of two
    patched passes' :class:`~selfrepair.terms.Terms`."""
    if hasattr(a, "tensors"):
        a, b = a.tensors(), b.tensors()
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([max_diff(a[k], b[k]) for k in a] or [0.0])
    if a is None or b is None:
        assert a is None and b is None
        return 0.0
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def cached(root: Path) -> dict[str, tuple]:
    """Every cache entry under ``root``: relative path -> (tensors, metadata)."""
    out = {}
    for f in sorted(root.glob("**/*.safetensors")):
        out[f.relative_to(root).as_posix()] = load_tensors(f)
    return out


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (nested) returned value."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


@pytest.fixture
def ndif_server(monkeypatch):
    """``remote=True`` with the NDIF calls faked: the source checks pass and every request goes to
    a :class:`FakeNDIF` holding its own copy of the weights; ``serve(path)`` returns its log."""
    import sys

    from nnsight.modeling.mixins.remotable import Remotable

    from selfrepair.models import loading
    from selfrepair.remote import remote_wrapper

    sys.path.insert(0, str(Path(__file__).parent))
    from ndif_fake import FakeNDIF

    def serve(path: Path) -> list:
        server, log = remote_wrapper(str(path), dtype=torch.float32), []
        monkeypatch.setattr(loading, "_ndif_source", lambda src, revision: None)
        monkeypatch.setattr(Remotable, "_remote_backend", lambda self, *a: FakeNDIF(server, log))
        return log

    return serve


def assert_same_chapter_results(chapter: str, results: dict, roots: dict, remote) -> None:
    """A chapter measured locally (``results[None]``, cache under ``roots[None]``) and on the remote
    path ``remote`` gave the same numbers (1e-6): the measured result's tensors for ``intro``
    (it caches nothing), else every cache entry, under the same key, its run recording where."""
    if chapter == "intro":
        a, b = results[None].result.tensors(), results[remote].result.tensors()
        assert a.keys() == b.keys()
        for k in a:
            assert max_diff(a[k], b[k]) <= TOL, k
        return
    here, there = cached(roots[None]), cached(roots[remote])
    assert here.keys() == there.keys() and here
    for f in here:
        (a, ma), (b, mb) = here[f], there[f]
        assert a.keys() == b.keys(), f
        for k in a:
            assert max_diff(a[k], b[k]) <= TOL, (f, k)
        assert ma["run"]["remote"] is False and mb["run"]["remote"] == (True if remote == "ndif" else remote)
        assert ma["key"] == mb["key"], f  # where a measurement runs is not part of what it is
