"""`FactoredGradients.layer_terms`: the backward pass without a graph stops at the layers."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tfa_widgets.core.factored import FactoredGradients, owning_modules


class _Reused(nn.Module):
    """A conv whose output an in-place ReLU and an in-place residual sum overwrite, then a conv
    called twice and a Linear layer (float64); records each gradient of its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv2d(2, 3, 3, padding=1)
        self.twice = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 3)
        self.input_gradients: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = x * 1.0  # a tensor whose gradient exists only if the first conv's is formed
            x.register_hook(self.input_gradients.append)
        out = F.relu(self.first(x), inplace=True)
        residual = self.twice(out)
        residual += out
        out = torch.tanh(self.twice(residual))
        return self.fc(out.flatten(1))


def test_layer_gradients_stop_at_the_layers_and_equal_per_example_autograd():
    model = _Reused().double().eval()
    names = [n for n, _ in model.named_parameters()]
    collector = FactoredGradients(
        model,
        owning_modules(model, names),
        model,
        functools.partial(F.cross_entropy, reduction="none"),
    )
    images = torch.randn(4, 2, 5, 5, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 2])
    pieces = torch.cat(list(collector.per_sample_grad_pieces(images, labels)), 1)
    assert not model.input_gradients  # the backward pass stopped at the first layer's output
    parameters = [p for _, p in model.named_parameters()]
    for image, label, piece in zip(images.detach(), labels, pieces, strict=True):
        loss = F.cross_entropy(model(image[None]), label[None])
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])
        # float64 sums of a few dozen O(1) products: 1e-12 of their scale is far above rounding.
        torch.testing.assert_close(
            piece, expected, rtol=0, atol=1e-12 * float(expected.abs().max())
        )
