"""The committed embedded corpus is reproduced byte-for-byte by scripts/build_corpus.py."""
from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_corpus_module():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_corpus_check_reproduces_committed_file(capsys):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available (not a Debian-based machine): cannot unpack the sources")
    build_corpus = _build_corpus_module()
    start = time.monotonic()
    try:
        ok = build_corpus.check()
    except build_corpus.SourceUnavailable as exc:
        pytest.skip(f"Debian package registry unreachable, cannot fetch corpus sources: {exc}")
    out = capsys.readouterr().out
    assert ok, out
    assert "byte-for-byte" in out
    assert time.monotonic() - start < 60


def test_check_reports_mismatch(tmp_path, capsys):
    build_corpus = _build_corpus_module()
    committed = REPO / "data" / "corpus" / "embedded.jsonl"
    altered = tmp_path / "embedded.jsonl"
    altered.write_bytes(committed.read_bytes().replace(b"In the beginning", b"In the BEGINNING", 1))
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available: cannot rebuild the corpus")
    try:
        assert build_corpus.main(["--check", "--output", str(altered)]) == 1
    except build_corpus.SourceUnavailable as exc:  # pragma: no cover - offline machines only
        pytest.skip(f"Debian package registry unreachable: {exc}")
    assert "MISMATCH" in capsys.readouterr().out
