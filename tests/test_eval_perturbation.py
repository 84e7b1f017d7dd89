"""One SGD step, insertion/deletion curves and fine-tuning against independent computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.perturbation import (
    OneStep,
    perturbation_curve,
    relative_change,
)
from tfa_widgets.eval.retraining import finetune, load_all, prediction_outcome, retraining_effect

pytestmark = pytest.mark.portability

C, H, W, K, CLASSES = 2, 3, 3, 4, 3

# Every test here is float64. A logit is a sum of C*H*W + 1 = 19 terms of at most 3 in size, so
# it is off by at most gamma_19 * 19 * 3 ~ 1.3e-13 (precision.py), and a loss of order one (or a
# difference of two) by about twice that, in any summation order. LOSS_TOLERANCE leaves a margin
# of more than 5 over that; a change of 1e-6 is a difference the code made, not rounding.
LOSS_TOLERANCE = 1e-12


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, CLASSES)).double().eval()


def _data(n=K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, C, H, W, generator=gen, dtype=torch.float64)
    labels = [int(v) for v in torch.randint(0, CLASSES, (n,), generator=gen)]
    return images, labels


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_one_step_matches_closed_form_for_softmax_regression():
    model = _linear_model()
    images, labels = _data()
    test_image, target, lr = torch.randn(C, H, W, dtype=torch.float64), 2, 0.3
    weight = model[1].weight.detach().numpy().copy()
    bias = model[1].bias.detach().numpy().copy()
    x = images.reshape(K, -1).numpy()
    residual = _softmax(x @ weight.T + bias) - np.eye(CLASSES)[labels]  # dCE/dlogits
    new_weight = weight - lr * residual.T @ x / K
    new_bias = bias - lr * residual.mean(axis=0)
    xt = test_image.reshape(-1).numpy()
    before = -np.log(_softmax(weight @ xt + bias)[target])
    after = -np.log(_softmax(new_weight @ xt + new_bias)[target])

    step = OneStep(model, test_image, target, lr=lr)
    assert step.loss_before == pytest.approx(before, rel=0, abs=LOSS_TOLERANCE)
    assert step.loss_change(images, labels) == pytest.approx(
        after - before, rel=0, abs=LOSS_TOLERANCE
    )
    assert torch.equal(model[1].weight.detach(), torch.from_numpy(weight))  # model untouched


def test_one_step_matches_closed_form_for_multilabel_bce():
    model = _linear_model()
    images, _ = _data()
    multi_hot = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])] * 2
    test_image, target, lr = torch.randn(C, H, W, dtype=torch.float64), 1, 0.5
    weight = model[1].weight.detach().numpy()
    bias = model[1].bias.detach().numpy()
    x = images.reshape(K, -1).numpy()
    y = torch.stack(multi_hot).numpy()
    residual = 1 / (1 + np.exp(-(x @ weight.T + bias))) - y  # d(sum_c BCE)/dlogits
    new_weight = weight - lr * residual.T @ x / K
    new_bias = bias - lr * residual.mean(axis=0)
    xt = test_image.reshape(-1).numpy()

    def loss_of(w, b):
        return np.log1p(np.exp(-(w @ xt + b)[target]))  # -log sigmoid(z_target)

    step = OneStep(model, test_image, target, lr=lr, loss="bce")
    expected = loss_of(new_weight, new_bias) - loss_of(weight, bias)
    assert step.loss_change(images, multi_hot) == pytest.approx(expected, rel=0, abs=LOSS_TOLERANCE)


def test_extreme_masks_reproduce_the_unmasked_step():
    model = _linear_model()
    images, labels = _data()
    maps = torch.randn(K, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    step = OneStep(model, torch.randn(C, H, W, dtype=torch.float64), 0, lr=0.1)
    full = step.loss_change(images, labels)
    baseline = torch.zeros(C)
    deletion = perturbation_curve(step, images, labels, maps, [0, 50], "deletion", baseline)
    insertion = perturbation_curve(step, images, labels, maps, [50, 100], "insertion", baseline)
    # The curves take the vmapped path, `loss_change` plain autograd: equal up to rounding.
    assert deletion[0] == pytest.approx(full, rel=0, abs=LOSS_TOLERANCE)
    assert insertion[100] == pytest.approx(full, rel=0, abs=LOSS_TOLERANCE)
    assert abs(deletion[50] - full) > 1e-6 and abs(insertion[50] - full) > 1e-6


def test_batched_variants_equal_separate_steps():
    model = _linear_model()
    images, labels = _data()
    step = OneStep(model, torch.randn(C, H, W, dtype=torch.float64), 1, lr=0.2)
    variants = torch.stack([images, images * 0.5, images.flip(-1)])
    separate = [step.loss_change(v, labels) for v in variants]
    assert step.loss_changes(variants, labels) == pytest.approx(separate, rel=0, abs=LOSS_TOLERANCE)
    assert min(abs(a - b) for a in separate for b in separate if a is not b) > 1e-6


def test_relative_change_by_hand():
    assert relative_change(-0.05, 0.2) == pytest.approx(-0.25)
    assert math.isnan(relative_change(-0.05, 0.0))


def test_perturbation_rejects_bad_input():
    model = _linear_model()
    images, labels = _data()
    step = OneStep(model, images[0], 0, lr=0.1)
    with pytest.raises(InputError, match="mode"):
        perturbation_curve(step, images, labels, images[:, 0], [5], "swap", torch.zeros(C))
    with pytest.raises(InputError, match="maps"):
        perturbation_curve(step, images, labels, images[:2, 0], [5], "deletion", torch.zeros(C))
    with pytest.raises(InputError, match="learning rate"):
        OneStep(model, images[0], 0, lr=0.0)


def test_full_batch_epoch_equals_one_step():
    model = _linear_model()
    images, labels = _data(n=6)
    tuned = finetune(model, images, labels, epochs=1, lr=0.2, batch_size=6, seed=0)
    stepped = OneStep(model, images[0], 0, lr=0.2).stepped_params(images, labels)
    # Parameters of order one after a step of lr times a gradient of 19-term sums: the two
    # paths' rounding is a few units of float64 (1.1e-16) each, far below 1e-12.
    for name, value in tuned.named_parameters():
        torch.testing.assert_close(value, stepped[name], rtol=0, atol=1e-12)


def test_finetune_control_and_edited_runs():
    model = _linear_model()
    images, labels = _data(n=12)
    settings = {"epochs": 2, "lr": 0.1, "batch_size": 4, "seed": 5}
    control = finetune(model, images, labels, **settings)
    again = finetune(model, images, labels, **settings)
    same = finetune(model, images, labels, replace={3: images[3]}, **settings)
    edited = finetune(model, images, labels, replace={3: torch.zeros(C, H, W)}, **settings)
    test_image = images[0]
    assert retraining_effect(control, again, test_image, 1) == {"loss_change": 0, "prob_change": 0}
    assert retraining_effect(control, same, test_image, 1)["loss_change"] == 0
    effect = retraining_effect(control, edited, test_image, 1)
    loss_c, prob_c = prediction_outcome(control, test_image, 1)
    loss_e, prob_e = prediction_outcome(edited, test_image, 1)
    assert effect["loss_change"] == pytest.approx(loss_e - loss_c, rel=0, abs=LOSS_TOLERANCE)
    assert abs(effect["loss_change"]) > 1e-6
    assert effect["prob_change"] == pytest.approx(prob_e - prob_c, rel=0, abs=LOSS_TOLERANCE)
    assert not torch.equal(control[1].weight, model[1].weight)
    with pytest.raises(InputError, match="outside"):
        finetune(model, images, labels, replace={99: images[0]}, **settings)


def test_load_all_stacks_a_dataset():
    images, labels = _data(n=3)
    stacked, got = load_all([(x.float(), y) for x, y in zip(images, labels, strict=True)])
    assert stacked.shape == (3, C, H, W) and got == labels
