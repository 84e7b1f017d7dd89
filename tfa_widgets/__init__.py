"""tfa-widgets: training feature attribution for vision models, with an interactive explorer."""

import warnings

from tfa_widgets.core.errors import (
    DatasetError,
    IndexCacheError,
    InputError,
    NonFiniteError,
    SaturatedPredictionError,
    TFAError,
)

__all__ = [
    "DatasetError",
    "Explanation",
    "IndexCacheError",
    "IndexSettings",
    "InputError",
    "NonFiniteError",
    "Query",
    "SaturatedPredictionError",
    "SearchSettings",
    "SmoothGrad",
    "TFAEngine",
    "TFAError",
]

__version__ = "0.1.0"

# torch's forward-mode AD (the engine's exact scores) compiles its decompositions with
# torch.jit.script on first use, which warns that torch.jit.script is deprecated: a notice about
# torch's own code that a user cannot act on, shown in notebooks as a red box. Only that one.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.jit\.script` is deprecated",
    category=FutureWarning,
    module=r"torch\.",
)

# Names that import torch (and captum) are loaded when first asked for, so that importing a light
# submodule (the CLI, or tfa_widgets.serving inside the Voila server process) stays light.
_LAZY = {
    "Explanation": "tfa_widgets.core.explanation",
    "IndexSettings": "tfa_widgets.core.settings",
    "Query": "tfa_widgets.core.query",
    "SearchSettings": "tfa_widgets.core.search",
    "SmoothGrad": "tfa_widgets.core.settings",
    "TFAEngine": "tfa_widgets.core.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfa_widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
