"""The evaluation on real-format files: demo images written as Pascal VOC 2012, read back."""

import math

import pytest
import torch

from tfa_widgets import TFAEngine
from tfa_widgets.data.voc import VOC_CLASSES
from tfa_widgets.eval.report import EvalConfig, evaluate
from tfa_widgets.eval.setups import random_test_images
from tfa_widgets.eval.vocformat import demo_as_voc, multilabel_model


@pytest.fixture(scope="module")
def voc(demo, tmp_path_factory):
    return demo_as_voc(demo, tmp_path_factory.mktemp("voc"), n_train=24, n_val=6, seed=3)


def test_voc_tree_reads_back_labels_and_masks(demo, voc):
    train, val = voc
    assert (len(train), len(val)) == (24, 6)
    meta = demo.metadata
    for i, image_id in enumerate(train.ids):
        index = int(image_id.split("_")[1])
        expected = {int(demo.train_set.labels[index])}
        mask = meta.train_masks[index]
        if index in meta.two_object:
            expected.add(meta.two_object[index][1])
            mask = mask | meta.train_second_masks[index]
        image, label = train[i]
        assert set(label.nonzero().flatten().tolist()) == expected
        assert torch.equal(train.mask(i), mask)
        assert (image - demo.train_set[index][0]).abs().mean() < 0.1  # JPEG, nearly lossless


def test_multilabel_model_and_evaluation_on_voc_files(demo, voc):
    train, val = voc
    model = multilabel_model(demo.model, train, epochs=1)
    assert model.fc.out_features == len(VOC_CLASSES)
    assert all(p.requires_grad for p in model.parameters())
    engine = TFAEngine(model, train, val, loss="bce", progress=False)
    images = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        top = model(images).argmax(1)
    hits = [bool(train[i][1][int(top[i])]) for i in range(len(train))]
    assert sum(hits) >= 0.8 * len(hits)
    config = EvalConfig(
        k=2, ps=(10,), measures=("insertion", "localisation"), scorers=("grad_cos",)
    )
    rows = evaluate(engine, random_test_images(len(val), 1, [0]), config, progress=False)
    measures = {r["measure"] for r in rows}
    assert {"insertion@10", "pointing: object", "mass in object"} <= measures
    assert not any(math.isnan(r["value"]) for r in rows if r["measure"] == "mass in object")
