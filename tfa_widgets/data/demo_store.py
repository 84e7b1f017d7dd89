"""The generated demo data kept on disk, so a kernel reads it in a fraction of a second.

Generating the shapes demo (3,600 rendered images) takes seconds of CPU; every explorer kernel
needs the same images. `load_demo_data` keeps them in ``<cache_dir>/demo-data-<key>.npz``, the key
a fingerprint of the generator version, seed and settings, written atomically. The file holds
only arrays and a JSON text (read without pickle); a file that cannot be read is replaced after a
warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from tfa_widgets.data.cache import write_atomic
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.demo_data import (
    GENERATOR_VERSION,
    DemoConfig,
    DemoMetadata,
    HarmfulGroup,
    _test_info,
    _train_info,
    generate_demo,
)
from tfa_widgets.data.transforms import Normalization

Split = tuple[InMemoryImageDataset, InMemoryImageDataset, DemoMetadata]


def demo_data_path(root: Path, seed: int, config: DemoConfig) -> Path:
    """Return where the demo data of ``seed`` and ``config`` are kept under ``root``.

    Parameters
    ----------
    root : Path
        The cache directory.
    seed : int
        The generator's seed.
    config : DemoConfig
        The generator's settings.

    Returns
    -------
    Path
        ``root / "demo-data-<key>.npz"``, the key a hash of generator version, seed and settings.
    """
    key = json.dumps([GENERATOR_VERSION, seed, asdict(config)], sort_keys=True)
    return Path(root) / f"demo-data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def load_demo_data(seed: int, config: DemoConfig, root: Path) -> Split:
    """Return `generate_demo` ``(seed, config)``: read from ``root`` when kept, else generated
    and kept there.

    Parameters
    ----------
    seed : int
        The generator's seed.
    config : DemoConfig
        The generator's settings.
    root : Path
        The cache directory.

    Returns
    -------
    tuple
        What `generate_demo` returns for ``seed`` and ``config``.
    """
    path = demo_data_path(root, seed, config)
    if path.is_file():
        try:
            return _read(path, seed, config)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            warnings.warn(
                f"demo data cache {path} is unreadable ({err}); generating it again", stacklevel=2
            )
    split = generate_demo(seed, config)
    write_atomic(path, lambda tmp: _write(tmp, *split))
    return split


def _write(
    tmp: Path, train: InMemoryImageDataset, test: InMemoryImageDataset, meta: DemoMetadata
) -> None:
    facts = {
        "class_names": meta.class_names,
        "shortcut_class": meta.shortcut_class,
        "patch_color": list(meta.patch_color),
        "train_patch_boxes": {str(i): list(b) for i, b in meta.train_patch_boxes.items()},
        "test_patch_boxes": {str(i): list(b) for i, b in meta.test_patch_boxes.items()},
        "flipped_labels": {str(i): c for i, c in meta.flipped_labels.items()},
        "two_object": {str(i): list(pair) for i, pair in meta.two_object.items()},
        "harmful_groups": [asdict(g) for g in meta.harmful_groups],
        "mean": list(meta.normalization.mean),
        "std": list(meta.normalization.std),
    }
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a bare name
        np.savez(
            f,
            facts=np.array(json.dumps(facts)),
            train_images=train.images_uint8,
            train_labels=train.labels.numpy(),
            train_masks=meta.train_masks.numpy(),
            train_second=meta.train_second_masks.numpy(),
            test_images=test.images_uint8,
            test_labels=test.labels.numpy(),
            test_masks=meta.test_masks.numpy(),
        )


def _read(path: Path, seed: int, config: DemoConfig) -> Split:
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    facts = json.loads(str(arrays["facts"]))
    ints = lambda d: {int(i): v for i, v in d.items()}  # noqa: E731 - JSON keys are strings
    norm = Normalization(tuple(facts["mean"]), tuple(facts["std"]))
    meta = DemoMetadata(
        seed=seed,
        config=config,
        generator_version=GENERATOR_VERSION,
        class_names=list(facts["class_names"]),
        shortcut_class=int(facts["shortcut_class"]),
        patch_color=tuple(facts["patch_color"]),
        train_patch_boxes={i: tuple(b) for i, b in ints(facts["train_patch_boxes"]).items()},
        test_patch_boxes={i: tuple(b) for i, b in ints(facts["test_patch_boxes"]).items()},
        train_masks=torch.from_numpy(arrays["train_masks"]),
        test_masks=torch.from_numpy(arrays["test_masks"]),
        train_second_masks=torch.from_numpy(arrays["train_second"]),
        flipped_labels=ints(facts["flipped_labels"]),
        two_object={i: tuple(p) for i, p in ints(facts["two_object"]).items()},
        harmful_groups=[HarmfulGroup(**g) for g in facts["harmful_groups"]],
        normalization=norm,
    )
    names = meta.class_names
    train = InMemoryImageDataset(
        arrays["train_images"],
        arrays["train_labels"],
        names,
        norm,
        arrays["train_masks"],
        _train_info(meta),
        name="demo-train",
    )
    test = InMemoryImageDataset(
        arrays["test_images"],
        arrays["test_labels"],
        names,
        norm,
        arrays["test_masks"],
        _test_info(meta),
        name="demo-test",
    )
    return train, test, meta
