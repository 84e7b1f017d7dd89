"""CIFAR-10 from the python batches directory (``cifar-10-batches-py``) already on disk."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tfa_widgets.core.errors import DatasetError
from tfa_widgets.data._pickle import load_array_pickle
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.transforms import CIFAR10_MEAN, CIFAR10_STD, Normalization

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
_EXPECTED = "a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints)"


def _get(d: dict, key: str):
    return d.get(key.encode(), d.get(key))


def _read_pickle(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing CIFAR-10 file {path} (expected {what})")
    try:
        obj = load_array_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DatasetError(
            f"{path} is truncated or not a CIFAR-10 file (expected {what}): {err}"
        ) from err
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, expected {what}")
    return obj


def _read_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    batch = _read_pickle(path, _EXPECTED)
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise DatasetError(f"{path} lacks b'data' or b'labels' (expected {_EXPECTED})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {n_classes}), found {labels.max()}")
    names = _get(batch, "filenames") or [b""] * len(data)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, names


def _find_root(root: Path) -> Path:
    if (root / META_FILE).is_file():
        return root
    if (root / "cifar-10-batches-py" / META_FILE).is_file():
        return root / "cifar-10-batches-py"
    raise DatasetError(
        f"{root} is not a CIFAR-10 python batches directory "
        f"(expected {META_FILE}, {', '.join(TRAIN_FILES)} and {TEST_FILES[0]} in it "
        f"or in {root / 'cifar-10-batches-py'})"
    )


def load_cifar10(
    root: str | Path, train: bool = True, normalization: Normalization | None = None
) -> InMemoryImageDataset:
    """Return CIFAR-10 (train or test split) read from the python batches directory ``root``.

    Nothing is downloaded; the files are read with an unpickler that only accepts arrays.
    CIFAR-10 has no object masks, so ``mask(i)`` is None.

    Parameters
    ----------
    root : str or Path
        The ``cifar-10-batches-py`` directory, or a directory holding it.
    train : bool
        The five training batches, or the test batch.
    normalization : Normalization, optional
        Maps [0, 1] RGB to model space (CIFAR-10 statistics by default).

    Returns
    -------
    InMemoryImageDataset
        The images with their labels and class names.

    Raises
    ------
    DatasetError
        When a file is missing, truncated or not a CIFAR-10 batch.
    """
    root = _find_root(Path(root).expanduser())
    meta = _read_pickle(root / META_FILE, "a pickled dict with b'label_names'")
    classes = _get(meta, "label_names")
    if not classes:
        raise DatasetError(f"{root / META_FILE} lacks b'label_names'")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes]
    parts = [_read_batch(root / f, len(classes)) for f in (TRAIN_FILES if train else TEST_FILES)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    files = [
        f for f, p in zip(TRAIN_FILES if train else TEST_FILES, parts, strict=False) for _ in p[1]
    ]
    names = [n for p in parts for n in p[2]]
    info = [{"file": f, "name": n} if n else {"file": f} for f, n in zip(files, names, strict=True)]
    norm = normalization or Normalization(CIFAR10_MEAN, CIFAR10_STD)
    split = "train" if train else "test"
    return InMemoryImageDataset(images, labels, classes, norm, info=info, name=f"cifar10-{split}")
