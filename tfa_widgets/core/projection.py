"""Seeded random projections of gradients that never form a projection matrix.

A CountSketch with a block structure: the ``P`` coordinates are cut into consecutive blocks of
``d``; each coordinate is multiplied by a random sign and block ``r`` is added to the ``d``
outputs cyclically shifted by a random offset ``o_r``, so coordinate ``r·d + c`` lands in
output ``(c + o_r) mod d``. Two coordinates of one block never collide and two of different
blocks collide with probability exactly ``1/d``, so inner products are kept in expectation
with at most the variance of a CountSketch (or a Gaussian Johnson-Lindenstrauss projection),
``(‖a‖²‖b‖² + ⟨a, b⟩²) / d``. Only the signs and the offsets are stored. On the CPU the sketch
is two fused multiply-adds of contiguous slices per block (a streaming pass, no scatter); on
CUDA one gather over all coordinates and a sum. Both give the same sketch.
"""

from __future__ import annotations

import math

import torch

SKETCH_VERSION = "shifted-block-countsketch/1"


class RandomProjector:
    """Project ``[B, P]`` gradients to ``[B, d]``, keeping inner products approximately.

    Parameters
    ----------
    num_params : int
        ``P``, the length of the gradients.
    dim : int
        ``d``, the projected dimension (at most ``P``).
    seed : int
        Seed of the signs and the block offsets.
    """

    def __init__(self, num_params: int, dim: int, seed: int = 0) -> None:
        self.num_params = num_params
        self.dim = min(dim, num_params)
        self.seed = seed
        self.blocks = math.ceil(num_params / self.dim)
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, self.dim, (self.blocks,), generator=generator).tolist()
        padded = self.blocks * self.dim
        signs = torch.randint(0, 2, (padded,), generator=generator).float() * 2 - 1
        self.signs = signs[:num_params]
        self._on: dict = {}

    def _signs(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = ("signs", device, dtype)
        if key not in self._on:
            self._on[key] = self.signs.to(device=device, dtype=dtype)
        return self._on[key]

    def _gather_order(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates summed into each output, ``[d · blocks]`` (output-major), and a mask
        that is zero where a block runs past ``P``."""
        key = ("order", device)
        if key not in self._on:
            outputs = torch.arange(self.dim)[:, None]
            blocks = torch.arange(self.blocks)[None, :]
            offsets = torch.tensor(self.offsets)[None, :]
            order = (blocks * self.dim + (outputs - offsets) % self.dim).flatten()
            real = order < self.num_params
            self._on[key] = (order.clamp(max=self.num_params - 1).to(device), real.to(device))
        return self._on[key]

    def project(self, grads: torch.Tensor, by_gather: bool | None = None) -> torch.Tensor:
        """Return the projected gradients, ``[B, d]`` (a ``[P]`` vector gives ``[d]``).

        ``by_gather`` chooses the summation (default: gather on CUDA, slice-adds on CPU).
        """
        single = grads.dim() == 1
        grads = grads.reshape(-1, self.num_params)
        if by_gather if by_gather is not None else grads.is_cuda:
            order, real = self._gather_order(grads.device)
            signed = grads * self._signs(grads.device, grads.dtype)
            shuffled = signed.index_select(1, order).mul_(real)
            projected = shuffled.view(grads.shape[0], self.dim, self.blocks).sum(-1)
        else:
            projected = grads.new_zeros(grads.shape[0], self.dim)
            self.accumulate(projected, grads, 0)
        return projected[0] if single else projected

    def accumulate(self, projected: torch.Tensor, block: torch.Tensor, start: int) -> None:
        """Add the sketch of coordinates ``start : start + n``, given as ``block`` ``[B, n]``,
        to ``projected`` ``[B, d]`` in place.

        Summed over consecutive blocks covering all ``P`` coordinates this equals `project`
        of their concatenation, which then never has to be formed.
        """
        end = start + block.shape[1]
        block = block.to(projected.dtype)
        signs = self._signs(block.device, projected.dtype)
        position = start
        while position < end:
            row, column = divmod(position, self.dim)
            stop = min(end, (row + 1) * self.dim)
            target = (column + self.offsets[row]) % self.dim
            split = min(stop, position + self.dim - target)  # the rest wraps around to output 0
            for first, last, output in ((position, split, target), (split, stop, 0)):
                if last > first:
                    projected[:, output : output + last - first].addcmul_(
                        block[:, first - start : last - start], signs[first:last]
                    )
            position = stop
