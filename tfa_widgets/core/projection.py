"""Seeded random projections of gradients that never form the projection matrix.

A subsampled randomized Fourier transform (SRFT): flip the sign of each coordinate at
random, apply an orthogonal real Fourier transform, keep ``d`` coordinates chosen at random
and rescale by ``sqrt(P / d)``. Like a Gaussian matrix it keeps inner products in
expectation (Johnson-Lindenstrauss), but it costs ``O(P log P)`` per gradient and stores only
``P`` signs and ``d`` indices, all regenerated from the seed. Gradients are zero-padded to a
length with no prime factor above 5, where FFTs are fast (a large prime factor would make
them many times slower).
"""

from __future__ import annotations

import math

import torch


def fft_friendly_length(n: int) -> int:
    """Return the smallest length ``>= n`` whose only prime factors are 2, 3 and 5."""
    best = 1 << max(n - 1, 0).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            length = power35
            while length < n:
                length *= 2
            best = min(best, length)
            power35 *= 3
        power5 *= 5
    return best


def orthogonal_real_fft(x: torch.Tensor) -> torch.Tensor:
    """Return an orthogonal real transform of the rows of ``x`` (same shape, same norms).

    The orthonormal real FFT written as real numbers: ``X_0``, then ``√2 Re X_k`` and
    ``√2 Im X_k`` for ``0 < k < n/2``, then ``X_{n/2}`` when ``n`` is even.
    """
    n = x.shape[-1]
    spectrum = torch.fft.rfft(x, norm="ortho")
    inner = spectrum[..., 1 : (n + 1) // 2] * math.sqrt(2.0)
    parts = [spectrum[..., :1].real, inner.real, inner.imag]
    if n % 2 == 0:
        parts.append(spectrum[..., -1:].real)
    return torch.cat(parts, dim=-1)


class RandomProjector:
    """Project ``[B, P]`` gradients to ``[B, d]``, keeping inner products approximately.

    Parameters
    ----------
    num_params : int
        ``P``, the length of the gradients.
    dim : int
        ``d``, the projected dimension (at most ``P``).
    seed : int
        Seed of the signs and of the kept coordinates.
    """

    def __init__(self, num_params: int, dim: int, seed: int = 0) -> None:
        self.num_params = num_params
        self.length = fft_friendly_length(num_params)
        self.dim = min(dim, num_params)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (num_params,), generator=generator).float() * 2 - 1
        self.kept = torch.randperm(self.length, generator=generator)[: self.dim]
        self.scale = math.sqrt(self.length / self.dim)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Return the projected gradients, ``[B, d]`` (a ``[P]`` vector gives ``[d]``)."""
        signs = self.signs.to(device=grads.device, dtype=grads.dtype)
        padded = torch.nn.functional.pad(grads * signs, (0, self.length - self.num_params))
        mixed = orthogonal_real_fft(padded)
        return mixed[..., self.kept.to(grads.device)] * self.scale
