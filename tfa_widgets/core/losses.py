"""Per-example losses and how targets are encoded for them.

Single-label models use cross-entropy with an integer class. Multi-label models use
binary cross-entropy with logits, summed over classes with per-class weights: a training
example uses its multi-hot label with all weights 1; explaining one class ``c`` of a test
image uses the label 1 and weight 1 on class ``c`` only. Scalar regressors use half the
squared error (``"squared_error"``), whose gradients have closed forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tfa_widgets.core.errors import DatasetError, InputError

LOSSES = ("cross_entropy", "bce")
REGRESSION_LOSS = "squared_error"


def check_loss(loss: str) -> str:
    """Return ``loss`` after checking it names a supported loss."""
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    return loss


def example_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Return the loss of one example from its logits ``[num_classes]`` and encoded target."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits.unsqueeze(0), target.unsqueeze(0))
    if loss == REGRESSION_LOSS:
        return 0.5 * (logits.squeeze(-1) - target) ** 2
    labels, weights = target[0], target[1]
    per_class = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (weights * per_class).sum()


def batch_losses(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Return each example's loss, ``[B]``: `example_loss` for a batch, in one pass."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits, targets, reduction="none")
    if loss == REGRESSION_LOSS:
        return 0.5 * (logits.squeeze(-1) - targets) ** 2
    labels, weights = targets[:, 0], targets[:, 1]
    per_class = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (weights * per_class).sum(-1)


def encode_labels(
    labels: Sequence, loss: str, num_classes: int, indices: Sequence[int] | None = None
) -> torch.Tensor:
    """Return training labels encoded as targets: ``[B]`` long, or ``[B, 2, num_classes]``.

    Raises
    ------
    DatasetError
        When a label is no class index of the model (cross-entropy: one whole number in
        ``[0, num_classes)``) or no multi-hot vector of ``num_classes`` entries (BCE), naming
        the training example (its position in ``indices``).
    """
    if indices is None:
        names = [f"training label {j}" for j in range(len(labels))]
    else:
        names = [f"training example {i}" for i in indices]
    if loss == "cross_entropy":
        classes = [
            _class_index(label, num_classes, name)
            for label, name in zip(labels, names, strict=True)
        ]
        return torch.as_tensor(classes, dtype=torch.long)
    rows = []
    for label, name in zip(labels, names, strict=True):
        multi_hot = torch.as_tensor(label, dtype=torch.float32).reshape(-1)
        if multi_hot.numel() != num_classes:
            raise DatasetError(
                f"{name}: multi-label targets must have {num_classes} entries, "
                f"got {multi_hot.numel()}"
            )
        rows.append(torch.stack([multi_hot, torch.ones(num_classes)]))
    return torch.stack(rows)


def _class_index(label: object, num_classes: int, name: str) -> int:
    try:
        value = torch.as_tensor(label)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DatasetError(f"{name} has label {label!r}, not a class index") from error
    if value.numel() != 1:
        raise DatasetError(
            f"{name} has a label of shape {tuple(value.shape)}, but cross_entropy needs one "
            "class index per image: convert one-hot labels with label.argmax(), or use "
            "loss='bce' for multi-label targets"
        )
    number = value.reshape(()).item()
    if isinstance(number, float) and not number.is_integer():
        raise DatasetError(f"{name} has label {number!r}, which is not a whole number (a class)")
    if not 0 <= int(number) < num_classes:
        raise DatasetError(
            f"{name} has label {int(number)}, but the model has {num_classes} classes "
            f"(0 to {num_classes - 1}); check the labels, or the model's number of outputs"
        )
    return int(number)


def encode_class(target_class: int, loss: str, num_classes: int) -> torch.Tensor:
    """Return the encoded target for explaining one class of a test image."""
    if loss == "cross_entropy":
        return torch.tensor(target_class, dtype=torch.long)
    one_hot = F.one_hot(torch.tensor(target_class), num_classes).float()
    return torch.stack([one_hot, one_hot])


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Return class probabilities: softmax for cross-entropy, sigmoid for multi-label."""
    return logits.softmax(-1) if loss == "cross_entropy" else logits.sigmoid()
