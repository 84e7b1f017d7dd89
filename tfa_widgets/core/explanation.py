"""The value the engine hands to figures and widgets: what was computed for one test image.

An `Explanation` holds results only (scores, per-channel TFA maps, Grad-CAM), never how they
are shown: each view reduces the maps as its own settings say (`Explanation.reduced_maps`).
`SmoothGrad` lives in `tfa_widgets.core.settings` and is re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfa_widgets.core.maps import reduce_maps
from tfa_widgets.core.settings import SmoothGrad

__all__ = ["Explanation", "SmoothGrad"]


@dataclass
class Explanation:
    """Everything the explorer shows for one test image and one target class.

    Images are model-space tensors ``[C, H, W]``; ``*_display`` are RGB arrays ``[H, W, 3]``
    in [0, 1] made by the engine's ``display`` transform. TFA maps are kept per channel
    ``[k, C, H, W]``; `reduced_maps` gives per-pixel maps ``[k, H, W]``.

    Parameters
    ----------
    test_index : int or None
        Index into the test set, or None for an image given as a tensor.
    test_image, test_display : torch.Tensor
        The test image, in model space and for display.
    test_label : object
        Its label (None for an image given as a tensor).
    target : int
        The class explained.
    predicted : int
        The predicted class.
    probabilities : torch.Tensor
        Class probabilities ``[num_classes]``.
    train_indices, scores : torch.Tensor
        The ``k`` training images, best first, and their scores ``[k]``.
    train_images, train_display : torch.Tensor
        Those images, ``[k, C, H, W]`` and ``[k, H, W, 3]``.
    train_labels : list
        Their labels.
    tfa_maps_raw : torch.Tensor
        Per-channel TFA maps ``[k, C, H, W]``.
    gradcam_test : torch.Tensor
        Grad-CAM of the test image for the target, ``[H, W]``.
    gradcam_train : torch.Tensor
        Grad-CAM of each training image for its own label, ``[k, H, W]`` (the two-step
        baseline).
    gradcam_layer : str
        The name of the layer both Grad-CAMs were computed at.
    method : str
        The scorer.
    opponents : bool
        Whether these are the lowest-scoring training images.
    smooth : SmoothGrad or None
        SmoothGrad settings of the maps.
    """

    test_index: int | None
    test_image: torch.Tensor
    test_display: torch.Tensor
    test_label: int | None
    target: int
    predicted: int
    probabilities: torch.Tensor
    train_indices: torch.Tensor
    scores: torch.Tensor
    train_images: torch.Tensor
    train_display: torch.Tensor
    train_labels: list
    tfa_maps_raw: torch.Tensor
    gradcam_test: torch.Tensor
    gradcam_train: torch.Tensor
    gradcam_layer: str = ""
    method: str = "grad_cos"
    opponents: bool = False
    smooth: SmoothGrad | None = None

    @property
    def k(self) -> int:
        """Number of training images explained."""
        return int(self.train_indices.numel())

    @property
    def tfa_maps(self) -> torch.Tensor:
        """Per-pixel TFA maps ``[k, H, W]``: the signed sum over channels."""
        return self.reduced_maps()

    def reduced_maps(self, reduction: str = "signed", times_input: bool = False) -> torch.Tensor:
        """Return the TFA maps reduced over channels, ``[k, H, W]``.

        Parameters
        ----------
        reduction : {"signed", "abs"}
            Signed sum over channels, or sum of absolute values.
        times_input : bool
            Multiply the maps by the training images first (gradient × input).

        Returns
        -------
        torch.Tensor
            One map per training image.
        """
        inputs = self.train_images if times_input else None
        return reduce_maps(self.tfa_maps_raw, reduction, inputs)
