"""Channel reduction of TFA maps and SmoothGrad noise."""

from __future__ import annotations

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.settings import SmoothGrad

REDUCTIONS = ("signed", "abs")


def reduce_maps(
    maps: torch.Tensor, how: str = "signed", inputs: torch.Tensor | None = None
) -> torch.Tensor:
    """Return per-pixel maps ``[k, H, W]`` from per-channel maps ``[k, C, H, W]``.

    Parameters
    ----------
    how : {"signed", "abs"}
        Signed sum over channels, or sum of absolute values.
    inputs : torch.Tensor, optional
        The images; when given, maps are multiplied by them first (gradient × input).
    """
    if how not in REDUCTIONS:
        raise InputError(f"unknown channel reduction {how!r}; choose one of {REDUCTIONS}")
    if inputs is not None:
        maps = maps * inputs.to(maps)
    return maps.abs().sum(dim=1) if how == "abs" else maps.sum(dim=1)


def noisy_copies(images: torch.Tensor, smooth: SmoothGrad) -> torch.Tensor:
    """Return ``smooth.n`` noisy copies of each image, ``[k * n, C, H, W]`` (image-major).

    The noise of each image has standard deviation ``sigma × (max - min)`` of that image.
    """
    generator = torch.Generator().manual_seed(int(smooth.seed))
    repeated = images.repeat_interleave(int(smooth.n), dim=0)
    flat = images.flatten(1)
    ranges = (flat.max(dim=1).values - flat.min(dim=1).values).repeat_interleave(int(smooth.n))
    noise = torch.randn(repeated.shape, generator=generator, dtype=torch.float32)
    scale = (float(smooth.sigma) * ranges).view(-1, 1, 1, 1)
    return repeated + noise.to(repeated) * scale
