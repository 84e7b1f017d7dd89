"""Per-example losses and how targets are encoded for them.

Single-label models use cross-entropy with an integer class. Multi-label models use
binary cross-entropy with logits, summed over classes with per-class weights: a training
example uses its multi-hot label with all weights 1; explaining one class ``c`` of a test
image uses the label 1 and weight 1 on class ``c`` only. Scalar regressors use half the
squared error (``"squared_error"``), whose gradients have closed forms.

Both classification losses are written so that every derivative autograd takes of them
(reverse mode, forward mode, double backward) is computed without cancellation. PyTorch's
``F.cross_entropy`` differentiates to ``softmax(z) − onehot(y)``, whose ``y`` entry
``p_y − 1`` is all rounding error once ``1 − p_y`` is below float32 resolution (a training
image the model fits well: loss 1e-7): the score of such an image came out as 0 where the
true cosine was −0.15. Here cross-entropy is ``logsumexp(d)`` over the logit differences
``d_k = z_k − z_y`` with ``d_y`` the constant 0, so ``∂ℓ/∂z_y = −Σ_{k≠y} p_k``, a sum of small
positive numbers, and BCE is ``y·softplus(−z) + (1 − y)·softplus(z)``, whose derivative
``−y·σ(−z) + (1 − y)·σ(z)`` has no ``σ(z) − 1`` either. Both equal PyTorch's losses in value.
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
    return batch_losses(logits.unsqueeze(0), target.unsqueeze(0), loss)[0]


def batch_losses(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Return each example's loss, ``[B]``: `example_loss` for a batch, in one pass."""
    if loss == "cross_entropy":
        return stable_cross_entropy(logits, targets)
    if loss == REGRESSION_LOSS:
        return 0.5 * (logits.squeeze(-1) - targets) ** 2
    labels, weights = targets[:, 0], targets[:, 1]
    return (weights * stable_binary_cross_entropy(logits, labels)).sum(-1)


def logit_gradient(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Return ``∂ℓ/∂z`` of one example's loss with respect to its logits ``[num_classes]``."""
    logits = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(example_loss(logits, target, loss), logits)[0]


def stable_cross_entropy(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy of each row of ``logits`` ``[B, K]`` for ``classes`` ``[B]``.

    ``logsumexp(d)`` with ``d_k = z_k − z_y`` for ``k ≠ y`` and ``d_y = 0`` held constant: the
    value of ``F.cross_entropy``, with derivatives free of the cancellation in ``p_y − 1``.
    """
    chosen = torch.arange(logits.shape[-1], device=logits.device) == classes.unsqueeze(-1)
    own = logits.gather(-1, classes.unsqueeze(-1))
    return (logits - own).masked_fill(chosen, 0.0).logsumexp(-1)


def stable_binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return BCE with logits per entry, ``y·softplus(−z) + (1 − y)·softplus(z)``."""
    return labels * F.softplus(-logits) + (1 - labels) * F.softplus(logits)


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
