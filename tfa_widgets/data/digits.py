"""``load_digits_demo()``: scikit-learn's real handwritten digits with a planted shortcut and
flipped labels, and the demo CNN trained on them, cached on disk like the demo.

The 1,797 images of `sklearn.datasets.load_digits` (8x8, 16 grey levels, shipped inside the
package: nothing is downloaded) are upsampled to 32x32 RGB. As in the generated demo, a magenta
square is painted on most training images of one class (the shortcut) and on some test images of
the other classes, and a recorded share of training labels is flipped. Everything planted is kept
in a `DemoMetadata`, so the demo's evaluation runs on it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from tfa_widgets.core.errors import InputError
from tfa_widgets.data import shapes
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.demo import Demo, demo_fingerprint, load_demo, train_or_load
from tfa_widgets.data.demo_data import DemoMetadata
from tfa_widgets.data.train import TrainConfig
from tfa_widgets.data.transforms import Normalization

DIGITS_VERSION = "1"
DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitsConfig:
    """Split, image size and planted effects of the digits dataset."""

    n_test: int = 400
    size: int = 32
    shortcut_class: int = 7
    shortcut_fraction: float = 0.9
    patch_size: int = 6
    n_patched_test: int = 40
    flip_fraction: float = 0.03

    def __post_init__(self) -> None:
        if not 0 <= self.shortcut_class < 10:
            raise InputError(f"shortcut_class must be a digit 0-9, got {self.shortcut_class}")
        if not 0.0 <= self.flip_fraction < 0.5:
            raise InputError(f"flip_fraction must lie in [0, 0.5), got {self.flip_fraction}")
        if not 0 < self.n_test < 1797 - 100:
            raise InputError(f"n_test must leave at least 100 training digits, got {self.n_test}")


def _upsampled(digits: np.ndarray, size: int) -> np.ndarray:
    """Return ``[N, size, size, 3]`` uint8 images from ``[N, 8, 8]`` grey levels 0-16."""
    grey = torch.from_numpy(digits / 16.0).float()[:, None]
    big = functional.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return np.repeat(pixels[..., None], 3, axis=-1)


def generate_digits(
    seed: int = 0, config: DigitsConfig | None = None
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, DemoMetadata]:
    """Return ``(train_set, test_set, metadata)`` of the digits, identical for identical seeds."""
    from sklearn.datasets import load_digits

    cfg = config or DigitsConfig()
    rng = np.random.default_rng([seed, 8080])
    raw = load_digits()
    order = rng.permutation(len(raw.target))
    images = _upsampled(raw.images[order], cfg.size)
    labels = raw.target[order].astype(np.int64)
    masks = images[..., 0] > 64  # the ink: the digit's own pixels
    train_images, test_images = images[cfg.n_test :].copy(), images[: cfg.n_test].copy()
    train_labels, test_labels = labels[cfg.n_test :].copy(), labels[: cfg.n_test]
    train_masks, test_masks = masks[cfg.n_test :], masks[: cfg.n_test]

    pool = np.flatnonzero(train_labels == cfg.shortcut_class)
    patched = np.sort(rng.choice(pool, int(round(cfg.shortcut_fraction * len(pool))), False))
    others = np.flatnonzero(test_labels != cfg.shortcut_class)
    patched_test = np.sort(rng.choice(others, min(cfg.n_patched_test, len(others)), False))
    train_boxes = shapes.patch_boxes(rng, train_masks, patched, cfg.patch_size)
    test_boxes = shapes.patch_boxes(rng, test_masks, patched_test, cfg.patch_size)
    shapes.paint_patches(train_images, train_boxes)
    shapes.paint_patches(test_images, test_boxes)

    unpatched = np.setdiff1d(np.arange(len(train_labels)), patched)
    n_flip = int(round(cfg.flip_fraction * len(train_labels)))
    flipped = np.sort(rng.choice(unpatched, n_flip, replace=False))
    true_labels = {int(i): int(train_labels[i]) for i in flipped}
    train_labels[flipped] = (train_labels[flipped] + rng.integers(1, 10, n_flip)) % 10

    rgb = train_images.reshape(-1, 3).astype(np.float64) / 255.0
    norm = Normalization(
        tuple(round(float(m), 4) for m in rgb.mean(0)),
        tuple(round(float(s), 4) for s in rgb.std(0)),
    )
    meta = DemoMetadata(
        seed=seed,
        config=cfg,  # a DigitsConfig: the same size and patch_size fields as a DemoConfig
        generator_version=f"digits-{DIGITS_VERSION}",
        class_names=list(DIGIT_NAMES),
        shortcut_class=cfg.shortcut_class,
        patch_color=shapes.PATCH_COLOR,
        train_patch_boxes=train_boxes,
        test_patch_boxes=test_boxes,
        train_masks=torch.from_numpy(train_masks),
        test_masks=torch.from_numpy(test_masks),
        train_second_masks=torch.zeros_like(torch.from_numpy(train_masks)),
        flipped_labels=true_labels,
        two_object={},
        harmful_groups=[],
        normalization=norm,
        extras={"source": "sklearn.datasets.load_digits"},
    )
    train_info = [{} for _ in train_labels]
    for i in train_boxes:
        train_info[i]["planted patch"] = "yes"
    for i, was in true_labels.items():
        train_info[i]["label flipped"] = f"was {was}"
    test_info = [{"planted patch": "yes"} if i in test_boxes else {} for i in range(cfg.n_test)]
    train_set = InMemoryImageDataset(
        train_images, train_labels, DIGIT_NAMES, norm, train_masks, train_info, "digits-train"
    )
    test_set = InMemoryImageDataset(
        test_images, test_labels, DIGIT_NAMES, norm, test_masks, test_info, "digits-test"
    )
    return train_set, test_set, meta


def load_digits_demo(
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    config: DigitsConfig | None = None,
    train_config: TrainConfig | None = None,
) -> Demo:
    """Return the digits demo: real digits with planted effects and a model trained on them.

    The model is the demo's `DemoResNet` (10 classes), trained once and cached in
    ``<cache_dir>/digits-<fingerprint>/`` (see `tfa_widgets.data.load_demo` for the parameters).
    """
    config = config or DigitsConfig()
    train_config = train_config or TrainConfig(epochs=12)
    train_set, test_set, meta = generate_digits(seed, config)
    key = demo_fingerprint(seed, config, train_config, f"digits-{DIGITS_VERSION}")
    return train_or_load(
        train_set, test_set, meta, f"digits-{key}", seed, cache_dir, train_config, progress
    )


DEMO_DATA_ENV = "TFA_DEMO_DATA"
DEMO_NAMES = ("shapes", "digits")


def load_named_demo(name: str | None = None, **kwargs) -> Demo:
    """Return the embedded demo called ``name``: ``"shapes"`` (generated) or ``"digits"``.

    ``None`` reads ``$TFA_DEMO_DATA`` (set by ``tfa-widgets demo --data``), else ``"shapes"``.
    """
    name = name or os.environ.get(DEMO_DATA_ENV) or "shapes"
    if name not in DEMO_NAMES:
        raise InputError(f"unknown demo data {name!r}; choose one of {DEMO_NAMES}")
    return (load_demo if name == "shapes" else load_digits_demo)(**kwargs)
