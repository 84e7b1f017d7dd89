"""Gradient-similarity scores between training and test examples, and their derivatives.

Each scorer maps ``<g_i, g_t>``, ``‖g_i‖`` and ``‖g_t‖`` to a score, and gives the closed-form
derivative ``v_i = ∂S/∂g_i`` that turns the TFA map into ``∇_x <g(x_i, y_i), v_i>``.
"""

from __future__ import annotations

import torch

from tfa_widgets.core.errors import InputError

METHODS = ("grad_cos", "grad_dot", "tracin_cp")


def check_method(method: str) -> str:
    """Return ``method`` after checking it names a supported scorer."""
    if method not in METHODS:
        raise InputError(f"unknown scoring method {method!r}; choose one of {METHODS}")
    return method


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` in float32 when it is of a lower precision (bfloat16, float16)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _reciprocal_or_zero(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms``, and 0 where a norm is exactly 0 (a zero gradient has no direction)."""
    return torch.where(norms > 0, 1 / norms.where(norms > 0, torch.ones_like(norms)), 0.0)


def query_gradient(method: str, test_grad: torch.Tensor) -> torch.Tensor:
    """Return the test gradient ``[P]`` (or ``[B, P]``) a scorer is applied with.

    Grad-Cos takes it at unit length: the cosine and its maps do not depend on its scale, and
    the products of two tiny gradients (a confident model) would underflow float32 in the dot
    products. Grad-Dot and TracIn-CP take it as it is.
    """
    if method != "grad_cos":
        return test_grad
    norms = at_least_float32(test_grad).norm(dim=-1, keepdim=True)
    return (test_grad * _reciprocal_or_zero(norms)).to(test_grad.dtype)


def score(
    method: str, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
) -> torch.Tensor:
    """Return scores from gradient dot products, in float32 at least.

    Grad-Cos is ``<g_i, g_t> / (‖g_i‖ ‖g_t‖)``, divided by each norm in turn so that it stays a
    cosine at any gradient scale (the product of two small norms would underflow, and an
    added ε would shrink it), and 0 where a gradient is exactly zero. Grad-Dot and each
    TracIn-CP term are the dot product itself.
    """
    dots = at_least_float32(dots)
    if method == "grad_cos":
        train_norms, test_norm = at_least_float32(train_norms), at_least_float32(test_norm)
        return dots * _reciprocal_or_zero(train_norms) * _reciprocal_or_zero(test_norm)
    return dots


def score_scale(method: str, norms: torch.Tensor) -> torch.Tensor:
    """Return the factor each gradient is scaled by so that the inner product of a scaled
    training gradient and a scaled test gradient is the score, as `score` computes it.

    Grad-Cos: ``1 / ‖g‖`` (0 for a zero gradient), for the training and the test gradient
    alike; Grad-Dot and each TracIn-CP term: 1. A search for the largest inner products of
    scaled rows (FAISS) then ranks by the score itself.
    """
    norms = at_least_float32(norms)
    return _reciprocal_or_zero(norms) if method == "grad_cos" else torch.ones_like(norms)


def score_gradient_coefficients(
    method: str, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(a, c)``, each ``[B]``, with ``∂S/∂g_i = a_i g_t + c_i g_i``.

    For Grad-Cos: ``a = 1 / (‖g_i‖ ‖g_t‖)`` and ``c = −S / ‖g_i‖²`` (both 0 where a gradient is
    exactly zero, where the cosine has no derivative). For Grad-Dot: ``a = 1`` and
    ``c = None`` (no ``g_i`` term). Only the scalars ``<g_i, g_t>`` and ``‖g_i‖`` are needed,
    never a ``[B, P]`` direction.
    """
    if method != "grad_cos":
        return torch.ones_like(dots), None
    train_norms, test_norm = at_least_float32(train_norms), at_least_float32(test_norm)
    inverse_train, inverse_test = _reciprocal_or_zero(train_norms), _reciprocal_or_zero(test_norm)
    cosines = at_least_float32(dots) * inverse_train * inverse_test
    return inverse_train * inverse_test, -cosines * inverse_train * inverse_train


def score_gradient(method: str, train_grads: torch.Tensor, test_grad: torch.Tensor) -> torch.Tensor:
    """Return ``∂S/∂g_i`` for each training gradient ``[B, P]`` against one test gradient ``[P]``.

    For Grad-Cos: ``g_t / (‖g_i‖ ‖g_t‖) − S g_i / ‖g_i‖²``. For Grad-Dot: ``g_t``.
    """
    a, c = score_gradient_coefficients(
        method, train_grads @ test_grad, train_grads.norm(dim=1), test_grad.norm()
    )
    directions = a[:, None].to(test_grad) * test_grad
    return directions if c is None else directions + c[:, None].to(train_grads) * train_grads
