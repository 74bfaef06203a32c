"""selfrepair: exact self-repair and Hydra-effect measurements on nnsight.

Companion library to Rushing & Nanda, *Explorations of Self-Repair in Language Models*
(ICML 2024) and McGrath et al., *The Hydra Effect* (2023).

The public API is the names in ``__all__`` (documented in the book's API appendix)::

    from selfrepair import load_model, self_repair, run_sweep

Importing the package has no side effects: it does not touch the global random state or the
user's Altair renderer (the book switches to its offline renderer explicitly, with
:func:`selfrepair.figures.use_book_renderer`). It imports nothing heavy either: each public name is
imported from its module when first used (:data:`_LAZY`), so ``selfrepair --help`` answers without
torch, transformers or nnsight, and the core library never imports the book's tools.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import (InputError, ModelLoadError, NumericalError, RemoteError, SelfRepairError,
                     UnsupportedArchitectureError)

__version__ = "0.1.0"

# public name -> the module defining it (imported on first access, PEP 562)
_LAZY = {"self_repair": ".heads", "EMBEDDED_MODEL": ".models", "Model": ".models",
         "load_model": ".models", "tiny_model": ".models", "SelfRepairResult": ".results",
         "Sweep": ".sweep", "run_sweep": ".sweep"}

__all__ = ["EMBEDDED_MODEL", "InputError", "Model", "ModelLoadError", "NumericalError",
           "RemoteError", "SelfRepairError", "SelfRepairResult", "Sweep", "UnsupportedArchitectureError",
           "load_model", "run_sweep", "self_repair", "tiny_model", "__version__"]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .heads import self_repair
    from .models import EMBEDDED_MODEL, Model, load_model, tiny_model
    from .results import SelfRepairResult
    from .sweep import Sweep, run_sweep


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
