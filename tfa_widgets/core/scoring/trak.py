"""TRAK (Park et al. 2023): a kernel of randomly projected gradients, re-weighted for softmax.

TRAK's features are gradients of the margin ``f = log(p / (1 − p))`` (``p`` the probability of
the label), projected: ``φ = Π ∇f``. For cross-entropy ``∇f = −g / (1 − p)`` with ``g`` the loss
gradient, so with ``K = ΦᵀΦ + λI`` over the training set TRAK's score

    ``τ_i = φ_tᵀ K⁻¹ φ_i (1 − p_i) = ⟨g_t, Πᵀ K⁻¹ Π g_i⟩ / (1 − p_t)``:

the output re-weighting ``1 − p_i`` cancels the training side's ``1 / (1 − p_i)`` exactly, and
the score is a preconditioned dot product ``P = Πᵀ K⁻¹ Π`` with the term weight ``1 / (1 − p_t)``
(``a = w``, no ``g_i`` term). With several checkpoints the score here is the mean of each
checkpoint's TRAK score; TRAK's ensemble instead multiplies the mean of ``φ_tᵀ K⁻¹ φ_i`` by the
mean of ``1 − p_i``, which differs when ``p_i`` changes across checkpoints. Cross-entropy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.outputs import read_logits
from tfa_widgets.core.projection import SKETCH_VERSION, RandomProjector
from tfa_widgets.core.scoring.base import (
    Coefficients,
    FitContext,
    Preconditioner,
    ScoreInputs,
    term_states,
)


class TRAKKernel:
    """``P = Πᵀ (ΦᵀΦ + λI)⁻¹ Π`` for a linear projection ``Π`` and training features ``Φ``.

    With fewer features than dimensions (``N < d``) the ``d × d`` inverse is never formed:
    ``(ΦᵀΦ + λI)⁻¹ = (I − Φᵀ (ΦΦᵀ + λI)⁻¹ Φ) / λ`` (Woodbury) takes an ``N × N`` inverse,
    ``N³ + N² d`` operations instead of ``d³``, and keeps ``Φ`` and that inverse (float64,
    applied in float64: the subtraction cancels up to the kernel's condition number).

    Parameters
    ----------
    projector
        Has ``project(grads [..., P]) -> [..., d]``, linear (e.g. `RandomProjector`).
    features : Tensor
        ``Φ``, ``[N, d]``.
    regularization : float
        ``λ``, times the mean eigenvalue ``trace(ΦᵀΦ) / d`` when ``relative``.

    Raises
    ------
    InputError
        When ``ΦᵀΦ + λI`` is singular (``λ = 0`` with fewer features than dimensions).
    """

    def __init__(
        self,
        projector,
        features: torch.Tensor,
        regularization: float = 1e-3,
        relative: bool = True,
    ) -> None:
        self.projector = projector
        exact = features.double()
        count, dim = exact.shape
        scale = float(exact.square().sum()) / dim if relative else 1.0  # trace(ΦᵀΦ) / d
        self.regularization = regularization * scale
        self.training_terms: tuple[torch.Tensor, torch.Tensor] | None = None
        if count < dim:
            if self.regularization <= 0:
                raise InputError(
                    f"the TRAK kernel ΦᵀΦ + λI is singular with λ = {self.regularization:g} "
                    f"and {count} features in {dim} dimensions; give TRAK a regularization > 0"
                )
            self.inverse = None
            self.features = exact
            self.core = _damped_inverse(exact @ exact.T, self.regularization)
        else:
            self.inverse = _damped_inverse(exact.T @ exact, self.regularization).to(features)

    @classmethod
    def from_tensors(cls, projector, tensors: dict[str, torch.Tensor]) -> TRAKKernel:
        """Return the kernel whose `tensors` these are, with the same ``projector``."""
        kernel = cls.__new__(cls)
        kernel.projector = projector
        kernel.inverse = tensors.get("inverse")
        if kernel.inverse is None:
            kernel.features, kernel.core = tensors["features"], tensors["core"]
        kernel.regularization = float(tensors["regularization"])
        kernel.training_terms = None
        return kernel

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return ``K⁻¹`` (or ``Φ`` and ``(ΦΦᵀ + λI)⁻¹``) and ``λ`` as named tensors (for the
        cache)."""
        kept = {"regularization": torch.tensor(self.regularization, dtype=torch.float64)}
        if self.inverse is not None:
            return {"inverse": self.inverse, **kept}
        return {"features": self.features, "core": self.core, **kept}

    def inverse_times(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return ``(ΦᵀΦ + λI)⁻¹ w`` for projected vectors ``w`` ``[..., d]``."""
        if self.inverse is not None:
            return vectors @ self.inverse.to(vectors)
        exact = vectors.double()
        features, core = self.features.to(exact.device), self.core.to(exact.device)
        kept = (exact @ features.T) @ core @ features
        return ((exact - kept) / self.regularization).to(vectors)

    def feature_quadratic_forms(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``φ_iᵀ (ΦᵀΦ + λI)⁻¹ φ_i`` of the training features ``Φ`` themselves, ``[N]``
        (Woodbury: the diagonal of ``G (G + λI)⁻¹``, ``G = ΦΦᵀ``)."""
        if self.inverse is not None:
            return (self.inverse_times(features) * features).sum(1)
        exact = self.features
        return ((exact @ exact.T) * self.core).sum(1).to(features)

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        """Return ``Πᵀ K⁻¹ Π g`` for gradients ``[..., P]``."""
        weights = self.inverse_times(self.projector.project(grads))
        return _transpose_project(self.projector, weights, grads)


def _damped_inverse(gram: torch.Tensor, regularization: float) -> torch.Tensor:
    """``(gram + λI)⁻¹`` by Cholesky (symmetric positive definite; 0.7x the time of a general
    inverse at 2048², float64, one CPU thread)."""
    kernel = gram + regularization * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(kernel)
    if int(info) != 0:
        raise InputError(
            f"the TRAK kernel ΦᵀΦ + λI is singular with λ = {regularization:g}; "
            "give TRAK a regularization > 0"
        )
    return torch.cholesky_inverse(factor)


def _transpose_project(projector, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``Πᵀ w`` as the gradient of ``⟨Π x, w⟩`` in ``x`` (``Π`` is linear, so any ``x`` does)."""
    with torch.enable_grad():
        point = torch.zeros_like(like, requires_grad=True)
        inner = (projector.project(point) * weights.detach()).sum()
        return torch.autograd.grad(inner, point)[0]


class TRAK:
    """TRAK (Park et al. 2023) on the model, or averaged over checkpoints (``ensemble=True``).

    Parameters
    ----------
    dim : int
        Projected dimension ``d``.
    regularization, relative : float, bool
        ``λ`` of `TRAKKernel`; default ``10⁻³`` of the kernel's mean eigenvalue.
    """

    name: ClassVar[str] = "trak"
    label: ClassVar[str] = "TRAK"
    needs: ClassVar[frozenset[str]] = frozenset({"projection"})
    self_term: ClassVar[bool] = False  # ∂S/∂g_i has no P g_i part (c is None)

    def __init__(
        self,
        dim: int = 4096,
        seed: int = 0,
        regularization: float = 1e-3,
        relative: bool = True,
        ensemble: bool = False,
        projector=None,
    ) -> None:
        self.dim, self.seed, self.projector = dim, seed, projector
        self.regularization, self.relative, self.ensemble = regularization, relative, ensemble
        self.num_terms = 1

    def cache_settings(self) -> dict | None:
        """Return what the fit depends on beyond weights and data (``None``: a projector was
        given, which the cache cannot identify)."""
        if self.projector is not None:
            return None
        return {
            "preconditioner": "trak",
            "dim": self.dim,
            "seed": self.seed,
            "sketch": SKETCH_VERSION,
            "regularization": self.regularization,
            "relative": self.relative,
            "ensemble": self.ensemble,
        }

    def restore(self, tensors: Sequence[dict], context: FitContext) -> list[Preconditioner]:
        """Return the kernels of a cached fit, one per term."""
        projector = self._projector(context)
        self.num_terms = len(tensors)
        return [TRAKKernel.from_tensors(projector, term) for term in tensors]

    def _projector(self, context: FitContext):
        parameters = dict(context.model.named_parameters())
        num_params = sum(parameters[n].numel() for n in context.names)
        return self.projector or RandomProjector(num_params, self.dim, self.seed)

    def prepare(self, context: FitContext) -> list[Preconditioner]:
        """Return one kernel per term, from the training set's projected margin gradients."""
        if context.loss != "cross_entropy":
            raise InputError(f"TRAK needs the cross-entropy loss, not {context.loss!r}")
        if self.ensemble and not context.checkpoints:
            raise InputError("TRAK over checkpoints needs checkpoints: (state_dict, weight) pairs")
        states = term_states(context, self.ensemble)
        self.num_terms = len(states)
        projector = self._projector(context)
        kernels = []
        for number, state in enumerate(states, 1):
            batches = tqdm(
                context.batches,
                desc=f"TRAK features {number}/{len(states)}",
                disable=not context.progress,
                leave=False,
            )
            features, probabilities = (
                torch.cat(parts)
                for parts in zip(
                    *(_margin_features(context, state, projector, x, y) for x, y in batches),
                    strict=True,
                )
            )
            kernel = TRAKKernel(projector, features, self.regularization, self.relative)
            # Π g_i = (1 − p_i) φ_i: the self-terms ⟨Π g_i, K⁻¹ Π g_i⟩ need no second pass.
            kernel.training_terms = (
                _residual(probabilities).square() * kernel.feature_quadratic_forms(features),
                probabilities,
            )
            kernels.append(kernel)
        return kernels

    def term_weights(self, test_probabilities: Sequence[torch.Tensor]) -> list[float]:
        """Return ``1 / (C (1 − p_t))`` per term, ``p_t`` the probability of the target."""
        residuals = [
            float((1 - p.detach()).clamp_min(torch.finfo(p.dtype).eps)) for p in test_probabilities
        ]
        return [1.0 / (len(residuals) * residual) for residual in residuals]

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return ``Σ_terms w ⟨g_t, P g_i⟩``."""
        return sum(term.weight * term.dots for term in terms)

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return ``(w, None)`` per term."""
        return [(torch.full_like(term.dots, term.weight), None) for term in terms]


def project_gradients(
    projector, gradients: GradientModel, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Return ``Π g_i``, ``[B, d]``: block by block with a `RandomProjector` (the ``[B, P]``
    gradients never formed, per-layer factorisation where the layers allow it), else
    ``projector.project`` of the materialised gradients."""
    if not hasattr(projector, "accumulate"):
        return projector.project(gradients.per_sample_grads(images, targets))
    projected = images.new_zeros(len(images), projector.dim)
    start = 0
    for piece in gradients.per_sample_grad_pieces(images, targets):
        projector.accumulate(projected, piece, start)
        start += piece.shape[1]
    return projected


def _margin_features(
    context: FitContext, state, projector, images, labels
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Π g_i / (1 − p_i)``, projected margin gradients up to their sign, ``[B, d]``, and
    ``p_i``, the probability of each label."""
    names = context.names
    gradients = GradientModel(
        context.model, names, context.loss, state, len(images), output=context.output
    )
    projected = project_gradients(projector, gradients, images, labels)
    with torch.no_grad():
        logits = read_logits(functional_call(context.model, state, (images,)), context.output)
        correct = logits.softmax(-1).gather(1, labels[:, None])[:, 0]
    return projected / _residual(correct)[:, None], correct


def _residual(probabilities: torch.Tensor) -> torch.Tensor:
    """``1 − p``, kept from zero (a label the model is certain of)."""
    return (1 - probabilities).clamp_min(torch.finfo(probabilities.dtype).eps)
