"""A restricted unpickler for dataset files: plain containers and NumPy arrays only."""

from __future__ import annotations

import pickle
from pathlib import Path

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: only arrays are allowed"
            )
        return super().find_class(module, name)


def load_array_pickle(path: Path) -> object:
    """Return the object pickled in ``path``, refusing anything but containers and NumPy arrays."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="bytes").load()
