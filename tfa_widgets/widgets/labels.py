"""Reading labels from datasets (single-label ints or multi-hot vectors) and naming them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Label = int | tuple[int, ...]


def as_label(y) -> Label:
    """Return a label as an int (single label) or a tuple of positive classes (multi-hot)."""
    arr = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    if arr.ndim == 0:
        return int(arr)
    return tuple(int(i) for i in np.flatnonzero(arr > 0.5))


def label_text(label: Label | None, class_names: Sequence[str]) -> str:
    """Return a label as class names, e.g. ``"cat"`` or ``"cat+dog"`` (``"?"`` when unknown)."""
    if label is None:
        return "?"
    if isinstance(label, tuple):
        return "+".join(class_names[i] for i in label) or "none"
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def is_mistake(label: Label | None, predicted: int) -> bool:
    """Return True when the top predicted class is not (one of) the true label(s)."""
    if label is None:
        return False
    if isinstance(label, tuple):
        return predicted not in label
    return predicted != label


def has_class(label: Label, cls: int) -> bool:
    """Return True when ``label`` is, or contains, class ``cls``."""
    return cls in label if isinstance(label, tuple) else label == cls


def own_class(label: Label) -> int | None:
    """Return the class a training image is explained for: its label, or first positive class."""
    if isinstance(label, tuple):
        return label[0] if label else None
    return label
