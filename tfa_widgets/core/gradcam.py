"""Grad-CAM (computed here, as Captum's ``LayerGradCam`` does, without importing Captum) and
the layer it is computed at.

Conventions follow pytorch-grad-cam: ReLU on the map, min-max scaled to [0, 1] per image,
resized to the input; the default layer is the last convolution whose output is at least
4×4 for the input size.

Grad-CAM is computed here with one forward hook (the explorer computes it for every view), and
Captum, which the saliency and Integrated Gradients reference maps use, is imported only when
they are asked for (`tfa_widgets.core.reference_maps`): ``captum.attr`` imports
``matplotlib.pyplot`` and its LLM attribution code, 37 MB and 1.9 s in every explorer kernel.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.outputs import OutputFn, logits_function

MIN_CAM_SIZE = 4


def resolve_layer(model: nn.Module, layer: str | nn.Module | None, example: torch.Tensor):
    """Return the module Grad-CAM hooks, choosing the default when ``layer`` is ``None``.

    Raises
    ------
    InputError
        When ``layer`` is not a module of ``model``, is never called by its forward, or has
        no spatial output ``[B, C, H, W]`` to weight.
    """
    modules = dict(model.named_modules())
    if layer is None:
        return default_layer(model, example)
    if isinstance(layer, nn.Module):
        names = [name for name, module in modules.items() if module is layer]
        if not names:
            raise InputError(
                f"the Grad-CAM layer {type(layer).__name__} is not part of the model; pass one "
                f"of the model's own modules (or its name, e.g. {_conv_names(modules)[-1:]})"
            )
        name = names[0]
    elif layer in modules and layer != "":
        name = layer
    else:
        raise InputError(
            f"unknown layer {layer!r} for Grad-CAM; convolutional layers are "
            f"{_conv_names(modules)[-8:]}, blocks include "
            f"{[n for n in modules if n and '.' not in n][:10]}"
        )
    _check_spatial_output(model, modules[name], name, example, modules)
    return modules[name]


def _conv_names(modules: dict[str, nn.Module]) -> list[str]:
    return [name for name, m in modules.items() if isinstance(m, nn.Conv2d)]


def _check_spatial_output(model, module, name, example, modules) -> None:
    shapes: list[tuple] = []
    hook = module.register_forward_hook(
        lambda _, __, out: shapes.append(tuple(getattr(out, "shape", ())))
    )
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        hook.remove()
    if not shapes:
        raise InputError(
            f"the Grad-CAM layer {name!r} is never called by the model's forward; choose one of "
            f"the layers it uses, e.g. {_conv_names(modules)[-4:]}"
        )
    if len(shapes[-1]) != 4:
        raise InputError(
            f"Grad-CAM needs a layer with a spatial output [B, C, H, W], but layer {name!r} "
            f"({type(module).__name__}) gives an output of shape {shapes[-1]}; choose a "
            f"convolutional layer or block, e.g. {_conv_names(modules)[-4:]}"
        )


def targets_for(target, count: int) -> list:
    """Return one class target per image: ``target`` repeated, or the ``count`` given.

    ``target`` is a class index (Python, NumPy or 0-d tensor integer) or a sequence of
    ``count`` of them; the classes themselves are checked by the caller.
    """
    if isinstance(target, torch.Tensor | np.ndarray) and target.ndim == 0:
        target = target.item()
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return [int(target)] * count
    if isinstance(target, str) or not isinstance(target, Sequence | torch.Tensor | np.ndarray):
        return [target] * count
    targets = list(target)
    if len(targets) != count:
        raise InputError(
            f"Grad-CAM got {len(targets)} targets for {count} images; give one class, or one "
            "class per image"
        )
    return [t.item() if isinstance(t, torch.Tensor | np.generic) else t for t in targets]


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
    model: nn.Module,
    images: torch.Tensor,
    targets: list[int] | torch.Tensor,
    layer: nn.Module,
    output: OutputFn | None = None,
) -> torch.Tensor:
    """Return Grad-CAM maps ``[B, H, W]`` in [0, 1] for ``images [B, C, H, W]``.

    ``ReLU(Σ_c mean_hw(∂y/∂A_c) A_c)`` with ``A`` the layer's output and ``y`` each image's
    target logit, resized bilinearly to the input and min-max scaled: what Captum's
    ``LayerGradCam(relu_attributions=True)`` and ``LayerAttribution.interpolate`` compute (the
    tests compare them), without importing Captum into every explorer kernel. ``output`` maps
    the model's output to its logits (see `read_logits`).
    """
    activations: list[torch.Tensor] = []

    def keep(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
        out = out if out.requires_grad else out.detach().requires_grad_(True)
        activations.append(out)
        return out

    hook = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = logits_function(model, output)(images)
            rows = torch.arange(len(images), device=logits.device)
            chosen = logits[rows, torch.as_tensor(targets, device=logits.device)]
            activation = activations[-1]
            grads = torch.autograd.grad(chosen.sum(), activation)[0]
    finally:
        hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    resized = nn.functional.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear")
    return minmax_scale(resized[:, 0])


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``[B, H, W]`` to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low).clamp_min(1e-12)
    return ((maps - low) / span).clamp(0, 1)
