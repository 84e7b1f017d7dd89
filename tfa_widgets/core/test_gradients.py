"""Test-image gradients: computed once per query and set of weights, checked, and kept.

Scores, re-scores and maps of one test image all start from its loss gradient ``g_t`` for the
explained class; the explorer asks for the same image again and again, so gradients are kept in
a byte-bounded least-recently-used cache keyed by the weights, the image and the class.

A query for the predicted class needs a forward pass to read the class and a forward and
backward pass for its gradient: `TestGradients.predicted_class` reads the class from a forward
pass that it keeps, and the gradient of that query is then a backward pass through it. With
the gradient checked finite by its norm (taken anyway for the saturation check) rather than by
a pass of its own, the class and the gradient of a ResNet-18 query went from 183 ms to 140 ms
of one CPU core (`benchmarks/scale_build.py`, README).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tfa_widgets.core.errors import NonFiniteError, SaturatedPredictionError
from tfa_widgets.core.losses import encode_class, logit_gradient, probabilities
from tfa_widgets.core.memory_cache import BytesLRU
from tfa_widgets.core.numerics import at_least_float32
from tfa_widgets.core.prediction import Predictor
from tfa_widgets.core.query import Query
from tfa_widgets.core.terms import WeightTerm
from tfa_widgets.core.validation import all_finite


class TestGradients:
    """The loss gradient of each query's test image for its target, under each set of weights.

    Parameters
    ----------
    predictor : Predictor
        The model, asked when a gradient vanishes whether it is saturated.
    num_classes : int
        Number of classes (to encode the target).
    budget_mb : float
        Memory for the gradients kept; the latest one is always kept.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, predictor: Predictor, num_classes: int, budget_mb: float) -> None:
        self.predictor, self.num_classes = predictor, num_classes
        self.cache = BytesLRU(int(budget_mb * 2**20))
        self._pending: tuple[tuple, Callable[[torch.Tensor], torch.Tensor]] | None = None

    def predicted_class(self, term: WeightTerm, key: tuple, image: torch.Tensor) -> int:
        """Return the class the term's weights predict for an image ``[C, H, W]`` (its
        probabilities' argmax, as `Predictor` gives them), keeping the forward pass for the
        gradient of the query whose key is ``key`` (only the latest is kept).

        Raises
        ------
        NonFiniteError
            When the model's outputs contain NaN or infinite values.
        """
        logits, gradient = term.gradients.logits_and_gradient(image)
        self._pending = None  # the previous forward pass is not needed any more
        if not all_finite(logits):
            raise NonFiniteError(
                "the model's outputs contain NaN or infinite values; check the model weights "
                "(e.g. a training run that diverged) and the image"
            )
        self._pending = ((term.name, key), gradient)
        return int(probabilities(logits[None], self.predictor.loss)[0].argmax())

    def get(self, term: WeightTerm, query: Query) -> torch.Tensor:
        """Return ``g_t`` ``[P]`` of the query under the term's weights.

        Raises
        ------
        NonFiniteError
            When the gradient is NaN or infinite.
        SaturatedPredictionError
            When the gradient vanishes because the model is certain of the target.
        """
        key = (term.name, query.key, query.target)
        if key not in self.cache:
            image = query.image
            encoded = encode_class(query.target, self.predictor.loss, self.num_classes)
            encoded = encoded.to(image.device)
            if encoded.is_floating_point():
                encoded = encoded.to(image.dtype)
            gradient = self._gradient(term, query, encoded)
            norm = float(at_least_float32(gradient).norm())
            # A finite norm means finite entries; an infinite one may be an overflow alone.
            if not math.isfinite(norm) and not all_finite(gradient):
                raise NonFiniteError(
                    f"the loss gradient of the test image for class {query.target} is not "
                    "finite (NaN or inf); check the model weights and the image"
                )
            self._check_not_saturated(term, norm, query, encoded)
            self.cache[key] = gradient
        return self.cache[key]

    def _gradient(self, term: WeightTerm, query: Query, encoded: torch.Tensor) -> torch.Tensor:
        """``g_t`` ``[P]``: a backward pass through the forward pass `predicted_class` kept for
        this query, else a forward and backward pass."""
        if self._pending is not None and self._pending[0] == (term.name, query.key):
            backward, self._pending = self._pending[1], None
            return backward(encoded)
        return term.gradients.gradient(query.image, encoded)

    def _check_not_saturated(self, term: WeightTerm, norm: float, query: Query, encoded) -> None:
        """Raise `SaturatedPredictionError` when the test gradient (of norm ``norm``) is zero
        or below float32 precision because the model is certain of the target (not because
        the selected parameters do not reach the loss: then the scores are truly 0)."""
        tiny = torch.finfo(torch.float32).tiny ** 0.5  # below it a squared norm underflows
        if norm >= tiny:
            return
        logits = self.predictor.logits(query.image[None])[0]
        confident = torch.finfo(torch.float32).eps ** 0.5
        gradient_of_logits = logit_gradient(logits, encoded, self.predictor.loss)
        if float(at_least_float32(gradient_of_logits).norm()) > confident:
            return
        probs = self.predictor.probabilities_of(query.image)
        others = logits.float().clone()  # the probabilities of the others may all be 0
        others[query.target] = -torch.inf
        where = "" if term.name == "model" else f" at TracIn {term.name}"
        amount = "zero" if norm == 0 else f"{norm:.1e}, below float32 precision"
        raise SaturatedPredictionError(
            f"the model is saturated on class {query.target} for this test image{where} "
            f"(probability {float(probs[query.target]):.7f}): its loss gradient is {amount}, so "
            "every training image would score 0 and the ranking would be arbitrary. Explain "
            f"another class instead, e.g. target={int(others.argmax())} (the next most probable)"
        )
