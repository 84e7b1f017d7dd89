"""Influence functions and RelatIF with an (E)K-FAC inverse curvature.

Sign: ``S = ⟨g_t, H⁻¹ g_i⟩`` with loss gradients. Up-weighting ``z_i`` by ``ε`` moves the
parameters by ``−ε H⁻¹ g_i`` and the test loss by ``−ε S``, so a positive score is a proponent
(it lowers the test loss of the explained target): Koh & Liang's ``I_up,loss`` negated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import ClassVar

import torch

from tfa_widgets.core.kfac import KFACPreconditioner, KFACSettings, fit_kfac
from tfa_widgets.core.scoring.base import (
    Coefficients,
    FitContext,
    Preconditioner,
    ScoreInputs,
    safe_sqrt,
)


class Influence:
    """Influence functions (Koh & Liang 2017) with EK-FAC (Grosse et al. 2023), ``⟨g_t, H⁻¹ g_i⟩``.

    ``a = 1`` and no ``g_i`` term: the map is ``∇_x ⟨g(x, y_i), H⁻¹ g_t⟩``.
    """

    name: ClassVar[str] = "influence"
    label: ClassVar[str] = "Influence (EK-FAC)"
    needs: ClassVar[frozenset[str]] = frozenset({"factors"})
    self_term: ClassVar[bool] = False  # ∂S/∂g_i has no P g_i part (c is None)

    def __init__(self, settings: KFACSettings | None = None) -> None:
        self.settings = settings or KFACSettings()

    def prepare(self, context: FitContext) -> list[Preconditioner]:
        """Return ``[H⁻¹]``, fitted on the training set (one pass when the gradients fit in
        memory, see `fit_kfac`)."""
        return [
            fit_kfac(
                context.model,
                context.names,
                context.batches,
                context.loss,
                self.settings,
                context.progress,
                context.output,
            )
        ]

    def cache_settings(self) -> dict:
        """Return what the fit depends on beyond weights and data (RelatIF shares the fit)."""
        return {"preconditioner": "kfac", **asdict(self.settings)}

    def restore(self, tensors: Sequence[dict], context: FitContext) -> list[Preconditioner]:
        """Return ``[H⁻¹]`` from the `KFACPreconditioner.tensors` of a cached fit."""
        parameters = dict(context.model.named_parameters())
        sizes = [parameters[n].numel() for n in context.names]
        return [
            KFACPreconditioner.from_tensors(term, context.names, sizes, self.settings)
            for term in tensors
        ]

    def term_weights(self, test_probabilities: Sequence[torch.Tensor]) -> list[float]:
        """Return ``[1]``."""
        return [1.0]

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return ``⟨g_t, H⁻¹ g_i⟩``."""
        return sum(term.weight * term.dots for term in terms)

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return ``(1, None)``."""
        return [(torch.full_like(term.dots, term.weight), None) for term in terms]


class RelatIF(Influence):
    """RelatIF (Barshan et al. 2020), ``⟨g_t, H⁻¹ g_i⟩ / sqrt(⟨g_i, H⁻¹ g_i⟩)``.

    Dividing by the training image's own influence favours images with global influence over
    outliers, as grad-cos does over grad-dot. With ``s_i = ⟨g_i, H⁻¹ g_i⟩``:
    ``a = 1 / sqrt(s_i)`` and ``c = −S / s_i``.
    """

    name: ClassVar[str] = "relatif"
    label: ClassVar[str] = "RelatIF (EK-FAC)"
    self_term: ClassVar[bool] = True

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return ``⟨g_t, H⁻¹ g_i⟩ / sqrt(⟨g_i, H⁻¹ g_i⟩)``."""
        return sum(term.weight * term.dots / safe_sqrt(term.train_self) for term in terms)

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return ``(1 / sqrt(s_i), −S / s_i)``."""
        result = []
        for term in terms:
            root = safe_sqrt(term.train_self)
            scores = term.weight * term.dots / root
            result.append((term.weight / root, -scores / root.square()))
        return result
