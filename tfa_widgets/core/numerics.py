"""Precision rules shared by the gradient index and the scorers."""

from __future__ import annotations

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` in float32 when it is of a lower precision (bfloat16, float16)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def reciprocal_or_zero(norms: torch.Tensor) -> torch.Tensor:
    """Return ``1 / norms``, and 0 where a norm is exactly 0 (a zero gradient has no direction)."""
    return torch.where(norms > 0, 1 / norms.where(norms > 0, torch.ones_like(norms)), 0.0)
