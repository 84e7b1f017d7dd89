"""Real dataset formats on disk: tiny files written here in each format and read back."""

from __future__ import annotations

import pickle
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from tfa_widgets.core.errors import DatasetError, TFAError
from tfa_widgets.data.cifar import load_cifar10
from tfa_widgets.data.imagefolder import ImageFolderDataset
from tfa_widgets.data.voc import VOC_CLASSES, VOCDataset

# ----------------------------------------------------------------------------------------- CIFAR


def _write_cifar(root, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch}, f)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        files = [f"{name}_{j}.png".encode() for j in range(n_per_batch)]
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"filenames": files}, f, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_back_images_labels_and_classes(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(root)
    train = load_cifar10(tmp_path, train=True)  # the parent directory works too
    test = load_cifar10(root, train=False)
    assert len(train) == 20 and len(test) == 4
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    data, labels = written["data_batch_2"]
    image, label = train[5]  # second image of the second batch
    assert label == labels[1]
    rgb = train.display(image).numpy()
    expected = data[1].reshape(3, 32, 32).transpose(1, 2, 0) / 255.0
    np.testing.assert_allclose(rgb, expected, atol=1e-5)
    assert train.mask(0) is None
    assert train.item_info(5) == {"file": "data_batch_2", "name": "data_batch_2_1.png"}
    assert train.fingerprint == load_cifar10(root).fingerprint != test.fingerprint


def test_cifar10_protocol5_pickles_load(tmp_path):
    root = tmp_path / "c"
    _write_cifar(root)
    data = np.full((2, 3072), 7, dtype=np.uint8)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [1, 2]}, f, protocol=5)
    test = load_cifar10(root, train=False)
    assert [test[i][1] for i in range(2)] == [1, 2]


def test_cifar10_missing_directory_and_file_are_named(tmp_path):
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batches directory"):
        load_cifar10(tmp_path / "nowhere")
    root = tmp_path / "c"
    _write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"missing CIFAR-10 file .*data_batch_3"):
        load_cifar10(root)


def test_cifar10_truncated_pickle_is_a_clear_error(tmp_path):
    root = tmp_path / "c"
    _write_cifar(root)
    blob = (root / "test_batch").read_bytes()
    (root / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"test_batch is truncated or not a CIFAR-10 file"):
        load_cifar10(root, train=False)


def test_cifar10_wrong_shapes_and_foreign_objects_are_refused(tmp_path):
    root = tmp_path / "c"
    _write_cifar(root)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar10(root, train=False)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Exception("boom"), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="only arrays are allowed"):
        load_cifar10(root, train=False)


# ------------------------------------------------------------------------------------ ImageFolder


def _write_folder(root, sizes=((8, 8),) * 3):
    rng = np.random.default_rng(1)
    pixels = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for j, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{j}.png")
            pixels[(cls, j)] = arr
    (root / "dog" / "notes.txt").write_text("not an image")
    return pixels


def test_imagefolder_reads_back_pngs(tmp_path):
    pixels = _write_folder(tmp_path)
    data = ImageFolderDataset(tmp_path)
    assert data.classes == ["cat", "dog"] and len(data) == 6
    image, label = data[4]
    assert label == 1 and image.shape == (3, 8, 8)
    np.testing.assert_allclose(data.display(image).numpy(), pixels[("dog", 1)] / 255.0, atol=1e-5)
    assert data.item_info(4) == {"file": "dog/1.png"}
    assert data.mask(0) is None
    assert isinstance(data.fingerprint, str) and len(data.fingerprint) >= 16


def test_imagefolder_resizes_mixed_sizes(tmp_path):
    _write_folder(tmp_path, sizes=((8, 8), (12, 10), (5, 7)))
    data = ImageFolderDataset(tmp_path, size=(6, 9))
    assert {tuple(data[i][0].shape) for i in range(len(data))} == {(3, 6, 9)}


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="is not a directory"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not an ImageFolder tree"):
        ImageFolderDataset(tmp_path / "empty")
    _write_folder(tmp_path / "t")
    (tmp_path / "t" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    data = ImageFolderDataset(tmp_path / "t")
    with pytest.raises(DatasetError, match=r"cat/0\.png is not a readable image"):
        data[0]
    with pytest.raises(TFAError, match="out of range"):
        data[99]


# -------------------------------------------------------------------------------------------- VOC

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [64] * (3 * 253)


def _label_png(path, arr):
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(PALETTE)
    img.save(path)


def _annotation(path, objects):
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = path.stem + ".jpg"
    for name, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
    ET.ElementTree(root).write(path)


def _write_voc(base):
    """Three images: dog and person (with masks), a cat (with masks), a sheep (no masks)."""
    root = base / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for d in ("SegmentationClass", "SegmentationObject"):
        (root / d).mkdir()
    dog, person, cat, sheep = (VOC_CLASSES.index(c) + 1 for c in ("dog", "person", "cat", "sheep"))
    rng = np.random.default_rng(2)
    items = {
        "2007_000001": [("dog", False), ("person", True)],
        "2007_000002": [("cat", False)],
        "2007_000003": [("sheep", False)],
    }
    for image_id, objs in items.items():
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg"
        )
        _annotation(root / "Annotations" / f"{image_id}.xml", objs)
    cls = np.zeros((20, 30), np.uint8)
    inst = np.zeros((20, 30), np.uint8)
    cls[2:10, 2:12], inst[2:10, 2:12] = dog, 1
    cls[12:18, 15:28], inst[12:18, 15:28] = person, 2
    cls[2, 2:12] = cls[9, 2:12] = inst[2, 2:12] = inst[9, 2:12] = 255  # object borders
    _label_png(root / "SegmentationClass" / "2007_000001.png", cls)
    _label_png(root / "SegmentationObject" / "2007_000001.png", inst)
    cat_map = np.zeros((20, 30), np.uint8)
    cat_map[5:15, 5:25] = cat
    _label_png(root / "SegmentationClass" / "2007_000002.png", cat_map)
    _label_png(root / "SegmentationObject" / "2007_000002.png", (cat_map > 0).astype(np.uint8))
    (root / "ImageSets/Main/train.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    return root, {"dog": dog, "person": person, "cat": cat, "sheep": sheep}


def test_voc_classification_labels_from_xml(tmp_path):
    root, _ = _write_voc(tmp_path)
    data = VOCDataset(tmp_path, "train", size=None)
    assert len(data) == 3 and data.classes == list(VOC_CLASSES)
    image, label = data[0]
    assert image.shape == (3, 20, 30) and label.dtype == torch.float32 and label.shape == (20,)
    assert {VOC_CLASSES[c] for c in label.nonzero().flatten().tolist()} == {"dog", "person"}
    assert data[2][1].nonzero().flatten().tolist() == [VOC_CLASSES.index("sheep")]
    no_difficult = VOCDataset(root, "train", include_difficult=False, size=None)
    assert no_difficult[0][1].nonzero().flatten().tolist() == [VOC_CLASSES.index("dog")]
    assert data.item_info(0)["difficult"] == "person"
    assert data.mask(2) is None and data.item_info(2)["segmentation mask"] == "no"


def test_voc_segmentation_masks_exclude_borders(tmp_path):
    root, idx = _write_voc(tmp_path)
    data = VOCDataset(root, "train", task="segmentation", size=None)
    assert len(data) == 2
    mask = data.mask(0)
    assert mask.dtype == torch.bool and mask.shape == (20, 30)
    assert int(mask.sum()) == 8 * 10 + 6 * 13 - 2 * 10  # two border rows of the dog box
    dog = data.class_mask(0, idx["dog"] - 1)
    assert dog[5, 5] and not dog[15, 20] and not dog[2, 5]
    inst = data.instances(0)
    assert set(inst.unique().tolist()) == {0, 1, 2, 255}
    assert data.segmentation(1)[10, 10] == idx["cat"]


def test_voc_resizes_images_and_masks_together(tmp_path):
    _write_voc(tmp_path)
    data = VOCDataset(tmp_path, "train", task="segmentation", size=(10, 15))
    assert data[1][0].shape == (3, 10, 15)
    seg = data.segmentation(1)
    assert seg.shape == (10, 15) and set(seg.unique().tolist()) <= {0, VOC_CLASSES.index("cat") + 1}


def test_voc_errors_name_path_and_expectation(tmp_path):
    with pytest.raises(DatasetError, match="not a Pascal VOC 2012 directory"):
        VOCDataset(tmp_path)
    root, _ = _write_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"missing VOC image list .*val\.txt"):
        VOCDataset(root, "val")
    (root / "Annotations" / "2007_000002.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DatasetError, match=r"2007_000002\.xml is malformed XML"):
        VOCDataset(root)
    _annotation(root / "Annotations" / "2007_000002.xml", [("unicorn", False)])
    with pytest.raises(DatasetError, match="'unicorn' is not one of the 20 VOC classes"):
        VOCDataset(root)
    _annotation(root / "Annotations" / "2007_000002.xml", [("cat", False)])
    (root / "SegmentationClass" / "2007_000002.png").write_bytes(b"garbage")
    data = VOCDataset(root, task="segmentation")
    with pytest.raises(DatasetError, match=r"2007_000002\.png is not a readable image"):
        data.mask(1)
    (root / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing VOC image .*2007_000002\.jpg"):
        _ = data.fingerprint
    with pytest.raises(DatasetError, match=r"missing file .*2007_000002\.jpg"):
        data[1]
    (root / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(DatasetError, match=r"missing .*SegmentationClass/2007_000002\.png"):
        VOCDataset(root, task="segmentation")
