"""Influence, RelatIF and TRAK through the engine: scores against explicit matrices, maps
against central finite differences, on a tiny float64 CNN."""

from __future__ import annotations

import pytest
import torch
from precision import float32_index_tolerance, unit_roundoff
from smooth_models import images_and_labels, smooth_cnn
from test_core_scoring import flat_grads, perturbed_checkpoints, relative_error
from torch.utils.data import TensorDataset

from tfa_widgets import InputError, SmoothGrad, TFAEngine
from tfa_widgets.core.maps import REDUCTIONS, noisy_copies, reduce_maps
from tfa_widgets.core.params import model_state
from tfa_widgets.core.scoring import score_inputs
from tfa_widgets.core.scoring.reference import tfa_maps

NEW = ("influence", "relatif", "trak")


def gray_display(image: torch.Tensor) -> torch.Tensor:
    """The first of the two channels, in [0, 1], as RGB."""
    return image[0].sigmoid()[..., None].expand(-1, -1, 3)


def engine_and_data(**settings):
    model = smooth_cnn()
    images, labels = images_and_labels(13)
    train = TensorDataset(images[:12], labels[:12])
    test = TensorDataset(images[12:], labels[12:])
    engine = TFAEngine(
        model, train, test, batch_size=5, progress=False, display=gray_display, **settings
    )
    return engine, model, images, labels


def explicit_matrix(preconditioner, size: int) -> torch.Tensor:
    """``P`` as a matrix, from its action on the identity (symmetric, so rows = columns)."""
    return preconditioner.apply(torch.eye(size, dtype=torch.float64))


def test_methods_list_what_the_engine_can_do():
    engine, model, _, _ = engine_and_data()
    assert engine.methods == ["grad_cos", "grad_dot", "influence", "relatif", "trak"]
    with_checkpoints, *_ = engine_and_data(checkpoints=perturbed_checkpoints(model))
    assert with_checkpoints.methods == [
        "grad_cos",
        "grad_dot",
        "tracin_cp",
        "influence",
        "relatif",
        "trak",
    ]


def test_trak_is_refused_without_cross_entropy():
    model = smooth_cnn()
    images, labels = images_and_labels(6)
    multi_hot = torch.nn.functional.one_hot(labels, 3).double()
    engine = TFAEngine(model, TensorDataset(images, multi_hot), loss="bce", progress=False)
    assert "trak" not in engine.methods and "influence" in engine.methods
    with pytest.raises(InputError, match="cross-entropy"):
        engine.scores(images[0], target=0, method="trak")


def explicit_scores(engine, model, images, labels, method, target):
    """Float64 scores from the explicit ``P``, and each score's factor on ``⟨g_i, q⟩``."""
    fitted = engine._preconditioned.fit(method)
    train = flat_grads(model, images[:12], labels[:12])
    test = flat_grads(model, images[12:], torch.tensor([target]))[0]
    matrix = explicit_matrix(fitted.preconditioner, train.shape[1])
    query = matrix @ test
    factors = torch.ones(len(train), dtype=torch.float64)
    if method == "relatif":
        factors = 1 / ((train @ matrix) * train).sum(1).sqrt()
    elif method == "trak":
        probability = model(images[12:]).softmax(-1)[0, target].detach()
        factors = factors / (1 - probability)
    return factors * (train @ query), factors * train.norm(dim=1) * query.norm()


@pytest.mark.portability
@pytest.mark.parametrize("method", NEW)
def test_engine_scores_equal_explicit_matrix_scores(method):
    engine, model, images, labels = engine_and_data()
    target = 2
    expected, scale = explicit_scores(engine, model, images, labels, method, target)
    # From the exact float32 index: ⟨g_i, q⟩ with both factors rounded to float32 and summed in
    # float32 errs by at most gamma(P + 2) ‖g_i‖ ‖q‖ (tests/precision.py), times the score's
    # factor on it; the float32 result adds u |S| (the rest is float64).
    num_params = engine._model_term.gradients.num_params
    bound = float32_index_tolerance(num_params) * scale + unit_roundoff() * expected.abs()
    actual = engine.scores(0, target=target, method=method).double()
    assert ((actual - expected).abs() <= bound).all()
    indices, values = engine.top_k(0, 3, target=target, method=method)
    assert ((values.double() - expected[indices]).abs() <= bound[indices]).all()
    # The chosen ones are the three highest, up to the error of the scores.
    assert float(values.min()) >= float(expected.topk(3).values.min()) - 2 * float(bound.max())


@pytest.mark.portability
@pytest.mark.parametrize("method", NEW)
def test_a_projected_index_rescores_top_k_exactly(method):
    engine, model, images, labels = engine_and_data(memory_budget_mb=0, projection_dim=16)
    target = 2
    expected, _ = explicit_scores(engine, model, images, labels, method, target)
    assert engine.build_index("grad_dot").projected
    # Exact by forward mode in float64 (~1e-14), returned in float32 (6e-8 relative).
    exact = engine.scores(0, target=target, method=method, exact=True).double()
    assert relative_error(exact, expected) < 1e-6
    approximate = engine.scores(0, target=target, method=method).double()
    assert relative_error(approximate, expected) > 1e-3  # 16 of 140 dimensions: not exact
    # rescore=16 >= N: every image is a candidate, so the top 3 are the exact top 3.
    indices, values = engine.top_k(0, 3, target=target, method=method)
    assert relative_error(values.double(), expected.topk(3).values) < 1e-6
    assert relative_error(expected[indices], expected.topk(3).values) < 1e-6


@pytest.mark.parametrize("method", NEW)
def test_engine_maps_are_central_finite_differences_of_the_score(method):
    engine, model, images, labels = engine_and_data()
    target = 1
    fitted = engine._preconditioned.fit(method)
    test = flat_grads(model, images[12:], torch.tensor([target]))[0]
    (weight,) = fitted.scorer.term_weights([model(images[12:]).softmax(-1)[0, target].detach()])
    chosen = torch.tensor([4, 0, 9])
    maps = engine.tfa_maps(0, chosen, target=target, method=method).double()
    generator = torch.Generator().manual_seed(11)
    directions = torch.randn(4, *images.shape[1:], generator=generator, dtype=torch.float64)
    step = 1e-4
    finite = torch.empty(len(chosen), len(directions))
    for n, i in enumerate(chosen):
        for d, direction in enumerate(directions):
            shifted = torch.stack([images[i] + step * direction, images[i] - step * direction])
            grads = flat_grads(model, shifted, labels[i].repeat(2))
            plus, minus = (
                fitted.scorer.score([score_inputs(fitted.preconditioner, g[None], test, weight)])
                for g in grads
            )
            finite[n, d] = float((plus - minus)[0] / (2 * step))
    along = torch.einsum("nchw,dchw->nd", maps, directions)
    # Central differences of a smooth float64 score: truncation ~ step² |S'''| ~ 1e-8 of its
    # scale, rounding ~ 1e-16 / step ~ 1e-12; the maps come back in float32 (~1e-7 relative),
    # so 1e-5 sits well above all three.
    assert relative_error(along.float(), finite) < 1e-5
    assert finite.abs().min() > 0
    explanation = engine.explain(0, k=2, target=target, method=method)
    assert explanation.method == method and explanation.tfa_maps_raw.shape == (2, 2, 6, 6)


@pytest.mark.portability
@pytest.mark.parametrize("method", NEW)
def test_self_scores_equal_explicit_matrix_self_scores(method):
    engine, model, images, labels = engine_and_data()
    fitted = engine._preconditioned.fit(method)
    train = flat_grads(model, images[:12], labels[:12])
    matrix = explicit_matrix(fitted.preconditioner, train.shape[1])
    own = ((train @ matrix) * train).sum(1)  # ⟨g_i, P g_i⟩
    if method == "relatif":
        expected = own.sqrt()  # RelatIF of z_i against itself: s_i / sqrt(s_i)
    elif method == "trak":
        probabilities = model(images[:12]).softmax(-1).gather(1, labels[:12, None])[:, 0]
        expected = own / (1 - probabilities.detach())
    else:
        expected = own
    # float64 throughout (the explicit matrix from P's action on the identity), returned in
    # float32: 6e-8 relative, so 1e-6 leaves room and catches any wrong factor or weight.
    assert relative_error(engine.self_scores(method).double(), expected) < 1e-6
    assert expected.min() > 0


def reference_maps(engine, fitted, model, images, targets, test_grad, probability):
    """The plain-autograd maps of `tfa_widgets.core.scoring.reference` (float64)."""
    return tfa_maps(
        fitted.scorer,
        [fitted.preconditioner],
        [model_state(model)],
        model,
        list(engine.param_names),
        engine.loss,
        images,
        targets,
        [test_grad],
        fitted.scorer.term_weights([probability]),
    )


@pytest.mark.portability
@pytest.mark.parametrize("strategy", ["factored", "vmap"])
@pytest.mark.parametrize("method", NEW)
def test_fast_maps_equal_the_reference_maps_with_smoothgrad(method, strategy):
    engine, model, images, labels = engine_and_data(strategy=strategy)
    target = 0
    fitted = engine._preconditioned.fit(method)
    test_grad = flat_grads(model, images[12:], torch.tensor([target]))[0]
    probability = model(images[12:]).softmax(-1)[0, target].detach()
    chosen = torch.tensor([3, 7, 11])
    smooth = SmoothGrad(n=3, sigma=0.1, seed=5)
    noisy = noisy_copies(images[chosen], smooth)
    expected = reference_maps(
        engine, fitted, model, noisy, labels[chosen].repeat_interleave(3), test_grad, probability
    )
    expected = expected.view(3, 3, *images.shape[1:]).mean(1)
    maps = engine.tfa_maps(0, chosen, target=target, smooth=smooth, method=method)
    # Two float64 computations of the same derivative (~1e-14 apart), the engine's rounded to
    # float32 (6e-8 relative to the largest entry): 1e-6 leaves room, a wrong a_i, c_i, P or
    # sign gives O(1).
    assert relative_error(maps.double(), expected) < 1e-6
    for how in REDUCTIONS:  # signed and absolute channel sums of the same maps
        assert relative_error(reduce_maps(maps, how).double(), reduce_maps(expected, how)) < 1e-6


@pytest.mark.portability
@pytest.mark.parametrize("method", ["influence", "relatif"])
def test_fast_maps_equal_the_reference_maps_for_multi_label_bce(method):
    model = smooth_cnn()
    images, labels = images_and_labels(9)
    multi_hot = torch.nn.functional.one_hot(labels, 3).double()
    multi_hot[::2, (labels[::2] + 1) % 3] = 1.0  # every other image has two labels
    train = TensorDataset(images[:8], multi_hot[:8])
    engine = TFAEngine(
        model,
        train,
        TensorDataset(images[8:], multi_hot[8:]),
        loss="bce",
        batch_size=3,
        progress=False,
    )
    fitted = engine._preconditioned.fit(method)
    target = 2
    test_grad = engine._test_gradients.get(engine._model_term, engine.query(0, target))
    probability = model(images[8:]).sigmoid()[0, target].detach()
    chosen = torch.tensor([0, 5])
    _, encoded = engine.train_data.batch(chosen.tolist())  # the labels as the loss takes them
    expected = reference_maps(
        engine, fitted, model, images[chosen], encoded, test_grad, probability
    )
    maps = engine.tfa_maps(0, chosen, target=target, method=method)
    assert relative_error(maps.double(), expected) < 1e-6  # as above


@pytest.mark.portability
def test_trak_over_the_engines_checkpoints():
    model = smooth_cnn()
    checkpoints = perturbed_checkpoints(model)
    engine, _, images, labels = engine_and_data(checkpoints=checkpoints)
    target = 1
    fitted = engine._preconditioned.fit("trak")
    assert len(fitted.fit.preconditioners) == 2  # one kernel per checkpoint
    expected, scale, own = 0, 0, 0
    for (state, _), preconditioner in zip(checkpoints, fitted.fit.preconditioners, strict=True):
        weights = smooth_cnn()
        weights.load_state_dict(state, strict=False)
        train = flat_grads(weights, images[:12], labels[:12])
        test = flat_grads(weights, images[12:], torch.tensor([target]))[0]
        matrix = explicit_matrix(preconditioner, train.shape[1])
        query = matrix @ test
        p_test = weights(images[12:]).softmax(-1)[0, target].detach()
        p_train = weights(images[:12]).softmax(-1).gather(1, labels[:12, None])[:, 0].detach()
        # The mean of each checkpoint's TRAK score (see core/scoring/trak.py).
        expected = expected + (train @ query) / (2 * (1 - p_test))
        scale = scale + train.norm(dim=1) * query.norm() / (2 * (1 - p_test))
        own = own + ((train @ matrix) * train).sum(1) / (2 * (1 - p_train))
    # Each checkpoint's float32 index term errs by at most gamma(P + 2) ‖g_i‖ ‖q‖ (times its
    # weight); the float32 result adds u |S|.
    num_params = engine._model_term.gradients.num_params
    bound = float32_index_tolerance(num_params) * scale + unit_roundoff() * expected.abs()
    actual = engine.scores(0, target=target, method="trak").double()
    assert ((actual - expected).abs() <= bound).all()
    assert relative_error(engine.self_scores("trak").double(), own) < 1e-6
    chosen = torch.tensor([2, 8])
    images_chosen, encoded = engine.train_data.batch(chosen.tolist())
    query = engine.query(0, target)
    test_grads = [engine._test_gradients.get(t, query) for t in engine._checkpoint_terms]
    classes = torch.tensor([target])
    probabilities = engine._preconditioned.probabilities("trak", images[12:], classes)
    states = [{**model_state(model), **state} for state, _ in checkpoints]
    reference = tfa_maps(
        fitted.scorer,
        fitted.fit.preconditioners,
        states,
        model,
        list(engine.param_names),
        engine.loss,
        images_chosen,
        encoded,
        test_grads,
        fitted.scorer.term_weights(list(probabilities[:, 0])),
    )
    maps = engine.tfa_maps(0, chosen, target=target, method="trak")
    assert relative_error(maps.double(), reference) < 1e-6  # float64 paths, float32 result


class DictOutput(torch.nn.Module):
    """A model whose output is a dict, read by the engine's ``output=``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict:
        return {"scores": self.inner(x)}


@pytest.mark.parametrize("method", NEW)
def test_fits_read_the_logits_through_the_engines_output(method):
    engine, model, images, labels = engine_and_data()
    wrapped = TFAEngine(
        DictOutput(model).eval(),
        TensorDataset(images[:12], labels[:12]),
        TensorDataset(images[12:], labels[12:]),
        batch_size=5,
        progress=False,
        display=gray_display,
        output=lambda raw: raw["scores"],
    )
    expected = engine.self_scores(method).double()
    assert relative_error(wrapped.self_scores(method).double(), expected) < 1e-6
    expected = engine.scores(0, target=2, method=method).double()
    assert relative_error(wrapped.scores(0, target=2, method=method).double(), expected) < 1e-6
