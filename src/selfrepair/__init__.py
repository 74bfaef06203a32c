"""selfrepair: exact self-repair and Hydra-effect measurements on nnsight.

Companion library to Rushing & Nanda, *Explorations of Self-Repair in Language Models*
(ICML 2024) and McGrath et al., *The Hydra Effect* (2023).
"""

from .errors import (InputError, ModelLoadError, NumericalError, SelfRepairError,
                     UnsupportedArchitectureError)
from .models import EMBEDDED_MODEL, Model, load_model, tiny_model

__version__ = "0.1.0"

__all__ = ["EMBEDDED_MODEL", "InputError", "Model", "ModelLoadError", "NumericalError",
           "SelfRepairError", "UnsupportedArchitectureError", "load_model", "tiny_model",
           "__version__"]
