"""2-d convolutions whose backward gives the input gradient only, for the maps' double backward.

The maps differentiate the input gradient of a backward pass again. Through the native
convolution's backward that second derivative (``_convolution_double_backward``) also forms a
weight gradient whenever the input gradient is differentiated, whether or not anything needs it:
on ResNet-18 one weight gradient per layer, about a fifth of a map's time. Here the backward is
``conv_transpose2d(G, W)``, whose own backward gives the gradient of ``G`` by ``conv2d`` and
forms a weight gradient only where one is asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode


class _InputGradientConvolution(torch.autograd.Function):
    """``conv2d`` with a backward for the input only (weight and bias get no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        # ``x`` is saved so that an in-place change to it before the backward raises, as it does
        # for the native convolution (the factored maps read the layer inputs they captured).
        ctx.save_for_backward(x, weight)
        ctx.settings = (_pair(stride), _pair(padding), _pair(dilation), groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        # The rows and columns a strided convolution never reached: conv_transpose2d's
        # output_padding restores them so that the input gradient has the input's size.
        reached = [
            (grad.shape[d] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[d] - 1)
            for i, d in enumerate((2, 3))
        ]
        extra = [x.shape[d] - 1 - r for d, r in zip((2, 3), reached, strict=True)]
        x_grad = F.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)
        return x_grad, None, None, None, None, None, None


class _InputGradientConvolutions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.conv2d:
            return func(*args, **kwargs)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        values = dict(zip(names, args, strict=False)) | kwargs
        if isinstance(values.get("padding", 0), str):  # "same" / "valid": left native
            return func(*args, **kwargs)
        return _InputGradientConvolution.apply(
            values["input"],
            values["weight"],
            values.get("bias"),
            values.get("stride", 1),
            values.get("padding", 0),
            values.get("dilation", 1),
            values.get("groups", 1),
        )


@contextlib.contextmanager
def input_gradient_convolutions() -> Iterator[None]:
    """Within this context, every ``conv2d`` differentiates to its input only (exactly: the same
    products as the native backward, without the weight gradients)."""
    with _InputGradientConvolutions():
        yield
