"""Reading the datasets: checked ``(image, label)`` items, training batches on the device.

Every training image the engine uses goes through `TrainingData`, so an explanation can load
its ``k`` images once and hand the same tensors to the maps, Grad-CAM and the display.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from tfa_widgets.core.errors import DatasetError
from tfa_widgets.core.loading import load_items
from tfa_widgets.core.losses import encode_labels
from tfa_widgets.core.prediction import Predictor


@dataclass
class TrainingBatch:
    """Training images with their labels, as the dataset gives them and as the loss takes them.

    Attributes
    ----------
    indices : list of int
        Their indices in the training set.
    images : Tensor
        ``[B, C, H, W]`` on the engine's device, in the model's dtype.
    labels : list
        The labels as the dataset yields them.
    targets : Tensor
        The labels encoded for the loss (class indices, or multi-hot vectors).
    """

    indices: list[int]
    images: torch.Tensor
    labels: list
    targets: torch.Tensor


class TrainingData:
    """The training set as the engine reads it: checked items, on the device, in the model dtype.

    Parameters
    ----------
    dataset : Dataset
        Map-style, yielding ``(image [C, H, W], label)``.
    device : torch.device
        Where images go.
    dtype : torch.dtype
        The model's floating-point type.
    predictor : Predictor
        The model, asked once for the number of classes.

    Raises
    ------
    DatasetError
        When the dataset is not a non-empty map-style dataset of ``(image [C, H, W], label)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device,
        dtype: torch.dtype,
        predictor: Predictor,
        num_workers: int = 0,
    ) -> None:
        check_dataset(dataset, "training set")
        self.dataset, self.device, self.dtype, self.loss = dataset, device, dtype, predictor.loss
        self.num_workers = num_workers
        self.image_shape = tuple(dataset_item(dataset, 0, "training set")[0].shape)
        first_image, first_label = self.items([0])
        self.num_classes = int(predictor.logits(first_image).shape[1])
        encode_labels(first_label, self.loss, self.num_classes, [0])
        self.class_names = _class_names(dataset, self.num_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def items(self, indices: Sequence[int]) -> tuple[torch.Tensor, list]:
        """Return training images ``[B, C, H, W]`` on the device and their labels.

        Raises
        ------
        DatasetError
            When an image does not have the first image's shape.
        """
        items = [dataset_item(self.dataset, int(i), "training set") for i in indices]
        return self._stack(indices, items)

    def _stack(self, indices: Sequence[int], items: list) -> tuple[torch.Tensor, list]:
        for i, (image, _) in zip(indices, items, strict=True):
            if tuple(image.shape) != self.image_shape:
                raise DatasetError(
                    f"training image {i} has shape {tuple(image.shape)}, but the first one has "
                    f"{self.image_shape}; all images must share one shape"
                )
        images = torch.stack([image for image, _ in items]).to(self.device, self.dtype)
        return images, [label for _, label in items]

    def load(self, indices: Sequence[int]) -> TrainingBatch:
        """Return the training images ``indices`` with their labels, raw and encoded."""
        indices = [int(i) for i in indices]
        return self._encoded(indices, *self.items(indices))

    def _encoded(self, indices: list[int], images: torch.Tensor, labels: list) -> TrainingBatch:
        targets = encode_labels(labels, self.loss, self.num_classes, indices).to(self.device)
        if targets.is_floating_point():
            targets = targets.to(self.dtype)
        return TrainingBatch(indices, images, labels, targets)

    def batches(
        self, batches: Sequence[Sequence[int]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, encoded targets)`` of each batch of training indices, in order,
        read by ``num_workers`` ``DataLoader`` workers (`tfa_widgets.core.loading`)."""
        read = functools.partial(dataset_item, self.dataset, name="training set")
        loaded = load_items(read, len(self.dataset), batches, self.num_workers)
        for indices, items in zip(batches, loaded, strict=True):
            indices = [int(i) for i in indices]
            batch = self._encoded(indices, *self._stack(indices, items))
            yield batch.images, batch.targets

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images, encoded targets)`` of training images, as gradients take them."""
        loaded = self.load(indices)
        return loaded.images, loaded.targets

    def own_class(self, label: object) -> int:
        """Return the class a training label stands for (the first positive one if multi-label,
        0 when there is none)."""
        if self.loss == "cross_entropy":
            return int(label)
        positive = torch.as_tensor(label).reshape(-1).nonzero().flatten()
        return int(positive[0]) if positive.numel() else 0


def check_dataset(dataset: Dataset, name: str) -> None:
    """Check ``dataset`` is a non-empty map-style dataset.

    Raises
    ------
    DatasetError
        When it has no length or is empty.
    """
    try:
        size = len(dataset)
    except TypeError as error:
        raise DatasetError(f"the {name} must be a map-style Dataset with a length") from error
    if size == 0:
        raise DatasetError(f"the {name} is empty")


def dataset_item(dataset: Dataset, i: int, name: str) -> tuple[torch.Tensor, object]:
    """Return item ``i`` of ``dataset`` as ``(image [C, H, W], label)``.

    Raises
    ------
    DatasetError
        When the item is not an ``(image tensor [C, H, W], label)`` pair.
    """
    item = dataset[i]
    if not isinstance(item, tuple | list):
        raise DatasetError(
            f"the {name} must yield (image, label) pairs; item {i} is {type(item).__name__}"
        )
    if len(item) != 2:
        raise DatasetError(
            f"the {name} must yield (image, label) pairs; item {i} has {len(item)} elements "
            f"({', '.join(type(x).__name__ for x in item)}). Wrap it in a Dataset whose "
            "__getitem__ returns dataset[i][:2]"
        )
    image = item[0]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise DatasetError(
            f"the {name} must yield image tensors [C, H, W]; item {i} has "
            f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
        )
    return image, item[1]


def _class_names(dataset: Dataset, num_classes: int) -> list[str]:
    names = getattr(dataset, "classes", None)
    if isinstance(names, Sequence) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]
