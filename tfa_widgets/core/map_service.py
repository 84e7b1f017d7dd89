"""TFA maps ``∇_{x_i} S(z_i, z_t)`` of loaded training images for a resolved query.

The training images come in already loaded (`TrainingBatch`), so an explanation reads each of
them once for the maps, Grad-CAM and the display. SmoothGrad averages the maps of noisy copies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from tfa_widgets.core.data_access import TrainingBatch
from tfa_widgets.core.errors import InputError
from tfa_widgets.core.gradients import batched_apply
from tfa_widgets.core.maps import noisy_copies
from tfa_widgets.core.preconditioned import PreconditionedScorers
from tfa_widgets.core.prediction import Predictor
from tfa_widgets.core.query import Query
from tfa_widgets.core.score_service import preconditioned_inputs
from tfa_widgets.core.scoring import IndexScorer, make_scorer
from tfa_widgets.core.settings import SmoothGrad
from tfa_widgets.core.terms import WeightTerm
from tfa_widgets.core.test_gradients import TestGradients
from tfa_widgets.core.validation import check_finite


class MapService:
    """TFA maps of one engine.

    Parameters
    ----------
    terms : callable
        Maps a method to the `WeightTerm` values its score sums over.
    test_gradients : TestGradients
        The test gradients of each query.
    preconditioned : PreconditionedScorers
        Influence, RelatIF and TRAK.
    predictor : Predictor
        The model's probabilities (TRAK re-weights by them).
    batch_size : int
        Images (noisy copies included) per batch.
    """

    def __init__(
        self,
        terms: Callable[[str], list[WeightTerm]],
        test_gradients: TestGradients,
        preconditioned: PreconditionedScorers,
        predictor: Predictor,
        batch_size: int,
    ) -> None:
        self.terms, self.test_gradients = terms, test_gradients
        self.preconditioned, self.predictor, self.batch_size = preconditioned, predictor, batch_size

    def maps(
        self, query: Query, batch: TrainingBatch, smooth: SmoothGrad | None, method: str
    ) -> torch.Tensor:
        """Return the maps ``[k, C, H, W]`` of the training images in ``batch``, on the CPU.

        Raises
        ------
        InputError
            When ``smooth`` is not None or a `SmoothGrad`.
        """
        if smooth is not None and not isinstance(smooth, SmoothGrad):
            raise InputError(f"smooth must be None or a SmoothGrad, got {smooth!r}")
        images, targets = batch.images, batch.targets
        repeats = smooth.n if smooth is not None else 1
        if smooth is not None:
            images = noisy_copies(images, smooth)
            targets = targets.repeat_interleave(repeats, dim=0)
        scorer = make_scorer(method)
        if not isinstance(scorer, IndexScorer):
            grads, probabilities = preconditioned_inputs(
                self.preconditioned, self.terms(method), self.test_gradients, [query], method
            )
            total = self.preconditioned.maps(
                method, grads[:, 0], probabilities[:, 0], images, targets
            )
        else:
            total = torch.zeros_like(images)
            for term in self.terms(method):
                test_grad = scorer.query(self.test_gradients.get(term, query))
                input_grads = functools.partial(
                    term.gradients.input_grads_of_score, scorer=scorer, test_grad=test_grad
                )
                total += term.weight * batched_apply(input_grads, self.batch_size, images, targets)
        maps = total.view(len(batch.indices), repeats, *images.shape[1:]).mean(dim=1)
        check_finite(maps, "the TFA maps")
        return maps.float().cpu()
