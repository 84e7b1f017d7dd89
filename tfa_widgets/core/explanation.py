"""Value objects passed from the engine to figures and widgets."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from tfa_widgets.core.errors import InputError


@dataclass(frozen=True)
class SmoothGrad:
    """SmoothGrad settings for TFA maps.

    Parameters
    ----------
    n : int
        Number of noisy copies averaged per training image.
    sigma : float
        Noise standard deviation as a fraction of the input range (max - min) of the image.
    seed : int
        Seed of the noise, so the same settings give the same maps.
    """

    n: int = 16
    sigma: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_integer(self.n) or self.n < 1:
            raise InputError(
                f"SmoothGrad needs a whole number of noise samples n >= 1, got n={self.n!r}"
            )
        if (
            isinstance(self.sigma, bool)
            or not isinstance(self.sigma, numbers.Real)
            or not 0.0 <= self.sigma < 10.0
        ):
            raise InputError(
                f"SmoothGrad sigma is a fraction of the input range and must be a number in "
                f"[0, 10), got sigma={self.sigma!r}"
            )
        if not _is_integer(self.seed):
            raise InputError(f"SmoothGrad seed must be an integer, got seed={self.seed!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class Explanation:
    """Everything the explorer shows for one test image and one target class.

    Images are model-space tensors ``[C, H, W]``; ``*_display`` are RGB arrays ``[H, W, 3]``
    in [0, 1] made by the engine's ``display`` transform. Maps are ``[k, H, W]`` after channel
    reduction; ``tfa_maps_raw`` keeps the per-channel gradients ``[k, C, H, W]``.

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
    tfa_maps : torch.Tensor
        Channel-reduced TFA maps ``[k, H, W]``.
    tfa_maps_raw : torch.Tensor
        Per-channel TFA maps ``[k, C, H, W]``.
    gradcam_test : torch.Tensor
        Grad-CAM of the test image for the target, ``[H, W]``.
    gradcam_train : torch.Tensor
        Grad-CAM of each training image for its own label, ``[k, H, W]`` (the two-step
        baseline).
    method : str
        The scorer.
    opponents : bool
        Whether these are the lowest-scoring training images.
    smooth : SmoothGrad or None
        SmoothGrad settings of the maps.
    reduction : str
        The channel reduction of ``tfa_maps``.
    extras : dict
        Anything else (e.g. ``times_input``).
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
    tfa_maps: torch.Tensor
    tfa_maps_raw: torch.Tensor
    gradcam_test: torch.Tensor
    gradcam_train: torch.Tensor
    method: str = "grad_cos"
    opponents: bool = False
    smooth: SmoothGrad | None = None
    reduction: str = "signed"
    extras: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Number of training images explained."""
        return int(self.train_indices.numel())
