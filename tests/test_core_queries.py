"""Many test images at once, and self-influence: the query API of Captum and dattri."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import small_cnn, small_dataset

from tfa_widgets import InputError, TFAEngine
from tfa_widgets.core import queries

N_TRAIN = 24
TESTS = [0, 2, 3, 5]


def _float32_engine(**kwargs) -> TFAEngine:
    model = small_cnn().float()
    return TFAEngine(
        model, small_dataset(N_TRAIN), small_dataset(6, seed=7), progress=False, **kwargs
    )


def _rounding_bound(engine: TFAEngine) -> float:
    # A float32 dot product of P terms is off by at most γ_P ≈ P·u times Σ|a_k b_k| ≤ ‖a‖‖b‖
    # (u = 2^-24); two differently ordered evaluations of a cosine (matrix-matrix against
    # matrix-vector products, per-test chunks) differ by at most twice that, and the norms add
    # as much again.
    return 4 * engine._model_term.gradients.num_params * 2.0**-24


@pytest.fixture(scope="module")
def exact_engine():
    return _float32_engine()


@pytest.fixture(scope="module")
def projected_engine():
    return _float32_engine(memory_budget_mb=1e-3, projection_dim=32)


def _one_at_a_time(engine, **kwargs) -> torch.Tensor:
    return torch.stack([engine.scores(t, **kwargs) for t in TESTS])


@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
@pytest.mark.parametrize("index", ["exact_engine", "projected_engine"])
def test_batch_scores_equal_one_at_a_time(request, index, method):
    engine = request.getfixturevalue(index)
    single = _one_at_a_time(engine, method=method)
    scale = 1.0 if method == "grad_cos" else float(single.abs().max())
    tolerance = _rounding_bound(engine) * scale
    images = torch.stack([engine.test_set[t][0] for t in TESTS])
    for batch in (TESTS, np.array(TESTS), torch.tensor(TESTS), images):
        scores = engine.scores(batch, method=method)
        assert scores.shape == (len(TESTS), N_TRAIN)
        torch.testing.assert_close(scores, single, rtol=0, atol=tolerance)


def test_batch_exact_rescoring_equals_one_at_a_time(projected_engine):
    single = _one_at_a_time(projected_engine, exact=True)
    batch = projected_engine.scores(TESTS, exact=True)
    torch.testing.assert_close(batch, single, rtol=0, atol=_rounding_bound(projected_engine))


def test_batch_products_are_chunked_without_changing_results(exact_engine, monkeypatch):
    whole = exact_engine.scores(TESTS)
    monkeypatch.setattr(queries, "QUERY_GRADIENTS_MB", 1e-9)  # one test gradient per product
    assert queries.tests_per_product(exact_engine._model_term.gradients.num_params) == 1
    torch.testing.assert_close(
        exact_engine.scores(TESTS), whole, rtol=0, atol=_rounding_bound(exact_engine)
    )


@pytest.mark.parametrize("index", ["exact_engine", "projected_engine"])
@pytest.mark.parametrize("opponents", [False, True])
def test_batch_top_k_equals_one_at_a_time(request, index, opponents):
    engine = request.getfixturevalue(index)
    k = 5
    tolerance = _rounding_bound(engine)
    indices, values = engine.top_k(np.array(TESTS), np.int64(k), opponents=opponents)
    assert indices.shape == values.shape == (len(TESTS), k)
    sign = -1.0 if opponents else 1.0
    for row, test in enumerate(TESTS):
        single_indices, single_values = engine.top_k(test, k, opponents=opponents)
        torch.testing.assert_close(values[row], single_values, rtol=0, atol=tolerance)
        # The items may differ only where two scores tie within rounding: each returned one
        # scores, exactly, at least as high as the one-at-a-time k-th.
        exact = engine.scores(test, exact=True)
        kth = sign * float(single_values[-1])
        assert bool((sign * exact[indices[row]] >= kth - 2 * tolerance).all())
        torch.testing.assert_close(values[row], exact[indices[row]], rtol=0, atol=tolerance)


def test_a_target_per_test_image(exact_engine):
    targets = [0, 2, 1, 0]
    batch = exact_engine.scores(TESTS, target=targets)
    single = torch.stack(
        [exact_engine.scores(t, target=c) for t, c in zip(TESTS, targets, strict=True)]
    )
    torch.testing.assert_close(batch, single, rtol=0, atol=_rounding_bound(exact_engine))
    with pytest.raises(InputError, match="3 targets given for 4 test images"):
        exact_engine.scores(TESTS, target=[0, 1, 2])


@pytest.mark.parametrize(
    ("test", "message"),
    [
        ([], "no test images given"),
        ([0, 1.5], "must be an integer"),
        ([True, 1], "must be an integer"),
    ],
)
def test_bad_batches_are_refused(exact_engine, test, message):
    with pytest.raises(InputError, match=message):
        exact_engine.scores(test)


def _autograd_squared_norms(model, dataset) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in dataset:
        loss = F.cross_entropy(model(x[None]), torch.as_tensor(y)[None])
        rows.append(sum(g.square().sum() for g in torch.autograd.grad(loss, params)))
    return torch.stack(rows)


def test_self_scores_are_squared_gradient_norms():
    model, train = small_cnn(), small_dataset(N_TRAIN)
    second = small_cnn(seed=3)
    checkpoints = [(model.state_dict(), 0.5), (second.state_dict(), 0.25)]
    engine = TFAEngine(model, train, checkpoints=checkpoints, progress=False)
    # The index sums the m parameters' squared norms in float32 (relative error at most
    # (m + 1)·u, u = 2^-24, with each term's rounding), keeps the root (half of it, plus u)
    # and self_scores squares it again (twice, plus u); the TracIn sum adds u.
    rtol = (2 * (len(engine.param_names) + 1) + 4) * 2.0**-24
    torch.testing.assert_close(
        engine.self_scores("grad_dot"),
        _autograd_squared_norms(model, train).float(),
        rtol=rtol,
        atol=0,
    )
    expected = 0.5 * _autograd_squared_norms(model, train) + 0.25 * _autograd_squared_norms(
        second, train
    )
    torch.testing.assert_close(engine.self_scores("tracin_cp"), expected.float(), rtol=rtol, atol=0)
    with pytest.raises(InputError, match="self-score is 1 for every training image"):
        engine.self_scores("grad_cos")
