"""Scores and TFA maps of the preconditioned scorers (influence, RelatIF, TRAK) for the engine.

Each scorer's preconditioner (EK-FAC factors, TRAK kernel) is fitted once per engine, with a
progress bar, on the model's own weights, and kept in memory for the engine's lifetime: it is
not written to the engine's ``cache_dir``. Scores are exact: every training gradient is formed
once more per query batch, a batch at a time. Maps take the plain-autograd path of
`tfa_widgets.core.scoring.reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.params import model_state
from tfa_widgets.core.scoring import FitContext, Preconditioner, ScoreInputs, Scorer, make_scorer
from tfa_widgets.core.scoring.reference import tfa_maps

#: The scorers this module serves, beside the engine's own grad_cos, grad_dot and tracin_cp.
PRECONDITIONED = ("influence", "relatif", "trak")


@dataclass
class _Fitted:
    scorer: Scorer
    preconditioner: Preconditioner
    train_self: torch.Tensor  # ⟨g_i, P g_i⟩, [N]


class PreconditionedScorers:
    """The preconditioned scorers of one engine, fitted on first use.

    Parameters
    ----------
    gradients : GradientModel
        The model's per-example gradients (the model's own weights).
    train_batch : callable
        Maps training indices to ``(images, encoded targets)``.
    num_train, batch_size : int
    progress : bool
        Show progress bars while fitting and scoring.
    """

    def __init__(
        self,
        gradients: GradientModel,
        train_batch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
        num_train: int,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.gradients = gradients
        self.train_batch = train_batch
        self.num_train, self.batch_size, self.progress = num_train, batch_size, progress
        self._fitted: dict[str, _Fitted] = {}

    def methods(self, loss: str) -> list[str]:
        """Return the scorers available for ``loss`` (TRAK only for cross-entropy)."""
        return [m for m in PRECONDITIONED if m != "trak" or loss == "cross_entropy"]

    def _batches(self, description: str | None):
        chunks = torch.arange(self.num_train).split(self.batch_size)
        hidden = description is None or not self.progress
        for chunk in tqdm(chunks, desc=description, unit="batch", disable=hidden):
            yield self.train_batch(chunk.tolist())

    def fit(self, method: str) -> _Fitted:
        """Return the fitted scorer ``method``, fitting it on the training set the first time."""
        if method not in self._fitted:
            model: nn.Module = self.gradients.model
            scorer = make_scorer(method)
            context = FitContext(
                model,
                list(self.gradients.names),
                _Reiterable(lambda: self._batches(None)),  # the scorer shows its own bars
                self.gradients.loss,
                progress=self.progress,
            )
            (preconditioner,) = scorer.prepare(context)
            train_self = torch.cat(
                [
                    (grads * preconditioner.apply(grads)).sum(-1)
                    for grads in self._train_grads(f"{method} self-scores")
                ]
            )
            self._fitted[method] = _Fitted(scorer, preconditioner, train_self)
        return self._fitted[method]

    def _train_grads(self, description: str):
        for images, targets in self._batches(description):
            yield self.gradients.per_sample_grads(images, targets)

    def scores(
        self, method: str, test_grads: torch.Tensor, test_probabilities: torch.Tensor
    ) -> torch.Tensor:
        """Return scores ``[B, N]`` of test gradients ``[B, P]``, ``p_t`` of each target ``[B]``."""
        fitted = self.fit(method)
        queries = fitted.preconditioner.apply(test_grads)
        dots = torch.cat([grads @ queries.T for grads in self._train_grads(f"{method} scores")])
        rows = []
        for b in range(len(test_grads)):
            (weight,) = fitted.scorer.term_weights([test_probabilities[b]])
            term = ScoreInputs(dots[:, b], fitted.train_self, test_grads[b] @ queries[b], weight)
            rows.append(fitted.scorer.score([term]))
        return torch.stack(rows)

    def maps(
        self,
        method: str,
        test_grad: torch.Tensor,
        test_probability: torch.Tensor,
        images: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Return ``∇_{x_i} S`` for training images ``[k, C, H, W]`` and one test gradient."""
        if self.gradients.output is not None:
            raise InputError(
                f"TFA maps of {method!r} do not support an output= hook yet; use a model that "
                "returns logits, or method='grad_cos', 'grad_dot' or 'tracin_cp'"
            )
        fitted = self.fit(method)
        model = self.gradients.model
        return tfa_maps(
            fitted.scorer,
            [fitted.preconditioner],
            [model_state(model)],
            model,
            list(self.gradients.names),
            self.gradients.loss,
            images,
            targets,
            [test_grad],
            fitted.scorer.term_weights([test_probability]),
        )


class _Reiterable:
    """An iterable that calls ``make`` for each pass (a scorer's fit may pass more than once)."""

    def __init__(self, make: Callable[[], Sequence]) -> None:
        self.make = make

    def __iter__(self):
        return iter(self.make())
