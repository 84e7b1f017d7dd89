"""TFA maps against ground truth: finite differences, SmoothGrad by definition, batching."""

from __future__ import annotations

import pytest
import torch
from core_models import conv_paths_model, small_cnn, small_dataset
from precision import float32_cosine_tolerance, ranking_margin
from torch.utils.data import TensorDataset

from tfa_widgets import InputError, SmoothGrad, TFAEngine
from tfa_widgets.core.maps import noisy_copies, reduce_maps

pytestmark = pytest.mark.portability


def reference_gradient(model, image, label, names, loss="cross_entropy"):
    """The loss gradient by plain autograd, independent of the engine's torch.func code."""
    params = dict(model.named_parameters())
    logits = model(image[None])
    if loss == "cross_entropy":
        value = torch.nn.functional.cross_entropy(logits, torch.tensor([label]))
    else:
        value = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[0], label, reduction="sum"
        )
    grads = torch.autograd.grad(value, [params[n] for n in names])
    return torch.cat([g.flatten() for g in grads])


def reference_score(method, g_train, g_test):
    if method == "grad_cos":
        return g_train @ g_test / (g_train.norm() * g_test.norm())
    return g_train @ g_test


def finite_difference_map(model, image, label, g_test, names, method, step=1e-5):
    flat = image.flatten()
    out = torch.zeros_like(flat)
    for j in range(flat.numel()):
        values = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[j] += sign * step
            g = reference_gradient(model, shifted.view_as(image), label, names)
            values.append(reference_score(method, g, g_test))
        out[j] = (values[0] - values[1]) / (2 * step)
    return out.view_as(image)


@pytest.mark.parametrize("strategy", ["vmap", "factored"])
@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
@pytest.mark.parametrize("params", [None, ["4.weight", "7"]])
def test_tfa_map_equals_finite_differences(method, params, strategy):
    model = small_cnn()
    train, test = small_dataset(6), small_dataset(2, seed=7)
    engine = TFAEngine(
        model, train, test, params=params, method=method, strategy=strategy, progress=False
    )
    names = engine.param_names
    if params is not None:
        assert names == ["4.weight", "7.weight", "7.bias"]
    target = 2
    maps = engine.tfa_maps(0, [3, 5], target=target)
    g_test = reference_gradient(model, test[0][0], target, names)
    for row, i in enumerate([3, 5]):
        image, label = train[i]
        expected = finite_difference_map(model, image, int(label), g_test, names, method)
        error = (maps[row].double() - expected).norm() / expected.norm()
        assert error < 1e-6, f"training image {i}: relative error {error:.2e}"


def test_scores_equal_reference_scores():
    model = small_cnn()
    train, test = small_dataset(12), small_dataset(2, seed=7)
    engine = TFAEngine(model, train, test, progress=False)
    names = engine.param_names
    predicted = int(model(test[1][0][None]).argmax())
    g_test = reference_gradient(model, test[1][0], predicted, names)
    expected = torch.stack(
        [
            reference_score("grad_cos", reference_gradient(model, x, int(y), names), g_test)
            for x, y in train
        ]
    )
    # The engine keeps float64 gradients in a float32 index: bound its rounding (precision.py).
    tolerance = float32_cosine_tolerance(len(g_test))
    torch.testing.assert_close(engine.scores(1).double(), expected, **tolerance)
    # The rankings are compared only where the float64 scores decide them by more than twice the
    # error bound (the data are float64 and seeded, so this holds on every CPU).
    bound = tolerance["atol"] + tolerance["rtol"]
    assert ranking_margin(expected, 3) > 2 * bound and ranking_margin(-expected, 2) > 2 * bound
    indices, values = engine.top_k(1, 3)
    assert indices.tolist() == expected.argsort(descending=True)[:3].tolist()
    low, _ = engine.top_k(1, 2, opponents=True)
    assert low.tolist() == expected.argsort()[:2].tolist()


def test_smoothgrad_is_the_mean_of_maps_at_the_noisy_copies():
    model = small_cnn()
    train, test = small_dataset(5), small_dataset(1, seed=7)
    smooth = SmoothGrad(n=4, sigma=0.2, seed=3)
    engine = TFAEngine(model, train, test, progress=False)
    smoothed = engine.tfa_maps(0, [1, 4], target=0, smooth=smooth)

    images = torch.stack([train[1][0], train[4][0]])
    labels = torch.stack([train[1][1], train[4][1]]).repeat_interleave(4)
    noisy = TensorDataset(noisy_copies(images, smooth), labels)
    plain = TFAEngine(model, noisy, test, progress=False).tfa_maps(0, range(8), target=0)
    torch.testing.assert_close(smoothed, plain.view(2, 4, *plain.shape[1:]).mean(1))
    assert not torch.allclose(smoothed, engine.tfa_maps(0, [1, 4], target=0))


def test_noise_scales_with_the_image_range():
    images = torch.zeros(2, 3, 16, 16)
    images[1, :, 0, 0] = 10.0
    noisy = noisy_copies(images, SmoothGrad(n=50, sigma=0.1, seed=0)) - images.repeat_interleave(
        50, 0
    )
    assert noisy[:50].std() == 0
    assert abs(float(noisy[50:].std()) - 1.0) < 0.05


@pytest.mark.parametrize("strategy", ["vmap", "factored"])
def test_batched_maps_equal_one_at_a_time(strategy):
    model = small_cnn()
    train, test = small_dataset(8), small_dataset(1, seed=7)
    engine = TFAEngine(model, train, test, progress=False, batch_size=3, strategy=strategy)
    together = engine.tfa_maps(0, [0, 2, 5, 7], target=1)
    alone = torch.cat([engine.tfa_maps(0, [i], target=1) for i in [0, 2, 5, 7]])
    torch.testing.assert_close(together, alone)
    gm = engine._model_term.gradients
    images, targets = engine.train_data.batch(list(range(8)))
    per_sample = gm.per_sample_grads(images, targets)
    one_by_one = torch.stack([gm.gradient(x, t) for x, t in zip(images, targets, strict=True)])
    torch.testing.assert_close(per_sample, one_by_one)


def test_tracin_cp_sums_grad_dot_over_checkpoints():
    train, test = small_dataset(6), small_dataset(1, seed=7)
    first, second = small_cnn(seed=1), small_cnn(seed=2)
    checkpoints = [(first.state_dict(), 0.5), (second.state_dict(), 0.25)]
    engine = TFAEngine(small_cnn(seed=3), train, test, method="tracin_cp", checkpoints=checkpoints)
    new = ["influence", "relatif", "trak"]
    assert engine.methods == ["grad_cos", "grad_dot", "tracin_cp", *new]
    assert TFAEngine(first, train, test).methods == ["grad_cos", "grad_dot", *new]
    parts = [TFAEngine(m, train, test, method="grad_dot", progress=False) for m in (first, second)]
    expected = 0.5 * parts[0].scores(0, target=1) + 0.25 * parts[1].scores(0, target=1)
    torch.testing.assert_close(engine.scores(0, target=1), expected)
    expected_maps = 0.5 * parts[0].tfa_maps(0, [2], target=1) + 0.25 * parts[1].tfa_maps(
        0, [2], target=1
    )
    torch.testing.assert_close(engine.tfa_maps(0, [2], target=1), expected_maps)


def test_multilabel_bce_maps_equal_finite_differences():
    model = small_cnn(num_classes=4)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.float64)
    train = TensorDataset(images, labels)
    engine = TFAEngine(model, train, train, loss="bce", progress=False)
    names = engine.param_names
    maps = engine.tfa_maps(torch.zeros(3, 8, 8, dtype=torch.float64) + 0.3, [2], target=3)
    # Explaining class 3 of a test image: BCE on logit 3 with label 1, other classes ignored.
    test_image = torch.zeros(3, 8, 8, dtype=torch.float64) + 0.3
    logit = model(test_image[None])[0, 3]
    value = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor(1.0).double())
    params = dict(model.named_parameters())
    g_test = torch.cat(
        [g.flatten() for g in torch.autograd.grad(value, [params[n] for n in names])]
    )

    flat = images[2].flatten()
    expected = torch.zeros_like(flat)
    for j in range(flat.numel()):
        values = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[j] += sign * 1e-5
            g = reference_gradient(model, shifted.view(3, 8, 8), labels[2], names, loss="bce")
            values.append(reference_score("grad_cos", g, g_test))
        expected[j] = (values[0] - values[1]) / 2e-5
    error = (maps[0].double().flatten() - expected).norm() / expected.norm()
    assert error < 1e-6


def test_channel_reductions():
    maps = torch.tensor([[[[1.0, -2.0]], [[-3.0, 1.0]]]])
    inputs = torch.tensor([[[[2.0, 1.0]], [[1.0, -1.0]]]])
    assert reduce_maps(maps, "signed").tolist() == [[[-2.0, -1.0]]]
    assert reduce_maps(maps, "abs").tolist() == [[[4.0, 3.0]]]
    assert reduce_maps(maps, "signed", inputs).tolist() == [[[-1.0, -3.0]]]


def test_factored_and_vmap_strategies_agree_on_a_resnet():
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(3, 3).double().eval()
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    model = (
        torch.nn.Sequential(
            block, torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 3)
        )
        .double()
        .eval()
    )
    train, test = small_dataset(6), small_dataset(1, seed=7)
    engines = [
        TFAEngine(model, train, test, strategy=s, progress=False) for s in ("vmap", "factored")
    ]
    torch.testing.assert_close(engines[0].scores(0), engines[1].scores(0))
    torch.testing.assert_close(engines[0].tfa_maps(0, [1, 4]), engines[1].tfa_maps(0, [1, 4]))


def vmap_and_factored(model, train, test, params=None, method="grad_cos"):
    """A vmap and a factored engine on one model, and each one's per-sample gradients of the
    whole training set."""
    engines = [
        TFAEngine(model, train, test, params=params, method=method, strategy=s, progress=False)
        for s in ("vmap", "factored")
    ]
    images, targets = engines[0].train_data.batch(list(range(len(train))))
    grads = [e._model_term.gradients.per_sample_grads(images, targets) for e in engines]
    return engines, grads


@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
def test_factored_conv_paths_agree_with_vmap_on_strides_dilation_and_odd_kernels(
    method, monkeypatch
):
    # Per-sample gradients (CPU): outputs of 64 positions or more take the grouped-convolution
    # path, smaller ones unfold + bmm. Maps: grouped from 256 positions, ghost norms where
    # cheaper, unfold + bmm otherwise; a layer called twice sums its calls. All must equal vmap.
    from tfa_widgets.core import factored

    calls = {"grouped": 0, "ghost": 0, "bmm": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        factored,
        "_grouped_conv_weight_gradients",
        counted("grouped", factored._grouped_conv_weight_gradients),
    )
    monkeypatch.setattr(
        factored, "_ghost_conv_weight_terms", counted("ghost", factored._ghost_conv_weight_terms)
    )
    monkeypatch.setattr(torch, "bmm", counted("bmm", torch.bmm))
    model = conv_paths_model()
    train, test = small_dataset(5, size=16), small_dataset(1, size=16, seed=7)
    engines, grads = vmap_and_factored(model, train, test, method=method)
    torch.testing.assert_close(grads[0], grads[1])
    assert calls["grouped"] == 3 and calls["ghost"] == 0
    torch.testing.assert_close(engines[0].scores(0), engines[1].scores(0))
    expected = engines[0].tfa_maps(0, [1, 3])
    calls.update(grouped=0, bmm=0)
    torch.testing.assert_close(engines[1].tfa_maps(0, [1, 3]), expected)
    # The first layer grouped; five layer calls by unfold + bmm and the ghost layer's two Grams.
    assert calls == {"grouped": 1, "ghost": 1, "bmm": 5 + 2}


class _WithUnusedHead(torch.nn.Module):
    """A CNN with a parametrised layer its forward never calls (as an auxiliary head in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)
        self.unused = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("params", [None, ["unused"]])
def test_factored_strategy_handles_a_layer_the_forward_skips(params):
    torch.manual_seed(0)
    model = _WithUnusedHead().double().eval()
    engines, grads = vmap_and_factored(model, small_dataset(4), small_dataset(1, seed=7), params)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[1].abs().sum() > 0 if params is None else not grads[1].any()
    torch.testing.assert_close(engines[0].tfa_maps(0, [1, 3]), engines[1].tfa_maps(0, [1, 3]))


def test_factored_strategy_needs_supported_layers():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
        torch.nn.Linear(144, 3),
    ).double().eval()  # fmt: skip
    with pytest.raises(InputError, match="factored strategy needs"):
        TFAEngine(model, small_dataset(3), strategy="factored", progress=False)
    engine = TFAEngine(model, small_dataset(3), strategy="auto", progress=False)
    assert engine._model_term.gradients.factored is None  # falls back to vmap
    assert engine.tfa_maps(torch.zeros(3, 8, 8, dtype=torch.float64), [0], target=0).shape == (
        1,
        3,
        8,
        8,
    )
