"""Scores, self-scores and TFA maps of the preconditioned scorers (influence, RelatIF, TRAK).

Each scorer's preconditioner (EK-FAC factors, TRAK kernel) is fitted once, with progress bars,
together with every training image's ``⟨g_i, P g_i⟩`` and the probability of its label, and
kept in the engine's cache directory (`PreconditionerStore`, within the indexes' budget), keyed
by the fingerprint of the weights, the data and the scorer's settings: a later engine on the
same model and data loads it instead of fitting again. Influence and RelatIF share one fit.
With checkpoints, TRAK fits a kernel on each (TRAK's ensemble; `tfa_widgets.core.scoring.trak`
says how its mean differs) and sums their terms, each against its checkpoint's index.

Scores come from the engine's gradient index with the preconditioned query ``q = P g_t``:
``⟨g_i, q⟩`` is one matrix product against an exact index; a projected index takes the
projected ``q`` and `top_k` re-scores its candidates exactly (one forward-mode pass along
``q``), as grad-cos does. RelatIF divides by the stored ``√⟨g_i, H⁻¹ g_i⟩``, TRAK weighs by
``1 / (1 − p_t)``. Maps take the engine's batched machinery (per-layer factorisation where the
layers allow it) with ``q`` and the scorer's coefficients.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.fingerprint import combine, state_fingerprint
from tfa_widgets.core.gradients import GradientModel, batched_apply
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.index_store import IndexStore
from tfa_widgets.core.kfac import KFACPreconditioner
from tfa_widgets.core.losses import batch_losses
from tfa_widgets.core.outputs import read_logits
from tfa_widgets.core.preconditioner_store import PreconditionerStore, preconditioner_parts
from tfa_widgets.core.scoring import (
    CacheableScorer,
    FitContext,
    Preconditioner,
    ScoreInputs,
    make_scorer,
)

#: The scorers this module serves, beside the engine's own grad_cos, grad_dot and tracin_cp.
PRECONDITIONED = ("influence", "relatif", "trak")


@dataclass
class ScoringTerm:
    """One set of weights a score sums over: its per-example gradients and gradient index."""

    gradients: GradientModel
    index: Callable[[], GradientIndex]

    def state(self) -> dict[str, torch.Tensor]:
        """Return the full state (parameters and buffers) of these weights."""
        return {**self.gradients.frozen, **self.gradients.params}


@dataclass
class _Fit:
    """One fit: the preconditioner of each term and what the self-scores need."""

    preconditioners: list[Preconditioner]
    train_self: torch.Tensor  # ⟨g_i, P g_i⟩ per term, [T, N]
    train_probabilities: torch.Tensor  # exp(−ℓ_i): the probability of each label, [T, N]


@dataclass
class _Fitted:
    scorer: CacheableScorer
    fit: _Fit
    terms: list[ScoringTerm]

    @property
    def preconditioner(self) -> Preconditioner:
        return self.fit.preconditioners[0]


class PreconditionedScorers:
    """The preconditioned scorers of one engine, fitted (or loaded from the cache) on first use.

    Parameters
    ----------
    model : ScoringTerm
        The model's own weights.
    checkpoints : list of ScoringTerm
        The engine's checkpoints (TRAK fits one kernel on each when there are any, unless
        ``settings["trak"]["ensemble"]`` says otherwise).
    train_batch : callable
        Maps training indices to ``(images, encoded targets)``.
    num_train, batch_size : int
    progress : bool
        Show progress bars while fitting and scoring.
    store : IndexStore, optional
        The engine's cache (no fit is saved when ``None`` or without a directory).
    data_fingerprint : callable, optional
        Returns the training set's fingerprint (asked only when a fit is looked up).
    settings : mapping, optional
        Keyword arguments of each scorer's class, by name: ``{"influence": {"settings":
        KFACSettings(damping=0.01)}, "trak": {"dim": 1024}}``.

    Raises
    ------
    InputError
        When ``settings`` names an unknown scorer or a setting its class does not take.
    """

    def __init__(
        self,
        model: ScoringTerm,
        checkpoints: Sequence[ScoringTerm],
        train_batch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
        num_train: int,
        batch_size: int,
        progress: bool,
        store: IndexStore | None = None,
        data_fingerprint: Callable[[], str] | None = None,
        settings: Mapping[str, dict] | None = None,
    ) -> None:
        self.model, self.checkpoints = model, list(checkpoints)
        self.gradients = model.gradients
        self.train_batch = train_batch
        self.num_train, self.batch_size, self.progress = num_train, batch_size, progress
        self.store = PreconditionerStore(store or IndexStore(None))
        self.data_fingerprint = data_fingerprint or (lambda: "unknown")
        settings = {name: dict(values) for name, values in (settings or {}).items()}
        unknown = sorted(set(settings) - set(PRECONDITIONED))
        if unknown:
            raise InputError(
                f"scorer_settings names {unknown}; only {PRECONDITIONED} take settings"
            )
        if self.checkpoints:
            settings.setdefault("trak", {}).setdefault("ensemble", True)
        self.scorers: dict[str, CacheableScorer] = {}
        for method in PRECONDITIONED:
            try:
                self.scorers[method] = make_scorer(method, **settings.get(method, {}))
            except TypeError as error:
                raise InputError(f"scorer_settings[{method!r}]: {error}") from None
        self.fits = 0  # preconditioners fitted (not loaded) by this object
        self._fits: dict[str, _Fit] = {}

    def methods(self, loss: str) -> list[str]:
        """Return the scorers available for ``loss`` (TRAK only for cross-entropy)."""
        return [m for m in PRECONDITIONED if m != "trak" or loss == "cross_entropy"]

    def over_checkpoints(self, method: str) -> bool:
        """Return whether ``method`` sums terms over the engine's checkpoints."""
        return bool(getattr(self.scorers[method], "ensemble", False))

    def terms(self, method: str) -> list[ScoringTerm]:
        """Return the sets of weights ``method`` sums over: the checkpoints, or the model."""
        if self.over_checkpoints(method):
            if not self.checkpoints:
                raise InputError("TRAK over checkpoints needs checkpoints given to the engine")
            return self.checkpoints
        return [self.model]

    def _batches(self, description: str | None):
        chunks = torch.arange(self.num_train).split(self.batch_size)
        hidden = description is None or not self.progress
        for chunk in tqdm(chunks, desc=description, unit="batch", disable=hidden):
            yield self.train_batch(chunk.tolist())

    def _context(self, terms: list[ScoringTerm]) -> FitContext:
        return FitContext(
            self.gradients.model,
            list(self.gradients.names),
            _Reiterable(lambda: self._batches(None)),  # the scorer shows its own bars
            self.gradients.loss,
            checkpoints=[(term.state(), 1.0) for term in terms if term is not self.model],
            progress=self.progress,
            output=self.gradients.output,
        )

    def fit(self, method: str) -> _Fitted:
        """Return the fitted scorer ``method``: from memory, from the cache, or fitted now."""
        scorer, terms = self.scorers[method], self.terms(method)
        settings = scorer.cache_settings()
        parts = None
        if settings is not None:
            parts = preconditioner_parts(
                self.gradients,
                model_name=type(self.gradients.model).__qualname__,
                data_fingerprint=self.data_fingerprint(),
                settings=settings,
                checkpoints=[
                    state_fingerprint(term.state()) for term in terms if term is not self.model
                ],
            )
        key = method if parts is None else combine(**parts)
        if key not in self._fits:
            self._fits[key] = self._load_or_fit(scorer, terms, key, parts)
        return _Fitted(scorer, self._fits[key], terms)

    def _load_or_fit(
        self, scorer: CacheableScorer, terms: list[ScoringTerm], key: str, parts: dict | None
    ) -> _Fit:
        context = self._context(terms)
        tensors = self.store.load(key) if parts is not None else None
        if tensors is not None:
            fit = self._restore(scorer, tensors, context, len(terms))
            if fit is not None:
                return fit
        if parts is not None:
            self.store.check_writable(key)
        preconditioners = scorer.prepare(context)
        self.fits += 1
        fit = self._self_terms(preconditioners, terms, f"{scorer.name} self-scores")
        if parts is not None:
            self.store.save(key, _fit_tensors(fit), parts)
        return fit

    def _restore(
        self, scorer: CacheableScorer, tensors: dict, context: FitContext, terms: int
    ) -> _Fit | None:
        """The fit saved as ``tensors``, or ``None`` with a warning when they do not fit."""
        device = self.gradients.flatten(self.gradients.params).device
        try:
            per_term = [
                {
                    name.partition("/")[2]: value
                    for name, value in tensors.items()
                    if name.startswith(f"term{t}/")
                }
                for t in range(terms)
            ]
            fit = _Fit(
                scorer.restore(per_term, context),
                tensors["train_self"].to(device),
                tensors["train_probabilities"].to(device),
            )
            expected = (terms, self.num_train)
            if fit.train_self.shape != expected or fit.train_probabilities.shape != expected:
                raise ValueError(f"self-terms of shape {tuple(fit.train_self.shape)}")
        except (KeyError, ValueError, RuntimeError, IndexError) as error:
            warnings.warn(
                f"the cached {scorer.name} fit does not match this engine ({error}); fitting "
                "it again",
                stacklevel=4,
            )
            return None
        return fit

    def _self_terms(
        self, preconditioners: list[Preconditioner], terms: list[ScoringTerm], description: str
    ) -> _Fit:
        """``⟨g_i, P g_i⟩`` and the label probability of every training image, per term
        (those the fit formed itself where it did, see `fit_kfac`)."""
        formed = [getattr(p, "training_terms", None) for p in preconditioners]
        if all(terms is not None for terms in formed):
            device = self.gradients.flatten(self.gradients.params).device
            selves, probabilities = (torch.stack(t).to(device) for t in zip(*formed, strict=True))
            return _Fit(preconditioners, selves, probabilities)
        selves, probabilities = [], []
        for images, targets in self._batches(description):
            batch_selves, batch_probabilities = [], []
            for preconditioner, term in zip(preconditioners, terms, strict=True):
                batch_selves.append(_quadratic_forms(preconditioner, term, images, targets))
                losses = batch_losses(_logits(term.gradients, images), targets, self.gradients.loss)
                batch_probabilities.append((-losses).exp())
            selves.append(torch.stack(batch_selves))
            probabilities.append(torch.stack(batch_probabilities))
        return _Fit(preconditioners, torch.cat(selves, 1), torch.cat(probabilities, 1))

    def probabilities(
        self, method: str, images: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """Return the probability of each image's class under each term's weights, ``[T, B]``."""
        rows = []
        for term in self.terms(method):
            logits = _logits(term.gradients, images)
            if self.gradients.loss == "cross_entropy":
                probabilities = logits.softmax(-1)
            else:
                probabilities = logits.sigmoid()
            rows.append(probabilities.gather(1, classes[:, None].to(logits.device))[:, 0])
        return torch.stack(rows)

    def self_scores(self, method: str) -> torch.Tensor:
        """Return each training image's score against itself, ``S(z_i, z_i)``, ``[N]``.

        Influence: ``⟨g_i, H⁻¹ g_i⟩``; RelatIF: ``√⟨g_i, H⁻¹ g_i⟩`` (its score of ``z_i``
        against itself); TRAK: ``⟨Π g_i, K⁻¹ Π g_i⟩ / (1 − p_i)``, ``p_i`` the probability of
        the label (TRAK's score with the training image as the test; the mean over
        checkpoints with them).
        """
        fitted = self.fit(method)
        probabilities = fitted.fit.train_probabilities
        weights = torch.tensor(
            [fitted.scorer.term_weights(list(column)) for column in probabilities.T],
            dtype=fitted.fit.train_self.dtype,
            device=fitted.fit.train_self.device,
        ).T  # [T, N]
        terms = [
            ScoreInputs(own, own, own, weight)
            for own, weight in zip(fitted.fit.train_self, weights, strict=True)
        ]
        return fitted.scorer.score(terms)

    def scores(
        self,
        method: str,
        test_grads: torch.Tensor,
        test_probabilities: torch.Tensor,
        exact: bool = False,
    ) -> torch.Tensor:
        """Return scores ``[B, N]`` of test gradients ``[T, B, P]`` (one row per term) and the
        probabilities ``[T, B]`` of their targets.

        ``⟨g_i, q⟩`` with ``q = P g_t`` from each term's gradient index: one matrix product,
        exact with an exact index; with a projected one ``q`` is projected too (approximate),
        unless ``exact``: then every ``⟨g_i, q⟩`` is one forward-mode pass over the training
        set.
        """
        fitted = self.fit(method)
        queries = self._queries(fitted, test_grads)
        dots = []
        for term, term_queries in zip(fitted.terms, queries, strict=True):
            index = term.index()
            if index.approximate and exact:
                everything = torch.arange(self.num_train)
                dots.append(
                    torch.stack([self._exact_dots(term, q, everything) for q in term_queries], 1)
                )
            else:
                dots.append(index.dots(term_queries))  # [N, B]
        return torch.stack(
            [
                self._score(
                    fitted,
                    [d[:, b] for d in dots],
                    fitted.fit.train_self,
                    test_grads[:, b],
                    queries[:, b],
                    test_probabilities[:, b],
                )
                for b in range(test_grads.shape[1])
            ]
        )

    def top_k(
        self,
        method: str,
        test_grads: torch.Tensor,
        test_probabilities: torch.Tensor,
        k: int,
        opponents: bool,
        rescore: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return indices and scores ``[B, k]`` of the highest (lowest) scores.

        From the index; with a projected index the ``max(rescore, 2k)`` best candidates of
        each test are re-scored exactly (forward mode along ``q``) and ranked by those scores.
        """
        sign = -1.0 if opponents else 1.0
        approximate = sign * self.scores(method, test_grads, test_probabilities)
        fitted = self.fit(method)
        if not any(term.index().approximate for term in fitted.terms):
            values, indices = approximate.topk(k, dim=1)
            return indices.cpu(), (sign * values).float().cpu()
        queries = self._queries(fitted, test_grads)
        pool = min(self.num_train, max(rescore, 2 * k))
        chosen, values = [], []
        for b, row in enumerate(approximate.topk(pool, dim=1).indices.cpu()):
            dots = [
                self._exact_dots(term, q, row)
                for term, q in zip(fitted.terms, queries[:, b], strict=True)
            ]
            train_self = fitted.fit.train_self[:, row.to(fitted.fit.train_self.device)]
            exact = self._score(
                fitted, dots, train_self, test_grads[:, b], queries[:, b], test_probabilities[:, b]
            )
            best, order = (sign * exact).topk(k)
            chosen.append(row[order.cpu()])
            values.append((sign * best).float().cpu())
        return torch.stack(chosen), torch.stack(values)

    @staticmethod
    def _queries(fitted: _Fitted, test_grads: torch.Tensor) -> torch.Tensor:
        """``q = P g_t`` per term, ``[T, B, P]``."""
        return torch.stack(
            [p.apply(g) for p, g in zip(fitted.fit.preconditioners, test_grads, strict=True)]
        )

    @staticmethod
    def _score(fitted: _Fitted, dots, train_self, test_grads, queries, probabilities):
        """The scores of training images from each term's ``⟨g_i, q⟩`` and ``⟨g_i, P g_i⟩``."""
        weights = fitted.scorer.term_weights(list(probabilities))
        terms = [
            ScoreInputs(d.to(own), own, g @ q, w)
            for d, own, g, q, w in zip(dots, train_self, test_grads, queries, weights, strict=True)
        ]
        return fitted.scorer.score(terms)

    def _exact_dots(self, term: ScoringTerm, query: torch.Tensor, rows: torch.Tensor):
        """``⟨g_i, q⟩`` of training images ``rows``, by forward mode, a batch at a time."""
        dots = []
        for chunk in rows.split(self.batch_size):
            images, targets = self.train_batch(chunk.tolist())
            dots.append(term.gradients.dots_along(images, targets, query))
        return torch.cat(dots)

    def maps(
        self,
        method: str,
        test_grads: torch.Tensor,
        test_probabilities: torch.Tensor,
        images: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Return ``∇_{x_i} S`` for training images ``[k, C, H, W]``, one test gradient per
        term ``[T, P]`` and the probabilities ``[T]`` of its target.

        Per term, with the per-layer factorisation, one batched double backward per batch of
        ``Σ_i a_i ⟨g_i, q⟩ + c_i ⟨g_i, P g_i⟩ / 2`` (``q = P g_t``); otherwise the directions
        ``a_i q + c_i P g_i`` from materialised gradients, then ``∇_x ⟨g(x, y_i), v_i⟩`` by
        reverse-over-forward. `tfa_widgets.core.scoring.reference` is the ground truth both
        are tested against.
        """
        fitted = self.fit(method)
        weights = fitted.scorer.term_weights(list(test_probabilities))
        total = torch.zeros_like(images)
        for term, preconditioner, test_grad, weight in zip(
            fitted.terms, fitted.fit.preconditioners, test_grads, weights, strict=True
        ):
            maps = _term_maps(fitted.scorer, term.gradients, preconditioner, test_grad, weight)
            total += batched_apply(maps, self.batch_size, images, targets)
        return total


def _term_maps(scorer, gradients: GradientModel, preconditioner, test_grad, weight: float):
    """The function ``(images, targets) -> maps`` of one term of ``scorer``."""
    query = preconditioner.apply(test_grad)
    test_self = test_grad @ query

    def coefficients(dots: torch.Tensor, train_self: torch.Tensor | None) -> tuple:
        ((a, c),) = scorer.coefficients([ScoreInputs(dots, train_self, test_self, weight)])
        return a, c

    if gradients.factored is not None:
        return functools.partial(
            gradients.factored.input_grads_of_preconditioned_score,
            query=query,
            coefficients=coefficients,
            preconditioner=preconditioner if scorer.self_term else None,
        )

    def maps(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grads = gradients.per_sample_grads(images, targets)
        own = preconditioner.apply(grads) if scorer.self_term else None
        a, c = coefficients(grads @ query, None if own is None else (grads * own).sum(1))
        directions = a[:, None] * query
        if c is not None:
            directions = directions + c[:, None] * own
        return gradients.input_grads_of_dots(images, targets, directions.detach())

    return maps


def _quadratic_forms(preconditioner, term: ScoringTerm, images, targets) -> torch.Tensor:
    """``⟨g_i, P g_i⟩`` of a batch: by the preconditioner's own cheaper way where it has one
    (EK-FAC: rotated layer terms of the model's own weights), else from materialised
    gradients."""
    gradients = term.gradients
    if isinstance(preconditioner, KFACPreconditioner):
        return preconditioner.quadratic_forms(
            gradients.model, images, targets, gradients.loss, gradients.output
        )
    grads = gradients.per_sample_grads(images, targets)
    return (grads * preconditioner.apply(grads)).sum(-1)


def _logits(gradients: GradientModel, images: torch.Tensor) -> torch.Tensor:
    """The logits of ``images`` under ``gradients``' weights."""
    with torch.no_grad():
        raw = functional_call(gradients.model, (gradients.params, gradients.frozen), (images,))
    return read_logits(raw, gradients.output)


def _fit_tensors(fit: _Fit) -> dict[str, torch.Tensor]:
    tensors = {
        f"term{t}/{name}": value
        for t, preconditioner in enumerate(fit.preconditioners)
        for name, value in preconditioner.tensors().items()
    }
    tensors["train_self"] = fit.train_self
    tensors["train_probabilities"] = fit.train_probabilities
    return tensors


class _Reiterable:
    """An iterable that calls ``make`` for each pass (a scorer's fit may pass more than once)."""

    def __init__(self, make: Callable[[], Sequence]) -> None:
        self.make = make

    def __iter__(self):
        return iter(self.make())
