"""Colour scales and per-map normalisation for attribution overlays."""

from __future__ import annotations

import numpy as np

SIGNED_COLORSCALE = "RdBu_r"
"""Diverging scale for signed maps: blue is negative, white zero, red positive."""

UNSIGNED_COLORSCALE = "Inferno"
"""Sequential scale for non-negative maps (absolute TFA, Grad-CAM)."""

MISTAKE_COLOR = (214, 39, 40)
SELECTED_COLOR = (31, 119, 180)


def as_numpy(x) -> np.ndarray:
    """Return ``x`` (tensor, array or list) as a float32 NumPy array on the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def normalise_map(m, signed: bool) -> np.ndarray:
    """Return ``m`` scaled to [-1, 1] (signed, zero kept at zero) or [0, 1] (unsigned).

    Signed maps are divided by their largest absolute value; unsigned maps by their maximum. An
    all-zero or non-finite map becomes zeros, so a degenerate map never breaks a figure.

    Parameters
    ----------
    m : array or torch.Tensor
        The map.
    signed : bool
        Keep the sign (scale to [-1, 1]), or shift to non-negative and scale to [0, 1].

    Returns
    -------
    numpy.ndarray
        The scaled map, float32, same shape.
    """
    arr = np.nan_to_num(as_numpy(m), nan=0.0, posinf=0.0, neginf=0.0)
    if not signed:
        arr = arr - min(0.0, float(arr.min(initial=0.0)))
    scale = float(np.abs(arr).max(initial=0.0))
    return arr / scale if scale > 0 else np.zeros_like(arr)


def hex_color(rgb: tuple[int, int, int]) -> str:
    """Return ``rgb`` as a CSS hex colour."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)
