"""The library's exceptions: one clear error per kind of bad input.

Every error raised for user input is a subclass of :class:`SelfRepairError` (itself a
``ValueError``) and its message says what was wrong and what to do instead.
"""


class SelfRepairError(ValueError):
    """Base class of all input errors raised by ``selfrepair``."""


class UnsupportedArchitectureError(SelfRepairError):
    """The model's architecture has no adapter in :mod:`selfrepair.models`."""


class ModelLoadError(SelfRepairError):
    """A model could not be loaded (unknown id offline, missing package, corrupt file)."""


class InputError(SelfRepairError):
    """Tokens, heads, layers, ablation names or parameters are malformed or out of range."""


class NumericalError(SelfRepairError):
    """A computed quantity is inf or NaN (usually fp16 overflow)."""
