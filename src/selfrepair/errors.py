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


class RemoteError(SelfRepairError):
    """The remote path (NDIF) cannot run: no API key, server unreachable, model not hosted."""


class NumericalError(SelfRepairError):
    """A computed quantity is inf or NaN (usually fp16 overflow)."""


def check_finite(values: dict, what: str, model_name: str, dtype) -> None:
    """Fail loudly (instead of writing NaN into figures) when a quantity is inf or NaN."""
    import torch

    bad = [name for name, v in values.items() if not torch.isfinite(v).all()]
    if bad:
        raise NumericalError(
            f"non-finite values in {', '.join(bad)} while {what} with {model_name} in "
            f"{str(dtype).replace('torch.', '')}. Half precision overflows on models with large "
            "activations (Gemma's residual stream reaches ~1e3): run with dtype='float32' or "
            "dtype='bfloat16'.")
