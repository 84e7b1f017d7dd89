"""The explorer's logic without a browser: a real engine on a tiny model, handlers called directly.

A spy around the real engine records the calls the explorer makes, so the tests check that each
user action asks the engine the right question (or, thanks to the cache, none at all).
"""

from __future__ import annotations

import csv
import json
import threading
import time

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


def _asked(spy: Spy):
    """The `Query` of the latest explanation the explorer asked for."""
    (query,), _ = spy.explains()[-1]
    return query


def _topk_tiles(x: Explorer) -> int:
    return x.strip.figure.figure.layout.meta["grid"]["n"]


def _messages(x: Explorer) -> str:
    return "".join(
        m.text
        for m in (x.gallery_message, x.controls.message, x.controls.layer_message, x.export_message)
    )


def _views(x: Explorer) -> dict:
    return {
        "test": x.selected.figure,
        "probs": x.selected.probabilities,
        "topk": x.strip.figure,
        "detail": x.detail.figure,
    }


def test_in_the_background_the_gallery_comes_first_and_a_click_meanwhile_is_explained_next(
    engine, tmp_path
):
    gate, calls = threading.Event(), []

    class Held(Spy):
        """Holds the first explanation until the test lets it go."""

        def __getattr__(self, name: str):
            attr = super().__getattr__(name)
            if name != "explain":
                return attr

            def explain(test, **kwargs):
                calls.append(test)
                assert gate.wait(timeout=60)
                return attr(test, **kwargs)

            return explain

    x = Explorer(Held(engine), progress=False, export_dir=tmp_path, page_size=12, background=True)
    first = x.gallery.first_choice()
    assert x.view is None and "Explaining" in x.caption.value  # the gallery is up already
    assert x.gallery.figure.figure.layout.meta["grid"]["n"] == 12
    other = next(i for i in x.gallery.page_indices() if i != first)
    started = time.perf_counter()
    x.gallery.handle_click(*_centre(x.gallery.figure, x.gallery.page_indices().index(other)))
    assert time.perf_counter() - started < 5, "a click during the first view must not wait"
    assert x.view is None
    gate.set()
    deadline = time.monotonic() + 60
    while (x.view is None or x.test != other or x._loading) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert x.test == other and x.gallery.selected() == other and _messages(x) == ""
    assert [query.index for query in calls] == [first, other]
    assert _topk_tiles(x) == 8


def test_starts_on_the_first_mistake_with_the_predicted_class(explorer, spy, engine):
    g = explorer.gallery
    first = int(np.flatnonzero(g.mistakes)[0])
    assert explorer.test == first and g.selected() == first
    [((query,), kwargs)] = spy.explains()  # the engine's own query, resolved once
    predicted = int(engine.predict(first).argmax())
    assert query.index == first and query.target == predicted and query.key == ("index", first)
    assert kwargs == dict(k=8, smooth=None, opponents=False, method="grad_cos", layer=None)
    assert explorer.explanation.k == 8 and _topk_tiles(explorer) == 8
    assert _messages(explorer) == ""
    for view in _views(explorer).values():  # what the browser gets is valid JSON
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
    before = {name: view.spec for name, view in _views(explorer).items()}
    explorer.gallery.figure.click(*_centre(explorer.gallery.figure, tile))
    (query,), _ = spy.explains()[-1]
    assert query.index == target and query.target == int(explorer.gallery.predicted[target])
    assert explorer.explanation.test_index == target
    assert explorer.gallery.selected() == target
    assert f"test #{target}" in explorer.caption.value
    for name in ("test", "topk", "detail"):
        assert _views(explorer)[name].spec != before[name], name
    shown = decode_png_data_uri(explorer.selected.figure.figure.data[0].source)
    expected = (explorer.explanation.test_display.numpy() * 255 + 0.5).astype(np.uint8)
    g = GridGeometry(**explorer.selected.figure.figure.layout.meta["grid"])
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
    assert _asked(spy).target == explorer.gallery.labels[test]
    explorer.controls.target.value = 2
    assert _asked(spy).target == 2
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
    z = decode_typed_array(explorer.strip.figure.figure.data[1].z)
    assert np.nanmin(z) >= 0
    c.times_input.value = True
    c.opacity.value = 0.25
    assert explorer.strip.figure.figure.data[1].opacity == pytest.approx(0.25)
    assert explorer.detail.figure.figure.data[2].visible is False  # baseline off: no Grad-CAM
    c.show_gradcam.value = True
    topk = explorer.strip.figure.figure
    assert topk.data[2].visible is True and topk.layout.meta["group"] == 2
    assert explorer.detail.figure.figure.data[2].visible is True
    assert len(spy.calls) == calls


def test_clicking_a_training_image_shows_it_with_metadata(explorer):
    e = explorer.explanation
    explorer.strip.figure.click(*_centre(explorer.strip.figure, 2))
    assert explorer.train_pos == 2
    info = explorer.detail.info.value
    index = int(e.train_indices[2])
    assert f"<td>{index}</td>" in info and "<td>3</td>" in info
    assert "planted patch" in info and ("yes" if index % 5 == 0 else "no") in info
    assert explorer.detail.figure.figure.layout.annotations[0].text.startswith(f"3. #{index}")


def test_a_bad_cam_layer_is_reported_beside_its_field_and_the_rest_keeps_working(explorer, spy):
    explorer.controls.layer.value = "no_such_layer"
    layer_error = explorer.controls.layer_message.text
    assert "no_such_layer" in layer_error and "tfa-error-box" in layer_error
    assert explorer.gallery_message.text == "" and explorer.controls.message.text == ""
    assert "layer 1 " not in explorer.caption.value  # the caption names the layer really used
    default = explorer.view.cams.layer
    assert default == "2" and f"Grad-CAM layer {default}" in explorer.caption.value
    page = explorer.gallery.page_indices()
    other = next(i for i in page if i != explorer.test)
    explorer.gallery.figure.click(*_centre(explorer.gallery.figure, page.index(other)))
    assert explorer.test == other  # clicks still work while the bad name stays in the field
    assert "no_such_layer" in explorer.controls.layer_message.text
    explorer.controls.k.value = 3
    assert explorer.explanation.k == 3
    explorer.controls.layer.value = "0"
    assert explorer.controls.layer_message.text == ""
    assert spy.calls[-1][0] == "gradcam" and spy.calls[-1][2] == {"layer": "0"}
    assert "Grad-CAM layer 0" in explorer.caption.value


def test_grad_cam_is_computed_once_per_explanation_at_the_chosen_layer(explorer, monkeypatch):
    from tfa_widgets.core import reference_maps

    calls = []
    real = reference_maps.gradcam
    monkeypatch.setattr(
        reference_maps, "gradcam", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw)
    )
    explorer.controls.layer.value = "0"  # a cached explanation: one Grad-CAM at the new layer
    assert len(calls) == 1 and explorer.view.cams.layer == "0"
    page = explorer.gallery.page_indices()
    other = next(i for i in page if i != explorer.test)
    explorer.gallery.figure.click(*_centre(explorer.gallery.figure, page.index(other)))
    assert explorer.explanation.gradcam_layer == "0"  # computed there, by the engine
    assert len(calls) == 2 and explorer.view.cams.layer == "0"
    model = explorer.engine.model
    assert all(module is model[0] for module in calls)


def test_a_rejected_test_image_keeps_the_previous_view_and_resets_the_status(explorer):
    shown = explorer.view
    explorer.select_test(torch.full((3, 12, 12), float("nan")))
    assert "NaN" in explorer.gallery_message.text
    assert explorer.view is shown and "⏳" not in explorer.status.value
    explorer.select_test(999)
    message = explorer.gallery_message.text
    assert "999" in message and "out of range" in message and "Traceback" not in message
    assert explorer.view is shown and "⏳" not in explorer.status.value
    explorer.select_test(5)
    assert _messages(explorer) == "" and explorer.explanation.test_index == 5


def test_an_unexpected_error_is_one_line_and_the_status_is_reset(explorer, monkeypatch):
    shown = explorer.view

    def broken(*args, **kwargs):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(explorer.engine, "explain", broken)
    explorer.controls.k.value = 20
    message = explorer.controls.message.text
    assert "ValueError: first line" in message and "second line" not in message
    assert explorer.view is shown and "⏳" not in explorer.status.value


def test_an_interrupted_update_leaves_selection_and_display_together(explorer, monkeypatch):
    shown, spec = explorer.view, explorer.strip.figure.spec

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(explorer.engine, "explain", interrupted)
    page = explorer.gallery.page_indices()
    other = next(i for i in page if i != explorer.test)
    explorer.select_test(other)
    assert explorer.view is shown and explorer.test == shown.test
    assert explorer.strip.figure.spec == spec and explorer.gallery.selected() == shown.test
    assert "interrupted" in explorer.gallery_message.text and "⏳" not in explorer.status.value


def test_a_test_set_with_a_nan_image_opens_and_marks_it_unusable(engine, tmp_path):
    test_set = Patches(30, 1)
    test_set.images[4] = float("nan")
    broken = TFAEngine(engine.model, engine.train_set, test_set, progress=False)
    x = Explorer(broken, progress=False, export_dir=tmp_path, page_size=12)
    assert x.view is not None and x.test != 4
    assert not x.gallery.usable[4] and x.gallery.usable.sum() == 29
    assert "unusable" in x.gallery.title(4)
    x.gallery.figure.click(*_centre(x.gallery.figure, 4))
    assert "NaN" in x.gallery_message.text and x.test != 4


def test_k_1_titles_say_top_proponent_and_fit(explorer):
    explorer.controls.k.value = 1
    fig = explorer.strip.figure.figure
    assert fig.layout.title.text.startswith("Top proponent:")
    assert fig.layout.width >= 7 * len(fig.layout.title.text)


def test_a_custom_image_can_be_explained_but_has_no_true_label(explorer, engine):
    image = engine.test_set[3][0] * 0.9
    explorer.select_test(image)
    assert _messages(explorer) == "" and explorer.explanation.test_index is None
    explorer.controls.target.value = "true"
    assert "true" in explorer.controls.message.text
    assert explorer.explanation.test_index is None  # still the custom image


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
    explorer.controls.layer.value = "0"
    html_path, csv_path = explorer.export(tmp_path / "out")
    assert html_path.is_absolute() and str(html_path) in explorer.export_note.value
    e = explorer.explanation
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["train_index"]) for r in rows] == e.train_indices.tolist()
    assert [float(r["score"]) for r in rows] == pytest.approx(e.scores.tolist())
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["label_name"] for r in rows] == [Patches.classes[y] for y in e.train_labels]
    page = html_path.read_text()
    assert page.count('class="tfa-figure"') == 4 and "Plotly.newPlot" in page
    assert "Grad-CAM layer 0" in page  # the layer in use is part of the export


def test_download_buttons_send_self_contained_files(explorer, monkeypatch):
    sent = []
    for button in (explorer.download_html, explorer.download_csv):
        monkeypatch.setattr(button, "send", lambda msg, buffers: sent.append((msg, buffers)))
        button._on_frontend_msg(button, {"event": "download"}, [])
    (page_msg, [page]), (csv_msg, [table]) = sent
    assert page_msg["name"].endswith(".html") and page_msg["mime"] == "text/html"
    text = page.decode()
    assert 'src="https://cdn.plot.ly' not in text and "<script src=" not in text  # embedded
    assert len(text) > 1_000_000 and text.count('class="tfa-figure"') == 4
    assert csv_msg["mime"] == "text/csv"
    indices = [int(r["train_index"]) for r in csv.DictReader(table.decode().splitlines())]
    assert indices == explorer.explanation.train_indices.tolist()


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
    assert "TracIn-CP" in x.caption.value


def test_a_view_that_fails_to_draw_leaves_the_previous_one_whole(explorer, monkeypatch):
    shown, spec = explorer.view, explorer.selected.figure.spec
    real_show = explorer.strip.show
    calls = []

    def fail_once(view):
        calls.append(view)
        if len(calls) == 1:
            raise RuntimeError("drawing failed")
        real_show(view)

    monkeypatch.setattr(explorer.strip, "show", fail_once)
    other = next(i for i in explorer.gallery.page_indices() if i != explorer.test)
    explorer.select_test(other)
    assert "drawing failed" in explorer.gallery_message.text
    assert explorer.view is shown and calls[-1] is shown  # redrawn with the previous view
    assert explorer.selected.figure.spec == spec and explorer.gallery.selected() == shown.test


def test_progress_area_is_cleared_and_errors_still_reach_the_caller():
    import ipywidgets as W

    from tfa_widgets.widgets.progress import progress_in

    out = W.Output()
    out.outputs = ({"output_type": "stream", "name": "stdout", "text": "50%"},)
    with pytest.raises(ValueError, match="boom"), progress_in(out):
        raise ValueError("boom")
    assert out.outputs == ()


def test_the_reference_map_kind_switch_redraws_caption_maps_and_exports(explorer, spy, tmp_path):
    c = explorer.controls
    assert [v for _, v in c.reference.options] == explorer.engine.reference_kinds
    c.show_gradcam.value = True
    explains = len(spy.explains())
    c.reference.value = "saliency"
    assert explorer.controls.message.text == "" and len(spy.explains()) == explains  # cached
    cams, e = explorer.view.cams, explorer.explanation
    assert cams.kind == "saliency" and cams.layer is None and c.layer.disabled
    assert "reference map saliency" in explorer.caption.value
    assert "Grad-CAM" not in explorer.caption.value
    # Saliency by plain autograd: |∂ logit_target / ∂ x| summed over channels, in float64.
    model = explorer.engine.model.double()
    try:
        x = e.test_image.double()[None].requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[0, e.target], x)
    finally:
        model.float()
    expected = grad[0].abs().sum(0)
    tol = 1e-5 * float(expected.abs().max()) + 1e-7  # float32 gradients of a 4-channel net
    assert torch.allclose(cams.test.double(), expected, rtol=1e-4, atol=tol)
    assert cams.train.shape == (e.k, *expected.shape)
    heatmaps = [t for t in explorer.selected.figure.figure.data if t.type == "heatmap"]
    bars = [t.colorbar.title.text for t in heatmaps if t.showscale]
    assert bars == ["saliency"]
    assert "saliency of its own label" in explorer.strip.figure.figure.layout.title.text
    html_path, _ = explorer.export(tmp_path / "out")
    assert "reference map saliency" in html_path.read_text()
    c.reference.value = "integrated_gradients"
    assert explorer.view.cams.kind == "integrated_gradients"
    assert "reference map Integrated Gradients" in explorer.caption.value
    c.reference.value = "gradcam"
    assert explorer.view.cams.kind == "gradcam" and not c.layer.disabled
    assert f"Grad-CAM layer {explorer.view.cams.layer}" in explorer.caption.value
    assert len(spy.explains()) == explains


def test_plotly_js_comes_from_the_url_the_server_gives_else_with_the_widget(monkeypatch):
    from tfa_widgets import serving
    from tfa_widgets.widgets.plotly_view import PLOTLY_URL_ENV, PlotlyLoader

    assert PLOTLY_URL_ENV == serving.PLOTLY_URL_ENV
    monkeypatch.delenv(PLOTLY_URL_ENV, raising=False)
    bundled = PlotlyLoader()
    assert bundled.url == "" and "plotly.js v" in bundled.source[:200]
    monkeypatch.setenv(PLOTLY_URL_ENV, "voila/labextensions/plotly.min.js")
    served = PlotlyLoader()
    assert served.url == "voila/labextensions/plotly.min.js" and served.source == ""
