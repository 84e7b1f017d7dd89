"""The engine's reference maps (Grad-CAM, saliency, Integrated Gradients) of checked inputs.

Checks the images and targets, resolves and caches the layer a layer map is computed at, runs
one of `tfa_widgets.core.reference_maps` and checks the result is finite. An explanation's two
Grad-CAMs (the test image for its target, the training images for their own labels) are one
batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tfa_widgets.core.errors import InputError, NonFiniteError
from tfa_widgets.core.gradcam import resolve_layer, targets_for
from tfa_widgets.core.outputs import OutputFn
from tfa_widgets.core.query import Query
from tfa_widgets.core.reference_maps import REFERENCE_MAPS, make_reference_map
from tfa_widgets.core.validation import check_class, check_image

Layer = str | nn.Module | None


class ReferenceMapService:
    """Reference maps of one engine's model.

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    output : callable, optional
        Maps the model's output to its logits (see `read_logits`).
    image_shape : tuple of int
        ``(C, H, W)`` of the training images.
    num_classes : int
    device : torch.device
    dtype : torch.dtype
        Where and in what precision the model runs.
    """

    def __init__(
        self,
        model: nn.Module,
        output: OutputFn | None,
        image_shape: tuple[int, ...],
        num_classes: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model, self.output = model, output
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.device, self.dtype = device, dtype
        self._layers: dict = {}

    def maps(
        self, image: torch.Tensor, target: int | Sequence[int], kind: str, layer: Layer
    ) -> torch.Tensor:
        """Return the maps of `TFAEngine.reference_maps` (it documents them).

        Raises
        ------
        InputError
            When the image is not ``[C, H, W]`` or ``[B, C, H, W]`` of the training images'
            shape, a target is out of range, or the kind or the layer is unknown.
        NonFiniteError
            When the maps are NaN or infinite.
        """
        single = isinstance(image, torch.Tensor) and image.dim() == 3
        batch = image[None] if single else image
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise InputError(
                f"{kind} needs an image [C, H, W] or a batch [B, C, H, W], "
                f"got {getattr(image, 'shape', image)!r}"
            )
        for row in batch:
            check_image(row, self.image_shape, f"{kind} image")
        batch = batch.to(self.device, self.dtype)
        targets = [check_class(t, self.num_classes) for t in targets_for(target, len(batch))]
        needs_layer = kind in REFERENCE_MAPS and REFERENCE_MAPS[kind].needs_layer
        module = self.layer(layer, batch) if needs_layer else None
        method = make_reference_map(kind, module)
        maps = method.attribute(self.model, batch, targets, self.output).float().cpu()
        if not bool(torch.isfinite(maps).all()):
            raise NonFiniteError(
                f"{kind} is NaN or infinite: the model's activations or gradients are not "
                "finite; check the model weights (e.g. a training run that diverged)"
            )
        return maps[0] if single else maps

    def layer(self, layer: Layer, batch: torch.Tensor) -> nn.Module:
        """Return the module of ``layer`` (resolved once per name or module).

        Raises
        ------
        InputError
            When the layer is unknown or has no spatial output.
        """
        key = layer if isinstance(layer, str | type(None)) else id(layer)
        if key not in self._layers:
            self._layers[key] = resolve_layer(self.model, layer, batch)
        return self._layers[key]

    def layer_name(self, layer: Layer) -> str:
        """Return the name in ``model.named_modules()`` of the module of ``layer``."""
        example = torch.zeros((1, *self.image_shape), device=self.device, dtype=self.dtype)
        module = self.layer(layer, example)
        return next(name for name, m in self.model.named_modules() if m is module)

    def gradcams(
        self, query: Query, images: torch.Tensor, own: list[int], layer: Layer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return Grad-CAM of the test image (its target) and of ``images`` (their own
        classes ``own``), computed as one batch."""
        both = torch.cat([query.image[None], images])
        maps = self.maps(both, [query.target, *own], "gradcam", layer)
        return maps[0], maps[1:]
