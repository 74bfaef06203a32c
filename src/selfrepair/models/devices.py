"""Where a loaded model sits: the device and dtype asked for (``"auto"``, a launcher's GPU, one
clear error for a bad name) and ``device_map``, which spreads a model over the GPUs of one machine
with accelerate (:func:`dispatch`; offloading to disk is refused: the measurements read weights
directly)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import InputError

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


def placed(hf: Any, name: str, dev: torch.device, dt: torch.dtype, device_map: str | dict | None) -> Any:
    """``hf`` on ``dev`` in ``dt``, or spread over devices by ``device_map`` (dispatched here unless
    ``from_pretrained`` placed it; offloading to disk refused)."""
    if device_map is None:
        return hf.to(device=dev, dtype=dt)
    if getattr(hf, "hf_device_map", None) is None:  # not placed by from_pretrained
        return dispatch(hf.to(dt), device_map)
    if any(str(d) in ("disk", "meta") for d in hf.hf_device_map.values()):
        raise InputError(f"{name} does not fit on the devices of this machine (device_map offloads "
                         "modules to disk): the measurements read weights directly; use more GPUs, "
                         "dtype='bfloat16' or a smaller model")
    return hf
