"""A tiny float64 CNN with smooth activations (finite differences never cross a kink) and data."""

from __future__ import annotations

import torch
from torch import nn


def smooth_cnn(seed: int = 0) -> nn.Module:
    """Conv (padded) -> tanh -> conv (strided, 2x2 out) -> tanh -> linear; 2x6x6 inputs."""
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        .double()
        .eval()
    )


def images_and_labels(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``n`` random float64 images ``[n, 2, 6, 6]`` and labels in ``0..2``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 2, 6, 6, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 3, (n,), generator=generator)
