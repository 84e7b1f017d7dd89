"""The model's forward pass as the engine uses it: logits, and checked class probabilities."""

from __future__ import annotations

import torch
from torch import nn

from tfa_widgets.core.errors import NonFiniteError
from tfa_widgets.core.losses import probabilities
from tfa_widgets.core.outputs import OutputFn, read_logits


class Predictor:
    """Logits and probabilities of a model in eval mode, without gradients.

    Parameters
    ----------
    model : nn.Module
        The classifier, in eval mode.
    output : callable, optional
        Maps the model's output to its logits (see `read_logits`).
    loss : str
        ``"cross_entropy"`` (softmax) or ``"bce"`` (sigmoids).
    """

    def __init__(self, model: nn.Module, output: OutputFn | None, loss: str) -> None:
        self.model, self.output, self.loss = model, output, loss

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Return the logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        with torch.no_grad():
            return read_logits(self.model(images), self.output)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Return class probabilities ``[B, num_classes]``, after checking the logits are finite.

        Raises
        ------
        NonFiniteError
            When the model's outputs contain NaN or infinite values.
        """
        logits = self.logits(images)
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(
                "the model's outputs contain NaN or infinite values; check the model weights "
                "(e.g. a training run that diverged) and the image"
            )
        return probabilities(logits, self.loss)

    def probabilities_of(self, image: torch.Tensor) -> torch.Tensor:
        """Return the class probabilities ``[num_classes]`` of one image ``[C, H, W]``."""
        return self.probabilities(image[None])[0]
