"""Seeded random projections of gradients that never form a projection matrix.

A balanced CountSketch: the ``P`` coordinates are shuffled by a seeded permutation, each is
multiplied by a random sign, and consecutive groups of ``ceil(P / d)`` coordinates are
summed into the ``d`` outputs. Every coordinate lands in exactly one output, so inner
products are kept in expectation, with the variance of a Gaussian Johnson-Lindenstrauss
projection, ``(‖a‖²‖b‖² + ⟨a, b⟩²) / d`` at most. It costs one gather and one sum per
gradient (no matrix product) and stores only a permutation and signs.
"""

from __future__ import annotations

import math

import torch


class RandomProjector:
    """Project ``[B, P]`` gradients to ``[B, d]``, keeping inner products approximately.

    Parameters
    ----------
    num_params : int
        ``P``, the length of the gradients.
    dim : int
        ``d``, the projected dimension (at most ``P``).
    seed : int
        Seed of the permutation and the signs.
    """

    def __init__(self, num_params: int, dim: int, seed: int = 0) -> None:
        self.num_params = num_params
        self.dim = min(dim, num_params)
        self.seed = seed
        self.group = math.ceil(num_params / self.dim)
        padded = self.group * self.dim
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(padded, generator=generator)
        signs = torch.randint(0, 2, (padded,), generator=generator).float() * 2 - 1
        signs[self.order >= num_params] = 0.0  # padding coordinates contribute nothing
        self.signs = signs
        self._on: dict = {}

    def _tables(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._on:
            order = self.order.clamp(max=self.num_params - 1).to(device)
            self._on[key] = (order, self.signs.to(device=device, dtype=dtype))
        return self._on[key]

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Return the projected gradients, ``[B, d]`` (a ``[P]`` vector gives ``[d]``)."""
        single = grads.dim() == 1
        grads = grads.reshape(-1, self.num_params)
        order, signs = self._tables(grads.device, grads.dtype)
        shuffled = grads.index_select(1, order).mul_(signs)
        projected = shuffled.view(grads.shape[0], self.dim, self.group).sum(-1)
        return projected[0] if single else projected
