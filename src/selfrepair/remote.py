"""The remote path (NDIF, ``load_model(..., remote=True | "local")``).

A remote trace runs on the server and only its saved values come back. Two ways a measurement
goes there:

- one request per trace: :func:`selfrepair.intervene.run` passes ``remote=`` to nnsight's trace
  (what every pass does outside a session; its ``watch`` / ``final`` reductions keep what comes
  back small, but the clean pass's reads come back and later passes upload what they need);
- one request per batch: :func:`in_session` runs a whole function — the clean pass, the ablated
  passes that use its values and the reductions over them — inside one nnsight ``session`` on
  the server; its traces run there as ordinary (non-remote) traces, the clean activations never
  leave the server and only the function's result (per-head sums, selected per-token rows) is
  brought back. The sweep's two passes (:mod:`selfrepair.sweep_batch`), ``self_repair``, the mean
  ``z``, the amplification, the frozen-norm ablations, the neurons and AtP run this way.

With ``remote=True`` the model is built on the meta device here (no weights: a 70B model needs
none on this machine), so every readout has to run on the server, inside a session; a weight
read here says so (:meth:`selfrepair.models.Model.home`). ``remote="local"`` is nnsight's
serverless simulation: the request is serialized and deserialized as for the server, then run in
this process against real weights.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import nnsight
import torch

from .errors import ModelLoadError, RemoteError

NDIF_MODELS_HINT = ("NDIF hosts only the models it lists: see `python -c \"import nnsight; "
                    "print(nnsight.status())\"` or https://nnsight.net/status")
KEY_HINT = ("set the NDIF API key with `export NDIF_API_KEY=...` or once with "
            "`python -c \"import nnsight; nnsight.login()\"` (nnsight's own configuration, "
            "~/.config/nnsight/config.yaml); get a key at https://login.ndif.us")


def ship_library() -> None:
    """Send this library's functions with every remote request by value (``nnsight.register``):
    the server has nnsight, torch and transformers, not ``selfrepair``."""
    import selfrepair

    nnsight.register(selfrepair)


def host() -> str:
    from nnsight.schema.config import CONFIG

    return CONFIG.API.HOST


def check_remote(source: str) -> None:
    """Before loading anything: an API key is configured, the NDIF host answers and it hosts
    ``source`` (a hub id). One :class:`~selfrepair.errors.RemoteError` saying what failed."""
    import httpx
    from nnsight.schema.config import CONFIG

    if not CONFIG.API.APIKEY:
        raise RemoteError(f"remote=True needs an NDIF API key and none is configured: {KEY_HINT}.")
    try:
        r = httpx.get(f"{host()}/status", timeout=httpx.Timeout(5.0, read=30.0),
                      headers={"ndif-api-key": CONFIG.API.APIKEY})
        r.raise_for_status()
        deployments = r.json().get("deployments", {})
    except (httpx.HTTPError, ValueError) as e:
        raise RemoteError(f"the NDIF server at {host()} is unreachable or did not answer ({e}). "
                          "Check the network, or the host (env NDIF_HOST / nnsight's CONFIG.API.HOST); "
                          "remote='local' simulates the remote path without a server.") from e
    hosted = sorted({d.get("repo_id", name) for name, d in deployments.items()})
    if source not in hosted:
        raise RemoteError(f"model {source!r} is not hosted on {host()}. {NDIF_MODELS_HINT}; now: "
                          f"{', '.join(hosted) or 'none'}. Run it locally (no remote) instead.")


def remote_wrapper(path: str, *, dtype: torch.dtype, revision: str | None = None,
                   dispatch: bool = True) -> Any:
    """nnsight's Hugging Face wrapper around a hub id or ``save_pretrained`` directory. With
    ``dispatch=False`` (``remote=True``) the module is built on the meta device: no weight is
    loaded here, every readout runs on the server (:func:`in_session`). ``remote="local"``
    simulates the server in this process and so loads them (``dispatch=True``)."""
    from nnsight import TransformersModel

    try:
        extra = {}
        if not dispatch:  # the meta pipeline cannot infer the tokenizer from a pre-built module
            from transformers import AutoTokenizer
            extra["tokenizer"] = AutoTokenizer.from_pretrained(path, revision=revision)
        return TransformersModel(path, task="text-generation", dispatch=dispatch, dtype=dtype,
                                 revision=revision, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot wrap {path!r} for the remote path: {str(e).splitlines()[0]}") from e


@contextlib.contextmanager
def remote_errors(model: Any):
    """A failed remote request as one :class:`~selfrepair.errors.RemoteError` naming the host."""
    if model.remote is not True:
        yield
        return
    from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError

    try:
        yield
    except NNsightRemoteError as e:
        raise RemoteError(f"the remote run of {model.name} on {host()} failed: {e}") from e
    except (OSError, ConnectionError) as e:  # websocket / socket errors: no server there
        raise RemoteError(f"the NDIF server at {host()} is unreachable ({e}): check the network "
                          "and NDIF_HOST, or run with remote='local'.") from e


def in_session(model: Any, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args, **kwargs)``; on the remote path as one request: one nnsight session on
    the server holding every trace ``fn`` runs, of which only ``fn``'s result comes back.

    ``fn`` must *return* everything the caller needs (reduced: sums, selected rows) and change no
    outside state (that change would happen on the server only); its arguments are uploaded, so
    keep them small (tokens, indices). Inside, ``model`` is a copy marked ``in_session``: its
    traces run on the server as plain traces (no ``remote=``, no library shipped again)."""
    if not model.remote or model.in_session:
        return fn(model, *args, **kwargs)
    inner = copy.copy(model)
    inner.in_session = True
    ship_library()
    with remote_errors(model), model.nn.session(remote=model.remote):
        with torch.no_grad():  # the server's weights may require grad: no graphs behind a readout
            out = nnsight.save(fn(inner, *args, **kwargs))
    return out
