"""Hub ids with no network fail at once with one clear error; a cached hub model still loads."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfrepair import hub, load_model
from selfrepair.data import load_corpus
from selfrepair.data import DataError
from selfrepair.errors import ModelLoadError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused, no network needed


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An endpoint that refuses connections and an empty hub cache."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub._unreachable.cache_clear()
    yield
    hub._unreachable.cache_clear()


def test_hub_model_offline_env_fails_at_once(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("EleutherAI/pythia-160m")
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "HF_HUB_OFFLINE is set" in msg and "not in the local Hugging Face cache" in msg
    assert "save_pretrained" in msg and "gemma-3-270m" in msg


def test_hub_model_unreachable_fails_at_once(no_hub):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"cannot be reached.*not in the local Hugging Face cache"):
        load_model("EleutherAI/pythia-160m")
    assert time.monotonic() - start < 10


def test_hub_dataset_unreachable_fails_at_once(no_hub):
    start = time.monotonic()
    with pytest.raises(DataError, match=r"hub id and the hub cannot be used.*dataset='embedded'"):
        load_corpus("NeelNanda/pile-10k")
    assert time.monotonic() - start < 10


def test_reachability_is_checked_once_per_endpoint(no_hub, monkeypatch):
    import urllib.request

    calls = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert hub.offline_reason() is not None and hub.offline_reason() is not None
    assert len(calls) == 1


def test_cached_hub_model_loads_without_network(tmp_path):
    """The hub code path on local files: a snapshot in the hub cache, the endpoint unreachable."""
    snap = tmp_path / "hub" / "models--selfrepair-tests--tiny" / "snapshots" / ("0" * 40)
    model = load_model("tiny-gpt_neox")
    model.hf.save_pretrained(snap)
    model.tokenizer.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("import time, torch; t = time.monotonic(); from selfrepair import load_model; "
            "m = load_model('selfrepair-tests/tiny'); print(time.monotonic() - t); "
            "ref = load_model('tiny-gpt_neox'); "
            "assert all(torch.equal(a, b) for a, b in zip(m.hf.state_dict().values(), ref.hf.state_dict().values())); "
            "assert m.tokenizer is not None; print('ok')")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": UNREACHABLE,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok") and "Retrying" not in r.stderr


def test_a_missing_local_directory_is_not_taken_for_a_hub_id(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_model(str(tmp_path / "never-saved"))
    assert time.monotonic() - start < 10
