"""The explorer's logic without a browser: a real engine on a tiny model, handlers called directly.

A spy around the real engine records the calls the explorer makes, so the tests check that each
user action asks the engine the right question (or, thanks to the cache, none at all).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tfa_widgets import InputError, SmoothGrad, TFAEngine
from tfa_widgets.viz import GridGeometry, decode_png_data_uri, decode_typed_array
from tfa_widgets.widgets import Explorer
from tfa_widgets.widgets.cache import ExplanationCache, slice_explanation

NUM_CLASSES = 3


class Patches(Dataset):
    """Noise images with a bright square in the colour channel of their class."""

    classes = ["red", "green", "blue"]

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.images = torch.rand(n, 3, 12, 12, generator=g) * 0.5
        for i, c in enumerate(self.labels):
            self.images[i, c, 3:9, 3:9] += 0.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def item_info(self, i: int) -> dict[str, str]:
        return {"planted patch": "yes" if i % 5 == 0 else "no"}


class Spy:
    """Forwards everything to a real engine, recording the calls of the methods in ``watched``."""

    watched = ("explain", "predict", "gradcam")

    def __init__(self, engine: TFAEngine) -> None:
        self._engine = engine
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        attr = getattr(self._engine, name)
        if name not in self.watched:
            return attr

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)

        return record

    def explains(self) -> list[tuple[tuple, dict]]:
        return [(a, k) for name, a, k in self.calls if name == "explain"]


@pytest.fixture(scope="module")
def engine() -> TFAEngine:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, NUM_CLASSES),
    ).eval()
    return TFAEngine(model, Patches(40, 0), Patches(30, 1), progress=False)


@pytest.fixture()
def spy(engine) -> Spy:
    return Spy(engine)


@pytest.fixture()
def explorer(spy, tmp_path) -> Explorer:
    return Explorer(spy, progress=False, export_dir=tmp_path / "exports", page_size=12)


def _centre(view, i: int) -> tuple[float, float]:
    g = GridGeometry(**view.figure.layout.meta["grid"])
    r, c = g.origin(i)
    return c + g.tile_w / 2, r + g.tile_h / 2


def _topk_tiles(x: Explorer) -> int:
    return x._figures["topk"].figure.layout.meta["grid"]["n"]


def test_starts_on_the_first_mistake_with_the_predicted_class(explorer, spy, engine):
    g = explorer.gallery
    first = int(np.flatnonzero(g.mistakes)[0])
    assert explorer.test == first and g.selected == first
    [(args, kwargs)] = spy.explains()
    assert args == (first,)
    predicted = int(engine.predict(first).argmax())
    assert kwargs == dict(k=8, target=predicted, smooth=None, opponents=False, method="grad_cos")
    assert explorer.explanation.k == 8 and _topk_tiles(explorer) == 8
    assert explorer.error.value == ""
    for view in explorer._figures.values():  # what the browser gets is valid JSON
        json.dumps(view.spec, allow_nan=False)


def test_gallery_predictions_match_the_engine(explorer, engine):
    g = explorer.gallery
    for i in (0, 7, 29):
        assert g.predicted[i] == int(engine.predict(i).argmax())
        assert g.mistakes[i] == (g.predicted[i] != engine.test_set[i][1])


def test_clicking_a_thumbnail_explains_it_and_updates_the_figures(explorer, spy):
    page = explorer.gallery.page_indices()
    target = next(i for i in page if i != explorer.test)
    tile = page.index(target)
    before = {name: view.spec for name, view in explorer._figures.items()}
    explorer.gallery.figure.click(*_centre(explorer.gallery.figure, tile))
    args, kwargs = spy.explains()[-1]
    assert args == (target,) and kwargs["target"] == int(explorer.gallery.predicted[target])
    assert explorer.explanation.test_index == target
    assert explorer.gallery.selected == target
    assert f"test #{target}" in explorer.caption.value
    for name in ("test", "topk", "detail"):
        assert explorer._figures[name].spec != before[name], name
    shown = decode_png_data_uri(explorer._figures["test"].figure.data[0].source)
    expected = (explorer.explanation.test_display.numpy() * 255 + 0.5).astype(np.uint8)
    g = GridGeometry(**explorer._figures["test"].figure.layout.meta["grid"])
    r, c = g.origin(0)
    np.testing.assert_array_equal(shown[r : r + g.tile_h, c : c + g.tile_w], expected)


def test_k_slider_is_served_from_the_cache_once_computed(explorer, spy):
    k = explorer.controls.k
    calls = len(spy.explains())
    k.value = 12
    assert len(spy.explains()) == calls + 1 and spy.explains()[-1][1]["k"] == 12
    assert _topk_tiles(explorer) == 12
    for value in (3, 12, 8, 12, 1):
        k.value = value
        assert explorer.explanation.k == value and _topk_tiles(explorer) == value
    assert len(spy.explains()) == calls + 1  # nothing recomputed
    assert (
        explorer.explanation.train_indices.tolist()
        == spy._engine.top_k(explorer.test, 1, target=explorer.explanation.target)[0].tolist()
    )


def test_target_choices_reach_the_engine(explorer, spy):
    test = explorer.test
    explorer.controls.target.value = "true"
    assert spy.explains()[-1][1]["target"] == explorer.gallery.labels[test]
    explorer.controls.target.value = 2
    assert spy.explains()[-1][1]["target"] == 2
    assert explorer.explanation.target == 2
    assert "target 'blue'" in explorer.caption.value


def test_direction_scorer_and_smoothing_reach_the_engine(explorer, spy):
    c = explorer.controls
    c.direction.value = True
    assert spy.explains()[-1][1]["opponents"] is True
    scores = explorer.explanation.scores
    assert torch.all(scores[:-1] <= scores[1:])  # opponents: most negative first
    c.method.value = "grad_dot"
    assert spy.explains()[-1][1]["method"] == "grad_dot"
    calls = len(spy.explains())
    c.smooth_n.value = 4  # smoothing off: its parameters change nothing
    assert len(spy.explains()) == calls
    c.smooth.value = True
    assert spy.explains()[-1][1]["smooth"] == SmoothGrad(n=4, sigma=0.15)
    c.smooth_sigma.value = 0.3
    assert spy.explains()[-1][1]["smooth"] == SmoothGrad(n=4, sigma=0.3)
    assert "SmoothGrad n=4" in explorer.caption.value


def test_display_controls_redraw_without_the_engine(explorer, spy):
    c = explorer.controls
    calls = len(spy.calls)
    c.reduction.value = "abs"
    z = decode_typed_array(explorer._figures["topk"].figure.data[1].z)
    assert np.nanmin(z) >= 0
    c.times_input.value = True
    c.opacity.value = 0.25
    assert explorer._figures["topk"].figure.data[1].opacity == pytest.approx(0.25)
    c.show_gradcam.value = True
    topk = explorer._figures["topk"].figure
    assert topk.data[2].visible is True and topk.layout.meta["group"] == 2
    assert len(spy.calls) == calls


def test_clicking_a_training_image_shows_it_with_metadata(explorer):
    e = explorer.explanation
    explorer._figures["topk"].click(*_centre(explorer._figures["topk"], 2))
    assert explorer.train_pos == 2
    info = explorer.detail_info.value
    index = int(e.train_indices[2])
    assert f"<td>{index}</td>" in info and "<td>3</td>" in info
    assert "planted patch" in info and ("yes" if index % 5 == 0 else "no") in info
    assert explorer._figures["detail"].figure.layout.annotations[0].text.startswith(f"3. #{index}")


def test_errors_are_shown_and_the_app_keeps_working(explorer, spy):
    shown = explorer.explanation
    calls = len(spy.explains())
    explorer.controls.layer.value = "no_such_layer"
    assert "no_such_layer" in explorer.error.value
    assert len(spy.explains()) == calls  # rejected before any slow work
    assert explorer.explanation is shown
    explorer.controls.layer.value = ""
    assert explorer.error.value == ""
    explorer.select_test(torch.full((3, 12, 12), float("nan")))
    assert "NaN" in explorer.error.value
    explorer.controls.layer.value = "2"
    assert explorer.error.value == ""
    assert spy.calls[-1][0] == "gradcam" and spy.calls[-1][2] == {"layer": "2"}
    explorer.select_test(5)
    assert explorer.error.value == "" and explorer.explanation.test_index == 5


def test_a_custom_image_can_be_explained_but_has_no_true_label(explorer, engine):
    image = engine.test_set[3][0] * 0.9
    explorer.select_test(image)
    assert explorer.error.value == "" and explorer.explanation.test_index is None
    explorer.controls.target.value = "true"
    assert "true label" in explorer.error.value


def test_gallery_filters_and_pages(explorer):
    g = explorer.gallery
    assert len(g.page_indices()) == 12 and g.num_pages == 3
    g.next_button.click()
    assert g.page == 1 and g.page_indices()[0] == 12
    g.true_filter.value = 1
    assert g.page == 0 and all(g.labels[i] == 1 for i in g.filtered())
    g.true_filter.value = -1
    g.pred_filter.value = int(g.predicted[0])
    assert all(g.predicted[i] == g.predicted[0] for i in g.filtered())
    g.pred_filter.value = -1
    g.mistakes_only.value = True
    assert list(g.filtered()) == list(np.flatnonzero(g.mistakes))
    titles = [a.text for a in g.figure.figure.layout.annotations]
    assert all("✗" in t for t in titles)
    g.true_filter.value = 0
    g.pred_filter.value = 0
    assert len(g.filtered()) == 0  # a mistake cannot be predicted as its own class
    assert g.handle_click(*_centre(g.figure, 0)) is None


def test_export_writes_the_view_and_the_ranking(explorer, tmp_path):
    explorer.controls.k.value = 5
    html_path, csv_path = explorer.export(tmp_path / "out")
    e = explorer.explanation
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["train_index"]) for r in rows] == e.train_indices.tolist()
    assert [float(r["score"]) for r in rows] == pytest.approx(e.scores.tolist())
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["label_name"] for r in rows] == [Patches.classes[y] for y in e.train_labels]
    page = html_path.read_text()
    assert page.count('class="tfa-figure"') == 4 and "Plotly.newPlot" in page
    assert "data:text/csv;base64," in explorer.export_links.value


def test_cache_slices_and_evicts(engine):
    cache = ExplanationCache(max_entries=2)
    computed = []

    def compute(k):
        computed.append(k)
        return engine.explain(0, k=k)

    e6, hit = cache.get("a", 6, compute)
    e2, hit2 = cache.get("a", 2, compute)
    assert (hit, hit2, computed) == (False, True, [6])
    assert e2.train_indices.tolist() == e6.train_indices[:2].tolist()
    assert slice_explanation(e6, 2).tfa_maps.shape[0] == 2
    cache.get("b", 1, compute)
    cache.get("c", 1, compute)
    assert len(cache) == 2
    cache.get("a", 2, compute)
    assert computed == [6, 1, 1, 2]


def test_needs_a_test_set(engine):
    with pytest.raises(InputError, match="test_set"):
        Explorer(TFAEngine(engine.model, engine.train_set, progress=False), progress=False)


def test_the_scorer_switch_offers_the_engines_methods_default_first(engine):
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    tracin = Spy(
        TFAEngine(
            engine.model,
            engine.train_set,
            engine.test_set,
            method="tracin_cp",
            checkpoints=[(state, 0.1)],
            progress=False,
        )
    )
    x = Explorer(tracin, progress=False, k=2)
    assert [v for _, v in x.controls.method.options] == [
        "tracin_cp",
        "grad_cos",
        "grad_dot",
        "influence",
        "relatif",
        "trak",
    ]
    assert tracin.explains()[-1][1]["method"] == "tracin_cp"
    assert "tracin-cp" in x.caption.value
