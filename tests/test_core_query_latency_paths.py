"""The paths a query takes on a projected index: candidates, exact re-scoring, query vectors.

`ScoreService` forms each test image's query vector once and hands it to the search and to the
exact re-scoring; these tests check the results against scores computed independently, by
plain float64 autograd over every training image.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from core_models import small_cnn, small_dataset
from precision import gamma, ranking_margin, unit_roundoff

from tfa_widgets import TFAEngine
from tfa_widgets.core import queries
from tfa_widgets.core.errors import NonFiniteError
from tfa_widgets.core.prediction import Predictor
from tfa_widgets.core.query import Query
from tfa_widgets.core.terms import WeightTerm
from tfa_widgets.core.test_gradients import TestGradients
from tfa_widgets.core.validation import all_finite

N_TRAIN = 40
TESTS = [0, 1, 2, 3]
K = 3
RESCORE = 16


def _gradients(model, dataset) -> torch.Tensor:
    """Per-example loss gradients ``[N, P]`` by plain float64 autograd, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        loss = F.cross_entropy(model(image[None]), torch.as_tensor(label)[None])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _reference(model, train, test, method: str) -> tuple[torch.Tensor, float]:
    """Scores ``[T, N]`` of every training image for the tests' true labels, and the largest
    ``‖g_i‖ ‖g_t‖`` a dot product's rounding error is relative to (1 for a cosine)."""
    train_grads, test_grads = _gradients(model, train), _gradients(model, test)
    dots = test_grads @ train_grads.T
    if method == "grad_dot":
        return dots, float(test_grads.norm(dim=1).max() * train_grads.norm(dim=1).max())
    return dots / test_grads.norm(dim=1)[:, None] / train_grads.norm(dim=1), 1.0


def _tolerance(engine: TFAEngine, scale: float, scores: torch.Tensor) -> float:
    """The float64 rounding of a P-term dot product and of the norms (``4 γ_P`` relative to
    ``scale``), and two float32 roundings relative to the score: of the training norm the index
    keeps, and of the score returned."""
    num_params = engine._model_term.gradients.num_params
    float32 = 2 * unit_roundoff() * float(scores.abs().max())
    return 4 * gamma(num_params, torch.float64) * scale + float32


def _engine(**kwargs) -> TFAEngine:
    return TFAEngine(
        small_cnn(), small_dataset(N_TRAIN), small_dataset(len(TESTS), seed=7),
        memory_budget_mb=1e-3, projection_dim=64, rescore=RESCORE, progress=False, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("opponents", [False, True])
@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
def test_top_k_on_a_projected_index_is_the_exact_top_k_when_the_candidates_hold_it(
    method, opponents
):
    engine = _engine()
    assert engine.build_index().projected
    sign = -1.0 if opponents else 1.0
    test_set = small_dataset(len(TESTS), seed=7)
    truth, scale = _reference(engine.model, small_dataset(N_TRAIN), test_set, method)
    truth = sign * truth
    approximate = sign * engine.scores(TESTS, target="true", method=method)
    tolerance = _tolerance(engine, scale, truth)
    indices, values = engine.top_k(TESTS, K, target="true", method=method, opponents=opponents)
    for row in range(len(TESTS)):
        exact_best = truth[row].topk(K).indices
        candidates = approximate[row].topk(RESCORE).indices
        # The premise: the projected scores put the exact top-k among the re-scored candidates
        # (not guaranteed in general; it holds for these seeds), and the exact top-k is not
        # decided by rounding.
        assert set(exact_best.tolist()) <= set(candidates.tolist()), row
        assert ranking_margin(truth[row], K) > 2 * tolerance
        # The projected ranking alone is not the exact one here, so the re-scoring matters.
        assert indices[row].tolist() == exact_best.tolist()
        torch.testing.assert_close(
            sign * values[row].double(), truth[row, exact_best], rtol=0, atol=tolerance
        )
    assert any(
        approximate[row].topk(K).indices.tolist() != truth[row].topk(K).indices.tolist()
        for row in range(len(TESTS))
    ), "every projected top-k was exact already: the test would not see a re-scoring bug"


def test_tracin_terms_in_groups_of_one_test_are_scored_and_re_scored_exactly(monkeypatch):
    model = small_cnn()
    later = copy.deepcopy(model)
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoints = [(model.state_dict(), 0.5), (later.state_dict(), 0.25)]
    engine = _engine(checkpoints=checkpoints, method="tracin_cp")
    train, test = small_dataset(N_TRAIN), small_dataset(len(TESTS), seed=7)
    (first, first_scale), (second, second_scale) = (
        _reference(m, train, test, "grad_dot") for m in (model, later)
    )
    truth = 0.5 * first + 0.25 * second
    tolerance = _tolerance(engine, 0.5 * first_scale + 0.25 * second_scale, truth)
    monkeypatch.setattr(queries, "QUERY_GRADIENTS_MB", 1e-9)  # one test per group
    exact = engine.scores(TESTS, target="true", exact=True)
    torch.testing.assert_close(exact.double(), truth, rtol=0, atol=tolerance)
    indices, values = engine.top_k(TESTS, K, target="true")
    torch.testing.assert_close(values.double(), truth.gather(1, indices), rtol=0, atol=tolerance)
    for row in range(len(TESTS)):
        assert bool(values[row].diff().le(0).all()), "best first"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_nan_or_infinity(dtype, bad):
    tensor = torch.randn(1000, dtype=torch.float64).to(dtype)
    if bad is not None:
        tensor[617] = bad
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
    assert all_finite(tensor) == (bad is None)


def test_the_projected_ranking_first_then_the_exact_one_take_one_test_gradient(monkeypatch):
    """The README's two-step query: ``scores(query).topk(k)`` at once (approximate), then
    ``top_k(query, k)`` (re-scored exactly) from the same test gradient, computed once, by
    one forward pass (which also picked the predicted class) and one backward pass."""
    engine = _engine()
    engine.build_index()
    gradients = engine._model_term.gradients
    forwards, backwards = [], []
    original = gradients.logits_and_gradient

    def counted(image):
        forwards.append(image)
        logits, backward = original(image)
        return logits, lambda target: backwards.append(target) or backward(target)

    monkeypatch.setattr(gradients, "logits_and_gradient", counted)
    monkeypatch.setattr(engine._predictor, "logits", _no_forward)
    query = engine.query(small_dataset(1, seed=11)[0][0])
    first = engine.scores(query).topk(K)
    indices, values = engine.top_k(query, K)
    assert (len(forwards), len(backwards)) == (1, 1)
    truth, scale = _reference(
        engine.model, small_dataset(N_TRAIN), [(query.image, query.target)], "grad_cos"
    )
    tolerance = _tolerance(engine, scale, truth)
    torch.testing.assert_close(values.double(), truth[0, indices], rtol=0, atol=tolerance)
    assert first.indices.shape == indices.shape


def _no_forward(images):
    raise AssertionError("the predictor ran a forward pass of its own")


def test_the_forward_pass_that_picks_the_class_gives_the_test_gradient(monkeypatch):
    """A query for the predicted class reads the class from a forward pass that the test gradient
    then goes back through, for that class or for another one asked next (no second forward),
    both against plain float64 autograd."""
    engine = _engine()
    model, term = engine.model, engine._model_term
    forwards = []
    original = term.gradients.logits_and_gradient
    monkeypatch.setattr(
        term.gradients, "logits_and_gradient", lambda x: forwards.append(x) or original(x)
    )
    monkeypatch.setattr(engine._predictor, "logits", _no_forward)
    image = small_dataset(1, seed=11)[0][0]
    logits = model(image[None])[0]
    predicted = engine.query(image)
    assert predicted.target == int(logits.argmax())
    other = engine.query(image, target=(predicted.target + 1) % 3)
    params = [p for p in model.parameters() if p.requires_grad]
    for query, count in ((other, 1), (predicted, 2)):  # the kept forward serves the first
        truth = torch.autograd.grad(
            F.cross_entropy(model(image[None]), torch.tensor([query.target])), params
        )
        truth = torch.cat([g.flatten() for g in truth])
        gradient = engine._test_gradients.get(term, query)
        assert len(forwards) == count
        tolerance = gamma(len(truth), torch.float64) * float(truth.norm())
        torch.testing.assert_close(gradient, truth, rtol=0, atol=tolerance)


class _Fixed:
    """Stands in for a `GradientModel` whose test gradient is ``vector``."""

    def __init__(self, vector: torch.Tensor) -> None:
        self.vector = vector

    def gradient(self, image, target):
        return self.vector


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_a_test_gradient_is_checked_finite_by_its_entries_not_its_norm(bad):
    """Finite entries whose norm overflows float32 are a valid gradient; a NaN or an infinite
    entry is not."""
    vector = torch.full((64,), 1e38)  # finite entries, ‖v‖ = 8e38 above float32's 3.4e38
    assert bool(torch.isfinite(vector).all()) and torch.isinf(vector.norm())
    if bad is not None:
        vector[5] = bad
    gradients = TestGradients(Predictor(small_cnn(), None, "cross_entropy"), 3, budget_mb=1)
    term = WeightTerm("model", _Fixed(vector), 1.0)
    query = Query(("image", "fixed"), torch.zeros(3, 8, 8, dtype=torch.float64), target=0)
    if bad is None:
        assert gradients.get(term, query) is vector
    else:
        with pytest.raises(NonFiniteError, match="not finite"):
            gradients.get(term, query)
