"""Test-image gradients: computed once per query and set of weights, checked, and kept.

Scores, re-scores and maps of one test image all start from its loss gradient ``g_t`` for the
explained class; the explorer asks for the same image again and again, so gradients are kept in
a byte-bounded least-recently-used cache keyed by the weights, the image and the class.
"""

from __future__ import annotations

import torch

from tfa_widgets.core.errors import NonFiniteError, SaturatedPredictionError
from tfa_widgets.core.losses import encode_class, logit_gradient
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
            gradient = term.gradients.gradient(image, encoded)
            if not all_finite(gradient):
                raise NonFiniteError(
                    f"the loss gradient of the test image for class {query.target} is not "
                    "finite (NaN or inf); check the model weights and the image"
                )
            self._check_not_saturated(term, gradient, query, encoded)
            self.cache[key] = gradient
        return self.cache[key]

    def _check_not_saturated(self, term: WeightTerm, gradient, query: Query, encoded) -> None:
        """Raise `SaturatedPredictionError` when the test gradient is zero or below float32
        precision because the model is certain of the target (not because the selected
        parameters do not reach the loss: then the scores are truly 0)."""
        tiny = torch.finfo(torch.float32).tiny ** 0.5  # below it a squared norm underflows
        norm = float(at_least_float32(gradient).norm())
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
