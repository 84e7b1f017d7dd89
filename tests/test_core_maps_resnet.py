"""TFA maps of a tiny ResNet (residual sums, BatchNorm in eval mode, strided blocks with 1x1
downsampling) against a float64 per-pair double backward by plain autograd and against central
finite differences, with and without SmoothGrad."""

from __future__ import annotations

import pytest
import torch
from core_models import small_dataset
from precision import gamma, unit_roundoff
from torch import nn
from torchvision.models.resnet import BasicBlock

from tfa_widgets import SmoothGrad, TFAEngine
from tfa_widgets.core import factored
from tfa_widgets.core.maps import noisy_copies

pytestmark = pytest.mark.portability

STEP = 1e-5  # central differences: truncation ~ STEP², rounding ~ u / STEP


def tiny_resnet(seed: int = 0) -> nn.Module:
    """A float64 ResNet for 16x16 inputs whose convs take every factored path of the maps:
    grouped weight gradients (the 16x16 stem and first block), unfold + bmm (8x8 and 4x4 blocks),
    ghost norms (the 2x2 block, its 1x1 downsampling too); BatchNorm with random running
    statistics and affine parameters."""
    torch.manual_seed(seed)

    def downsample(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        BasicBlock(4, 4),
        BasicBlock(4, 8, stride=2, downsample=downsample(4, 8)),
        BasicBlock(8, 16, stride=2, downsample=downsample(8, 16)),
        BasicBlock(16, 16, stride=2, downsample=downsample(16, 16)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval()


def flat_gradient(model: nn.Module, image: torch.Tensor, label: int, create_graph: bool):
    """The cross-entropy gradient of all parameters, by plain autograd on the module itself."""
    loss = nn.functional.cross_entropy(model(image[None]), torch.tensor([label]))
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph)
    return torch.cat([g.flatten() for g in grads])


def score(method: str, g_train: torch.Tensor, g_test: torch.Tensor) -> torch.Tensor:
    if method == "grad_cos":
        return g_train @ g_test / (g_train.norm() * g_test.norm())
    return g_train @ g_test


def reference_map(model, image, label, g_test, method) -> torch.Tensor:
    """``∇_x S`` by a per-pair double backward (the baseline the benchmark times)."""
    x = image.clone().requires_grad_(True)
    value = score(method, flat_gradient(model, x, label, create_graph=True), g_test)
    return torch.autograd.grad(value, x)[0]


def directional_differences(model, image, label, g_test, method, directions) -> torch.Tensor:
    """Central differences of the score along each direction of ``[D, C, H, W]``, ``[D]``: the
    map's inner product with each, from 2 gradients per direction instead of 2 per pixel."""
    values = []
    for direction in directions:
        ends = [image + sign * STEP * direction for sign in (1, -1)]
        up, down = (score(method, flat_gradient(model, x, label, False), g_test) for x in ends)
        values.append((up - down) / (2 * STEP))
    return torch.stack(values)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def map_tolerance(model: nn.Module) -> float:
    """Relative error bound of the engine's maps against the float64 reference: two float64
    computations in different orders, each of the ~3 passes (forward, backward, double backward)
    through each layer summing at most ``P`` terms (``3 · layers · gamma(P)``), then the engine's
    rounding of the maps to float32 (``u`` of float32)."""
    params = sum(p.numel() for p in model.parameters())
    layers = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return 3 * layers * gamma(params, torch.float64) + unit_roundoff(torch.float32)


def counting(monkeypatch) -> dict:
    """Count the calls of the factored conv paths (grouped, ghost) the maps take."""
    calls = {"grouped": 0, "ghost": 0}
    for name, function in (
        ("grouped", factored._grouped_conv_weight_gradients),
        ("ghost", factored._ghost_conv_weight_terms),
    ):

        def wrapper(*args, _name=name, _function=function, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(factored, function.__name__, wrapper)
    return calls


@pytest.mark.parametrize("strategy", ["factored", "vmap"])
@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
def test_resnet_maps_equal_autograd_and_finite_differences(method, strategy, monkeypatch):
    model = tiny_resnet()
    train, test = small_dataset(4, size=16), small_dataset(1, size=16, seed=7)
    engine = TFAEngine(model, train, test, method=method, strategy=strategy, progress=False)
    assert (engine._model_term.gradients.factored is None) == (strategy == "vmap")
    calls = counting(monkeypatch)
    maps = engine.tfa_maps(0, [1, 3], target=2)
    if strategy == "factored":  # 16x16 convs (stem, first block) grouped; the 2x2 block ghost
        assert calls == {"grouped": 3, "ghost": 3}
    g_test = flat_gradient(model, test[0][0], 2, create_graph=False)
    directions = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)).double()
    tolerance = map_tolerance(model)
    for row, i in enumerate([1, 3]):
        image, label = train[i]
        reference = reference_map(model, image, int(label), g_test, method)
        error = relative_error(maps[row], reference)
        assert error < tolerance, f"image {i}: {error:.2e} against autograd (> {tolerance:.1e})"
        # Central differences (no ReLU kink within STEP of these seeded inputs): truncation
        # ~ STEP^2 |S'''| and rounding ~ u |S| / STEP (about 1e-9 of |map| |d| measured); 1e-6
        # leaves three orders for larger third derivatives.
        expected = directional_differences(model, image, int(label), g_test, method, directions)
        along = (directions * maps[row].double()).flatten(1).sum(1)
        scale = maps[row].double().norm() * directions.flatten(1).norm(dim=1)
        error = float(((along - expected).abs() / scale).max())
        assert error < 1e-6, f"training image {i}: {error:.2e} of |map| |d| against FD"


def test_resnet_smoothgrad_is_the_mean_of_reference_maps_at_the_noisy_copies():
    model = tiny_resnet(seed=1)
    train, test = small_dataset(3, size=16), small_dataset(1, size=16, seed=7)
    smooth = SmoothGrad(n=5, sigma=0.15, seed=2)
    engine = TFAEngine(model, train, test, batch_size=4, progress=False)  # copies span batches
    smoothed = engine.tfa_maps(0, [0, 2], target=1, smooth=smooth)
    g_test = flat_gradient(model, test[0][0], 1, create_graph=False)
    images = torch.stack([train[0][0], train[2][0]])
    labels = [int(train[0][1])] * 5 + [int(train[2][1])] * 5
    noisy = noisy_copies(images, smooth)
    reference = torch.stack(
        [reference_map(model, x, y, g_test, "grad_cos") for x, y in zip(noisy, labels, strict=True)]
    )
    expected = reference.view(2, 5, *reference.shape[1:]).mean(1)
    tolerance = map_tolerance(model)
    for row in range(2):
        error = relative_error(smoothed[row], expected[row])
        assert error < tolerance, f"image {row}: relative error {error:.2e} (> {tolerance:.1e})"
