"""What a query's ``test`` and ``target`` name: one test image or many, and a target for each."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.validation import as_integer, index_tensor

TestInput = int | torch.Tensor | Sequence[int] | np.ndarray
Target = int | str | None

QUERY_GRADIENTS_MB = 256
"""Memory the test gradients of one matrix product against the index may take, in MB."""


def split_tests(test: TestInput) -> tuple[list[int | torch.Tensor], bool]:
    """Return the single tests a query names (indices or images ``[C, H, W]``) and whether it
    named a batch.

    One test is an integer (Python, NumPy or a 0-d integer tensor) or an image tensor
    ``[C, H, W]``; many are a sequence of integers (list, tuple, NumPy array or 1-D integer
    tensor) or a batch of images ``[B, C, H, W]``.
    """
    if isinstance(test, torch.Tensor):
        if test.dim() == 4:
            if len(test) == 0:
                raise InputError("no test images given: the batch [B, C, H, W] has B = 0")
            return list(test), True
        if test.dim() == 0:
            return [as_integer(test, "test")], False
        if test.dim() == 1:
            return _index_list(test), True
        return [test], False
    if isinstance(test, np.ndarray | list | tuple):
        return _index_list(test), True
    if isinstance(test, np.integer):
        return [as_integer(test, "test")], False
    return [test], False


def _index_list(indices: object) -> list[int]:
    indices = index_tensor(indices, "test indices").tolist()
    if not indices:
        raise InputError("no test images given: the list of test indices is empty")
    return indices


def split_targets(target: Target | Sequence, count: int) -> list[Target]:
    """Return one target per test: the same for all, or one each from a sequence of ``count``."""
    if isinstance(target, str | int | np.integer | None) or (
        isinstance(target, torch.Tensor) and target.dim() == 0
    ):
        return [target] * count
    if not isinstance(target, Sequence | np.ndarray | torch.Tensor):
        raise InputError(
            "target must be None, 'predicted', 'true', a class index or one per test image, "
            f"got {target!r}"
        )
    targets = list(target)
    if len(targets) != count:
        raise InputError(
            f"{len(targets)} targets given for {count} test images; give one target for all "
            "of them or one per test image"
        )
    return targets


def tests_per_product(num_params: int) -> int:
    """Return how many test gradients ``[P]`` one product against the index takes at a time
    (as many as fit `QUERY_GRADIENTS_MB` in float32, at least one)."""
    return max(1, int(QUERY_GRADIENTS_MB * 2**20 // (4 * num_params)))
