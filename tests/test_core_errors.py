"""Bad input gets a clear error naming the problem, and loses nothing already computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_models import small_cnn, small_dataset
from torch import nn
from torch.utils.data import TensorDataset

from tfa_widgets import (
    DatasetError,
    InputError,
    NonFiniteError,
    SmoothGrad,
    TFAEngine,
    TFAError,
)
from tfa_widgets.data import load_checkpoint

pytestmark = pytest.mark.portability


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
        engine.scores(0, method="influence_lissa")
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
    images, targets = engine.train_data.batch(range(6))
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


# ---------------------------------------------------------------- issue 10, section 3
class _Triples(torch.utils.data.Dataset):
    """Yields (image, label, path) triples, as some user datasets do."""

    def __init__(self, n: int = 4) -> None:
        self.inner = small_dataset(n)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        image, label = self.inner[i]
        return image, label, f"image-{i}.png"


def _with_labels(labels) -> TensorDataset:
    images = small_dataset(len(labels)).tensors[0]
    return TensorDataset(images, torch.as_tensor(labels))


class _Wrapped(nn.Module):
    """``small_cnn`` whose output is wrapped: a tuple, a dict, or 1-D logits."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = small_cnn(), kind
        self.eval()

    def forward(self, x):
        logits = self.inner(x)
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "dict":
            return {"logits": logits, "hidden": x}
        if self.kind == "other_dict":
            return {"scores": logits}
        return logits[:, 0]  # 1-D


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: TFAEngine(small_cnn(), _Triples()), DatasetError, r"\(image, label\) pairs.*3"),
        (
            lambda: TFAEngine(small_cnn(), _with_labels([0, 1, 7])).build_index(),
            DatasetError,
            r"training example 2 has label 7.*3 classes",
        ),
        (
            lambda: TFAEngine(small_cnn(), _with_labels(torch.eye(3))),
            DatasetError,
            r"one-hot.*argmax.*loss='bce'",
        ),
        (
            lambda: TFAEngine(small_cnn(), _with_labels([0.5, 1.0])),
            DatasetError,
            r"example 0 has label 0.5, which is not a whole number",
        ),
        (
            lambda: TFAEngine(_Wrapped("tuple"), small_dataset(4)),
            InputError,
            r"returns a tuple.*output=",
        ),
        (
            lambda: TFAEngine(_Wrapped("other_dict"), small_dataset(4)),
            InputError,
            r"returns a dict.*output=",
        ),
        (
            lambda: TFAEngine(_Wrapped("1d"), small_dataset(4)),
            InputError,
            r"logits of shape \(1,\).*\[B, num_classes\]",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), batch_size=0),
            InputError,
            r"batch_size must be a positive integer",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), batch_size=-3),
            InputError,
            r"batch_size must be a positive integer",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), projection_dim=0),
            InputError,
            r"projection_dim must be a positive integer",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), test_gradient_cache_mb=-1),
            InputError,
            r"test_gradient_cache_mb must be a positive number",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), memory_budget_mb=-1),
            InputError,
            r"memory_budget_mb must be a number >= 0",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), cache_budget_mb="8 GB"),
            InputError,
            r"cache_budget_mb must be a positive number, got '8 GB'",
        ),
        (
            lambda: TFAEngine(small_cnn(), small_dataset(4), rescore=-1),
            InputError,
            r"rescore must be an integer >= 0",
        ),
        (lambda: SmoothGrad(n=2.5), InputError, r"whole number of noise samples.*2.5"),
        (lambda: SmoothGrad(n=True), InputError, r"whole number of noise samples"),
        (lambda: SmoothGrad(sigma="a lot"), InputError, r"sigma.*'a lot'"),
        (lambda: SmoothGrad(seed=0.5), InputError, r"seed must be an integer"),
    ],
    ids=[
        "triples",
        "label-out-of-range",
        "one-hot-with-cross-entropy",
        "fractional-label",
        "tuple-output",
        "dict-without-logits",
        "1d-logits",
        "batch-size-0",
        "batch-size-negative",
        "projection-dim-0",
        "test-gradient-cache-negative",
        "memory-budget-negative",
        "cache-budget-string",
        "rescore-negative",
        "smoothgrad-fractional-n",
        "smoothgrad-bool-n",
        "smoothgrad-sigma-string",
        "smoothgrad-fractional-seed",
    ],
)
def test_bad_settings_and_data_get_a_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    ("target", "layer", "message"),
    [
        ([0, 1, 2], None, r"3 targets for 2 images"),
        ([0], None, r"1 targets for 2 images"),
        (0, "7", r"spatial output \[B, C, H, W\].*layer '7' \(Linear\).*shape \(1, 3\)"),
        (0, nn.Conv2d(3, 4, 3), r"not part of the model"),
    ],
    ids=["too-many-targets", "too-few-targets", "linear-layer", "foreign-module"],
)
def test_gradcam_arguments_are_checked(engine, target, layer, message):
    images = small_dataset(2).tensors[0]
    with pytest.raises(InputError, match=message):
        engine.gradcam(images, target, layer=layer)


def test_gradcam_takes_numpy_integer_targets(engine):
    images = small_dataset(2).tensors[0]
    expected = engine.gradcam(images, [2, 2])
    torch.testing.assert_close(engine.gradcam(images, np.int64(2)), expected)
    torch.testing.assert_close(engine.gradcam(images, np.array([2, 2])), expected)
    torch.testing.assert_close(engine.gradcam(images[0], np.int64(2)), expected[0])


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.unused = small_cnn(), nn.Conv2d(3, 3, 1).double()
        self.eval()

    def forward(self, x):
        return self.inner(x)


def test_gradcam_on_a_layer_the_forward_never_calls():
    engine = TFAEngine(_WithUnusedLayer(), small_dataset(4), progress=False)
    with pytest.raises(InputError, match="never called"):
        engine.gradcam(small_dataset(1)[0][0], 0, layer="unused")


@pytest.mark.parametrize("strategy", ["factored", "vmap"])
@pytest.mark.parametrize("kind", ["dict", "tuple", "1d"])
def test_the_output_hook_reaches_every_path_that_calls_the_model(kind, strategy):
    # Every verb of an engine on a wrapped model (a dict is read by default; a tuple and
    # 1-D logits through ``output=``) equals the engine on the plain model: the same
    # arithmetic on the same float64 logits, so equal to float64 rounding.
    output = {"dict": None, "tuple": lambda out: out[0], "1d": lambda out: out[:, None]}[kind]
    loss = "bce" if kind == "1d" else "cross_entropy"
    train = _binary(small_dataset(8)) if kind == "1d" else small_dataset(8)
    test = small_dataset(2, seed=7)
    settings = {"loss": loss, "strategy": strategy, "progress": False}
    wrapped = TFAEngine(_Wrapped(kind), train, test, output=output, **settings)
    plain_model = _FirstLogit(small_cnn()) if kind == "1d" else small_cnn()
    plain = TFAEngine(plain_model, train, test, **settings)
    assert (wrapped._model_term.gradients.factored is None) == (strategy == "vmap")
    torch.testing.assert_close(wrapped.scores(0, target=0), plain.scores(0, target=0))
    torch.testing.assert_close(
        wrapped.tfa_maps(0, [1, 2], target=0), plain.tfa_maps(0, [1, 2], target=0)
    )
    torch.testing.assert_close(wrapped.predict(1), plain.predict(1))
    images = test.tensors[0]
    torch.testing.assert_close(wrapped.gradcam(images, 0), plain.gradcam(images, 0))
    torch.testing.assert_close(wrapped.saliency(images[0], 0), plain.saliency(images[0], 0))


class _FirstLogit(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.eval()

    def forward(self, x):
        return self.inner(x)[:, :1]


def _binary(data: TensorDataset) -> TensorDataset:
    return TensorDataset(data.tensors[0], (data.tensors[1] == 0).double()[:, None])


def test_load_checkpoint_on_a_directory_says_so(tmp_path):
    with pytest.raises(DatasetError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)
