"""Checks on user input that fail early with a message naming the problem."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tfa_widgets.core.errors import InputError, NonFiniteError


def check_image(
    image: torch.Tensor, expected_shape: Sequence[int] | None = None, name: str = "image"
) -> torch.Tensor:
    """Return ``image`` as a floating tensor ``[C, H, W]`` after checking shape and values.

    Parameters
    ----------
    image : torch.Tensor
        One image ``[C, H, W]``; a leading batch dimension of size 1 is accepted.
    expected_shape : sequence of int, optional
        The ``[C, H, W]`` shape the model was trained on (from the training set).
    name : str
        How to call the image in error messages.
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor [C, H, W], got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise InputError(
            f"{name} must have shape [C, H, W] (3 dimensions), got shape {tuple(image.shape)}"
        )
    if expected_shape is not None and tuple(image.shape) != tuple(expected_shape):
        channels, height, width = expected_shape
        if image.shape[0] != channels:
            raise InputError(
                f"{name} has {image.shape[0]} channels but the training images have {channels} "
                f"(expected shape {tuple(expected_shape)}, got {tuple(image.shape)})"
            )
        raise InputError(
            f"{name} has size {tuple(image.shape[1:])} but the training images are "
            f"{(height, width)} (expected shape {tuple(expected_shape)})"
        )
    if not image.is_floating_point():
        image = image.float()
    check_finite(image, name)
    return image


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise `NonFiniteError` when ``tensor`` holds a NaN or an infinity."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nans = int(torch.isnan(tensor).sum())
        infs = int((~finite).sum()) - nans
        raise NonFiniteError(f"{name} contains {nans} NaN and {infs} infinite values")


def check_k(k: int, n: int, what: str = "training images") -> int:
    """Return ``k`` as an int after checking ``1 <= k <= n``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise InputError(f"k must be at least 1, got k={k}")
    if k > n:
        raise InputError(f"k={k} is larger than the number of {what} ({n})")
    return k


def check_class(target: int, num_classes: int) -> int:
    """Return ``target`` as an int after checking it is a valid class index."""
    if isinstance(target, torch.Tensor) and target.numel() == 1:
        target = int(target.item())
    if isinstance(target, bool) or not isinstance(target, int):
        raise InputError(
            f"target must be None, 'predicted', 'true' or a class index, got {target!r}"
        )
    if not 0 <= target < num_classes:
        raise InputError(
            f"target class {target} is out of range: the model has {num_classes} classes "
            f"(0 to {num_classes - 1})"
        )
    return target


def check_indices(indices: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """Return training indices as a 1-D long tensor after checking they lie in ``[0, n)``."""
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if indices.numel() == 0:
        raise InputError("no training indices given")
    bad = indices[(indices < 0) | (indices >= n)]
    if bad.numel():
        raise InputError(
            f"training indices {bad.tolist()[:5]} are out of range for a training set of size {n}"
        )
    return indices
