"""Insertion and deletion: one SGD step on masked training images, and the change of the test loss.

Definitions (fixed before looking at any test image):

- The *test loss* is the loss of the test image for the explained target class (cross-entropy with
  that class, or for multi-label models binary cross-entropy of that class's logit against 1), with
  the model in eval mode.
- *One SGD step* on training images ``x_1..x_k`` with labels ``y_1..y_k`` is
  ``theta' = theta - lr * grad_theta (1/k) sum_i loss(theta; x_i, y_i)`` over all trainable
  parameters, with the model in eval mode (BatchNorm running statistics fixed, no dropout), plain
  SGD (no momentum, no weight decay). The model itself is never modified.
- The *loss change* is ``test_loss(theta') - test_loss(theta)``: negative when the step helps the
  test prediction. A step on the unmodified top proponents lowers the test loss (to first order it
  is ``-lr * <g_test, mean g_i>``).
- *Insertion at p*: each training image keeps only the top p% pixels of its map (see
  `tfa_widgets.eval.masking`), all other pixels are set to the baseline. *Deletion at p*: the top
  p% pixels are set to the baseline, the rest kept.
- The *relative change* is ``change / test_loss(theta)``: scale-free across test images, and
  never below -1 (a loss cannot drop below 0). Insertion is better when lower (the kept pixels
  still help the test prediction); deletion when higher (the removed pixels were what helped).
- The learning rate must keep the step small. At the demo's training rate (0.1) one step on masked
  images drives the test loss to about 0 whatever pixels were kept, so every map scores the same;
  the evaluation uses ``lr = 1e-4`` (see `tfa_widgets.eval.report.EvalConfig`).
- Masked images are out of distribution: their training loss, hence their gradient, is far larger
  than that of the unmasked proponents, so a step on them moves the test loss far more than a step
  on the unmasked images. A step on *blank* images (all pixels at the baseline, same labels) shows
  how much of that needs no pixel at all; comparing maps at the same p (and with random maps) is
  what tells them apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.losses import check_loss, encode_class, encode_labels, example_loss
from tfa_widgets.eval.masking import keep_top, remove_top

MODES = ("insertion", "deletion")


def batch_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Return the mean over a batch of `example_loss`, from logits ``[B, num_classes]``."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits, targets)
    labels, weights = targets[:, 0].to(logits.dtype), targets[:, 1].to(logits.dtype)
    per_class = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (weights * per_class).sum(dim=1).mean()


def match_dtype(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Return an encoded target in the logits' precision (multi-label targets are float)."""
    return target.to(logits.dtype) if target.is_floating_point() else target


class OneStep:
    """Measures how one SGD step on given training images changes the loss of one test image.

    Parameters
    ----------
    model : nn.Module
        The trained model; it is used in eval mode and never modified.
    test_image : torch.Tensor
        The test image ``[C, H, W]`` in model space.
    target : int
        The class whose test loss is measured (the explained class).
    lr : float
        The SGD learning rate (fix it a priori, e.g. the model's training learning rate).
    loss : str
        ``"cross_entropy"`` or ``"bce"`` (multi-label).

    Raises
    ------
    InputError
        When ``lr`` is not positive, the loss is unknown or the model has no trainable
        parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        test_image: torch.Tensor,
        target: int,
        *,
        lr: float,
        loss: str = "cross_entropy",
    ) -> None:
        if not float(lr) > 0.0:
            raise InputError(f"the SGD learning rate must be positive, got lr={lr}")
        self.model = model
        self.loss = check_loss(loss)
        self.lr = float(lr)
        self.params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise InputError("the model has no trainable parameters to take an SGD step on")
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}
        self.test_image = test_image.detach().unsqueeze(0)
        with torch.no_grad():
            logits = self._logits(self.params, self.test_image)
        self.num_classes = int(logits.shape[-1])
        encoded = encode_class(int(target), self.loss, self.num_classes)
        self.test_target = match_dtype(encoded, logits)
        self.loss_before = float(example_loss(logits[0], self.test_target, self.loss))

    def _logits(self, params: dict, images: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return functional_call(self.model, {**params, **self.buffers}, (images,))
        finally:
            self.model.train(was_training)

    def stepped_params(self, images: torch.Tensor, labels: Sequence) -> dict:
        """Return the parameters after one SGD step on ``images [k, C, H, W]`` with ``labels``.

        Parameters
        ----------
        images : torch.Tensor
            The training images ``[k, C, H, W]``.
        labels : sequence
            Their labels (class indices, or multi-hot vectors for ``"bce"``).

        Returns
        -------
        dict of str to torch.Tensor
            Parameter name to its value after the step; the model is not modified.
        """
        targets = encode_labels(labels, self.loss, self.num_classes)
        params = {name: p.clone().requires_grad_(True) for name, p in self.params.items()}
        train_loss = batch_loss(self._logits(params, images), targets, self.loss)
        grads = torch.autograd.grad(train_loss, list(params.values()))
        return {
            name: p.detach() - self.lr * g
            for (name, p), g in zip(params.items(), grads, strict=True)
        }

    def loss_changes(self, variants: torch.Tensor, labels: Sequence) -> list[float]:
        """Return `loss_change` for each set of images ``variants [V, k, C, H, W]`` (vmapped).

        All variants share ``labels``; one batched pass replaces V separate steps.

        Parameters
        ----------
        variants : torch.Tensor
            ``V`` versions of the same ``k`` training images, ``[V, k, C, H, W]``.
        labels : sequence
            The ``k`` labels.

        Returns
        -------
        list of float
            The test-loss change after one step on each variant.

        Raises
        ------
        InputError
            When ``variants`` is not ``[V, k, C, H, W]`` with ``k`` labels.
        """
        if variants.dim() != 5 or variants.shape[1] != len(labels):
            raise InputError(
                f"image variants must be [V, k, C, H, W] with k labels; got "
                f"{tuple(variants.shape)} and {len(labels)} labels"
            )
        targets = encode_labels(labels, self.loss, self.num_classes)
        state = {**self.params, **self.buffers}

        def train_loss(params: dict, images: torch.Tensor) -> torch.Tensor:
            logits = functional_call(self.model, {**state, **params}, (images,))
            return batch_loss(logits, targets, self.loss)

        def test_loss_after(images: torch.Tensor) -> torch.Tensor:
            grads = torch.func.grad(train_loss)(self.params, images)
            stepped = {name: p - self.lr * grads[name] for name, p in self.params.items()}
            logits = functional_call(self.model, {**state, **stepped}, (self.test_image,))
            return example_loss(logits[0], self.test_target, self.loss)

        was_training = self.model.training
        self.model.eval()
        try:
            after = torch.func.vmap(test_loss_after)(variants.detach())
        finally:
            self.model.train(was_training)
        return [float(v) - self.loss_before for v in after]

    def loss_change(self, images: torch.Tensor, labels: Sequence) -> float:
        """Return ``test_loss(after one step on images) - test_loss(before)``.

        Parameters
        ----------
        images : torch.Tensor
            The training images ``[k, C, H, W]``.
        labels : sequence
            Their ``k`` labels.

        Returns
        -------
        float
            Negative when the step helps the test prediction.

        Raises
        ------
        InputError
            When ``images`` is not ``[k, C, H, W]`` with one label each.
        """
        if images.dim() != 4 or images.shape[0] != len(labels):
            raise InputError(
                f"training images must be [k, C, H, W] with one label each; got images "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        params = self.stepped_params(images, labels)
        with torch.no_grad():
            logits = self._logits(params, self.test_image)
        return float(example_loss(logits[0], self.test_target, self.loss)) - self.loss_before


def perturbation_curve(
    step: OneStep,
    images: torch.Tensor,
    labels: Sequence,
    maps: torch.Tensor,
    ps: Iterable[float],
    mode: str,
    baseline: torch.Tensor,
) -> dict[float, float]:
    """Return ``{p: loss change}`` after one step on the masked training images.

    Parameters
    ----------
    step : OneStep
        Measures the test-loss change of one step.
    images : torch.Tensor
        The training images ``[k, C, H, W]`` (e.g. the top-k proponents of the test image).
    labels : sequence
        Their ``k`` labels.
    maps : torch.Tensor
        One map per image, ``[k, H, W]`` or ``[k, C, H, W]``.
    ps : iterable of float
        The percentages of pixels kept or removed.
    mode : str
        ``"insertion"`` (keep the top p% pixels) or ``"deletion"`` (remove them).
    baseline : torch.Tensor
        The fill value per channel ``[C]`` (e.g. the training set's channel mean).

    Returns
    -------
    dict of float to float
        ``p`` to the test-loss change after one step on the masked images.

    Raises
    ------
    InputError
        When ``mode`` is unknown or there is not one map per image.
    """
    if mode not in MODES:
        raise InputError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if maps.shape[0] != images.shape[0]:
        raise InputError(f"got {maps.shape[0]} maps for {images.shape[0]} training images")
    masker = keep_top if mode == "insertion" else remove_top
    ps = list(ps)
    variants = torch.stack([masker(images, maps, p, baseline) for p in ps])
    return dict(zip(ps, step.loss_changes(variants, labels), strict=True))


def relative_change(change: float, loss_before: float) -> float:
    """Return ``change / loss_before`` (NaN when the test loss is exactly 0)."""
    return change / loss_before if loss_before != 0.0 else float("nan")
