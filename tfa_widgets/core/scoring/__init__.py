"""Training-data attribution scorers, one class each, in a registry.

Every scorer is a function of ``⟨g_i, P g_t⟩`` and ``⟨g_i, P g_i⟩`` for a preconditioner ``P``
fitted once (see `base`), so each has a TFA map by the same double backward.
"""

from __future__ import annotations

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.scoring.base import (
    CacheableScorer,
    FitContext,
    Identity,
    IndexScorer,
    Preconditioner,
    ScoreInputs,
    Scorer,
    score_inputs,
    term_states,
)
from tfa_widgets.core.scoring.influence import Influence, RelatIF
from tfa_widgets.core.scoring.similarity import GradCos, GradDot, TracInCP
from tfa_widgets.core.scoring.trak import TRAK, TRAKKernel

SCORERS: dict[str, type] = {
    cls.name: cls for cls in (GradCos, GradDot, TracInCP, Influence, RelatIF, TRAK)
}


def make_scorer(name: str, **settings) -> Scorer:
    """Return the scorer registered as ``name``, built with ``settings``.

    Raises
    ------
    InputError
        ``name`` is not registered.
    """
    if name not in SCORERS:
        raise InputError(f"unknown scorer {name!r}; choose one of {tuple(SCORERS)}")
    return SCORERS[name](**settings)


def available_scorers(has: set[str] | frozenset[str]) -> list[str]:
    """Return the registered scorers whose needs are all in ``has`` (e.g. ``{"checkpoints"}``;
    ``"factors"`` and ``"projection"`` are fitted on demand, so an engine passes them)."""
    return [name for name, cls in SCORERS.items() if cls.needs <= set(has)]


__all__ = [
    "CacheableScorer",
    "SCORERS",
    "TRAK",
    "FitContext",
    "GradCos",
    "GradDot",
    "Identity",
    "IndexScorer",
    "Influence",
    "Preconditioner",
    "RelatIF",
    "ScoreInputs",
    "Scorer",
    "TRAKKernel",
    "TracInCP",
    "available_scorers",
    "make_scorer",
    "score_inputs",
    "term_states",
]
