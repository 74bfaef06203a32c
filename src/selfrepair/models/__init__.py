"""Models: the architecture registry (:mod:`.adapters`), the :class:`Model` wrapper and its
algebra (:mod:`.model`), loading (:mod:`.loading`: hub, directory, GGUF, remote), where a model
sits (:mod:`.devices`: device, dtype, device maps) and tiny random models (:mod:`.tiny`). Every
name is importable from ``selfrepair.models``."""

from .adapters import ADAPTERS, SUPPORTED_MODEL_TYPES, Adapter, adapter_for
from .devices import DTYPES, dispatch, resolve_device, resolve_dtype
from .loading import EMBEDDED_MODEL, embedded_checkpoint, embedded_gguf, folded, load_model, resolve_remote
from .model import CACHED_WEIGHTS, Model, cached_property, raise_no_weights
from .tiny import TINY_PREFIX, tiny_config, tiny_model, tiny_names, tiny_tokenizer

__all__ = ["ADAPTERS", "CACHED_WEIGHTS", "DTYPES", "EMBEDDED_MODEL", "SUPPORTED_MODEL_TYPES",
           "TINY_PREFIX", "Adapter", "Model", "adapter_for", "cached_property", "dispatch",
           "embedded_checkpoint", "embedded_gguf", "folded", "load_model", "raise_no_weights",
           "resolve_device", "resolve_dtype", "resolve_remote", "tiny_config", "tiny_model",
           "tiny_names", "tiny_tokenizer"]
