"""The engine against independent ground truths: closed forms, Captum TracInCP, Grad-CAM."""

from __future__ import annotations

import pytest
import torch
from captum.influence import TracInCP
from core_models import small_cnn, small_dataset
from precision import float32_index_tolerance
from torch import nn

from tfa_widgets import TFAEngine
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.scoring import GradCos, GradDot

pytestmark = pytest.mark.portability


def linear_setup(n=5, d=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=generator, dtype=torch.float64))
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    return model, x, y


def test_linear_squared_loss_closed_form():
    """f(x) = wᵀx, ℓ = ½(wᵀx − y)²: g_i = r_i x_i, and ∇_x S is analytic."""
    model, x, y = linear_setup()
    w = model.weight[0].detach()
    gm = GradientModel(model, ["weight"], "squared_error")
    x_test, y_test = x[0] + 0.5, torch.tensor(0.7, dtype=torch.float64)
    g_test = gm.gradient(x_test, y_test)
    r = x @ w - y
    torch.testing.assert_close(g_test, ((x_test @ w) - y_test) * x_test)
    grads = gm.per_sample_grads(x, y)
    torch.testing.assert_close(grads, r[:, None] * x)

    # Grad-Dot: S = r ⟨x, g_t⟩, so ∇_x S = r g_t + w ⟨x, g_t⟩.
    expected = r[:, None] * g_test + w[None] * (x @ g_test)[:, None]
    torch.testing.assert_close(gm.input_grads_of_score(x, y, GradDot(), g_test), expected)
    directions = g_test.expand(len(x), -1)  # ∂S/∂g_i = g_t
    torch.testing.assert_close(gm.input_grads_of_dots(x, y, directions), expected)

    # Grad-Cos: S = sign(r) ⟨x, g_t⟩ / (‖x‖ ‖g_t‖), whose gradient needs no w.
    norm_x, norm_t = x.norm(dim=1, keepdim=True), g_test.norm()
    expected = r.sign()[:, None] * (
        g_test / (norm_x * norm_t) - (x @ g_test)[:, None] * x / (norm_x**3 * norm_t)
    )
    torch.testing.assert_close(gm.input_grads_of_score(x, y, GradCos(), g_test), expected)
    a, c = GradCos().norm_coefficients(grads @ g_test, grads.norm(dim=1), g_test.norm())
    directions = a[:, None] * g_test + c[:, None] * grads
    torch.testing.assert_close(gm.input_grads_of_dots(x, y, directions), expected)
    cosines = GradCos().index_scores(grads @ g_test, grads.norm(dim=1), g_test.norm())
    torch.testing.assert_close(cosines, r.sign() * (x @ g_test) / (x.norm(dim=1) * norm_t))


def test_dots_along_equal_materialised_gradients():
    model = small_cnn()
    train = small_dataset(10)
    engine = TFAEngine(model, train, progress=False)
    gm = engine._model_term.gradients
    images, targets = engine.train_data.batch(range(10))
    direction = torch.randn(gm.num_params, dtype=torch.float64)
    torch.testing.assert_close(
        gm.dots_along(images, targets, direction), gm.per_sample_grads(images, targets) @ direction
    )


def _gradient_norm(model, image, label):
    """``||grad_theta CE(model(image), label)||`` by plain autograd."""
    loss = nn.functional.cross_entropy(model(image[None]), torch.tensor([int(label)]))
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, model.parameters())]).norm()


def test_grad_dot_scores_agree_with_captum_tracincp(tmp_path):
    # float64 model and data: Captum computes in float64 (the ground truth), the engine keeps
    # float32 gradients in its index.
    model = small_cnn()
    train = small_dataset(16)
    generator = torch.Generator().manual_seed(5)
    test_images = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    test_labels = torch.tensor([0, 2, 1])
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(model.state_dict(), checkpoint)

    def load_checkpoint(net, path):
        net.load_state_dict(torch.load(path, weights_only=True))
        return 1.0

    captum = TracInCP(
        model,
        train,
        checkpoints=[str(checkpoint)],
        checkpoints_load_func=load_checkpoint,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=4,
    )
    expected = captum.influence((test_images, test_labels))
    engine = TFAEngine(model, train, method="grad_dot", progress=False)
    ours = torch.stack(
        [
            engine.scores(img, target=int(lbl))
            for img, lbl in zip(test_images, test_labels, strict=True)
        ]
    )
    # Each grad-dot is within float32_index_tolerance * ||g_i|| ||g_t|| of the truth (precision.py).
    bound = float32_index_tolerance(sum(p.numel() for p in model.parameters()))
    train_norms = torch.stack([_gradient_norm(model, x, y) for x, y in train])
    test_norms = torch.stack(
        [_gradient_norm(model, x, y) for x, y in zip(test_images, test_labels, strict=True)]
    )
    error = (ours.double() - expected).abs()
    assert (error <= bound * test_norms[:, None] * train_norms[None]).all(), error.max()
    assert expected.abs().max() > 1e3 * float(error.max())  # the scores are not all near zero


def manual_gradcam(model, image, target, layer):
    """Grad-CAM by hand with hooks: ReLU(Σ_c mean(∂y/∂A_c) A_c), bilinear resize, min-max."""
    saved = {}
    hook = layer.register_forward_hook(lambda m, i, out: saved.update(act=out))
    logits = model(image[None])
    hook.remove()
    grads = torch.autograd.grad(logits[0, target], saved["act"])[0]
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * saved["act"]).sum(1, keepdim=True))
    cam = nn.functional.interpolate(
        cam, size=image.shape[-2:], mode="bilinear", align_corners=False
    )
    cam = cam[0, 0]
    return ((cam - cam.min()) / (cam.max() - cam.min())).detach()


def test_gradcam_matches_a_manual_implementation():
    model = small_cnn()
    train = small_dataset(4)
    engine = TFAEngine(model, train, progress=False)
    image = train[1][0]
    for layer_name in ["0", "4"]:
        expected = manual_gradcam(model, image, 2, dict(model.named_modules())[layer_name])
        ours = engine.gradcam(image, 2, layer=layer_name)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
        assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    batch = engine.gradcam(torch.stack([train[0][0], image]), [0, 2], layer="4")
    torch.testing.assert_close(batch[1], engine.gradcam(image, 2, layer="4"))


def test_gradcam_matches_captums_layer_gradcam_with_frozen_weights_and_under_no_grad():
    """Captum's LayerGradCam + LayerAttribution.interpolate, the implementation replaced."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = small_cnn()
    train = small_dataset(4)
    images, targets = torch.stack([train[i][0] for i in range(4)]), [0, 2, 1, 2]
    engine = TFAEngine(model, train, progress=False)
    for layer_name in ["0", "4"]:
        layer = dict(model.named_modules())[layer_name]
        theirs = LayerGradCam(model, layer).attribute(
            images, target=targets, relu_attributions=True
        )
        theirs = LayerAttribution.interpolate(theirs, tuple(images.shape[-2:]), "bilinear")[:, 0]
        low = theirs.flatten(1).min(1).values[:, None, None]
        high = theirs.flatten(1).max(1).values[:, None, None]
        expected = ((theirs - low) / (high - low)).detach()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            ours = engine.gradcam(images, targets, layer=layer_name)
        for p in model.parameters():
            p.requires_grad_(True)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


def test_default_gradcam_layer_is_last_conv_with_output_at_least_4x4():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 8x8
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),  # 4x4: the default
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),  # 2x2: too small
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    engine = TFAEngine(model.eval(), small_dataset(3), progress=False)
    image = small_dataset(3)[0][0]
    torch.testing.assert_close(
        engine.gradcam(image, 1), engine.gradcam(image, 1, layer="2"), rtol=0, atol=0
    )
    assert not torch.allclose(engine.gradcam(image, 1), engine.gradcam(image, 1, layer="0"))


def test_saliency_is_the_input_gradient_of_the_logit():
    model = small_cnn()
    image = small_dataset(1)[0][0]
    engine = TFAEngine(model, small_dataset(2), progress=False)
    x = image.clone().requires_grad_(True)
    expected = torch.autograd.grad(model(x[None])[0, 1], x)[0]
    torch.testing.assert_close(engine.saliency(image, 1).double(), expected, rtol=1e-5, atol=1e-7)


def test_ghost_norm_terms_equal_those_of_the_materialised_conv_gradients():
    # <W_i, T> = <G_i, T U_i> and ||W_i||^2 = <G_i^T G_i, U_i^T U_i> for W_i = G_i U_i^T, against
    # W_i from plain autograd, one example at a time, on a strided, padded, rectangular conv.
    from tfa_widgets.core.factored import _ghost_conv_weight_terms

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, bias=False).double()
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64)
    grad = torch.randn_like(conv(x))
    test = torch.randn(conv.weight.numel(), dtype=torch.float64)
    dots, squares = _ghost_conv_weight_terms(conv, x, grad, test)
    for i in range(len(x)):
        (weight_grad,) = torch.autograd.grad(conv(x[i : i + 1]), conv.weight, grad[i : i + 1])
        torch.testing.assert_close(dots[i], weight_grad.flatten() @ test)
        torch.testing.assert_close(squares[i], weight_grad.square().sum())
