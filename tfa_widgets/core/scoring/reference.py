"""Plain-autograd per-sample gradients and TFA maps for any scorer: the reference path.

Slow but general (``torch.func.vmap`` over one example's ``grad``); the engine's factored path
must agree with it. A map is ``∇_x ⟨g(x, y_i), v_i⟩`` with ``v_i = a_i q + c_i P g_i`` held
fixed (see `tfa_widgets.core.scoring.base`), summed over the scorer's terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tfa_widgets.core.losses import example_loss
from tfa_widgets.core.scoring.base import Preconditioner, ScoreInputs, Scorer, score_inputs


def per_sample_grads(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    names: list[str],
    images: torch.Tensor,
    targets: torch.Tensor,
    loss: str,
) -> torch.Tensor:
    """Return each example's loss gradient in the selected parameters, flat, ``[N, P]``."""
    return vmap(_flat_gradient(model, state, names, loss))(images, targets)


def tfa_maps(
    scorer: Scorer,
    preconditioners: Sequence[Preconditioner],
    states: Sequence[dict[str, torch.Tensor]],
    model: nn.Module,
    names: list[str],
    loss: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    test_grads: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """Return ``∇_{x_i} S`` for training images ``[N, C, H, W]``, one term per state.

    Parameters
    ----------
    preconditioners, states, test_grads, weights : sequences, one entry per term
        From ``scorer.prepare``, `tfa_widgets.core.scoring.base.term_states`, the test
        gradient under each state, and ``scorer.term_weights``.
    """
    terms: list[ScoreInputs] = []
    train_grads = []
    for preconditioner, state, test_grad, weight in zip(
        preconditioners, states, test_grads, weights, strict=True
    ):
        train_grads.append(per_sample_grads(model, state, names, images, targets, loss))
        terms.append(score_inputs(preconditioner, train_grads[-1], test_grad, weight))
    maps = torch.zeros_like(images)
    for (a, c), preconditioner, state, test_grad, grads in zip(
        scorer.coefficients(terms), preconditioners, states, test_grads, train_grads, strict=True
    ):
        directions = a[:, None] * preconditioner.apply(test_grad)
        if c is not None:
            directions = directions + c[:, None] * preconditioner.apply(grads)
        flat_gradient = _flat_gradient(model, state, names, loss)

        def inner(image, target, direction, flat_gradient=flat_gradient):
            return flat_gradient(image, target) @ direction

        maps += vmap(grad(inner))(images, targets, directions.detach())
    return maps


def _flat_gradient(model: nn.Module, state: dict, names: list[str], loss: str):
    def example(parameters: dict, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**state, **parameters}, (image.unsqueeze(0),))[0]
        return example_loss(logits, target, loss)

    def flat(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        grads = grad(example)({n: state[n] for n in names}, image, target)
        return torch.cat([grads[n].flatten() for n in names])

    return flat
