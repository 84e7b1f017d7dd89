"""Grad-CAM and input-gradient saliency, computed with Captum.

Conventions follow pytorch-grad-cam: ReLU on the map, min-max scaled to [0, 1] per image,
resized to the input; the default layer is the last convolution whose output is at least
4×4 for the input size.
"""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from torch import nn

from tfa_widgets.core.errors import InputError

MIN_CAM_SIZE = 4


def resolve_layer(model: nn.Module, layer: str | nn.Module | None, example: torch.Tensor):
    """Return the module Grad-CAM hooks, choosing the default when ``layer`` is ``None``."""
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer is not None:
        if layer not in modules or layer == "":
            convs = [name for name, m in modules.items() if isinstance(m, nn.Conv2d)]
            raise InputError(
                f"unknown layer {layer!r} for Grad-CAM; convolutional layers are {convs[-8:]}, "
                f"blocks include {[n for n in modules if n and '.' not in n][:10]}"
            )
        return modules[layer]
    return default_layer(model, example)


def default_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Return the last convolution (in execution order) with an output of at least 4×4."""
    outputs: list[tuple[nn.Module, tuple]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _, out: outputs.append((mod, tuple(out.shape[-2:]))))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    large = [m for m, size in outputs if min(size) >= MIN_CAM_SIZE]
    if not large:
        raise InputError(
            "the model has no convolutional layer with an output of at least 4×4 for this input "
            "size; pass a layer name to Grad-CAM"
        )
    return large[-1]


def gradcam(
    model: nn.Module, images: torch.Tensor, targets: list[int] | torch.Tensor, layer: nn.Module
) -> torch.Tensor:
    """Return Grad-CAM maps ``[B, H, W]`` in [0, 1] for ``images [B, C, H, W]``."""
    attribution = LayerGradCam(model, layer).attribute(
        images, target=torch.as_tensor(targets).tolist(), relu_attributions=True
    )
    resized = LayerAttribution.interpolate(attribution, tuple(images.shape[-2:]), "bilinear")
    return minmax_scale(resized[:, 0].detach())


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``[B, H, W]`` to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low).clamp_min(1e-12)
    return ((maps - low) / span).clamp(0, 1)


def saliency(model: nn.Module, images: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Return the plain input gradient of each target logit, shaped like ``images``."""
    inputs = images.detach().clone().requires_grad_(True)
    return Saliency(model).attribute(inputs, target=list(targets), abs=False).detach()
