"""The demo's small CIFAR-style ResNet (about 150k parameters).

Its residual block has torchvision's ``BasicBlock`` layout (same submodules, same parameter names,
same order of construction, so the same seeded weights), defined here because importing
torchvision's models pulls in ``torch._dynamo``: seconds on every kernel start of the explorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (torchvision's layout).

    Parameters
    ----------
    inplanes, planes : int
        Input and output channels.
    stride : int
        Stride of the first convolution.
    downsample : nn.Module, optional
        Maps the input to the output's shape for the residual (when stride or channels change).
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

        Parameters
        ----------
        x : torch.Tensor
            Feature maps ``[B, inplanes, H, W]``.

        Returns
        -------
        torch.Tensor
            Feature maps ``[B, planes, H / stride, W / stride]``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = []
    for _ in range(blocks):
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers.append(BasicBlock(inplanes, planes, stride, down))
        inplanes, stride = planes, 1
    return nn.Sequential(*layers)


class DemoResNet(nn.Module):
    """A three-stage ResNet for small images: ``stem -> layer1 -> layer2 -> layer3 -> pool -> fc``.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    widths : sequence of 3 ints
        Channels of the three stages.
    blocks : sequence of 3 ints
        Basic blocks per stage.
    strides : sequence of 3 ints
        Stride of each stage's first block (the default takes 32x32 inputs to 4x4 in ``layer3``).
    """

    def __init__(
        self,
        num_classes: int = 6,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 2),
        strides: Sequence[int] = (2, 2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.layer1 = _stage(widths[0], widths[0], blocks[0], strides[0])
        self.layer2 = _stage(widths[0], widths[1], blocks[1], strides[1])
        self.layer3 = _stage(widths[1], widths[2], blocks[2], strides[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``[B, num_classes]`` of images ``x`` ``[B, 3, H, W]``.

        Parameters
        ----------
        x : torch.Tensor
            A batch of model-space images.

        Returns
        -------
        torch.Tensor
            The logits.
        """
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
