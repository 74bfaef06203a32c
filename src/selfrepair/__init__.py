"""selfrepair: exact self-repair and Hydra-effect measurements on nnsight.

Companion library to Rushing & Nanda, *Explorations of Self-Repair in Language Models*
(ICML 2024) and McGrath et al., *The Hydra Effect* (2023).

The public API is the names in ``__all__`` (documented in the book's API appendix)::

    from selfrepair import load_model, self_repair, run_sweep

Importing the package has no side effects: it does not touch the global random state or the
user's Altair renderer (the book switches to its offline renderer explicitly, with
:func:`selfrepair.figures.use_book_renderer`).
"""

from .errors import (InputError, ModelLoadError, NumericalError, RemoteError, SelfRepairError,
                     UnsupportedArchitectureError)
from .heads import self_repair
from .models import EMBEDDED_MODEL, Model, load_model, tiny_model
from .results import SelfRepairResult
from .sweep import Sweep, run_sweep

__version__ = "0.1.0"

__all__ = ["EMBEDDED_MODEL", "InputError", "Model", "ModelLoadError", "NumericalError",
           "RemoteError", "SelfRepairError", "SelfRepairResult", "Sweep", "UnsupportedArchitectureError",
           "load_model", "run_sweep", "self_repair", "tiny_model", "__version__"]
