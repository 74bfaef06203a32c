"""The :class:`Model` wrapper and its algebra (weights as effect-dtype views, the norms'
linearisation, per-head output weights).

Conventions (../PAPER.md):
- a head's output is ``z_h @ W_O[h]`` where ``z_h`` is the head's ``d_head`` slice of the
  output projection's input (so value biases are inside the head; the output bias ``b_O`` is a
  separate bias term) — unless the model is loaded with ``fold_value_biases=True``, the
  TransformerLens convention the paper's code used (:mod:`selfrepair.value_bias`);
- norms are linearised as ``norm(x) = n(x) / S + b`` with ``n`` linear (centering for LayerNorm,
  the gain) and ``S`` the scale (std or rms of ``x``); direct effects freeze ``S`` at the clean run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RemoteError
from ..value_bias import value_index
from .adapters import Adapter, get_path as _get


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


NO_POSITION_LIMIT = 2**31 - 1  # n_ctx of a model without learned or rotary position limits
CACHED_WEIGHTS = ("unembed_weight", "unembed_bias", "unembed_mean", "unembed_bias_mean")


def raise_no_weights(model: "Model") -> None:
    raise RemoteError(
        f"{model.name} runs on NDIF (remote=True) and its weights are not loaded here, but this "
        "code reads a weight outside a remote session. Every measurement of the library runs its "
        "readouts on the server (selfrepair.remote.in_session); run code of your own that reads "
        "weights inside in_session, or with remote='local' (the weights loaded here) or without remote.")


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
        self.adapter = self.adapter.resolve(cfg)  # the family's variants for this config
        a = self.adapter
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        # shapes only (remote=True holds the weights on the meta device)
        w = self.module(a.attn_out, 0).weight  # Linear [d_model, n_heads * d_head]; Conv1D transposed
        self.d_head = w.shape[0 if a.conv1d else 1] // self.n_heads
        self.d_vocab = self.module(a.unembed).weight.shape[0]
        self.d_mlp = None  # a mixture of experts has no one down projection
        if a.mlp_out is not None:
            w = self.module(a.mlp_out, 0).weight  # Linear [d_model, d_mlp]; Conv1D [d_mlp, d_model]
            self.d_mlp = w.shape[0] if a.conv1d else w.shape[1]
        self.n_ctx = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                      or NO_POSITION_LIMIT)  # BLOOM: ALiBi, no learned positions
        self.parallel_residual = a.is_parallel(cfg)
        self.sandwich = a.post_attn_norm is not None
        self.write_scale = float(getattr(cfg, a.write_scale)) if a.write_scale else 1.0
        self.logit_scale = _config_scale(cfg, a.logit_scale)
        cap = getattr(cfg, a.logit_softcap, None) if a.logit_softcap else None
        self.logit_softcap = float(cap) if cap else None

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
        """``[d_vocab, d_model]``: the logits are ``norm_out @ unembed_weight.T + unembed_bias``
        (before any soft-capping): the unembedding, through the family's map from the final norm
        (OPT's project_out) and times its logit scale (granite, cohere)."""
        w = self.module(self.adapter.unembed).weight
        if w.is_meta:
            raise_no_weights(self)
        w = w.to(self.device)
        if self.adapter.unembed_in is not None and self.module(self.adapter.unembed_in) is not None:
            w = (w.double() @ self.module(self.adapter.unembed_in).weight.to(self.device).double()).to(w.dtype)
        return w * self.logit_scale if self.logit_scale != 1.0 else w

    @cached_property
    def unembed_bias(self) -> torch.Tensor | None:
        """``[d_vocab]`` the unembedding's bias times the logit scale (``None``: no bias)."""
        b = getattr(self.module(self.adapter.unembed), "bias", None)
        return None if b is None else self.home(b) * self.logit_scale

    @cached_property
    def unembed_mean(self) -> torch.Tensor:
        """Mean unembedding row, taken in float64 (262k-row vocabularies lose digits in fp32)."""
        return self.unembed_weight.double().mean(0).to(self.effect_dtype)

    @cached_property
    def unembed_bias_mean(self) -> float:
        b = self.unembed_bias
        return 0.0 if b is None else float(b.double().mean())

    def centered_unembed(self, targets: torch.Tensor) -> torch.Tensor:
        """Rows ``W_U[t] - mean_v W_U[v]`` for target ids ``[...]`` -> ``[..., d_model]`` fp32."""
        return self.unembed_weight[targets].to(self.effect_dtype) - self.unembed_mean

    def centered_unembed_bias(self, targets: torch.Tensor) -> torch.Tensor:
        b = self.unembed_bias
        if b is None:
            return torch.zeros(targets.shape, device=targets.device, dtype=self.effect_dtype)
        return b[targets] - self.unembed_bias_mean

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (before soft-capping) of final-norm outputs ``[..., d_model]``."""
        out = self.acc(normed) @ self.acc(self.unembed_weight).T
        return out if self.unembed_bias is None else out + self.unembed_bias

    def capped_logit(self, normed: torch.Tensor, targets: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
        """The target's centered logit *after* the family's final soft-cap ``c tanh(x / c)``
        (Gemma-2), ``[...]`` for final-norm outputs ``normed [..., d_model]`` and ``targets [...]``:
        the capped target logit minus the mean capped logit over the vocabulary (in chunks)."""
        c, x = self.logit_softcap, self.acc(normed)
        w, b = self.acc(self.unembed_weight), self.unembed_bias
        total = torch.zeros(targets.shape, device=x.device, dtype=torch.float64)
        for start in range(0, w.shape[0], chunk):
            logits = x @ w[start:start + chunk].T + (0.0 if b is None else b[start:start + chunk])
            total += (c * torch.tanh(logits / c)).double().sum(-1)
        target = (x * w[targets]).sum(-1) + (0.0 if b is None else b[targets])
        return c * torch.tanh(target / c) - (total / w.shape[0]).to(x.dtype)

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor:
        """The norm's gain ``g`` (``n(x) = g * x`` after centering): ``w``, ``1 + w`` (Gemma) or
        ones (a norm without parameters)."""
        if self.adapter.gain == "none":
            return torch.ones(self.d_model, device=self.device, dtype=self.effect_dtype)
        w = self.home(norm.weight)
        return 1.0 + w if self.adapter.gain == "1+w" else w

    def norm_eps(self, norm: torch.nn.Module) -> float:
        for name in ("eps", "variance_epsilon"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        if self.adapter.eps is not None:
            return self.adapter.eps
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

    def value_bias(self, layer: int) -> torch.Tensor | None:
        """The value bias of block ``layer`` per key-value head, ``[n_kv_heads, d_head]`` (query
        head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``), sliced from the module the
        adapter names as its layout says (:func:`selfrepair.value_bias.value_index`); ``None``
        when it has no bias."""
        b = getattr(self.module(self.adapter.value, layer), "bias", None) if self.adapter.value else None
        if b is None:
            return None
        idx, n_kv = value_index(self.adapter.value_layout, b.numel(), self.n_heads, self.d_head)
        return self.home(b)[idx.to(b.device)].view(n_kv, self.d_head)

    def describe(self) -> dict:
        """Identity and shape, recorded with every cached result."""
        return {"model": self.name, "revision": self.revision, "family": self.adapter.family,
                "model_type": self.hf.config.model_type, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "d_model": self.d_model, "d_head": self.d_head,
                "d_mlp": self.d_mlp, "d_vocab": self.d_vocab, "dtype": str(self.dtype).replace("torch.", ""),
                "parallel_residual": self.parallel_residual, **self.meta}


def _config_scale(config: Any, spec: str | None) -> float:
    """The logit scale an adapter names: ``"attr"`` (times) or ``"1/attr"`` (divided by)."""
    if not spec:
        return 1.0
    if spec.startswith("1/"):
        return 1.0 / float(getattr(config, spec[2:]))
    return float(getattr(config, spec))
