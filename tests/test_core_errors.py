"""Bad input gets a clear error naming the problem, and loses nothing already computed."""

from __future__ import annotations

import pytest
import torch
from core_models import small_cnn, small_dataset
from torch.utils.data import TensorDataset

from tfa_widgets import (
    DatasetError,
    InputError,
    NonFiniteError,
    SmoothGrad,
    TFAEngine,
    TFAError,
)


@pytest.fixture(scope="module")
def engine():
    return TFAEngine(small_cnn(), small_dataset(10), small_dataset(3, seed=7), progress=False)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.zeros(8, 8, dtype=torch.float64), "shape \\[C, H, W\\]"),
        (torch.zeros(1, 8, 8, dtype=torch.float64), "1 channels but the training images have 3"),
        (torch.zeros(3, 16, 16, dtype=torch.float64), "size \\(16, 16\\)"),
        ("cat", "must be an index into the test set, an image tensor"),
    ],
)
def test_wrong_image_shapes(engine, image, message):
    with pytest.raises(InputError, match=message):
        engine.top_k(image, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_test_image(engine, bad):
    image = torch.zeros(3, 8, 8, dtype=torch.float64)
    image[1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match="test image contains"):
        engine.explain(image, k=2)


@pytest.mark.parametrize(("k", "message"), [(0, "at least 1"), (-2, "at least 1"), (11, "larger")])
def test_bad_k(engine, k, message):
    with pytest.raises(InputError, match=message):
        engine.top_k(0, k)


def test_bad_targets_and_layers(engine):
    with pytest.raises(InputError, match="target class 3 is out of range"):
        engine.scores(0, target=3)
    with pytest.raises(InputError, match="unknown target 'bogus'"):
        engine.scores(0, target="bogus")
    with pytest.raises(InputError, match="unknown layer 'layer9'"):
        engine.gradcam(small_dataset(1)[0][0], 0, layer="layer9")
    with pytest.raises(InputError, match="test index 5 is out of range"):
        engine.predict(5)
    with pytest.raises(InputError, match="out of range for a training set of size 10"):
        engine.tfa_maps(0, [3, 10])
    with pytest.raises(InputError, match="unknown scoring method"):
        engine.scores(0, method="influence")
    with pytest.raises(TFAError, match="n >= 1"):
        SmoothGrad(n=0)


def test_errors_lose_nothing_already_computed(engine):
    engine.build_index()
    builds = engine.index_builds
    before = engine.scores(1)
    with pytest.raises(TFAError):
        engine.top_k(1, 100)
    torch.testing.assert_close(engine.scores(1), before)
    assert engine.index_builds == builds


def test_empty_and_malformed_datasets():
    with pytest.raises(DatasetError, match="training set is empty"):
        TFAEngine(small_cnn(), TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)))
    with pytest.raises(DatasetError, match="image tensors"):
        TFAEngine(small_cnn(), [(torch.zeros(8, 8), 0)])
    with pytest.raises(InputError, match="unknown parameter or module name 'fc'"):
        TFAEngine(small_cnn(), small_dataset(3), params=["fc"])
    with pytest.raises(InputError, match="tracin_cp' needs checkpoints"):
        TFAEngine(small_cnn(), small_dataset(3), method="tracin_cp")


def test_non_finite_gradients_name_the_training_images():
    images = small_dataset(6).tensors[0].clone()
    images[4, 0, 0, 0] = float("inf")
    engine = TFAEngine(small_cnn(), TensorDataset(images, torch.zeros(6, dtype=torch.long)))
    with pytest.raises(NonFiniteError, match=r"training examples \[4\]"):
        engine.build_index()


def test_non_finite_test_gradient():
    model = small_cnn()
    with torch.no_grad():
        model[7].weight[0, 0] = float("nan")
    engine = TFAEngine(model, small_dataset(4), progress=False)
    with pytest.raises(NonFiniteError, match="not finite"):
        engine.scores(torch.ones(3, 8, 8, dtype=torch.float64), target=1)


def test_train_mode_model_is_switched_to_eval_with_a_warning():
    model = small_cnn().train()
    with pytest.warns(UserWarning, match="train mode"):
        engine = TFAEngine(model, small_dataset(6), progress=False)
    assert not model.training
    # Per-sample gradients do not depend on the rest of the batch.
    gm = engine._model_term.gradients
    images, targets = engine._train_batch(range(6))
    torch.testing.assert_close(
        gm.per_sample_grads(images[:2], targets[:2]), gm.per_sample_grads(images, targets)[:2]
    )


def test_true_target_needs_a_label(engine):
    with pytest.raises(InputError, match="target 'true' needs a test index"):
        engine.scores(torch.zeros(3, 8, 8, dtype=torch.float64), target="true")
    label = int(small_dataset(3, seed=7)[0][1])
    torch.testing.assert_close(engine.scores(0, target="true"), engine.scores(0, target=label))


def test_predict_batch_agrees_with_predict_and_checks_images(engine):
    images = torch.stack([small_dataset(3, seed=7)[i][0] for i in range(3)])
    batch = engine.predict_batch(images)
    torch.testing.assert_close(batch[1], engine.predict(1))
    torch.testing.assert_close(batch.sum(1), torch.ones(3))
    images[2, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="image 2 of the batch"):
        engine.predict_batch(images)
    with pytest.raises(InputError, match="predict_batch needs images"):
        engine.predict_batch(images[0])
