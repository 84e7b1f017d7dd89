"""tfa-widgets: training feature attribution for vision models, with an interactive explorer."""

from tfa_widgets.core.errors import (
    DatasetError,
    IndexCacheError,
    InputError,
    NonFiniteError,
    SaturatedPredictionError,
    TFAError,
)
from tfa_widgets.core.explanation import Explanation, SmoothGrad

__all__ = [
    "DatasetError",
    "Explanation",
    "IndexCacheError",
    "InputError",
    "NonFiniteError",
    "SaturatedPredictionError",
    "SmoothGrad",
    "TFAEngine",
    "TFAError",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in captum and torch.func; import it only when asked for.
    if name == "TFAEngine":
        from tfa_widgets.core.engine import TFAEngine

        return TFAEngine
    raise AttributeError(f"module 'tfa_widgets' has no attribute {name!r}")
