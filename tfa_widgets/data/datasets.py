"""An in-memory image dataset following the engine's dataset conventions."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tfa_widgets.core.errors import DatasetError, InputError
from tfa_widgets.data.transforms import Normalization


class InMemoryImageDataset(Dataset):
    """Images held as uint8 RGB, served as model-space tensors with labels, masks and notes.

    Parameters
    ----------
    images : array ``[N, H, W, 3]`` uint8
        RGB images.
    labels : array ``[N]`` of ints
        Class index of each image.
    classes : list of str
        Class names, in label order.
    normalization : Normalization
        Maps [0, 1] RGB to model space; also the ``display`` transform.
    masks : bool array ``[N, H, W]``, optional
        Object mask of each image.
    info : list of dict, optional
        Human-readable notes per image, shown by the explorer.
    name : str
        Short name used in the fingerprint and in messages.

    Raises
    ------
    DatasetError
        When the images, labels, masks or notes do not have matching, valid shapes.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        normalization: Normalization,
        masks: np.ndarray | None = None,
        info: Sequence[dict[str, str]] | None = None,
        name: str = "images",
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DatasetError(
                f"{name}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if labels.shape != (len(images),):
            raise DatasetError(f"{name}: {len(images)} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(
                f"{name}: labels must lie in [0, {len(classes)}), got {labels.max()}"
            )
        if masks is not None and masks.shape != images.shape[:3]:
            raise DatasetError(f"{name}: masks {masks.shape} do not match images {images.shape}")
        if info is not None and len(info) != len(images):
            raise DatasetError(f"{name}: {len(info)} info entries for {len(images)} images")
        self.name = name
        self.classes = list(classes)
        self.normalization = normalization
        self.display = normalization
        self.labels = torch.from_numpy(labels)
        self.images_uint8 = images
        self._pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
        self._images: torch.Tensor | None = None
        self.masks = None if masks is None else torch.from_numpy(np.asarray(masks, dtype=bool))
        self._info = list(info) if info is not None else None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _check(self, i: int) -> int:
        n = len(self)
        if not -n <= int(i) < n:
            raise InputError(f"{self.name}: index {i} out of range for {n} images")
        return int(i) % n

    @property
    def images(self) -> torch.Tensor:
        """All images in model space, ``[N, C, H, W]`` float (computed once, then kept)."""
        if self._images is None:
            self._images = self.normalization.to_model(self._pixels.float() / 255.0).contiguous()
        return self._images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._check(i)
        image = self._images[i] if self._images is not None else self._to_model(i)
        return image, int(self.labels[i])

    def _to_model(self, i: int) -> torch.Tensor:
        return self.normalization.to_model(self._pixels[i].float() / 255.0)

    def item_info(self, i: int) -> dict[str, str]:
        """Return human-readable notes on image ``i`` (empty when there is nothing to say).

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        dict of str to str
            The notes, shown by the explorer beside the image.
        """
        i = self._check(i)
        return dict(self._info[i]) if self._info is not None else {}

    def mask(self, i: int) -> torch.Tensor | None:
        """Return the object mask ``[H, W]`` (bool) of image ``i``, or None without masks.

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        torch.Tensor or None
            The mask, or None when the dataset has no masks.
        """
        i = self._check(i)
        return None if self.masks is None else self.masks[i]

    @property
    def fingerprint(self) -> str:
        """Stable content hash of images, labels, class names and normalisation."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.name.encode())
            h.update(repr((self.classes, self.normalization.mean, self.normalization.std)).encode())
            h.update(np.ascontiguousarray(self.images_uint8).tobytes())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def __repr__(self) -> str:
        h, w = self._pixels.shape[-2:]
        n_classes = len(self.classes)
        return (
            f"{type(self).__name__}({self.name!r}, {len(self)} images {h}x{w}, {n_classes} classes)"
        )
