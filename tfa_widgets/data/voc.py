"""Pascal VOC 2012 on disk: multi-label classification from the XML annotations, with object masks
from SegmentationClass and instance maps from SegmentationObject where they exist."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tfa_widgets.core.errors import DatasetError, InputError
from tfa_widgets.data._images import as_size, read_label_map, read_rgb
from tfa_widgets.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
BOUNDARY = 255  # "void" label around objects in VOC segmentation PNGs


def _find_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(
        f"{root} is not a Pascal VOC 2012 directory (expected JPEGImages/, Annotations/ and "
        f"ImageSets/ in it, or in {root / 'VOCdevkit' / 'VOC2012'})"
    )


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing VOC image list {path} (expected one image id per line)")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"VOC image list {path} is empty")
    return ids


def _read_objects(path: Path) -> list[tuple[str, bool]]:
    """Return ``(class name, difficult)`` of every object in an annotation XML."""
    if not path.is_file():
        raise DatasetError(f"missing VOC annotation {path} (expected an XML file with <object>s)")
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise DatasetError(f"{path} is malformed XML ({err}); expected a VOC annotation") from err
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DatasetError(f"{path}: object class {name!r} is not one of the 20 VOC classes")
        objects.append((name, (obj.findtext("difficult") or "0").strip() == "1"))
    if not objects:
        raise DatasetError(f"{path} has no <object> with a <name>; expected at least one")
    return objects


class VOCDataset(Dataset):
    """Pascal VOC 2012 as a multi-label dataset: ``(image [3, H, W], multi-hot float [20])``.

    Parameters
    ----------
    root : path
        The ``VOC2012`` directory, or a directory holding ``VOCdevkit/VOC2012``.
    image_set : str
        Name of the image list, e.g. ``"train"``, ``"val"``, ``"trainval"``.
    task : "classification" or "segmentation"
        Read the list from ``ImageSets/Main`` (classification) or ``ImageSets/Segmentation``
        (images that all have segmentation masks).
    size : int or (height, width)
        Size images and masks are resized to (masks by nearest neighbour).
    normalization : Normalization, optional
        Maps [0, 1] RGB to model space (ImageNet statistics by default); also the ``display``
        transform.
    include_difficult : bool
        Count objects marked difficult in the labels.

    Raises
    ------
    InputError
        When ``task`` is neither "classification" nor "segmentation".
    DatasetError
        When the VOC tree, an image list or an annotation is missing or malformed, or (for
        ``task="segmentation"``) a listed image has no segmentation mask.
    """

    def __init__(
        self,
        root: str | Path,
        image_set: str = "train",
        task: str = "classification",
        size: int | tuple[int, int] | None = 224,
        normalization: Normalization | None = None,
        include_difficult: bool = True,
    ) -> None:
        if task not in ("classification", "segmentation"):
            raise InputError(f"task must be 'classification' or 'segmentation', got {task!r}")
        self.root = _find_root(Path(root).expanduser())
        folder = "Main" if task == "classification" else "Segmentation"
        self.ids = _read_ids(self.root / "ImageSets" / folder / f"{image_set}.txt")
        self.image_set, self.task = image_set, task
        self.classes = list(VOC_CLASSES)
        self.size = as_size(size)
        self.normalization = normalization or Normalization(IMAGENET_MEAN, IMAGENET_STD)
        self.display = self.normalization
        self.objects = [_read_objects(self.root / "Annotations" / f"{i}.xml") for i in self.ids]
        self.labels = torch.zeros(len(self.ids), len(VOC_CLASSES))
        for row, objs in enumerate(self.objects):
            for name, difficult in objs:
                if include_difficult or not difficult:
                    self.labels[row, VOC_CLASSES.index(name)] = 1.0
        if task == "segmentation":
            for i in self.ids:
                if not (self.root / "SegmentationClass" / f"{i}.png").is_file():
                    raise DatasetError(
                        f"missing {self.root / 'SegmentationClass' / f'{i}.png'} "
                        f"(listed in ImageSets/Segmentation/{image_set}.txt)"
                    )
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _id(self, i: int) -> str:
        if not -len(self) <= int(i) < len(self):
            raise InputError(f"index {i} out of range for {len(self)} VOC images")
        return self.ids[int(i)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_rgb(self.root / "JPEGImages" / f"{self._id(i)}.jpg", self.size)
        return self.normalization.to_model(image), self.labels[int(i)].clone()

    def segmentation(self, i: int) -> torch.Tensor | None:
        """Return the class map ``[H, W]`` (0 background, 1-20 classes, 255 boundary), or None.

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        torch.Tensor or None
            The map from ``SegmentationClass``, or None when the image has none.
        """
        path = self.root / "SegmentationClass" / f"{self._id(i)}.png"
        return read_label_map(path, self.size) if path.is_file() else None

    def instances(self, i: int) -> torch.Tensor | None:
        """Return the instance map ``[H, W]`` (0 background, k: object k, 255 border), or None.

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        torch.Tensor or None
            The map from ``SegmentationObject``, or None when the image has none.
        """
        path = self.root / "SegmentationObject" / f"{self._id(i)}.png"
        return read_label_map(path, self.size) if path.is_file() else None

    def class_mask(self, i: int, c: int) -> torch.Tensor | None:
        """Return the ``[H, W]`` bool mask of class ``c`` (0-19) in image ``i``, or None.

        Parameters
        ----------
        i : int
            Index of the image.
        c : int
            Class index, 0 to 19.

        Returns
        -------
        torch.Tensor or None
            The mask, or None when the image has no segmentation.

        Raises
        ------
        InputError
            When ``c`` is not a VOC class index.
        """
        if not 0 <= int(c) < len(VOC_CLASSES):
            raise InputError(f"VOC class index must lie in [0, 20), got {c}")
        seg = self.segmentation(i)
        return None if seg is None else seg == int(c) + 1

    def mask(self, i: int) -> torch.Tensor | None:
        """Return the ``[H, W]`` bool mask of all labelled objects (borders excluded), or None.

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        torch.Tensor or None
            The mask, or None when the image has no segmentation.
        """
        seg = self.segmentation(i)
        return None if seg is None else (seg > 0) & (seg != BOUNDARY)

    def item_info(self, i: int) -> dict[str, str]:
        """Return the image id, the objects in it and whether masks exist.

        Parameters
        ----------
        i : int
            Index of the image.

        Returns
        -------
        dict of str to str
            Notes shown by the explorer beside the image.
        """
        image_id = self._id(i)
        objs = self.objects[int(i)]
        info = {"image": image_id, "objects": ", ".join(name for name, _ in objs)}
        hard = [name for name, difficult in objs if difficult]
        if hard:
            info["difficult"] = ", ".join(hard)
        has_mask = (self.root / "SegmentationClass" / f"{image_id}.png").is_file()
        info["segmentation mask"] = "yes" if has_mask else "no"
        return info

    @property
    def fingerprint(self) -> str:
        """Hash of ids, labels, file sizes and modification times, size and normalisation."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.size, self.normalization, self.task)).encode())
            h.update(self.labels.numpy().tobytes())
            for image_id in self.ids:
                path = self.root / "JPEGImages" / f"{image_id}.jpg"
                if not path.is_file():
                    raise DatasetError(f"missing VOC image {path} (listed in the image set)")
                st = path.stat()
                h.update(f"{image_id}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"VOCDataset({str(self.root)!r}, {self.image_set!r}, {len(self)} images, {self.task})"
        )
