"""Pixel masks from attribution maps: the top p% of each map, and filling pixels with a baseline.

Conventions used by every measure in `tfa_widgets.eval`:

- A map is ``[H, W]`` (already channel-reduced) or ``[C, H, W]`` (raw per-channel gradients), or a
  stack of them ``[k, H, W]`` / ``[k, C, H, W]`` when ``stacked=True``.
- The *importance* of a pixel is ``|m|`` for a reduced map and ``sum_c |m_c|`` for a raw map: for
  gradients the sign says in which direction a pixel moves the score, the magnitude how much.
  Grad-CAM and random maps are non-negative, so for them the importance is the map itself.
- The top p% of a map are exactly ``n = floor(p / 100 * H * W + 0.5)`` pixels (p% of the pixel
  count, rounded half up): the n most important ones. Ties are broken by the row-major position of
  the pixel, lower first, so the selection is deterministic and always has exactly n pixels.
- A pixel mask ``[H, W]`` applies to all channels; removed pixels take a baseline value per channel
  (by default the per-channel mean of the training set in model space, see `channel_mean`).
"""

from __future__ import annotations

import math

import torch

from tfa_widgets.core.errors import InputError, NonFiniteError


def pixel_importance(maps: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """Return the per-pixel importance ``[H, W]`` (or ``[k, H, W]`` when ``stacked``).

    Parameters
    ----------
    maps : torch.Tensor
        ``[H, W]`` or ``[C, H, W]``; with ``stacked=True``, ``[k, H, W]`` or ``[k, C, H, W]``.
    stacked : bool
        Whether the first dimension indexes several maps.

    Returns
    -------
    torch.Tensor
        ``|m|``, summed over channels for raw maps.

    Raises
    ------
    InputError
        When the maps have the wrong number of dimensions.
    NonFiniteError
        When a map holds NaN or infinite values.
    """
    base = 3 if stacked else 2
    if maps.dim() not in (base, base + 1):
        shapes = "[k, H, W] or [k, C, H, W]" if stacked else "[H, W] or [C, H, W]"
        raise InputError(f"a map must have shape {shapes}, got shape {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise NonFiniteError("the attribution map contains NaN or infinite values")
    importance = maps.detach().abs()
    if maps.dim() == base + 1:
        importance = importance.sum(dim=-3)
    return importance


def top_count(p: float, num_pixels: int) -> int:
    """Return how many pixels the top ``p`` percent of ``num_pixels`` are (rounded half up)."""
    if not 0.0 <= float(p) <= 100.0:
        raise InputError(f"p is a percentage and must lie in [0, 100], got p={p}")
    return min(num_pixels, int(math.floor(float(p) / 100.0 * num_pixels + 0.5)))


def top_p_mask(maps: torch.Tensor, p: float, stacked: bool = False) -> torch.Tensor:
    """Return a boolean mask ``[H, W]`` (``[k, H, W]`` if stacked) of the top ``p`` % pixels.

    Pixels are ranked by `pixel_importance`; exactly ``top_count(p, H * W)`` pixels are selected
    per map, ties broken by row-major position (lower first).

    Parameters
    ----------
    maps : torch.Tensor
        ``[H, W]`` or ``[C, H, W]``; with ``stacked=True``, ``[k, H, W]`` or ``[k, C, H, W]``.
    p : float
        Percentage of pixels, in [0, 100].
    stacked : bool
        Whether the first dimension indexes several maps.

    Returns
    -------
    torch.Tensor
        Boolean mask, True on the selected pixels.
    """
    importance = pixel_importance(maps, stacked=stacked)
    flat = importance.reshape(-1, importance.shape[-2] * importance.shape[-1])
    n = top_count(p, flat.shape[1])
    order = torch.argsort(-flat, dim=1, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order[:, :n], True)
    return mask.reshape(importance.shape)


def fill(images: torch.Tensor, remove: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Return copies of ``images`` with the pixels where ``remove`` is True set to ``baseline``.

    Parameters
    ----------
    images : torch.Tensor
        ``[C, H, W]`` or ``[k, C, H, W]``.
    remove : torch.Tensor
        Boolean pixel mask ``[H, W]`` or ``[k, H, W]``, applied to all channels.
    baseline : torch.Tensor
        Per-channel value ``[C]``, or a full baseline image ``[C, H, W]``.
    """
    if images.dim() not in (3, 4) or remove.dim() != images.dim() - 1:
        raise InputError(
            f"images [C, H, W] or [k, C, H, W] need a pixel mask [H, W] or [k, H, W]; got "
            f"images {tuple(images.shape)} and mask {tuple(remove.shape)}"
        )
    if remove.shape[-2:] != images.shape[-2:]:
        raise InputError(
            f"the pixel mask is {tuple(remove.shape[-2:])} but the images are "
            f"{tuple(images.shape[-2:])}"
        )
    channels = images.shape[-3]
    baseline = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    if baseline.dim() == 1:
        if baseline.numel() != channels:
            raise InputError(f"baseline has {baseline.numel()} channels, images have {channels}")
        baseline = baseline[:, None, None]
    if baseline.shape[0] != channels:
        raise InputError(f"baseline has {baseline.shape[0]} channels, images have {channels}")
    return torch.where(remove.unsqueeze(-3).to(images.device), baseline, images)


def keep_top(
    images: torch.Tensor, maps: torch.Tensor, p: float, baseline: torch.Tensor
) -> torch.Tensor:
    """Return ``images [k, C, H, W]`` keeping only the top ``p`` % pixels of each map.

    Parameters
    ----------
    images : torch.Tensor
        The images ``[k, C, H, W]``.
    maps : torch.Tensor
        One map per image, ``[k, H, W]`` or ``[k, C, H, W]``.
    p : float
        Percentage of pixels kept, in [0, 100].
    baseline : torch.Tensor
        The value of the other pixels: per channel ``[C]``, or an image ``[C, H, W]``.

    Returns
    -------
    torch.Tensor
        Masked copies of the images (insertion).
    """
    return fill(images, ~top_p_mask(maps, p, stacked=True), baseline)


def remove_top(
    images: torch.Tensor, maps: torch.Tensor, p: float, baseline: torch.Tensor
) -> torch.Tensor:
    """Return ``images [k, C, H, W]`` with the top ``p`` % pixels of each map removed (deletion).

    Parameters
    ----------
    images : torch.Tensor
        The images ``[k, C, H, W]``.
    maps : torch.Tensor
        One map per image, ``[k, H, W]`` or ``[k, C, H, W]``.
    p : float
        Percentage of pixels removed, in [0, 100].
    baseline : torch.Tensor
        The value of the removed pixels: per channel ``[C]``, or an image ``[C, H, W]``.

    Returns
    -------
    torch.Tensor
        Masked copies of the images.
    """
    return fill(images, top_p_mask(maps, p, stacked=True), baseline)


def channel_mean(dataset, limit: int | None = None) -> torch.Tensor:
    """Return the per-channel mean ``[C]`` of a dataset's images in model space.

    Parameters
    ----------
    limit : int, optional
        Use only the first ``limit`` images (all by default).
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise InputError("cannot take the channel mean of an empty dataset")
    total = None
    for i in range(n):
        image = torch.as_tensor(dataset[i][0], dtype=torch.float64)
        sums = image.sum(dim=(-2, -1)) / (image.shape[-2] * image.shape[-1])
        total = sums if total is None else total + sums
    return (total / n).float()
