"""Any ImageFolder tree (``root/<class>/<image>``) as a dataset the engine takes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tfa_widgets.core.errors import DatasetError, InputError
from tfa_widgets.data._images import as_size, read_rgb
from tfa_widgets.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization


class ImageFolderDataset(Dataset):
    """Images under ``root/<class name>/``, read from disk on access (nothing is downloaded).

    Parameters
    ----------
    root : path
        Directory with one sub-directory per class.
    size : int or (height, width), optional
        Resize every image to this size; needed when the images differ in size.
    normalization : Normalization, optional
        Model-space normalisation (default: ImageNet mean and std); also the ``display`` transform.

    Raises
    ------
    DatasetError
        When ``root`` is not a directory with one sub-directory of images per class.
    """

    def __init__(
        self,
        root: str | Path,
        size: int | tuple[int, int] | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        # Imported here: torchvision pulls in torch._dynamo, seconds that every importer of
        # tfa_widgets.data (the explorer's kernel) would pay.
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"ImageFolder root {self.root} is not a directory")
        try:
            self.classes, class_to_idx = find_classes(str(self.root))
            self.samples = make_dataset(str(self.root), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as err:
            raise DatasetError(
                f"{self.root} is not an ImageFolder tree (expected one sub-directory per class "
                f"holding images with extensions {', '.join(IMG_EXTENSIONS)}): {err}"
            ) from err
        self.size = as_size(size)
        self.normalization = normalization or Normalization(IMAGENET_MEAN, IMAGENET_STD)
        self.display = self.normalization
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _sample(self, i: int) -> tuple[str, int]:
        if not -len(self) <= int(i) < len(self):
            raise InputError(f"index {i} out of range for {len(self)} images in {self.root}")
        return self.samples[int(i)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self._sample(i)
        return self.normalization.to_model(read_rgb(Path(path), self.size)), label

    def item_info(self, i: int) -> dict[str, str]:
        """Return the file of image ``i``, relative to the root.

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        dict of str to str
            ``{"file": path relative to the root}``.
        """
        return {"file": str(Path(self._sample(i)[0]).relative_to(self.root))}

    def mask(self, i: int) -> None:
        """Return None: ImageFolder trees carry no object masks.

        Parameters
        ----------
        i : int
            Index of the image (checked).
        """
        self._sample(i)
        return None

    @property
    def fingerprint(self) -> str:
        """Hash of relative paths, labels, file sizes and mtimes, image size and normalisation."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.size, self.normalization, self.classes)).encode())
            for path, label in self.samples:
                st = Path(path).stat()
                rel = Path(path).relative_to(self.root)
                h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def __repr__(self) -> str:
        n_classes = len(self.classes)
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {n_classes} classes)"
