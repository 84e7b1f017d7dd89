"""Scores, index norms and maps stay exact on the training images a trained model fits best.

There ``1 − p_y`` is below float32 resolution and a float32 cross-entropy differentiated the
usual way (``softmax − onehot``) loses its largest logit derivative to cancellation (issue
#14: a score of 0 returned for a true cosine of −0.15). Ground truth is plain autograd in
float64; the tolerance is the error plain float32 reverse-mode autograd makes on the same
images: the engine may not be worse than the reference implementations (dattri, Captum).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from tfa_widgets import TFAEngine

N_BEST = 8
TESTS = [437, 3]


def _ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, label)


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits), reduction="sum")


def _bce_of_one_class(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    # How the engine explains one class c of a test image: label 1, weight 1 on c only.
    chosen = logits.gather(1, label[:, None])
    return F.binary_cross_entropy_with_logits(chosen, torch.ones_like(chosen), reduction="sum")


def _gradient(model, image, label, loss_fn, create_graph=False):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(image[None]), torch.as_tensor(label)[None])
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.flatten() for g in grads])


def _reference(model, dtype, train_items, test_items, loss_fn, test_loss_fn=None):
    """Cosines ``[T, N]``, training norms ``[N]`` and grad-cos maps ``[T, N, C, H, W]`` by
    plain reverse-mode autograd in ``dtype``."""
    model = copy.deepcopy(model).to(dtype).eval()
    test_loss_fn = test_loss_fn or loss_fn
    tests = torch.stack([_gradient(model, x.to(dtype), y, test_loss_fn) for x, y in test_items])
    trains = torch.stack([_gradient(model, x.to(dtype), y, loss_fn) for x, y in train_items])
    cosines = (tests @ trains.T) / tests.norm(dim=1)[:, None] / trains.norm(dim=1)
    maps = []  # [N, T, C, H, W]: one double backward graph per training image
    for x, y in train_items:
        x = x.to(dtype).requires_grad_(True)
        g = _gradient(model, x, y, loss_fn, create_graph=True)
        cosines_of_x = g @ tests.T / (g.norm() * tests.norm(dim=1))
        maps.append(
            torch.stack([torch.autograd.grad(c, x, retain_graph=True)[0] for c in cosines_of_x])
        )
    return cosines, trains.norm(dim=1), torch.stack(maps).transpose(0, 1)


def _worst(errors: torch.Tensor) -> float:
    """The largest error of the float32 reference; a NaN is it failing outright (a float32
    gradient that cancelled to exactly zero)."""
    return float(errors.nan_to_num(nan=torch.inf).max())


def _relative(maps: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (maps.double() - truth).flatten(2).norm(dim=2) / truth.flatten(2).norm(dim=2)


def _largest(errors: torch.Tensor) -> float:
    """The largest error of the engine (NaN if any is NaN, which fails every comparison)."""
    return float(errors.max()) if not bool(errors.isnan().any()) else float("nan")


@pytest.fixture(scope="module")
def best_fitted(demo):
    """The demo's ``N_BEST`` lowest-loss training images, as their own training set."""
    with torch.no_grad():
        losses = torch.cat(
            [
                F.cross_entropy(demo.model(x), y, reduction="none")
                for x, y in zip(
                    demo.train_set.images.split(256), demo.train_set.labels.split(256), strict=True
                )
            ]
        )
    indices = losses.argsort()[:N_BEST].tolist()
    return Subset(demo.train_set, indices)


def _check_in_cancellation_regime(model, items) -> None:
    # The test means something only where float32 softmax − onehot cancels: 1 − p_y below
    # 2^-20, i.e. fewer than 4 significant bits left in p_y − 1.
    with torch.no_grad():
        for x, y in items:
            p = model(x[None]).softmax(1)[0, int(y)]
            assert float(1 - p) < 2**-20


@pytest.fixture(scope="module")
def cross_entropy_case(demo, best_fitted):
    """Training and test items with float64 and float32 plain-autograd references."""
    train_items = [best_fitted[i] for i in range(len(best_fitted))]
    test_items = [(demo.test_set[t][0], demo.test_set[t][1]) for t in TESTS]
    _check_in_cancellation_regime(demo.model, train_items)
    truth = _reference(demo.model, torch.float64, train_items, test_items, _ce)
    float32 = _reference(demo.model, torch.float32, train_items, test_items, _ce)
    return truth, float32


@pytest.mark.parametrize("strategy", ["factored", "vmap"])
def test_cross_entropy_scores_norms_and_maps_on_the_best_fitted_images(
    demo, best_fitted, cross_entropy_case, strategy
):
    (truth, true_norms, true_maps), (float32, float32_norms, float32_maps) = cross_entropy_case
    allowed = _worst((float32.double() - truth).abs())

    exact_index = TFAEngine(
        demo.model, best_fitted, demo.test_set, strategy=strategy, progress=False
    )
    assert not exact_index.build_index().projected
    scores = exact_index.scores(TESTS, target="true")
    assert _largest((scores.double() - truth).abs()) <= allowed
    norms = exact_index.build_index().norms.double()
    assert _largest((norms - true_norms).abs() / true_norms) <= _worst(
        (float32_norms.double() - true_norms).abs() / true_norms
    )

    projected = TFAEngine(
        demo.model, best_fitted, demo.test_set, strategy=strategy, memory_budget_mb=1e-3,
        projection_dim=64, progress=False,
    )  # fmt: skip
    assert projected.build_index().projected
    exact = projected.scores(TESTS, target="true", exact=True)
    assert _largest((exact.double() - truth).abs()) <= allowed
    indices, values = projected.top_k(TESTS, 4, target="true")  # candidates re-scored exactly
    assert _largest((values.double() - truth.gather(1, indices)).abs()) <= allowed

    maps = torch.stack([exact_index.tfa_maps(t, list(range(N_BEST)), target="true") for t in TESTS])
    assert _largest(_relative(maps, true_maps)) <= _worst(_relative(float32_maps, true_maps))


def test_bce_scores_and_maps_on_saturated_sigmoids(demo, best_fitted):
    """BCE's ``σ(z) − y`` cancels the same way when a positive logit is large."""
    model = copy.deepcopy(demo.model)
    with torch.no_grad():  # a confident multi-label head: every sigmoid near 0 or 1
        model.fc.weight.mul_(4)
        model.fc.bias.mul_(4)
    num_classes = model.fc.out_features

    def multi_hot(items):
        return [(x, F.one_hot(torch.as_tensor(y), num_classes).float()) for x, y in items]

    train_items = multi_hot([best_fitted[i] for i in range(len(best_fitted))])
    test_items = multi_hot([demo.test_set[t] for t in TESTS[:2]])
    test_classes = [(x, torch.as_tensor(int(y.argmax()))) for x, y in test_items]
    with torch.no_grad():
        sigmoid = model(torch.stack([x for x, _ in train_items])).sigmoid()
    labels = torch.stack([y for _, y in train_items])
    assert float((1 - sigmoid)[labels.bool()].min()) < 2**-20  # in the cancellation regime
    truth, _, true_maps = _reference(
        model, torch.float64, train_items, test_classes, _bce, _bce_of_one_class
    )
    float32, _, float32_maps = _reference(
        model, torch.float32, train_items, test_classes, _bce, _bce_of_one_class
    )

    class MultiLabel(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    engine = TFAEngine(
        model, MultiLabel(train_items), MultiLabel(test_items), loss="bce", progress=False
    )
    scores = engine.scores([0, 1], target="true")
    assert _largest((scores.double() - truth).abs()) <= _worst((float32.double() - truth).abs())
    maps = torch.stack([engine.tfa_maps(t, list(range(N_BEST)), target="true") for t in (0, 1)])
    assert _largest(_relative(maps, true_maps)) <= _worst(_relative(float32_maps, true_maps))
