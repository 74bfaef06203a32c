"""Which adapter a loaded model gets: its family's, checked against what it computes
(:mod:`selfrepair.adapter_check`); for a model type not in the registry (a fine-tune saved under
a new name), the first family whose module layout it matches and whose check passes."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from .adapters import SUPPORTED_MODEL_TYPES, adapter_for, layout_matches
from .model import Model


def check_known_or_matching(config: Any) -> None:
    """Before any weight is read: the model type is in the registry, or a model built from its
    config on the meta device (no memory) matches a family's layout; otherwise the registry's
    error."""
    try:
        adapter_for(config.model_type).resolve(config)
        return
    except UnsupportedArchitectureError as e:
        if config.model_type in SUPPORTED_MODEL_TYPES:
            raise
        error = e
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError):
        raise error from None
    if not layout_matches(hf):
        raise error


def wrap(hf: torch.nn.Module, **model_kw: Any) -> Model:
    """``hf`` as a :class:`Model` whose adapter passed the load-time check.

    A model type in the registry gets its family's adapter or one error naming the piece of the
    check that failed. Another model type is tried with every family whose module paths it has
    (:func:`~selfrepair.models.adapters.layout_matches`, registry order) and gets the first that
    passes, with a warning saying which; if none does, one error lists what failed for each."""
    from ..adapter_check import check_adapter

    if model_kw.get("remote") is not True and next(hf.parameters()).dtype == torch.float64 \
            and getattr(hf.config, "_experts_implementation", None) == "grouped_mm":
        hf.set_experts_implementation("eager")  # grouped_mm has no float64 kernel; same sums
    model_type = hf.config.model_type
    if model_type in SUPPORTED_MODEL_TYPES:
        model = Model(hf, adapter_for(model_type), **model_kw)
        check_adapter(model)
        return model
    candidates = layout_matches(hf)
    failures = []
    for adapter in candidates:
        try:
            model = Model(hf, adapter, **model_kw)
            check_adapter(model)
        except Exception as e:  # noqa: BLE001 - a wrong layout fails in any way: try the next
            failures.append(f"{adapter.family}: {str(e).splitlines()[0][:300]}")
            continue
        note = (f"model type {model_type!r} is not in the registry; its modules match the "
                f"{adapter.family!r} family's layout and the load-time check passes with that "
                "adapter, so it is used")
        warnings.warn(note, stacklevel=3)
        model.meta["adapter"] = f"{adapter.family} (matched by layout and the load-time check)"
        return model
    try:
        adapter_for(model_type)
    except UnsupportedArchitectureError as e:
        error = str(e)
    if failures:
        error += (f" Its modules match the layout of {', '.join(a.family for a in candidates)}, but "
                  "the load-time check failed with each: " + "; ".join(failures))
    raise UnsupportedArchitectureError(error)
