"""Small models and datasets for the core tests (float64, so finite differences are exact)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def small_cnn(num_classes: int = 3, channels: int = 3, seed: int = 0) -> nn.Module:
    """Return a float64 CNN with conv, BatchNorm (random running stats), ReLU, max-pool, linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, num_classes),
    ).double()
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.2)
    return model.eval()


def small_dataset(n: int, channels: int = 3, size: int = 8, num_classes: int = 3, seed: int = 1):
    """Return a float64 TensorDataset of random images with random labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, size, size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return TensorDataset(images, labels)


def conv_paths_model(seed: int = 0) -> nn.Module:
    """Return a float64 CNN (16x16 inputs) whose convs take every factored path: grouped,
    unfold + bmm and ghost norms, a layer called twice; strides, dilation, odd kernels."""
    torch.manual_seed(seed)
    shared = nn.Conv2d(12, 12, 1)  # 1x2, called twice: not by ghost norms
    return (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),  # 16x16: grouped in maps too
            nn.ReLU(),
            nn.Conv2d(4, 5, (3, 1), stride=(2, 1), padding=(1, 0)),  # 8x16
            nn.Conv2d(5, 4, 3, dilation=2, padding=2, bias=False),  # 8x16
            nn.Conv2d(4, 6, 1, stride=2),  # 4x8: unfold
            nn.Conv2d(6, 12, 3, stride=4, padding=1),  # 1x2: ghost norms in maps
            shared,
            nn.ReLU(),
            shared,
            nn.Flatten(),
            nn.Linear(24, 3),
        )
        .double()
        .eval()
    )
