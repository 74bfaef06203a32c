"""Hugging Face hub ids without a network: one clear error at once, not minutes of retries.

Loading a hub id that is neither cached nor reachable used to take five retries with back-off
(about 27 s) before failing. :func:`offline_reason` decides once per process whether the hub can
be used: ``HF_HUB_OFFLINE`` set (``1``/``true``/``yes``/``on``) means no, otherwise one HEAD
request to the endpoint (``HF_ENDPOINT``, default ``https://huggingface.co``; through
``HTTPS_PROXY`` when one is set) with a short timeout decides: any HTTP answer means reachable. Offline, a model already in the
local Hugging Face cache is loaded from it (``local_files_only``), anything else raises at once
with what to do instead.
"""

from __future__ import annotations

import os
from functools import lru_cache

CONNECT_TIMEOUT_S = 2.0


def offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=4)
def _unreachable(endpoint: str, timeout: float) -> str | None:
    import urllib.error
    import urllib.request

    try:  # one HEAD request, no retries; urllib honours HTTPS_PROXY / NO_PROXY
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered: reachable, whatever the status
    except (OSError, ValueError) as e:  # URLError, TLS errors, timeouts, malformed endpoints
        why = getattr(e, "reason", None) or e
        return f"{endpoint} cannot be reached: {why}"
    return None


def offline_reason(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now (``None``: it can); checked once per process and endpoint."""
    if offline_env():
        return "HF_HUB_OFFLINE is set"
    return _unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"), timeout)


def cached_file(repo_id: str, filename: str, *, revision: str | None = None,
                repo_type: str = "model") -> str | None:
    """The local path of ``filename`` of ``repo_id`` in the Hugging Face cache, or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    except Exception:  # noqa: BLE001 -- a malformed id is simply not cached
        return None
    return found if isinstance(found, str) else None


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


__all__ = ["CONNECT_TIMEOUT_S", "cache_dir", "cached_file", "offline_env", "offline_reason"]
