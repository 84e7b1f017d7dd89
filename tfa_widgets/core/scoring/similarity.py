"""Gradient-similarity scorers with ``P = I``: grad-dot, grad-cos and TracIn-CP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.scoring.base import (
    Coefficients,
    FitContext,
    Identity,
    Preconditioner,
    ScoreInputs,
    safe_sqrt,
)

COSINE_EPS = 1e-12


class GradDot:
    """Grad-Dot, ``⟨g_i, g_t⟩``: ``a = 1``, no ``g_i`` term."""

    name: ClassVar[str] = "grad_dot"
    label: ClassVar[str] = "Grad-Dot"
    needs: ClassVar[frozenset[str]] = frozenset()

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


class GradCos:
    """Grad-Cos (Charpiat et al. 2019), ``⟨g_i, g_t⟩ / (‖g_i‖ ‖g_t‖ + ε)``.

    With ``D = ‖g_i‖ ‖g_t‖ + ε``: ``a = 1 / D`` and ``c = −S ‖g_t‖ / (‖g_i‖ D)``.
    """

    name: ClassVar[str] = "grad_cos"
    label: ClassVar[str] = "Grad-Cos"
    needs: ClassVar[frozenset[str]] = frozenset()

    def prepare(self, context: FitContext) -> list[Preconditioner]:
        """Return ``[I]``: nothing to fit."""
        return [Identity()]

    def term_weights(self, test_probabilities: Sequence[torch.Tensor]) -> list[float]:
        """Return ``[1]``."""
        return [1.0]

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return the weighted cosines, summed over terms."""
        return sum(term.weight * self._cosines(term)[0] for term in terms)

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return ``(w / D, −w S ‖g_t‖ / (‖g_i‖ D))`` per term."""
        result = []
        for term in terms:
            cosines, denominator, train_norms, test_norm = self._cosines(term)
            a = term.weight / denominator
            result.append((a, -term.weight * cosines * test_norm / (train_norms * denominator)))
        return result

    @staticmethod
    def _cosines(term: ScoreInputs):
        train_norms, test_norm = safe_sqrt(term.train_self), term.test_self.clamp_min(0).sqrt()
        denominator = train_norms * test_norm + COSINE_EPS
        return term.dots / denominator, denominator, train_norms, test_norm


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
