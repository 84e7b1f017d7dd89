"""Convolutions differentiated to their input only: first and second derivatives equal the native
convolution's (float64 autograd), on strided, dilated, grouped convs of odd-sized inputs."""

from __future__ import annotations

import pytest
import torch
from precision import gamma

from tfa_widgets.core.lean_convolution import input_gradient_convolutions

pytestmark = pytest.mark.portability


def input_gradient_and_its_gradient(conv, x, upstream, probe):
    """``g = ∂<conv(x), upstream>/∂x`` with the graph kept, then ``∂<g, probe>/∂(x, upstream)``
    through a nonlinearity, so the second derivative reaches both."""
    g = torch.autograd.grad((torch.tanh(conv(x)) * upstream).sum(), x, create_graph=True)[0]
    return (g, *torch.autograd.grad((g * probe).sum(), (x, upstream)))


@pytest.mark.parametrize(
    ("settings", "shape"),
    [
        ({"stride": 2, "padding": 1}, (7, 6)),  # rows and columns the stride never reaches
        ({"stride": (2, 3), "padding": (0, 2), "dilation": (2, 1)}, (9, 8)),
        ({"padding": 1, "groups": 2}, (5, 5)),
    ],
)
def test_input_gradients_and_their_derivatives_equal_the_native_ones(settings, shape):
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, **settings).double()
    x = torch.randn(3, 4, *shape, generator=generator, dtype=torch.float64, requires_grad=True)
    out_shape = conv(x).shape
    upstream = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    upstream.requires_grad_(True)
    probe = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    expected = input_gradient_and_its_gradient(conv, x, upstream, probe)
    with input_gradient_convolutions():
        y = conv(x)
    assert y.grad_fn is not None and "InputGradient" in type(y.grad_fn).__name__
    actual = input_gradient_and_its_gradient(lambda _: y, x, upstream, probe)
    # The same products, maybe summed in another order: gamma of the longest chain of sums (the
    # fan-in, in/groups × taps, times the taps reaching one input position, and the output
    # channels), relative to the largest value.
    terms = conv.weight[0].numel() * conv.weight[0, 0].numel() * conv.out_channels
    bound = 4 * gamma(terms, torch.float64)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=bound, atol=bound * float(e.detach().abs().max()))
