"""Retraining: fine-tune for several epochs with regions removed from some training images.

One SGD step (`tfa_widgets.eval.perturbation`) is a first-order probe. Here the trained model is
fine-tuned for ``epochs`` passes over the whole training set, once on the original images (the
*control* run) and once with chosen training images replaced by edited copies (e.g. their top p%
pixels set to the baseline). Both runs start from the same weights, see the same batches in the same
order (seeded) and differ only in the edited pixels, so the difference of their test predictions is
the effect of those pixels.

Definitions:

- Fine-tuning: plain SGD (no momentum, no weight decay) at learning rate ``lr`` on the mean batch
  loss, batches of ``batch_size`` drawn from a permutation seeded by ``seed`` (one per epoch), the
  model in eval mode (BatchNorm statistics fixed, no dropout), the copy only; the model is never
  modified.
- ``loss_change = test_loss(edited run) - test_loss(control run)`` for the explained class:
  positive when removing the regions hurts the test prediction, i.e. when they had been helping it.
- ``prob_change = p_target(edited run) - p_target(control run)``: negative when they had been
  helping.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.losses import (
    check_loss,
    encode_class,
    encode_labels,
    example_loss,
    probabilities,
)
from tfa_widgets.eval.perturbation import batch_loss, match_dtype


def load_all(dataset) -> tuple[torch.Tensor, list]:
    """Return all images of a map-style dataset stacked ``[N, C, H, W]`` and their labels."""
    if len(dataset) == 0:
        raise InputError("the training set is empty")
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), [y for _, y in items]


def finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: Sequence,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    loss: str = "cross_entropy",
    replace: dict[int, torch.Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Return a fine-tuned copy of ``model`` (eval mode), using ``replace[i]`` instead of image i.

    Parameters
    ----------
    images, labels :
        The training set, ``[N, C, H, W]`` and N labels (see `load_all`).
    replace : dict, optional
        Training index -> edited image ``[C, H, W]`` used in place of ``images[i]``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InputError(
            f"fine-tuning needs epochs >= 1, batch_size >= 1 and lr > 0; got epochs={epochs}, "
            f"batch_size={batch_size}, lr={lr}"
        )
    loss = check_loss(loss)
    data = images
    if replace:
        bad = [i for i in replace if not 0 <= int(i) < len(images)]
        if bad:
            raise InputError(f"replaced training indices {bad} are outside [0, {len(images)})")
        data = images.clone()
        for i, edited in replace.items():
            data[int(i)] = edited
    tuned = copy.deepcopy(model).eval()
    data = data.to(next(tuned.parameters()).dtype)
    num_classes = int(tuned(data[:1]).shape[-1])
    targets = encode_labels(labels, loss, num_classes)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="fine-tuning", disable=not progress, leave=False):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            batch_loss(tuned(data[batch]), targets[batch], loss).backward()
            optimiser.step()
    return tuned


def prediction_outcome(
    model: nn.Module, test_image: torch.Tensor, target: int, loss: str = "cross_entropy"
) -> tuple[float, float]:
    """Return ``(test loss, probability)`` of the target class for one test image ``[C, H, W]``."""
    model.eval()
    with torch.no_grad():
        logits = model(test_image.unsqueeze(0))[0]
    encoded = match_dtype(encode_class(int(target), loss, int(logits.shape[-1])), logits)
    return float(example_loss(logits, encoded, loss)), float(probabilities(logits, loss)[target])


def retraining_effect(
    control: nn.Module,
    edited: nn.Module,
    test_image: torch.Tensor,
    target: int,
    loss: str = "cross_entropy",
) -> dict[str, float]:
    """Return ``loss_change`` and ``prob_change`` of the edited run relative to the control run."""
    control_loss, control_prob = prediction_outcome(control, test_image, target, loss)
    edited_loss, edited_prob = prediction_outcome(edited, test_image, target, loss)
    return {"loss_change": edited_loss - control_loss, "prob_change": edited_prob - control_prob}
