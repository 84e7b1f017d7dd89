"""Reference maps behind one interface (`tfa_widgets.core.reference_maps`), against closed forms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from core_models import small_dataset
from precision import gamma, unit_roundoff
from smooth_models import images_and_labels, smooth_cnn
from torch import nn

from tfa_widgets import InputError, TFAEngine
from tfa_widgets.core.reference_maps import (
    REFERENCE_MAPS,
    GradCAM,
    IntegratedGradients,
    ReferenceMap,
    make_reference_map,
)


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).double().eval()


def test_the_registry_offers_grad_cam_saliency_and_integrated_gradients():
    assert list(REFERENCE_MAPS) == ["gradcam", "saliency", "integrated_gradients"]
    for name in REFERENCE_MAPS:
        layer = nn.Conv2d(1, 1, 1) if REFERENCE_MAPS[name].needs_layer else None
        assert isinstance(make_reference_map(name, layer), ReferenceMap)
    with pytest.raises(InputError, match="unknown reference map 'lime'"):
        make_reference_map("lime")
    with pytest.raises(InputError, match="needs a layer"):
        make_reference_map("gradcam")
    with pytest.raises(InputError, match="steps"):
        IntegratedGradients(steps=0)
    assert isinstance(make_reference_map("gradcam", nn.Conv2d(1, 1, 1)), GradCAM)


@pytest.mark.portability
def test_integrated_gradients_of_a_linear_model_is_the_closed_form():
    """For ``f(x) = w·x + b`` the gradient is constant: IG = (x − x₀) ⊙ w_c exactly."""
    model = _linear()
    train = small_dataset(6)
    engine = TFAEngine(model, train, progress=False)
    images = torch.stack([train[i][0] for i in range(4)])
    targets = [0, 1, 2, 1]
    steps = 16
    for baseline in (0.0, 0.5):
        maps = IntegratedGradients(steps, baseline).attribute(model, images, targets)
        weights = model[1].weight.detach()[targets].view_as(images)
        expected = (images - baseline) * weights
        # the quadrature weights sum to 1 up to rounding: one `steps`-term sum per pixel
        tolerance = gamma(2 * steps + 2, torch.float64) * expected.abs()
        assert bool(((maps - expected).abs() <= tolerance).all())
    through_engine = engine.reference_maps(images[0], 2, "integrated_gradients")
    expected = images[0] * model[1].weight.detach()[2].view_as(images[0])
    # the engine returns float32: one more rounding
    tolerance = (gamma(2 * 32 + 2, torch.float64) + unit_roundoff()) * expected.abs()
    assert bool(((through_engine.double() - expected).abs() <= tolerance).all())


@pytest.mark.portability
def test_integrated_gradients_is_complete_on_a_smooth_cnn():
    """``Σ IG = f(x) − f(x₀)`` up to the quadrature error, estimated by doubling the steps."""
    model = smooth_cnn()
    images, _ = images_and_labels(3)
    targets = [0, 2, 1]
    with torch.no_grad():
        change = (
            model(images)[range(3), targets] - model(torch.zeros_like(images))[range(3), targets]
        )
    coarse = IntegratedGradients(16).attribute(model, images, targets).flatten(1).sum(1)
    fine_maps = IntegratedGradients(32).attribute(model, images, targets).flatten(1)
    fine = fine_maps.sum(1)
    rounding = gamma(fine_maps.shape[1] * 64, torch.float64) * fine_maps.abs().sum(1)
    tolerance = (coarse - fine).abs() + rounding + gamma(64, torch.float64) * change.abs()
    assert bool(((fine - change).abs() <= tolerance).all())
    assert bool((change.abs() > 10 * tolerance).all())  # the check is not vacuous


@pytest.mark.portability
def test_saliency_of_a_linear_model_is_its_weight_row():
    model = _linear(1)
    train = small_dataset(6)
    engine = TFAEngine(model, train, progress=False)
    image = train[0][0]
    for target in range(3):
        expected = model[1].weight.detach()[target].view_as(image)
        # a one-hot backward through the linear layer: the weights, rounded to float32 once
        got = engine.saliency(image, target).double()
        assert bool(((got - expected).abs() <= unit_roundoff() * expected.abs()).all())
    batch = engine.reference_maps(torch.stack([image, image]), [0, 2], "saliency")
    assert batch.shape == (2, 3, 8, 8)


def test_an_unknown_kind_is_refused_by_the_engine():
    engine = TFAEngine(_linear(), small_dataset(6), progress=False)
    with pytest.raises(InputError, match="unknown reference map"):
        engine.reference_maps(small_dataset(1)[0][0], 0, "lime")
    assert engine.reference_kinds == list(REFERENCE_MAPS)


def test_captum_is_imported_only_when_a_map_is_computed():
    code = (
        "import sys, tfa_widgets.core.engine, tfa_widgets.core.reference_maps; "
        "print('captum' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
