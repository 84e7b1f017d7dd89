"""Gradient-similarity scorers with ``P = I``: grad-dot, grad-cos and TracIn-CP.

Besides the `Scorer` protocol, they are `IndexScorer`s: scored from a gradient index (dot
products with the stored gradients and their norms), with maps whose ``∂S/∂g_i`` needs only
``⟨g_i, g_t⟩``, ``‖g_i‖`` and ``‖g_t‖``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.numerics import at_least_float32, reciprocal_or_zero
from tfa_widgets.core.scoring.base import (
    Coefficients,
    FitContext,
    Identity,
    Preconditioner,
    ScoreInputs,
)


class GradDot:
    """Grad-Dot, ``⟨g_i, g_t⟩``: ``a = 1``, no ``g_i`` term."""

    name: ClassVar[str] = "grad_dot"
    label: ClassVar[str] = "Grad-Dot"
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_train_gradient: ClassVar[bool] = False  # ∂S/∂g_i = g_t

    def prepare(self, context: FitContext) -> list[Preconditioner]:
        """Return ``[I]``: nothing to fit."""
        return [Identity()]

    def term_weights(self, test_probabilities: Sequence[torch.Tensor]) -> list[float]:
        """Return ``[1]``."""
        return [1.0]

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return ``Σ_terms w ⟨g_i, g_t⟩``."""
        return sum(term.weight * term.dots for term in terms)

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return ``(w, None)`` per term."""
        return [(torch.full_like(term.dots, term.weight), None) for term in terms]

    def query(self, test_grad: torch.Tensor) -> torch.Tensor:
        """Return the test gradient ``[P]`` (or ``[B, P]``) as it is scored: unchanged."""
        return test_grad

    def index_scores(
        self, dots: torch.Tensor, train_norms: torch.Tensor, test_norms: torch.Tensor
    ) -> torch.Tensor:
        """Return the scores of one term from ``⟨g_i, query⟩``: the dots, in float32 at least."""
        return at_least_float32(dots)

    def norm_coefficients(
        self, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
    ) -> Coefficients:
        """Return ``(1, None)``: ``∂S/∂g_i = g_t``."""
        return torch.ones_like(dots), None


class GradCos(GradDot):
    """Grad-Cos (Charpiat et al. 2019), ``⟨g_i, g_t⟩ / (‖g_i‖ ‖g_t‖)``, 0 for a zero gradient.

    ``a = 1 / (‖g_i‖ ‖g_t‖)`` and ``c = −S / ‖g_i‖²`` (both 0 where a gradient is exactly zero,
    where the cosine has no derivative). The score divides by each norm in turn, so it stays a
    cosine at any gradient scale: the product of two small norms would underflow, and an added
    ε would shrink it.
    """

    name: ClassVar[str] = "grad_cos"
    label: ClassVar[str] = "Grad-Cos"
    needs_train_gradient: ClassVar[bool] = True

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return the weighted cosines, summed over terms."""
        return sum(term.weight * self.index_scores(term.dots, *self._norms(term)) for term in terms)

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return ``(w / (‖g_i‖ ‖g_t‖), −w S / ‖g_i‖²)`` per term."""
        result = []
        for term in terms:
            a, c = self.norm_coefficients(term.dots, *self._norms(term))
            result.append((term.weight * a, term.weight * c))
        return result

    def query(self, test_grad: torch.Tensor) -> torch.Tensor:
        """Return the test gradient at unit length: the cosine and its maps do not depend on its
        scale, and the products of two tiny gradients (a confident model) would underflow
        float32 in the dot products."""
        norms = at_least_float32(test_grad).norm(dim=-1, keepdim=True)
        return (test_grad * reciprocal_or_zero(norms)).to(test_grad.dtype)

    def index_scores(
        self, dots: torch.Tensor, train_norms: torch.Tensor, test_norms: torch.Tensor
    ) -> torch.Tensor:
        """Return ``dots / ‖g_i‖ / ‖q‖`` in float32 at least (0 where a norm is 0)."""
        train, test = at_least_float32(train_norms), at_least_float32(test_norms)
        return at_least_float32(dots) * reciprocal_or_zero(train) * reciprocal_or_zero(test)

    def norm_coefficients(
        self, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
    ) -> Coefficients:
        """Return ``(a, c)``, each ``[B]``, from ``⟨g_i, g_t⟩``, ``‖g_i‖`` and ``‖g_t‖``."""
        train, test = at_least_float32(train_norms), at_least_float32(test_norm)
        inverse_train, inverse_test = reciprocal_or_zero(train), reciprocal_or_zero(test)
        cosines = at_least_float32(dots) * inverse_train * inverse_test
        return inverse_train * inverse_test, -cosines * inverse_train * inverse_train

    @staticmethod
    def _norms(term: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return term.train_self.clamp_min(0).sqrt(), term.test_self.clamp_min(0).sqrt()


class TracInCP(GradDot):
    """TracIn-CP (Pruthi et al. 2020), ``Σ_c η_c ⟨g_i^c, g_t^c⟩`` over checkpoints ``c``."""

    name: ClassVar[str] = "tracin_cp"
    label: ClassVar[str] = "TracIn-CP"
    needs: ClassVar[frozenset[str]] = frozenset({"checkpoints"})

    def __init__(self) -> None:
        self.rates: list[float] = []

    def prepare(self, context: FitContext) -> list[Preconditioner]:
        """Return one ``I`` per checkpoint and keep their learning rates ``η_c``."""
        if not context.checkpoints:
            raise InputError("TracIn-CP needs checkpoints: a list of (state_dict, learning rate)")
        self.rates = [float(rate) for _, rate in context.checkpoints]
        return [Identity() for _ in context.checkpoints]

    def term_weights(self, test_probabilities: Sequence[torch.Tensor]) -> list[float]:
        """Return the learning rates ``η_c``."""
        return list(self.rates)
