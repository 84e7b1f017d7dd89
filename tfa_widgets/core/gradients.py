"""Per-sample parameter gradients, exact gradient dot products, and their input gradients.

All functions take gradients over a chosen subset of parameters, flattened into one vector
per example in the order of ``GradientModel.names``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from tfa_widgets.core.losses import example_loss


class GradientModel:
    """A model seen as a function of the selected parameters, one example at a time.

    Parameters
    ----------
    model : nn.Module
        The model, in eval mode.
    names : list of str
        Names of the parameters gradients are taken over.
    loss : str
        ``"cross_entropy"`` or ``"bce"``.
    state : dict, optional
        Parameters and buffers to use instead of the model's own (e.g. a TracIn checkpoint).
    chunk_size : int
        Examples per vmapped chunk, bounding the memory of per-sample work.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        loss: str,
        state: dict[str, torch.Tensor] | None = None,
        chunk_size: int = 32,
    ) -> None:
        self.model = model
        self.names = list(names)
        self.loss = loss
        self.chunk_size = chunk_size
        if state is None:
            state = {n: p.detach() for n, p in model.named_parameters()}
            state.update({n: b.detach() for n, b in model.named_buffers()})
        self.params = {n: state[n] for n in self.names}
        self.frozen = {n: t for n, t in state.items() if n not in self.params}
        self.shapes = [p.shape for p in self.params.values()]
        self.sizes = [p.numel() for p in self.params.values()]
        self.num_params = sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
        """Concatenate per-parameter tensors into vectors (``[P]`` or ``[B, P]``)."""
        start = 1 if batched else 0
        return torch.cat([tensors[n].flatten(start) for n in self.names], dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector ``[P]`` back into per-parameter tensors."""
        pieces = vector.split(self.sizes, dim=-1)
        return {
            n: piece.reshape(shape)
            for n, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def _loss(self, params: dict, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, (params, self.frozen), (image.unsqueeze(0),))
        return example_loss(logits[0], target, self.loss)

    def per_sample_grads(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the flattened loss gradient of each example, ``[B, P]``."""
        grads = vmap(grad(self._loss), in_dims=(None, 0, 0), chunk_size=self.chunk_size)(
            self.params, images, targets
        )
        return self.flatten(grads, batched=True)

    def gradient(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the flattened loss gradient of one example, ``[P]``."""
        return self.flatten(grad(self._loss)(self.params, image, target))

    def dots_along(
        self, images: torch.Tensor, targets: torch.Tensor, direction: torch.Tensor
    ) -> torch.Tensor:
        """Return ``<g_i, direction>`` for each example without forming ``g_i``, ``[B]``.

        One forward-mode pass: the directional derivative of every per-example loss along
        the fixed parameter direction.
        """
        tangent = self.unflatten(direction.to(images.dtype))

        def losses(params: dict) -> torch.Tensor:
            return vmap(self._loss, in_dims=(None, 0, 0))(params, images, targets)

        _, dots = jvp(losses, (self.params,), (tangent,))
        return dots

    def input_grads_of_dots(
        self, images: torch.Tensor, targets: torch.Tensor, directions: torch.Tensor
    ) -> torch.Tensor:
        """Return ``∇_x <g(x_i, y_i), v_i>`` for each example, shaped like ``images``.

        Reverse-over-forward: a JVP in parameter space along ``v_i``, then a gradient in the
        input, vmapped over examples (no Python loop over pairs).
        """

        def dot_along(image: torch.Tensor, target: torch.Tensor, vector: torch.Tensor):
            tangent = self.unflatten(vector)
            return jvp(lambda p: self._loss(p, image, target), (self.params,), (tangent,))[1]

        return vmap(grad(dot_along), chunk_size=self.chunk_size)(images, targets, directions)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch, ``[B, num_classes]``."""
        with torch.no_grad():
            return functional_call(self.model, (self.params, self.frozen), (images,))


def batched_apply(
    fn: Callable[..., torch.Tensor], batch_size: int, *tensors: torch.Tensor
) -> torch.Tensor:
    """Apply ``fn`` to consecutive slices of ``tensors`` and concatenate the results."""
    n = tensors[0].shape[0]
    return torch.cat(
        [fn(*(t[i : i + batch_size] for t in tensors)) for i in range(0, n, batch_size)]
    )
