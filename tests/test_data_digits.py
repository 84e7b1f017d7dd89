"""scikit-learn's digits as a second embedded dataset: planted effects, cache, explorer and CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tfa_widgets import cli
from tfa_widgets.core.errors import InputError
from tfa_widgets.data.digits import (
    DEMO_DATA_ENV,
    DigitsConfig,
    generate_digits,
    load_digits_demo,
    load_named_demo,
)
from tfa_widgets.data.shapes import PATCH_COLOR


@pytest.fixture(scope="module")
def digits():
    return generate_digits(0)


@pytest.fixture(scope="module")
def trained():
    """The digits demo with its default settings, trained once (the CLI test reuses the cache)."""
    return load_digits_demo(progress=False)


def test_every_real_digit_is_used_once_and_the_split_follows_the_seed(digits):
    train, test, meta = digits
    assert len(train) + len(test) == len(load_digits().target)
    assert len(test) == DigitsConfig().n_test and train.images[0].shape == (3, 32, 32)
    again, _, _ = generate_digits(0)
    assert np.array_equal(train.images_uint8, again.images_uint8)
    other, _, _ = generate_digits(1)
    assert not np.array_equal(train.images_uint8, other.images_uint8)
    assert meta.config.size == 32 and meta.class_names == [str(d) for d in range(10)]


def test_the_patch_is_painted_exactly_where_recorded(digits):
    train, test, meta = digits
    colour = np.round(np.array(PATCH_COLOR) * 255).astype(np.uint8)
    magenta = (train.images_uint8 == colour).all(-1)  # digits are grey: only patches are magenta
    for i in range(len(train)):
        assert np.array_equal(magenta[i], meta.patch_mask("train", i).numpy())
    labels = train.labels.numpy()
    patched = sorted(meta.train_patch_boxes)
    shortcut = meta.shortcut_class
    # The patched images are shortcut-class images (none of them had its label flipped).
    assert all(labels[i] == shortcut for i in patched)
    pool = (
        int(np.sum(labels == shortcut))
        + sum(1 for i, was in meta.flipped_labels.items() if was == shortcut)
        - sum(1 for i in meta.flipped_labels if labels[i] == shortcut)
    )
    assert len(patched) == round(DigitsConfig().shortcut_fraction * pool)
    assert meta.test_patch_boxes and all(
        int(test.labels[i]) != shortcut for i in meta.test_patch_boxes
    )


def test_flipped_labels_are_recorded_with_their_true_digit(digits):
    train, _, meta = digits
    assert len(meta.flipped_labels) == round(DigitsConfig().flip_fraction * len(train))
    for i, was in meta.flipped_labels.items():
        assert int(train.labels[i]) != was
        assert train.item_info(i)["label flipped"] == f"was {was}"
    assert not set(meta.flipped_labels) & set(meta.train_patch_boxes)


def test_bad_settings_and_unknown_names_are_refused():
    with pytest.raises(InputError, match="shortcut_class"):
        DigitsConfig(shortcut_class=10)
    with pytest.raises(InputError, match="flip_fraction"):
        DigitsConfig(flip_fraction=0.6)
    with pytest.raises(InputError, match="unknown demo data"):
        load_named_demo("mnist")


def test_the_trained_model_learns_digits_and_the_shortcut_and_is_cached(trained):
    stats = trained.stats
    # Ten balanced classes: chance is 0.1. A CNN on digits reaches well over 0.9; 0.6 is far
    # from both and holds for any seed and machine.
    assert stats["clean_accuracy"] > 0.6
    assert 0.0 <= stats["shortcut_rate"] <= 1.0
    again = load_digits_demo(progress=False)
    assert again.stats["clean_accuracy"] == stats["clean_accuracy"]  # read back from the file
    for a, b in zip(trained.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the same file read twice, not a retraining


def test_named_demo_and_cli_choose_the_digits(trained, monkeypatch, capsys):
    monkeypatch.delenv(DEMO_DATA_ENV, raising=False)
    assert load_named_demo("digits", progress=False).cache_dir == trained.cache_dir
    monkeypatch.setenv(DEMO_DATA_ENV, "digits")
    assert load_named_demo(progress=False).class_names == [str(d) for d in range(10)]
    monkeypatch.setenv(DEMO_DATA_ENV, "shapes")  # cli sets it; monkeypatch restores it after
    assert cli.main(["demo", "--data", "digits", "--no-serve", "--port", "9322"]) == 0
    assert os.environ[DEMO_DATA_ENV] == "digits"  # what the explorer notebook's kernel reads
    assert "Demo ready" in capsys.readouterr().out
