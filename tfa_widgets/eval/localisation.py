"""Localisation of maps against known regions: pointing game and share of map mass in a mask.

Both use the pixel importance of `tfa_widgets.eval.masking.pixel_importance` (``|m|``, summed over
channels for raw maps) unless said otherwise, so they rank pixels the way insertion and deletion do.

- *Pointing game* (Zhang et al. 2016, with no tolerance margin: the images are small): a hit when
  the most important pixel lies inside the mask. When several pixels share the maximum, the score is
  the share of them inside the mask (the expected hit under random tie breaking), so a constant map
  scores the mask's area fraction rather than whatever pixel comes first.
- *Mass in mask*: the share of the map's mass inside the mask, ``sum_{mask} a / sum a`` with ``a``
  the importance (``part="abs"``) or the positive part of a signed map (``part="positive"``).
  NaN when the map has no mass. A map that ignores the mask scores its area fraction on average.
"""

from __future__ import annotations

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.masking import pixel_importance

PARTS = ("abs", "positive")


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        raise InputError(f"the mask must be [H, W] = {tuple(shape)}, got {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise InputError("the mask is empty: localisation needs at least one pixel inside it")
    return mask.to(torch.bool)


def pointing_game(map_: torch.Tensor, mask: torch.Tensor) -> float:
    """Return the pointing-game score of a map ``[H, W]`` / ``[C, H, W]`` against a mask ``[H, W]``.

    Parameters
    ----------
    map_ : torch.Tensor
        ``[H, W]`` or ``[C, H, W]``.
    mask : torch.Tensor
        The region, bool ``[H, W]``, not empty.

    Returns
    -------
    float
        1.0 for a hit, 0.0 for a miss, the share inside the mask when several pixels tie for the
        maximum.
    """
    importance = pixel_importance(map_)
    mask = _check_mask(mask, importance.shape)
    at_max = importance == importance.max()
    return float((at_max & mask.to(at_max.device)).sum()) / float(at_max.sum())


def mass_in_mask(map_: torch.Tensor, mask: torch.Tensor, part: str = "abs") -> float:
    """Return the share of a map's mass inside ``mask`` (NaN when the map has no mass).

    Parameters
    ----------
    map_ : torch.Tensor
        ``[H, W]`` or ``[C, H, W]``.
    part : str
        ``"abs"``: mass of the importance ``|m|``; ``"positive"``: mass of ``max(m, 0)`` of a
        channel-reduced signed map ``[H, W]`` (raw ``[C, H, W]`` maps are summed over channels
        first).
    mask : torch.Tensor
        The region, bool ``[H, W]``, not empty.

    Returns
    -------
    float
        The share in [0, 1], or NaN when the map has no mass.

    Raises
    ------
    InputError
        When ``part`` is unknown, or the mask is empty or of another size.
    """
    if part not in PARTS:
        raise InputError(f"unknown map part {part!r}; choose one of {PARTS}")
    if part == "abs":
        mass = pixel_importance(map_)
    else:
        signed = map_.detach().sum(dim=-3) if map_.dim() == 3 else map_.detach()
        pixel_importance(signed)  # shape and finiteness checks
        mass = signed.clamp(min=0)
    mask = _check_mask(mask, mass.shape)
    total = float(mass.sum())
    if total == 0.0:
        return float("nan")
    return float(mass[mask.to(mass.device)].sum()) / total
