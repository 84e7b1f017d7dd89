"""An in-memory least-recently-used cache bounded by the bytes its values hold, not their count.

A count says nothing about memory: 64 test gradients are 64 × 4 bytes × P, 2.9 GB for a
ResNet-18 and about 22 GB for a ViT-B/16. A byte budget holds many small values or few large
ones. The most recent value is always kept, even alone over the budget, so the value just
computed is served to the next call.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch


def nbytes(value: Any) -> int:
    """Return the bytes held by the tensors and arrays in ``value`` (nested in dataclasses,
    dicts, lists)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return 0


class BytesLRU:
    """A mapping that drops its least recently used values while they exceed ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        Bytes of tensors kept (the newest value is kept even if it alone exceeds them).
    max_entries : int, optional
        A bound on the number of values as well, when a caller needs one.
    """

    def __init__(self, max_bytes: int, max_entries: int | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.max_entries = max_entries
        self._values: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def __getitem__(self, key: Hashable) -> Any:
        self._values.move_to_end(key)
        return self._values[key][0]

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the value of ``key`` (marking it recently used), or ``default``."""
        return self[key] if key in self._values else default

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if key in self._values:
            self.nbytes -= self._values.pop(key)[1]
        size = nbytes(value)
        self._values[key] = (value, size)
        self.nbytes += size
        while len(self._values) > 1 and (
            self.nbytes > self.max_bytes
            or (self.max_entries is not None and len(self._values) > self.max_entries)
        ):
            self.nbytes -= self._values.popitem(last=False)[1][1]

    def clear(self) -> None:
        """Forget every value."""
        self._values.clear()
        self.nbytes = 0
