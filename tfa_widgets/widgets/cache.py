"""A cache of explanations that serves every k up to the largest computed, without recomputing.

The top-k ranking is a prefix of the top-(k+1) ranking, so an explanation computed for k
training images answers every smaller k by slicing. The cache therefore stores, per key (test
image, target and the settings that change scores or maps), the explanation with the largest k
computed so far. Moving the k slider down, or back up to a value already seen, costs nothing;
computing k=32 up front instead would make every first click about four times slower than the
default k=8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable

from tfa_widgets.core.explanation import Explanation
from tfa_widgets.core.memory_cache import BytesLRU

DEFAULT_MAX_BYTES = 256 * 2**20

_PER_TRAIN_FIELDS = (
    "train_indices",
    "scores",
    "train_images",
    "train_display",
    "tfa_maps_raw",
    "gradcam_train",
)


def slice_explanation(explanation: Explanation, k: int) -> Explanation:
    """Return ``explanation`` restricted to its first ``k`` training images."""
    if k > explanation.k:
        raise ValueError(f"cannot slice an explanation of k={explanation.k} to k={k}")
    if k == explanation.k:
        return explanation
    changes = {name: getattr(explanation, name)[:k] for name in _PER_TRAIN_FIELDS}
    changes["train_labels"] = list(explanation.train_labels)[:k]
    return dataclasses.replace(explanation, **changes)


class ExplanationCache:
    """Least-recently-used store of explanations, keyed by everything but k.

    Parameters
    ----------
    max_bytes : int
        Bytes of tensors kept (an explanation of k=8 ImageNet-sized images holds about
        20 MB); least recently used explanations are dropped first, the latest is kept.
    max_entries : int, optional
        A bound on the number of keys as well.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int | None = None) -> None:
        self._store = BytesLRU(max_bytes, max_entries)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def get(
        self, key: Hashable, k: int, compute: Callable[[int], Explanation]
    ) -> tuple[Explanation, bool]:
        """Return ``(explanation for k, was_cached)``, calling ``compute(k)`` only on a miss."""
        stored = self._store.get(key)
        if stored is not None and stored.k >= k:
            self.hits += 1
            return slice_explanation(stored, k), True
        self.misses += 1
        explanation = compute(k)
        self._store[key] = explanation
        return slice_explanation(explanation, min(k, explanation.k)), False

    def clear(self) -> None:
        """Forget every stored explanation."""
        self._store.clear()
