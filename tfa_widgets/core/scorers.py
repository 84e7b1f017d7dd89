"""Gradient-similarity scores between training and test examples, and their derivatives.

Each scorer maps ``<g_i, g_t>``, ``‖g_i‖`` and ``‖g_t‖`` to a score, and gives the closed-form
derivative ``v_i = ∂S/∂g_i`` that turns the TFA map into ``∇_x <g(x_i, y_i), v_i>``.
"""

from __future__ import annotations

import torch

from tfa_widgets.core.errors import InputError

METHODS = ("grad_cos", "grad_dot", "tracin_cp")
COSINE_EPS = 1e-12


def check_method(method: str) -> str:
    """Return ``method`` after checking it names a supported scorer."""
    if method not in METHODS:
        raise InputError(f"unknown scoring method {method!r}; choose one of {METHODS}")
    return method


def score(
    method: str, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
) -> torch.Tensor:
    """Return scores from gradient dot products.

    Grad-Cos is ``<g_i, g_t> / (‖g_i‖ ‖g_t‖ + ε)``; Grad-Dot and each TracIn-CP term are the
    dot product itself.
    """
    if method == "grad_cos":
        return dots / (train_norms * test_norm + COSINE_EPS)
    return dots


def score_gradient_coefficients(
    method: str, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(a, c)``, each ``[B]``, with ``∂S/∂g_i = a_i g_t + c_i g_i``.

    For Grad-Cos with ``D = ‖g_i‖ ‖g_t‖ + ε``: ``a = 1 / D`` and ``c = −S ‖g_t‖ / (‖g_i‖ D)``.
    For Grad-Dot: ``a = 1`` and ``c = None`` (no ``g_i`` term). Only the scalars ``<g_i, g_t>``
    and ``‖g_i‖`` are needed, never a ``[B, P]`` direction.
    """
    if method != "grad_cos":
        return torch.ones_like(dots), None
    denominator = train_norms * test_norm + COSINE_EPS
    cosines = dots / denominator
    safe_norms = train_norms.clamp_min(torch.finfo(train_norms.dtype).tiny)
    return 1 / denominator, -cosines * test_norm / (safe_norms * denominator)


def score_gradient(method: str, train_grads: torch.Tensor, test_grad: torch.Tensor) -> torch.Tensor:
    """Return ``∂S/∂g_i`` for each training gradient ``[B, P]`` against one test gradient ``[P]``.

    For Grad-Cos with ``D = ‖g_i‖ ‖g_t‖ + ε``: ``(g_t − S ‖g_t‖ ĝ_i) / D``.
    For Grad-Dot: ``g_t``.
    """
    a, c = score_gradient_coefficients(
        method, train_grads @ test_grad, train_grads.norm(dim=1), test_grad.norm()
    )
    directions = a[:, None] * test_grad
    return directions if c is None else directions + c[:, None] * train_grads
