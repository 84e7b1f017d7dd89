"""Normalisation between display space (RGB in [0, 1]) and model space (standardised)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tfa_widgets.core.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``; calling it inverts that for display.

    ``norm(image)`` takes a model-space ``[C, H, W]`` tensor and returns an ``[H, W, 3]`` float
    tensor in [0, 1], which is the ``display`` transform the engine and the explorer expect.

    Parameters
    ----------
    mean, std : tuple of float
        One value per channel; every ``std`` positive.

    Raises
    ------
    InputError
        When ``mean`` and ``std`` differ in length or a ``std`` is not positive.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise InputError(
                f"mean and std need one value per channel, got {self.mean}, {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise InputError(f"std values must be positive, got {self.std}")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Return model-space images from ``[..., C, H, W]`` float images in [0, 1].

        Parameters
        ----------
        images : torch.Tensor
            RGB images in [0, 1], channels third from last.

        Returns
        -------
        torch.Tensor
            ``(images - mean) / std``, same shape.
        """
        mean, std = self._stats(images)
        return (images - mean) / std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return the ``[H, W, 3]`` display image in [0, 1] of a model-space ``[C, H, W]`` image."""
        if image.dim() != 3 or image.shape[0] != len(self.mean):
            raise InputError(
                f"display expects one model-space image [{len(self.mean)}, H, W], "
                f"got shape {tuple(image.shape)}"
            )
        mean, std = self._stats(image)
        rgb = (image.detach() * std + mean).clamp(0.0, 1.0)
        if rgb.shape[0] == 1:
            rgb = rgb.expand(3, -1, -1)
        return rgb.permute(1, 2, 0).contiguous()


def as_normalization(mean: Sequence[float], std: Sequence[float]) -> Normalization:
    """Return a :class:`Normalization` from any sequences of floats."""
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std))
