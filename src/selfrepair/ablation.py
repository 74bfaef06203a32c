"""Head ablations (paper §2.1): what replaces a head's output.

A head's output is ``z_h @ W_O[h]``, so replacing the head's ``d_head`` slice ``z_h`` of the
output projection's input replaces its output exactly (``b_O`` and the other heads untouched).

- ``resample``: the same head's ``z_h`` on other tokens at the same positions (a token set packed
  from a corpus takes each row's source from another document, :mod:`selfrepair.data`; a bare
  tensor of rows is rolled by one);
- ``mean``: the mean of the head's clean ``z_h`` over batch and positions (the output is linear
  in ``z_h``, so this is the mean output);
- ``zero``: zeros (the head writes nothing).
"""

from __future__ import annotations

import torch

from .errors import InputError
from .models import Model

ABLATIONS = ("resample", "mean", "zero")


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")
    return ablation


def replacement_z(model: Model, ablation: str, clean_z: torch.Tensor,
                  corrupt_z: torch.Tensor | None) -> torch.Tensor:
    """The replacement for every layer's ``z`` (``[layer, batch, pos, n_heads*d_head]``).

    For ``mean`` and ``zero`` the result broadcasts over batch and positions.
    """
    check_ablation(ablation)
    if ablation == "resample":
        return corrupt_z
    if ablation == "mean":
        return clean_z.float().mean((1, 2), keepdim=True).to(clean_z.dtype)
    return torch.zeros_like(clean_z[:, :1, :1])


def head_slice(model: Model, head: int) -> slice:
    return slice(head * model.d_head, (head + 1) * model.d_head)


def patch_heads(model: Model, z: torch.Tensor, heads: list[int], repl: torch.Tensor,
                rows: int) -> torch.Tensor:
    """``z`` of ``len(heads)`` stacked copies of a ``rows``-row batch, copy ``k`` with head
    ``heads[k]`` replaced by ``repl`` (``[rows or 1, pos or 1, n_heads*d_head]``)."""
    z = z.clone()
    for k, h in enumerate(heads):
        sl = head_slice(model, h)
        z[k * rows:(k + 1) * rows, :, sl] = repl[..., sl].to(z.dtype)
    return z
