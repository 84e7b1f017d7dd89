"""The demo's small CIFAR-style ResNet (about 150k parameters), built from torchvision blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


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
