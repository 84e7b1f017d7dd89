"""Real-format data for the evaluation: demo images written as a Pascal VOC 2012 tree, read back.

No real dataset can be downloaded here, so the evaluation's real-format run writes demo images in
the exact on-disk layout of Pascal VOC 2012 (JPEG images, XML annotations, palette PNG class
masks, image lists), reads them back with `tfa_widgets.data.voc.VOCDataset` (multi-label,
binary cross-entropy, object masks from ``SegmentationClass``) and fine-tunes a multi-label head on
the demo model. The same code runs on a real VOC directory given a multi-label model for it.

Demo class ``i`` is written as VOC class ``VOC_CLASSES[i]``; a two-object training image lists both
objects and masks both.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tfa_widgets.data.voc import VOC_CLASSES, VOCDataset
from tfa_widgets.eval.retraining import finetune, load_all
from tfa_widgets.eval.setups import draw

FOLDERS = (
    "JPEGImages",
    "Annotations",
    "SegmentationClass",
    "ImageSets/Main",
    "ImageSets/Segmentation",
)


def _palette() -> list[int]:
    rng = np.random.default_rng(0)
    return [0, 0, 0] + rng.integers(0, 256, 3 * 255).tolist()


def _write_item(
    root: Path, image_id: str, image: np.ndarray, objects: list[tuple[int, np.ndarray]]
):
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95, subsampling=0)
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "filename").text = f"{image_id}.jpg"
    label_map = np.zeros(image.shape[:2], np.uint8)
    for cls, mask in objects:
        obj = ET.SubElement(annotation, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[cls]
        ET.SubElement(obj, "difficult").text = "0"
        label_map[mask] = cls + 1
    ET.ElementTree(annotation).write(root / "Annotations" / f"{image_id}.xml")
    png = Image.fromarray(label_map, mode="P")
    png.putpalette(_palette())
    png.save(root / "SegmentationClass" / f"{image_id}.png")


def write_demo_split(demo, split: str, indices: list[int], root: Path, image_set: str) -> None:
    """Write demo images ``indices`` of ``split`` ("train"/"test") into the VOC tree at ``root``."""
    meta = demo.metadata
    data = demo.train_set if split == "train" else demo.test_set
    masks = meta.train_masks if split == "train" else meta.test_masks
    ids = []
    for i in indices:
        objects = [(int(data.labels[i]), masks[i].numpy())]
        if split == "train" and i in meta.two_object:
            objects.append((meta.two_object[i][1], meta.train_second_masks[i].numpy()))
        image_id = f"{split}_{i:06d}"
        _write_item(root, image_id, data.images_uint8[i], objects)
        ids.append(image_id)
    for folder in ("Main", "Segmentation"):
        (root / "ImageSets" / folder / f"{image_set}.txt").write_text("\n".join(ids) + "\n")


def demo_as_voc(
    demo, root: str | Path, n_train: int = 600, n_val: int = 120, seed: int = 0
) -> tuple[VOCDataset, VOCDataset]:
    """Return ``(train, val)`` VOC datasets read back from demo images written under ``root``."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in FOLDERS:
        (base / folder).mkdir(parents=True, exist_ok=True)
    write_demo_split(
        demo, "train", sorted(draw(range(len(demo.train_set)), n_train, seed)), base, "train"
    )
    write_demo_split(
        demo, "test", sorted(draw(range(len(demo.test_set)), n_val, seed)), base, "val"
    )
    size = demo.metadata.config.size
    norm = demo.metadata.normalization
    return tuple(
        VOCDataset(root, image_set, task="segmentation", size=size, normalization=norm)
        for image_set in ("train", "val")
    )


def multilabel_model(
    demo_model: nn.Module, train_set, *, epochs: int = 4, lr: float = 0.1, seed: int = 0
) -> nn.Module:
    """Return the demo model with a 20-class head trained with BCE on ``train_set``.

    The head starts from the demo's classifier (demo class i -> VOC class i; the other VOC classes
    start at zero weight and bias -5) and only the head is trained, to calibrate it for BCE; the
    returned model has every parameter trainable again.
    """
    model = copy.deepcopy(demo_model)
    old = model.fc
    model.fc = nn.Linear(old.in_features, len(VOC_CLASSES))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-5.0)
        model.fc.weight[: old.out_features] = old.weight
        model.fc.bias[: old.out_features] = old.bias
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    images, labels = load_all(train_set)
    tuned = finetune(
        model, images, labels, epochs=epochs, lr=lr, batch_size=64, seed=seed, loss="bce"
    )
    for p in tuned.parameters():
        p.requires_grad_(True)
    return tuned.eval()
