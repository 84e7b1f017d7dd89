"""The engine as a quanda explainer: its scores, and quanda's metrics computed through it."""

from __future__ import annotations

import pytest
import torch
from core_models import small_cnn, small_dataset
from torch import nn

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.attribution import (
    identical_class,
    mislabelling_detection,
    randomisation_correlation,
    top_k_cardinality,
)

pytest.importorskip(
    "quanda",
    reason="quanda is not in the default environment (it pins captum<0.9); "
    "`make bench-peers` builds .venv-peers with it, run these tests there",
)

from quanda.metrics.downstream_eval import (  # noqa: E402
    ClassDetectionMetric,
    MislabelingDetectionMetric,
)
from quanda.metrics.heuristics import TopKCardinalityMetric  # noqa: E402

from tfa_widgets.eval.quanda_bridge import TFAExplainer  # noqa: E402

N = 16


def per_example_gradients(model: nn.Module, dataset) -> torch.Tensor:
    """Return ``[N, P]`` loss gradients, one autograd call per example (independent code)."""
    rows = []
    for image, label in dataset:
        loss = nn.functional.cross_entropy(model(image[None]), torch.as_tensor([int(label)]))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setup():
    model, train = small_cnn(), small_dataset(N)
    return model, train, per_example_gradients(model, train)


def test_explainer_scores_are_the_dot_and_cosine_of_float64_gradients(setup):
    model, train, grads = setup
    tests = torch.stack([train[i][0] for i in range(3)])
    targets = [2, 0, 1]
    test_grads = per_example_gradients(model, [(x, t) for x, t in zip(tests, targets, strict=True)])
    dots = test_grads @ grads.T
    # float64 throughout: the two computations differ by rounding of sums of ~10^2 terms.
    tolerance = 1e-9 * float(dots.abs().max())
    explainer = TFAExplainer(model, train, method="grad_dot")
    assert torch.allclose(explainer.explain(tests, targets).double(), dots, atol=tolerance)
    cosine = TFAExplainer(model, train, method="grad_cos").explain(tests, targets).double()
    norms = test_grads.norm(dim=1)[:, None] * grads.norm(dim=1)[None]
    assert torch.allclose(cosine, dots / norms, atol=1e-9)


def test_quanda_metrics_through_the_explainer_equal_the_measures_written_here(setup):
    model, train, grads = setup
    explainer = TFAExplainer(model, train, method="grad_dot")
    tests = torch.stack([train[i][0] for i in range(4)])
    targets = torch.tensor([0, 1, 2, 0])
    explanations = explainer.explain(tests, targets)

    cardinality = TopKCardinalityMetric(model, train, top_k=3)
    cardinality.update(explanations)
    assert cardinality.compute()["score"] == pytest.approx(top_k_cardinality(explanations, 3))

    labels = torch.tensor([int(y) for _, y in train])
    classes = ClassDetectionMetric(model, train, s=3)
    classes.update(explanations, targets)
    ours = identical_class(explanations, labels, targets.tolist(), s=3)
    assert classes.compute()["score"] == pytest.approx(sum(ours) / len(ours))

    flagged = [1, 5, 9]
    metric = MislabelingDetectionMetric(
        model, train, flagged, explainer_cls=TFAExplainer, expl_kwargs={"method": "grad_dot"}
    )
    # The grad-dot self-influence is ‖g_i‖²: quanda ranks by it, and so do we. The same ranking
    # gives the same rational score; quanda sums its curve in float32 (relative error ~1e-7).
    expected = mislabelling_detection(grads.norm(dim=1) ** 2, flagged)
    assert metric.compute()["score"] == pytest.approx(expected, rel=1e-6)


def test_randomised_weights_reach_the_explainer_through_quanda_checkpoints(setup, tmp_path):
    model, train, _ = setup
    tests = torch.stack([train[i][0] for i in range(2)])
    targets = [0, 1]
    trained = TFAExplainer(model, train, method="grad_cos").explain(tests, targets)
    other = small_cnn(seed=5)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    reloaded = TFAExplainer(small_cnn(), train, checkpoints=str(path), method="grad_cos")
    again = TFAExplainer(other, train, method="grad_cos").explain(tests, targets)
    assert torch.allclose(reloaded.explain(tests, targets), again, atol=1e-9)
    # Different weights give different rankings: the correlation is below 1.
    assert max(randomisation_correlation(trained, again)) < 0.999


def test_tracin_cp_through_the_explainer_sums_rate_weighted_checkpoint_dots(setup):
    model, train, _ = setup
    checkpoints = [(small_cnn(seed=s).state_dict(), rate) for s, rate in ((2, 0.5), (3, 0.125))]
    tests = torch.stack([train[i][0] for i in range(2)])
    targets = [1, 2]
    expected = 0
    for state, rate in checkpoints:
        copy = small_cnn()
        copy.load_state_dict(state)
        test_grads = per_example_gradients(copy, list(zip(tests, targets, strict=True)))
        expected = expected + rate * (test_grads @ per_example_gradients(copy, train).T)
    explainer = TFAExplainer(model, train, method="tracin_cp", tracin_checkpoints=checkpoints)
    # float64 throughout, as for grad-dot above.
    tolerance = 1e-9 * float(expected.abs().max())
    assert torch.allclose(explainer.explain(tests, targets).double(), expected, atol=tolerance)
    self_scores = sum(
        rate * per_example_gradients(_loaded(state), train).norm(dim=1) ** 2
        for state, rate in checkpoints
    )
    assert torch.allclose(explainer.self_influence().double(), self_scores, rtol=1e-6)


def _loaded(state: dict) -> nn.Module:
    model = small_cnn()
    model.load_state_dict(state)
    return model


def test_grad_cos_has_no_self_influence_ranking(setup):
    model, train, _ = setup
    with pytest.raises(InputError, match="no self-influence"):
        TFAExplainer(model, train, method="grad_cos").self_influence()
