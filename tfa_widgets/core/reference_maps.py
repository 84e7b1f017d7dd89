"""Feature-attribution maps TFA is compared with, behind one small interface, in a registry.

Each reference map is a class with a ``name`` (its registry key), a ``label`` for people and one
verb, ``attribute(model, images, targets, output)``: Grad-CAM (Selvaraju et al. 2017) at a
layer, the plain input gradient (saliency, Simonyan et al. 2014) and Integrated Gradients
(Sundararajan et al. 2017). All go through Captum, imported when a map is first computed, so
importing the core stays light. The explorer's baseline choice and the evaluation offer
`REFERENCE_MAPS`; adding one is one class here and its tests.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.gradcam import gradcam
from tfa_widgets.core.outputs import OutputFn, logits_function


@runtime_checkable
class ReferenceMap(Protocol):
    """One feature-attribution method on the images themselves."""

    name: ClassVar[str]  # the registry key, e.g. "gradcam"
    label: ClassVar[str]  # for people, e.g. "Grad-CAM"
    needs_layer: ClassVar[bool]  # whether it is computed at a layer

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: list[int],
        output: OutputFn | None = None,
    ) -> torch.Tensor:
        """Return the maps of ``images [B, C, H, W]`` for one class each: ``[B, H, W]`` for a
        layer map, ``[B, C, H, W]`` for an input-space attribution."""
        ...


class GradCAM:
    """Grad-CAM at ``layer``: ReLU-ed, min-max scaled to [0, 1] per image, resized, ``[B, H, W]``.

    Parameters
    ----------
    layer : nn.Module
        The module whose activations are weighted by their pooled gradients.
    """

    name: ClassVar[str] = "gradcam"
    label: ClassVar[str] = "Grad-CAM"
    needs_layer: ClassVar[bool] = True

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: list[int],
        output: OutputFn | None = None,
    ) -> torch.Tensor:
        """Return Grad-CAM ``[B, H, W]`` in [0, 1].

        Parameters
        ----------
        model : nn.Module
            The classifier, in eval mode.
        images : torch.Tensor
            ``[B, C, H, W]`` in model space.
        targets : list of int
            One class per image.
        output : callable, optional
            Maps the model's output to its logits.

        Returns
        -------
        torch.Tensor
            The maps.
        """
        return gradcam(model, images, targets, self.layer, output)


class InputGradient:
    """Saliency: the gradient of the target logit with respect to the image, ``[B, C, H, W]``."""

    name: ClassVar[str] = "saliency"
    label: ClassVar[str] = "saliency"
    needs_layer: ClassVar[bool] = False

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: list[int],
        output: OutputFn | None = None,
    ) -> torch.Tensor:
        """Return the signed input gradients ``[B, C, H, W]``.

        Parameters
        ----------
        model : nn.Module
            The classifier, in eval mode.
        images : torch.Tensor
            ``[B, C, H, W]`` in model space.
        targets : list of int
            One class per image.
        output : callable, optional
            Maps the model's output to its logits.

        Returns
        -------
        torch.Tensor
            The gradients.
        """
        from captum.attr import Saliency

        inputs = images.detach().clone().requires_grad_(True)
        forward = logits_function(model, output)
        return Saliency(forward).attribute(inputs, target=list(targets), abs=False).detach()


class IntegratedGradients:
    """Integrated Gradients: ``(x − x₀) ⊙ ∫₀¹ ∇f(x₀ + α(x − x₀)) dα``, ``[B, C, H, W]``.

    The integral by Gauss-Legendre quadrature (Captum's default); the maps sum to
    ``f(x) − f(x₀)`` up to its error (completeness). For a linear model they are exactly
    ``(x − x₀) ⊙ w``.

    Parameters
    ----------
    steps : int
        Quadrature points.
    baseline : float
        The constant image ``x₀`` (0: black in model space).

    Raises
    ------
    InputError
        When ``steps`` is not a positive integer.
    """

    name: ClassVar[str] = "integrated_gradients"
    label: ClassVar[str] = "Integrated Gradients"
    needs_layer: ClassVar[bool] = False

    def __init__(self, steps: int = 32, baseline: float = 0.0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"Integrated Gradients needs steps >= 1, got {steps!r}")
        self.steps, self.baseline = steps, float(baseline)

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: list[int],
        output: OutputFn | None = None,
    ) -> torch.Tensor:
        """Return the attributions ``[B, C, H, W]``.

        Parameters
        ----------
        model : nn.Module
            The classifier, in eval mode.
        images : torch.Tensor
            ``[B, C, H, W]`` in model space.
        targets : list of int
            One class per image.
        output : callable, optional
            Maps the model's output to its logits.

        Returns
        -------
        torch.Tensor
            The attributions.
        """
        from captum.attr import IntegratedGradients as CaptumIntegratedGradients

        method = CaptumIntegratedGradients(logits_function(model, output))
        baselines = torch.full_like(images, self.baseline)
        maps = method.attribute(
            images.detach(), baselines, target=list(targets), n_steps=self.steps
        )
        return maps.detach()


REFERENCE_MAPS: dict[str, type] = {
    cls.name: cls for cls in (GradCAM, InputGradient, IntegratedGradients)
}


def make_reference_map(name: str, layer: nn.Module | None = None) -> ReferenceMap:
    """Return the reference map registered as ``name``.

    Parameters
    ----------
    name : str
        A key of `REFERENCE_MAPS`.
    layer : nn.Module, optional
        The layer of a map computed at one (Grad-CAM).

    Returns
    -------
    ReferenceMap
        Ready to ``attribute``.

    Raises
    ------
    InputError
        When ``name`` is not registered, or a layer map is asked for without a layer.
    """
    if name not in REFERENCE_MAPS:
        raise InputError(f"unknown reference map {name!r}; choose one of {tuple(REFERENCE_MAPS)}")
    cls = REFERENCE_MAPS[name]
    if cls.needs_layer:
        if layer is None:
            raise InputError(f"the reference map {name!r} needs a layer")
        return cls(layer)
    return cls()
