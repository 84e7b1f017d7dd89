"""The demo dataset: shapes with a planted shortcut patch, mislabelled and two-object images."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.data import shapes
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.transforms import Normalization

GENERATOR_VERSION = "1"
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and planted effects of the demo dataset (defaults: 3000 train, 600 test, 32x32).

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test images.
    size : int
        Image height and width in pixels (at least 16).
    shortcut_class : int
        The class whose training images carry the shortcut patch.
    shortcut_fraction : float
        Share of the shortcut class's training images that carry the patch.
    patch_size : int
        Side of the square patch in pixels.
    n_patched_test : int
        Test images of other classes that carry the patch.
    flip_groups, two_object_groups : int
        Number of planted harmful groups of each kind (mislabelled look-alikes; a small labelled
        object beside a big object of another class).
    train_copies, test_copies : int
        Near-duplicate training and test images per harmful group.

    Raises
    ------
    InputError
        When a setting is out of range or the sizes are too small for the classes.
    """

    n_train: int = 3000
    n_test: int = 600
    size: int = 32
    shortcut_class: int = 2
    shortcut_fraction: float = 0.9
    patch_size: int = 6
    n_patched_test: int = 40
    flip_groups: int = 4
    two_object_groups: int = 4
    train_copies: int = 4
    test_copies: int = 3

    def __post_init__(self) -> None:
        n_classes = len(shapes.SHAPE_NAMES)
        harmful = (self.flip_groups + self.two_object_groups) * max(self.train_copies, 1)
        if not 0 <= self.shortcut_class < n_classes:
            raise InputError(
                f"shortcut_class must lie in [0, {n_classes}), got {self.shortcut_class}"
            )
        if self.size < 16:
            raise InputError(f"size must be at least 16 pixels, got {self.size}")
        if self.n_train < 2 * n_classes + harmful or self.n_test < 2 * n_classes:
            raise InputError(
                f"too few images for {n_classes} classes: {self.n_train}/{self.n_test}"
            )
        if not 0.0 <= self.shortcut_fraction <= 1.0:
            raise InputError(f"shortcut_fraction must lie in [0, 1], got {self.shortcut_fraction}")


@dataclass
class HarmfulGroup:
    """Near-duplicate training images planted to cause specific test misclassifications.

    Parameters
    ----------
    kind : {"flipped label", "two objects"}
        Mislabelled look-alikes, or images labelled for a small object beside a big object of
        another class.
    train_indices : list of int
        The harmful training images.
    test_indices : list of int
        The test images they are expected to make the model get wrong.
    true_class : int
        True class of those test images.
    harmful_class : int
        The class the training images teach: the expected wrong prediction.
    other_class : int, optional
        The unlabelled big object of two-object training images.
    """

    kind: str  # "flipped label" or "two objects"
    train_indices: list[int]
    test_indices: list[int]
    true_class: int  # true class of the affected test images
    harmful_class: int  # the class the training images teach, expected as the test prediction
    other_class: int | None = None  # the unlabelled object in two-object training images


@dataclass
class DemoMetadata:
    """Everything planted in the demo data, by split and index.

    Parameters
    ----------
    seed : int
        The seed the data was generated with.
    config : DemoConfig
        The generation settings.
    generator_version : str
        Version of the generator (part of the cache key).
    class_names : list of str
        The shape names, in label order.
    shortcut_class : int
        The class whose training images carry the patch.
    patch_color : tuple of 3 floats
        RGB colour of the patch, in [0, 1].
    train_patch_boxes, test_patch_boxes : dict of int to (y0, x0, y1, x1)
        The patch box of each patched image.
    train_masks, test_masks : torch.Tensor
        Object masks ``[N, H, W]`` (bool) of the labelled object.
    train_second_masks : torch.Tensor
        Masks ``[N, H, W]`` of the second (unlabelled) object of two-object training images.
    flipped_labels : dict of int to int
        Training index to its true class (what the image shows), for the mislabelled images.
    two_object : dict of int to (int, int)
        Training index to (labelled class, other class), for the two-object images.
    harmful_groups : list of HarmfulGroup
        The planted groups and the test images they affect.
    normalization : Normalization
        Between display space and model space.
    extras : dict
        Anything else recorded.
    """

    seed: int
    config: DemoConfig
    generator_version: str
    class_names: list[str]
    shortcut_class: int
    patch_color: tuple[float, float, float]
    train_patch_boxes: dict[int, Box]
    test_patch_boxes: dict[int, Box]
    train_masks: torch.Tensor
    test_masks: torch.Tensor
    train_second_masks: torch.Tensor
    flipped_labels: dict[int, int]
    two_object: dict[int, tuple[int, int]]
    harmful_groups: list[HarmfulGroup]
    normalization: Normalization
    extras: dict = field(default_factory=dict)

    @property
    def harmful_effects(self) -> dict[int, list[int]]:
        """Map each harmful training index to the test indices it is expected to misclassify."""
        return {i: list(g.test_indices) for g in self.harmful_groups for i in g.train_indices}

    @property
    def expected_mispredictions(self) -> dict[int, int]:
        """Map each affected test index to the wrong class its harmful images should cause."""
        return {t: g.harmful_class for g in self.harmful_groups for t in g.test_indices}

    @property
    def patched_test_other(self) -> list[int]:
        """Test images that carry the patch but belong to another class than the shortcut class."""
        return sorted(self.test_patch_boxes)

    @property
    def clean_test_indices(self) -> list[int]:
        """Test images with neither a patch nor a planted near-duplicate."""
        planted = set(self.test_patch_boxes) | set(self.expected_mispredictions)
        return [i for i in range(len(self.test_masks)) if i not in planted]

    def patch_mask(self, split: str, index: int) -> torch.Tensor:
        """Return the ``[H, W]`` bool patch mask of image ``index`` of ``split`` (may be empty).

        Parameters
        ----------
        split : {"train", "test"}
            Which images.
        index : int
            The image's index in that split.

        Returns
        -------
        torch.Tensor
            ``[H, W]`` bool, True on the patch (all False for an unpatched image).
        """
        boxes = {"train": self.train_patch_boxes, "test": self.test_patch_boxes}[split]
        size = self.config.size
        out = torch.zeros(size, size, dtype=torch.bool)
        if index in boxes:
            y0, x0, y1, x1 = boxes[index]
            out[y0:y1, x0:x1] = True
        return out

    def summary(self) -> dict:
        """Return a small JSON-friendly description (counts and settings).

        Returns
        -------
        dict
            Seed, generator version, settings, shortcut class name and the count of each
            planted effect.
        """
        return {
            "seed": self.seed,
            "generator_version": self.generator_version,
            "config": asdict(self.config),
            "shortcut_class": self.class_names[self.shortcut_class],
            "patched_train": len(self.train_patch_boxes),
            "patched_test_other": len(self.test_patch_boxes),
            "flipped_labels": len(self.flipped_labels),
            "two_object": len(self.two_object),
        }


def _scene(rng: np.random.Generator, cls: np.ndarray, size: int) -> shapes.Scene:
    return {**shapes.sample_objects(rng, cls, size), **shapes.sample_backgrounds(rng, len(cls))}


def _two_object_sources(rng, small_cls, big_cls, size):
    """Return train scenes (small labelled object beside a big other one), test scenes (big one)."""
    n = len(small_cls)
    big = shapes.sample_objects(rng, big_cls, size)
    small = shapes.sample_objects(rng, small_cls, size, small=True)
    small["radius"] = rng.uniform(0.1, 0.12, n) * size
    left = rng.random(n) < 0.5
    big["radius"] = rng.uniform(0.25, 0.3, n) * size
    big["cx"] = np.where(left, 0.3, 0.7) * size + rng.uniform(-1, 1, n)
    small["cx"] = np.where(left, 0.8, 0.2) * size + rng.uniform(-1, 1, n)
    big["cy"] = np.clip(big["cy"], big["radius"] + 0.5, size - big["radius"] - 1.5)
    bg = shapes.sample_backgrounds(rng, n)
    train = {**small, **{"b_" + k: v for k, v in big.items()}, **bg, "has_b": np.ones(n, bool)}
    test = {**big, **bg}
    return train, test


def _pick_pairs(
    rng: np.random.Generator, n: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` pairs of distinct classes drawn from ``allowed``."""
    a = rng.choice(allowed, n)
    b = np.array([rng.choice(allowed[allowed != x]) for x in a], dtype=np.int64)
    return a.astype(np.int64), b


def generate_demo(
    seed: int = 0, config: DemoConfig | None = None
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, DemoMetadata]:
    """Return ``(train_set, test_set, metadata)`` of the demo, identical for identical seeds.

    Parameters
    ----------
    seed : int
        Seeds the generator.
    config : DemoConfig, optional
        Sizes and planted effects (the defaults when ``None``).

    Returns
    -------
    train_set, test_set : InMemoryImageDataset
        The images, labels, object masks and notes.
    metadata : DemoMetadata
        Everything planted.
    """
    cfg = config or DemoConfig()
    rng = np.random.default_rng([seed, 20251])
    names = list(shapes.SHAPE_NAMES)
    n_classes, size = len(names), cfg.size
    others = np.array([c for c in range(n_classes) if c != cfg.shortcut_class])
    g_f, g_t, tc, ec = cfg.flip_groups, cfg.two_object_groups, cfg.train_copies, cfg.test_copies

    # Harmful sources: flipped-label look-alikes; a small labelled object beside a big other one.
    flip_true, flip_wrong = _pick_pairs(rng, g_f, others)
    flip_src = _scene(rng, flip_true, size)
    two_label, two_other = _pick_pairs(rng, g_t, others)
    two_train_src, two_test_src = _two_object_sources(rng, two_label, two_other, size)

    n_reg_train = cfg.n_train - (g_f + g_t) * tc
    n_reg_test = cfg.n_test - (g_f + g_t) * ec
    reg_train_cls = rng.permutation(np.arange(n_reg_train) % n_classes)
    reg_test_cls = rng.permutation(np.arange(n_reg_test) % n_classes)

    train_scene = shapes.concat(
        _scene(rng, reg_train_cls, size),
        shapes.jitter(rng, flip_src, tc),
        shapes.jitter(rng, two_train_src, tc),
    )
    train_labels = np.concatenate(
        [reg_train_cls, np.repeat(flip_wrong, tc), np.repeat(two_label, tc)]
    )
    test_scene = shapes.concat(
        _scene(rng, reg_test_cls, size),
        shapes.jitter(rng, flip_src, ec),
        shapes.jitter(rng, two_test_src, ec),
    )
    test_labels = np.concatenate([reg_test_cls, np.repeat(flip_true, ec), np.repeat(two_other, ec)])

    # Shuffle so planted images are spread through each split; pos[old] is the new index.
    train_perm, test_perm = rng.permutation(cfg.n_train), rng.permutation(cfg.n_test)
    train_pos, test_pos = np.argsort(train_perm), np.argsort(test_perm)
    train_scene = {k: v[train_perm] for k, v in train_scene.items()}
    test_scene = {k: v[test_perm] for k, v in test_scene.items()}
    train_labels, test_labels = train_labels[train_perm], test_labels[test_perm]

    train_images, train_masks, train_second = shapes.render(train_scene, size, rng)
    test_images, test_masks, _ = shapes.render(test_scene, size, rng)

    groups: list[HarmfulGroup] = []
    for g in range(g_f + g_t):
        flipped = g < g_f
        j = g if flipped else g - g_f
        old_train = n_reg_train + g * tc + np.arange(tc)
        old_test = n_reg_test + g * ec + np.arange(ec)
        groups.append(
            HarmfulGroup(
                kind="flipped label" if flipped else "two objects",
                train_indices=sorted(int(i) for i in train_pos[old_train]),
                test_indices=sorted(int(i) for i in test_pos[old_test]),
                true_class=int(flip_true[j] if flipped else two_other[j]),
                harmful_class=int(flip_wrong[j] if flipped else two_label[j]),
                other_class=None if flipped else int(two_other[j]),
            )
        )

    reg_train_new = train_pos[:n_reg_train]
    shortcut_pool = reg_train_new[train_labels[reg_train_new] == cfg.shortcut_class]
    n_patch = int(round(cfg.shortcut_fraction * len(shortcut_pool)))
    patched_train = np.sort(rng.choice(shortcut_pool, n_patch, replace=False))
    reg_test_new = test_pos[:n_reg_test]
    test_pool = reg_test_new[test_labels[reg_test_new] != cfg.shortcut_class]
    n_patch_test = min(cfg.n_patched_test, len(test_pool))
    patched_test = np.sort(rng.choice(test_pool, n_patch_test, replace=False))
    train_boxes = shapes.patch_boxes(rng, train_masks | train_second, patched_train, cfg.patch_size)
    test_boxes = shapes.patch_boxes(rng, test_masks, patched_test, cfg.patch_size)
    shapes.paint_patches(train_images, train_boxes)
    shapes.paint_patches(test_images, test_boxes)

    rgb = train_images.reshape(-1, 3).astype(np.float64) / 255.0
    norm = Normalization(
        tuple(round(float(m), 4) for m in rgb.mean(0)),
        tuple(round(float(s), 4) for s in rgb.std(0)),
    )
    meta = DemoMetadata(
        seed=seed,
        config=cfg,
        generator_version=GENERATOR_VERSION,
        class_names=names,
        shortcut_class=cfg.shortcut_class,
        patch_color=shapes.PATCH_COLOR,
        train_patch_boxes=train_boxes,
        test_patch_boxes=test_boxes,
        train_masks=torch.from_numpy(train_masks),
        test_masks=torch.from_numpy(test_masks),
        train_second_masks=torch.from_numpy(train_second),
        flipped_labels={
            i: g.true_class for g in groups if g.kind == "flipped label" for i in g.train_indices
        },
        two_object={
            i: (g.harmful_class, g.other_class)
            for g in groups
            if g.kind == "two objects"
            for i in g.train_indices
        },
        harmful_groups=groups,
        normalization=norm,
    )
    train_set = InMemoryImageDataset(
        train_images, train_labels, names, norm, train_masks, _train_info(meta), name="demo-train"
    )
    test_set = InMemoryImageDataset(
        test_images, test_labels, names, norm, test_masks, _test_info(meta), name="demo-test"
    )
    return train_set, test_set, meta


def _box_text(box: Box) -> str:
    y0, x0, y1, x1 = box
    return f"yes (rows {y0}-{y1 - 1}, columns {x0}-{x1 - 1})"


def _train_info(meta: DemoMetadata) -> list[dict[str, str]]:
    names = meta.class_names
    info: list[dict[str, str]] = [{} for _ in range(len(meta.train_masks))]
    for i, box in meta.train_patch_boxes.items():
        info[i]["planted patch"] = _box_text(box)
    for i, orig in meta.flipped_labels.items():
        info[i]["label flipped"] = f"was {names[orig]}"
    for i, (labelled, other) in meta.two_object.items():
        info[i]["two objects"] = f"{names[labelled]} + {names[other]} (labelled {names[labelled]})"
    for i, tests in meta.harmful_effects.items():
        info[i]["expected to mislead test images"] = ", ".join(map(str, tests))
    return info


def _test_info(meta: DemoMetadata) -> list[dict[str, str]]:
    names = meta.class_names
    info: list[dict[str, str]] = [{} for _ in range(len(meta.test_masks))]
    for i, box in meta.test_patch_boxes.items():
        info[i]["planted patch"] = _box_text(box)
    for g in meta.harmful_groups:
        for t in g.test_indices:
            info[t]["near-duplicate of"] = (
                f"training images {', '.join(map(str, g.train_indices))} ({g.kind})"
            )
            info[t]["expected misprediction"] = names[g.harmful_class]
    return info
