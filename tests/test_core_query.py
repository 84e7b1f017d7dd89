"""A query resolved once (`TFAEngine.query`), settings as values, and an explanation that reads
each training image once and computes Grad-CAM once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from core_models import small_cnn, small_dataset
from torch.utils.data import Dataset

from tfa_widgets import IndexSettings, InputError, Query, SmoothGrad, TFAEngine
from tfa_widgets.core import reference_maps
from tfa_widgets.core.maps import reduce_maps


class Counting(Dataset):
    """A dataset that counts the reads of each item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.reads = dataset, Counter()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        self.reads[int(i)] += 1
        return self.dataset[i]


@pytest.fixture()
def counted():
    train, test = Counting(small_dataset(12)), Counting(small_dataset(4, seed=2))
    engine = TFAEngine(small_cnn(), train, test, progress=False, batch_size=5)
    engine.build_index()
    train.reads.clear()
    test.reads.clear()
    return engine, train, test


def test_a_query_is_resolved_once_and_reused(counted):
    engine, _, test = counted
    query = engine.query(1, "true")
    assert isinstance(query, Query) and test.reads == Counter({1: 1})
    assert query.key == ("index", 1) == engine.test_key(1) and query.test == 1
    assert query.target == int(small_dataset(4, seed=2)[1][1]) == engine.resolve_target(1, "true")
    test.reads.clear()
    explanation = engine.explain(query, k=3)
    engine.scores(query), engine.top_k(query, 2), engine.tfa_maps(query, [0, 1])
    assert test.reads == Counter()  # never read again
    assert explanation.target == query.target and explanation.test_index == 1
    assert engine.query(query) is query and engine.query(query, query.target) is query
    with pytest.raises(InputError, match="already explains class"):
        engine.scores(query, target=(query.target + 1) % 3)


def test_equal_images_get_equal_keys_and_a_bare_image_has_no_label(counted):
    engine, _, _ = counted
    image = small_dataset(4, seed=2)[0][0]
    first, again = engine.query(image, 1), engine.query(image.clone(), 1)
    assert first.key == again.key == engine.test_key(image) and first.key[0] == "image"
    assert first.index is None and first.label is None and first.test is first.image
    assert engine.query(image + 1, 1).key != first.key
    with pytest.raises(InputError, match="target 'true' needs a test index"):
        engine.query(image, "true")


def test_an_explanation_reads_each_training_image_once(counted):
    engine, train, _ = counted
    explanation = engine.explain(0, k=4, smooth=SmoothGrad(n=2))
    assert train.reads == Counter({int(i): 1 for i in explanation.train_indices})


def test_an_explanation_computes_grad_cam_once_at_the_chosen_layer(counted, monkeypatch):
    engine, _, _ = counted
    calls = []
    real = reference_maps.gradcam
    monkeypatch.setattr(
        reference_maps, "gradcam", lambda *a, **kw: calls.append(a[1].shape[0]) or real(*a, **kw)
    )
    explanation = engine.explain(0, k=3)
    assert calls == [1 + 3] and explanation.gradcam_layer == "4"  # test and training images
    at_first = engine.explain(0, k=3, layer="0")
    assert len(calls) == 2 and at_first.gradcam_layer == "0"


def test_explanations_hold_per_channel_maps_and_reduce_them_on_request(counted):
    engine, _, _ = counted
    explanation = engine.explain(2, k=3)
    raw = explanation.tfa_maps_raw
    assert raw.shape == (3, 3, 8, 8) and not hasattr(explanation, "reduction")
    torch.testing.assert_close(explanation.tfa_maps, raw.sum(dim=1))
    torch.testing.assert_close(explanation.reduced_maps("abs"), raw.abs().sum(dim=1))
    inputs = explanation.train_images
    torch.testing.assert_close(
        explanation.reduced_maps("signed", times_input=True), (raw * inputs).sum(dim=1)
    )
    assert reduce_maps(raw, "abs").shape == (3, 8, 8)


def test_index_settings_as_one_value_or_as_keywords():
    train, test = small_dataset(8), small_dataset(2, seed=2)
    settings = IndexSettings(batch_size=3, projection_dim=64, rescore=4)
    engine = TFAEngine(small_cnn(), train, test, progress=False, settings=settings)
    assert engine.settings is settings
    same = TFAEngine(small_cnn(), train, test, progress=False, batch_size=3, projection_dim=64,
                     rescore=4)  # fmt: skip
    assert same.settings == settings
    with pytest.raises(InputError, match=r"not both: \['batch_size'\]"):
        TFAEngine(small_cnn(), train, test, settings=settings, batch_size=5)
    with pytest.raises(InputError, match="rescore must be an integer >= 0"):
        IndexSettings(rescore=-1)
    with pytest.raises(InputError, match="settings must be an IndexSettings"):
        TFAEngine(small_cnn(), train, test, settings={"batch_size": 3})
