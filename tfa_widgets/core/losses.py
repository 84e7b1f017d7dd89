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

from tfa_widgets.core.errors import InputError

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


def encode_labels(labels: Sequence, loss: str, num_classes: int) -> torch.Tensor:
    """Return training labels encoded as targets: ``[B]`` long, or ``[B, 2, num_classes]``."""
    if loss == "cross_entropy":
        return torch.as_tensor([int(label) for label in labels], dtype=torch.long)
    rows = []
    for label in labels:
        multi_hot = torch.as_tensor(label, dtype=torch.float32).reshape(-1)
        if multi_hot.numel() != num_classes:
            raise InputError(
                f"multi-label targets must have {num_classes} entries, got {multi_hot.numel()}"
            )
        rows.append(torch.stack([multi_hot, torch.ones(num_classes)]))
    return torch.stack(rows)


def encode_class(target_class: int, loss: str, num_classes: int) -> torch.Tensor:
    """Return the encoded target for explaining one class of a test image."""
    if loss == "cross_entropy":
        return torch.tensor(target_class, dtype=torch.long)
    one_hot = F.one_hot(torch.tensor(target_class), num_classes).float()
    return torch.stack([one_hot, one_hot])


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Return class probabilities: softmax for cross-entropy, sigmoid for multi-label."""
    return logits.softmax(-1) if loss == "cross_entropy" else logits.sigmoid()
