"""One test image and the class it is explained for, resolved once: a `Query`.

Every verb of the engine names its test image(s) and target in the user's terms (an index, an
image, ``"predicted"``, ``"true"``, a class); `QueryResolver` turns each into a `Query` once,
and everything downstream (test gradients, scores, maps, the explorer's caches) reads the same
value instead of resolving the target or hashing the image again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from tfa_widgets.core.data_access import dataset_item
from tfa_widgets.core.errors import InputError
from tfa_widgets.core.prediction import Predictor
from tfa_widgets.core.queries import Target, TestInput, split_targets, split_tests
from tfa_widgets.core.validation import as_integer, check_class, check_image


@dataclass(frozen=True, eq=False)
class Query:
    """A test image and the class explained, as the engine resolved them.

    Pass it wherever the engine takes one ``test`` (`TFAEngine.explain`, ``scores``,
    ``top_k``, ``tfa_maps``): it is not resolved again.

    Parameters
    ----------
    key : tuple
        Identifies the test image: ``("index", i)`` for a test-set index, ``("image", sha1)``
        for an image given as a tensor.
    image : torch.Tensor
        The image ``[C, H, W]``, in model space, on the engine's device.
    target : int
        The class explained.
    index : int or None
        The test-set index, or None for an image given as a tensor.
    label : object
        The test label (None for an image given as a tensor).
    """

    key: tuple
    image: torch.Tensor
    target: int
    index: int | None = None
    label: object = None

    @property
    def test(self) -> int | torch.Tensor:
        """The test as the user named it: its test-set index, or the image itself."""
        return self.index if self.index is not None else self.image


class QueryResolver:
    """Resolves tests and targets into `Query` values for one engine.

    Parameters
    ----------
    test_set : Dataset, optional
        The test set indices refer to.
    image_shape : tuple of int
        The training images' ``[C, H, W]``.
    device, dtype
        Where and in which type the model takes images.
    num_classes : int
        Number of classes of the model.
    predictor : Predictor
        Asked for the predicted class (and, for multi-label ``"true"``, the most probable
        positive one).
    predicted_class : callable, optional
        ``(key, image) -> class`` asked for the predicted class instead of ``predictor``:
        `TestGradients.predicted_class`, which keeps the forward pass for the test gradient.
    """

    def __init__(
        self,
        test_set: Dataset | None,
        image_shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        num_classes: int,
        predictor: Predictor,
        predicted_class: Callable[[tuple, torch.Tensor], int] | None = None,
    ) -> None:
        self.test_set, self.image_shape = test_set, image_shape
        self.device, self.dtype = device, dtype
        self.num_classes, self.predictor = num_classes, predictor
        self.predicted_class = predicted_class or (
            lambda key, image: int(predictor.probabilities_of(image).argmax())
        )

    def resolve(self, test: int | torch.Tensor | Query, target: Target = None) -> Query:
        """Return the `Query` of one test and its target (a forward pass only if it needs one).

        Raises
        ------
        InputError
            When the test or the target is invalid, or a `Query` comes with another target.
        """
        if isinstance(test, Query):
            if target is not None and target != test.target:
                raise InputError(
                    f"this query already explains class {test.target}; pass target=None with a "
                    "Query, or ask the engine for a new query"
                )
            return test
        index, image, label = self.test_input(test)
        key = ("index", index) if index is not None else image_key(image)
        return Query(key, image, self._target(target, label, image, key), index, label)

    def resolve_many(
        self, test: TestInput | Query, target: Target | Sequence
    ) -> tuple[list[Query], bool]:
        """Return the `Query` of every test a query names, and whether it named a batch."""
        if isinstance(test, Query):
            return [self.resolve(test, target)], False
        tests, batched = split_tests(test)
        targets = split_targets(target, len(tests))
        return [self.resolve(t, c) for t, c in zip(tests, targets, strict=True)], batched

    def test_input(
        self, test: int | torch.Tensor | Query
    ) -> tuple[int | None, torch.Tensor, object]:
        """Return ``(index or None, image on the device, label or None)`` of one test.

        Raises
        ------
        InputError
            When ``test`` is not a valid index or image (or is an index without a test set).
        """
        if isinstance(test, Query):
            return test.index, test.image, test.label
        if isinstance(test, torch.Tensor) and test.dim() != 0:
            image = check_image(test, self.image_shape, "test image")
            return None, image.to(self.device, self.dtype), None
        try:
            test = as_integer(test, "test")
        except InputError:
            raise InputError(
                "test must be an index into the test set, an image tensor [C, H, W], a "
                f"sequence of indices or a batch of images [B, C, H, W], got {test!r}"
            ) from None
        if self.test_set is None:
            raise InputError("test is an index, but the engine was given no test_set")
        if not 0 <= test < len(self.test_set):
            raise InputError(
                f"test index {test} is out of range for a test set of size {len(self.test_set)}"
            )
        image, label = dataset_item(self.test_set, test, "test set")
        image = check_image(image, self.image_shape, f"test image {test}")
        return test, image.to(self.device, self.dtype), label

    def _target(self, target: Target, label: object, image: torch.Tensor, key: tuple) -> int:
        if target is None or target == "predicted":
            return self.predicted_class(key, image)
        if target == "true":
            if label is None:
                raise InputError("target 'true' needs a test index with a label, not a bare image")
            if self.predictor.loss == "cross_entropy":
                return check_class(int(label), self.num_classes)
            probs = self.predictor.probabilities_of(image)
            positive = torch.as_tensor(label, dtype=torch.float32).to(probs.device) > 0.5
            if not bool(positive.any()):
                raise InputError("target 'true': this multi-label test image has no positive class")
            return int(torch.where(positive, probs, torch.full_like(probs, -1.0)).argmax())
        if isinstance(target, str):
            raise InputError(
                f"unknown target {target!r}: use None, 'predicted', 'true' or a class index"
            )
        return check_class(target, self.num_classes)


def image_key(image: torch.Tensor) -> tuple[str, str]:
    """Return ``("image", sha1)`` of an image's bytes: equal images get equal keys."""
    data = image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return ("image", hashlib.sha1(data).hexdigest())
