"""Seeded random projections of gradients that never form a projection matrix.

A balanced CountSketch: the ``P`` coordinates are shuffled by a seeded permutation, each is
multiplied by a random sign, and consecutive groups of ``ceil(P / d)`` coordinates are
summed into the ``d`` outputs. Every coordinate lands in exactly one output, so inner
products are kept in expectation, with the variance of a Gaussian Johnson-Lindenstrauss
projection, ``(‖a‖²‖b‖² + ⟨a, b⟩²) / d`` at most. It costs one gather and one sum per
gradient (no matrix product) and stores only a permutation and signs. The sums are taken by a
gather and a reshape on CUDA, and by a scatter-add into the ``d`` outputs on the CPU, where that
is several times faster; both give the same sketch.
"""

from __future__ import annotations

import math

import torch

SKETCH_VERSION = "balanced-countsketch/1"


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
        # Coordinate order[i] goes to output i // group.
        outputs = torch.arange(padded) // self.group
        self.bucket = torch.empty(padded, dtype=torch.long).scatter_(0, self.order, outputs)
        self.coordinate_signs = torch.empty(padded).scatter_(0, self.order, signs)
        self._on: dict = {}

    def _tables(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._on:
            real = slice(0, self.num_params)
            self._on[key] = (
                self.order.clamp(max=self.num_params - 1).to(device),
                self.signs.to(device=device, dtype=dtype),
                self.bucket[real].to(device),
                self.coordinate_signs[real].to(device=device, dtype=dtype),
            )
        return self._on[key]

    def project(self, grads: torch.Tensor, by_gather: bool | None = None) -> torch.Tensor:
        """Return the projected gradients, ``[B, d]`` (a ``[P]`` vector gives ``[d]``).

        ``by_gather`` chooses the summation (default: gather on CUDA, scatter-add on CPU).
        """
        single = grads.dim() == 1
        grads = grads.reshape(-1, self.num_params)
        order, signs, bucket, coordinate_signs = self._tables(grads.device, grads.dtype)
        if by_gather if by_gather is not None else grads.is_cuda:
            shuffled = grads.index_select(1, order).mul_(signs)
            projected = shuffled.view(grads.shape[0], self.dim, self.group).sum(-1)
        else:
            projected = grads.new_zeros(grads.shape[0], self.dim)
            projected.index_add_(1, bucket, grads * coordinate_signs)
        return projected[0] if single else projected
