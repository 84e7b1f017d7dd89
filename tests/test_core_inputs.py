"""Inputs that used to give a wrong answer without a word (issue #10 §2) now give the right
answer or a clear error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import small_cnn, small_dataset
from torch.utils.data import TensorDataset

from tfa_widgets import InputError, NonFiniteError, SaturatedPredictionError, TFAEngine
from tfa_widgets.core.scoring import GradCos

U32 = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def engine():
    return TFAEngine(small_cnn(), small_dataset(12), small_dataset(4, seed=7), progress=False)


# ----------------------------------------------------------------- grad-cos at any scale
@pytest.mark.parametrize("scale", [1.0, 1e-9, 1e-30])
def test_cosine_is_scale_free(scale):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    test = torch.randn(40, generator=generator, dtype=torch.float64)
    expected = F.cosine_similarity(train, test[None], dim=1)
    train, test = train * scale, test * scale
    cosines = GradCos().index_scores(train @ test, train.norm(dim=1), test.norm())
    torch.testing.assert_close(cosines, expected, rtol=1e-12, atol=0)


def test_cosine_of_a_zero_gradient_is_zero():
    norms = torch.tensor([0.0, 2.0])
    assert GradCos().index_scores(torch.zeros(2), norms, torch.tensor(1.0)).tolist() == [0.0, 0.0]
    a, c = GradCos().norm_coefficients(torch.zeros(2), norms, torch.tensor(0.0))
    assert not a.any() and not c.any()


@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e-100])
def test_cosine_derivative_coefficients_equal_finite_differences(scale):
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(3, 20, generator=generator, dtype=torch.float64) * scale
    test = torch.randn(20, generator=generator, dtype=torch.float64) * scale
    a, c = GradCos().norm_coefficients(train @ test, train.norm(dim=1), test.norm())
    derivative = a[:, None] * test + c[:, None] * train

    def cosines(rows):
        return GradCos().index_scores(rows @ test, rows.norm(dim=1), test.norm())

    # Central differences with a step of 1e-5 of the gradient's size: truncation error of
    # order 1e-10 relative, rounding of order 1e-16 / 1e-5; compared at 1e-7 relative.
    step = 1e-5 * train.norm(dim=1, keepdim=True)
    numerical = torch.zeros_like(train)
    for j in range(train.shape[1]):
        shift = torch.zeros_like(train)
        shift[:, j] = step[:, 0]
        numerical[:, j] = (cosines(train + shift) - cosines(train - shift)) / (2 * step[:, 0])
    torch.testing.assert_close(
        derivative, numerical, rtol=1e-7, atol=1e-7 * float(derivative.abs().max())
    )


def test_engine_cosines_of_a_confident_model_are_cosines():
    """Tiny gradients (a confident model): no ε may shrink the cosine (0.85 for 0.9986 before)."""
    model = small_cnn()
    images = small_dataset(300).tensors[0]
    with torch.no_grad():
        top2 = model(images).topk(2, dim=1)
        margins = top2.values[:, 0] - top2.values[:, 1]
        # The largest logit margin becomes 36 (gradients of about e^-36, still far above the
        # float32 range the index is kept in); keep the images with a margin of 22 or more.
        scale = 36 / float(margins.max())
        model[-1].weight.mul_(scale)
        model[-1].bias.mul_(scale)
    chosen = (margins * scale >= 22).nonzero().flatten()
    assert len(chosen) >= 15
    predicted = top2.indices[:, 0]
    train = TensorDataset(images[chosen[:12]], predicted[chosen[:12]])
    tests = TensorDataset(images[chosen[12:15]], predicted[chosen[12:15]])
    engine = TFAEngine(model, train, tests, progress=False)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(x, y):
        # ∂ℓ/∂z in closed form, p_k for k ≠ y and −Σ_{k≠y} p_k for y, pulled back through the
        # model: float64 F.cross_entropy is itself off by up to 1e-4 at these margins.
        logits = model(x[None])[0]
        differences = (logits - logits[y]).detach()
        exponentials = differences.exp().index_fill(0, torch.as_tensor(y), 0.0)
        others = exponentials / (1 + exponentials.sum())
        logit_grad = others.index_fill(0, torch.as_tensor(y), -float(others.sum()))
        pulled = torch.autograd.grad(logits @ logit_grad, params)
        return torch.cat([g.flatten() for g in pulled])

    train_grads = torch.stack([gradient(x, y) for x, y in train])
    for t in range(3):
        test_grad = gradient(*tests[t])
        # Tiny next to the ε = 1e-12 once added to the product, which shrank cosines by 8% and more.
        assert float(train_grads.norm(dim=1).max() * test_grad.norm()) < 1e-11
        expected = train_grads @ test_grad / train_grads.norm(dim=1) / test_grad.norm()
        # The index keeps the float64 gradients in float32: a cosine of P terms is then off
        # by at most about 2·P·u (u the float32 unit roundoff).
        tolerance = 2 * len(test_grad) * U32
        torch.testing.assert_close(engine.scores(t).double(), expected, rtol=0, atol=tolerance)


# ----------------------------------------------------------------- saturated test prediction
def test_saturated_test_prediction_is_an_error_naming_another_class():
    model = small_cnn().float()
    with torch.no_grad():
        model[-1].weight.mul_(1e4)
    engine = TFAEngine(model, small_dataset(6), small_dataset(2, seed=7), progress=False)
    probs = engine.predict(0)
    assert float(probs.max()) == 1.0  # saturated in float32
    with torch.no_grad():
        second = int(model(small_dataset(2, seed=7)[0][0][None].float())[0].argsort()[-2])
    with pytest.raises(SaturatedPredictionError, match=f"e.g. target={second}"):
        engine.scores(0)
    with pytest.raises(SaturatedPredictionError, match="saturated"):
        engine.explain(0, k=2)
    assert engine.scores(0, target=second).abs().sum() > 0


# ----------------------------------------------------------------- integer images
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_refused(engine, dtype):
    image = torch.zeros(3, 8, 8, dtype=dtype)
    for call in (
        lambda: engine.scores(image),
        lambda: engine.predict(image),
        lambda: engine.gradcam(image, 0),
        lambda: engine.predict_batch(image[None]),
    ):
        with pytest.raises(InputError, match=f"{dtype} tensor.*image.float\\(\\) / 255"):
            call()


# ----------------------------------------------------------------- index arguments
@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.tensor([True, False, True] + [False] * 9), "boolean mask"),
        (np.array([True, True] + [False] * 10), "boolean mask"),
        ([0.0, 2.7], "must be an integer"),
        (torch.tensor([0.0, 2.0]), "must be integers"),
        (np.array([1.0, 2.0]), "must be integers"),
        ([True, False], "must be an integer"),
        ("01", "sequence of integers"),
    ],
)
def test_bad_training_indices_are_refused(engine, indices, message):
    with pytest.raises(InputError, match=message):
        engine.tfa_maps(0, indices)


def test_integer_indices_of_every_kind_are_accepted(engine):
    expected = engine.tfa_maps(0, [1, 3])
    for indices in (np.array([1, 3]), torch.tensor([1, 3]), (np.int64(1), torch.tensor(3))):
        torch.testing.assert_close(engine.tfa_maps(0, indices), expected)
    test = np.argmax([0.1, 0.9, 0.3])  # np.int64
    torch.testing.assert_close(engine.scores(test), engine.scores(1))
    torch.testing.assert_close(engine.scores(torch.tensor(1)), engine.scores(1))
    assert engine.top_k(test, np.int64(3))[0].shape == (3,)
    torch.testing.assert_close(engine.scores(1, target=np.int64(2)), engine.scores(1, target=2))
    with pytest.raises(InputError, match="k must be an integer"):
        engine.top_k(1, 2.0)
    with pytest.raises(InputError, match="k must be an integer"):
        engine.top_k(1, True)


# ----------------------------------------------------------------- NaN weights
def test_nan_weights_are_reported_by_predict_and_gradcam():
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    engine = TFAEngine(model, small_dataset(4), small_dataset(2, seed=7), progress=False)
    image = small_dataset(1)[0][0]
    with pytest.raises(NonFiniteError, match="model's outputs contain NaN"):
        engine.predict(0)
    with pytest.raises(NonFiniteError, match="model's outputs contain NaN"):
        engine.predict_batch(image[None])
    with pytest.raises(NonFiniteError, match="check the model weights"):
        engine.gradcam(image, 0)


# ----------------------------------------------------------------- low-precision models
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_score_in_float32(dtype):
    reference = small_cnn().float()
    train, tests = small_dataset(16), small_dataset(3, seed=7)
    full = TFAEngine(reference, train, tests, progress=False)
    low = TFAEngine(copy.deepcopy(reference).to(dtype), train, tests, progress=False)
    projected = TFAEngine(
        copy.deepcopy(reference).to(dtype), train, tests, memory_budget_mb=1e-3,
        projection_dim=16, progress=False,
    )  # fmt: skip
    # How far the low-precision gradients are from the float32 ones, relatively: ε. Unit
    # vectors off by at most ε each give cosines off by at most 2ε (one per factor), twice
    # over for the test gradient's own error: 4ε bounds the score error.
    low_index, full_index = low.build_index().features, full.build_index().features
    epsilon = float(((low_index - full_index).norm(dim=1) / full_index.norm(dim=1)).max())
    for t in range(3):
        target = int(full.predict(t).argmax())
        test_error = _relative_test_gradient_error(full, low, t, target)
        bound = 2 * (epsilon + test_error) + 8 * U32 * full_index.shape[1]
        exact = full.scores(t, target=target)
        for engine, scores in (
            (low, low.scores(t, target=target)),
            (projected, projected.scores(t, target=target, exact=True)),
        ):
            assert float(scores.abs().max()) <= 1 + 4 * U32  # a cosine stays a cosine
            assert float((scores - exact).abs().max()) <= bound
            indices, _ = engine.top_k(t, 3, target=target)
            kth = float(exact.topk(3).values[-1])  # within the bound of the float32 top-3
            assert bool((exact[indices] >= kth - 2 * bound).all())
    for i in range(len(train)):  # a training image against itself: a cosine of at most 1
        image, label = train[i]
        assert float(low.scores(image, target=int(label))[i]) <= 1 + 4 * U32


def _relative_test_gradient_error(full, low, test, target):
    grads = [
        e._test_gradients.get(e._model_term, e.query(test, target)).float() for e in (full, low)
    ]
    return float((grads[1] - grads[0]).norm() / grads[0].norm())
