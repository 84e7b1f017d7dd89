"""What every scorer is: a preconditioner fitted once, a score of a few inner products, and its
derivative in the training gradient.

A scorer sees each training gradient ``g_i`` only through ``⟨g_i, q⟩`` with the preconditioned
query ``q = P g_t`` and ``⟨g_i, P g_i⟩`` (one set of weights: the model, or each checkpoint).
Its derivative is then ``∂S/∂g_i = a_i q + c_i P g_i`` with two scalars per image, so the TFA map
is ``∇_x ⟨g(x, y_i), a_i q + c_i P g_i⟩`` with ``P``, ``q``, ``a_i`` and ``c_i`` held fixed: the
preconditioner is fitted on the training set once, so the map leaves out how the image itself
changes ``P``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from tfa_widgets.core.outputs import OutputFn
from tfa_widgets.core.params import model_state

#: What a scorer may need beyond the model and the training set.
NEEDS = ("checkpoints", "factors", "projection")


class Preconditioner(Protocol):
    """A fixed symmetric positive semi-definite ``P``, applied to flat gradients."""

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        """Return ``P g`` for gradients ``[..., P]``."""
        ...


class Identity:
    """``P = I``: the plain gradient inner product."""

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        """Return ``grads`` unchanged."""
        return grads


@dataclass(frozen=True)
class ScoreInputs:
    """The inner products a score is made of, for one set of weights.

    Attributes
    ----------
    dots : Tensor
        ``⟨g_i, q⟩`` with ``q = P g_t``, ``[N]``.
    train_self : Tensor
        ``⟨g_i, P g_i⟩``, ``[N]`` (``‖g_i‖²`` when ``P = I``).
    test_self : Tensor
        ``⟨g_t, P g_t⟩``, a scalar.
    weight : float
        This term's factor in the score (a TracIn learning rate, TRAK's test re-weighting).
    """

    dots: torch.Tensor
    train_self: torch.Tensor
    test_self: torch.Tensor
    weight: float = 1.0


#: ``(a, c)`` of one term, each ``[N]``; ``c`` is ``None`` where the score has no ``P g_i`` part.
Coefficients = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class FitContext:
    """What a scorer may fit its preconditioners on.

    Attributes
    ----------
    model : nn.Module
        In eval mode.
    names : list of str
        Selected parameter names, in the order of the flat gradients.
    batches : iterable of (images, encoded targets)
        The training set, iterable more than once (a ``DataLoader`` or a list).
    loss : str
        A loss of `tfa_widgets.core.losses`.
    checkpoints : list of (state_dict, weight)
        Sets of weights whose terms are summed (TracIn-CP, TRAK over checkpoints).
    progress : bool
        Show progress bars while fitting.
    output : callable, optional
        Maps the model's output to its logits (the engine's ``output=``, see `read_logits`).
    """

    model: nn.Module
    names: list[str]
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    loss: str = "cross_entropy"
    checkpoints: Sequence[tuple[dict, float]] = field(default_factory=list)
    progress: bool = True
    output: OutputFn | None = None


@runtime_checkable
class Scorer(Protocol):
    """One training-data attribution score and its derivative in the training gradient."""

    name: ClassVar[str]  # the registry key, e.g. "influence"
    label: ClassVar[str]  # for people, e.g. "Influence (EK-FAC)"
    needs: ClassVar[frozenset[str]]  # a subset of NEEDS

    def prepare(self, context: FitContext) -> list[Preconditioner]:
        """Return one preconditioner per term (the model, or each checkpoint), fitted once."""
        ...

    def term_weights(self, test_probabilities: Sequence[torch.Tensor]) -> list[float]:
        """Return each term's `ScoreInputs.weight`, from the probability of the explained target
        under that term's weights."""
        ...

    def score(self, terms: Sequence[ScoreInputs]) -> torch.Tensor:
        """Return the scores ``[N]``; positive means proponent (helps the test target)."""
        ...

    def coefficients(self, terms: Sequence[ScoreInputs]) -> list[Coefficients]:
        """Return per term ``(a, c)`` with ``∂S/∂g_i = a_i q + c_i P g_i`` for that term."""
        ...


@runtime_checkable
class IndexScorer(Protocol):
    """A scorer served from a gradient index: a function of ``⟨g_i, g_t⟩``, ``‖g_i‖`` and
    ``‖g_t‖`` alone (``P = I``), summed over the weight terms (grad-cos, grad-dot, TracIn-CP).

    The engine scores the index with `query` and `index_scores`, and computes TFA maps from
    `norm_coefficients`; ``needs_train_gradient`` is False when ``∂S/∂g_i = g_t`` for every
    image (then maps need no per-example gradient).
    """

    needs_train_gradient: ClassVar[bool]

    def query(self, test_grad: torch.Tensor) -> torch.Tensor:
        """Return the test gradient ``[P]`` (or ``[B, P]``) as it is scored against the index."""
        ...

    def index_scores(
        self, dots: torch.Tensor, train_norms: torch.Tensor, test_norms: torch.Tensor
    ) -> torch.Tensor:
        """Return one term's scores from ``⟨g_i, query⟩`` and the norms of ``g_i`` and the query."""
        ...

    def norm_coefficients(
        self, dots: torch.Tensor, train_norms: torch.Tensor, test_norm: torch.Tensor
    ) -> Coefficients:
        """Return ``(a, c)`` of one term with ``∂S/∂g_i = a_i g_t + c_i g_i``."""
        ...


@runtime_checkable
class CacheableScorer(Scorer, Protocol):
    """A scorer whose fitted preconditioners can be saved and restored (influence, TRAK)."""

    self_term: ClassVar[bool]  # whether ∂S/∂g_i has a ``c_i P g_i`` part

    def cache_settings(self) -> dict | None:
        """Return the settings the fit depends on beyond weights and data (``None``: do not
        cache); scorers that return equal settings share one fit."""
        ...

    def restore(self, tensors: Sequence[dict], context: FitContext) -> list[Preconditioner]:
        """Return the preconditioners, one per term, from their saved ``tensors()``."""
        ...


def score_inputs(
    preconditioner: Preconditioner,
    train_grads: torch.Tensor,
    test_grad: torch.Tensor,
    weight: float = 1.0,
) -> ScoreInputs:
    """Return the `ScoreInputs` of materialised training gradients ``[N, P]`` and a test one."""
    query = preconditioner.apply(test_grad)
    return ScoreInputs(
        dots=train_grads @ query,
        train_self=(train_grads * preconditioner.apply(train_grads)).sum(-1),
        test_self=test_grad @ query,
        weight=weight,
    )


def safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """``sqrt`` clamped away from zero, so that it can divide."""
    return values.clamp_min(torch.finfo(values.dtype).tiny).sqrt()


def term_states(context: FitContext, checkpoints: bool) -> list[dict[str, torch.Tensor]]:
    """Return the full state (parameters and buffers) of each term: every checkpoint's merged
    into the model's, or the model's own alone."""
    state = model_state(context.model)
    if not checkpoints:
        return [state]
    return [{**state, **checkpoint} for checkpoint, _ in context.checkpoints]
