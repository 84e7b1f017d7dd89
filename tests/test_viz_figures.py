"""Figures from arrays: tiling, clicks, overlays, colour scales, probability bars, exports."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from tfa_widgets.viz import (
    GridGeometry,
    decode_png_data_uri,
    decode_typed_array,
    figures_to_html,
    fit_grid,
    image_grid,
    normalise_map,
    overlay_grid,
    probability_bars,
    rows_to_csv,
    tile_at,
    tile_images,
    tile_maps,
)
from tfa_widgets.viz.scales import MISTAKE_COLOR, SELECTED_COLOR
from tfa_widgets.viz.training import embedding_scatter, score_histogram


def _images(n: int, h: int = 8, w: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((n, h, w, 3)).astype(np.float32)


def _tile_centre(fig: go.Figure, i: int) -> tuple[float, float]:
    g = GridGeometry(**fig.layout.meta["grid"])
    r, c = g.origin(i)
    return c + g.tile_w / 2, r + g.tile_h / 2


def test_geometry_maps_every_pixel_of_a_cell_back_to_its_tile():
    g = GridGeometry(n=7, ncols=3, tile_h=4, tile_w=5, pad=1, band=2)
    assert (g.nrows, g.width, g.height) == (3, 21, 24)
    for i in range(g.n):
        r0, c0 = divmod(i, g.ncols)
        for y in range(r0 * g.cell_h, (r0 + 1) * g.cell_h):
            for x in range(c0 * g.cell_w, (c0 + 1) * g.cell_w):
                assert g.index_at(x, y) == i
    assert g.index_at(2 * g.cell_w + 1, 2 * g.cell_h + 1) is None  # the empty 9th cell
    assert g.index_at(-3, 0) is None and g.index_at(0, g.height + 1) is None
    assert g.index_at(float("nan"), 0) is None


def test_tile_images_places_each_image_and_frames_it():
    images = _images(3)
    g = GridGeometry(n=3, ncols=2, tile_h=8, tile_w=10, pad=2, band=3)
    out = tile_images(images, g, borders=[None, (1, 2, 3), None])
    assert out.shape == (g.height, g.width, 3) and out.dtype == np.uint8
    for i in range(3):
        r, c = g.origin(i)
        expected = (np.clip(images[i], 0, 1) * 255 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(out[r : r + 8, c : c + 10], expected)
    r, c = g.origin(1)
    assert tuple(out[r - 1, c - 1]) == (1, 2, 3)
    r, c = g.origin(0)
    assert tuple(out[r - 1, c - 1]) == (255, 255, 255)
    with pytest.raises(ValueError, match="expected images of shape"):
        tile_images(images[:2], g)


def test_tile_maps_is_nan_outside_the_tiles():
    g = GridGeometry(n=2, ncols=2, tile_h=3, tile_w=3, pad=1, band=0)
    out = tile_maps([np.ones((3, 3)), None], g)
    r, c = g.origin(0)
    assert np.all(out[r : r + 3, c : c + 3] == 1)
    assert np.isnan(out).sum() == out.size - 9


def test_image_grid_titles_marks_and_click_mapping():
    images = _images(5)
    titles = [f"#{i}<br>pred" for i in range(5)]
    fig = image_grid(
        images, titles, ncols=3, mistakes=[False, True, False, False, True], selected=2
    )
    assert [a.text for a in fig.layout.annotations] == titles
    assert [a.font.color for a in fig.layout.annotations][1] != fig.layout.annotations[0].font.color
    composite = decode_png_data_uri(fig.data[0].source)
    g = GridGeometry(**fig.layout.meta["grid"])
    for i, colour in [(1, MISTAKE_COLOR), (4, MISTAKE_COLOR), (2, SELECTED_COLOR)]:
        r, c = g.origin(i)
        assert tuple(composite[r - 1, c - 1]) == colour
    for i in range(5):
        assert tile_at(fig, *_tile_centre(fig, i)) == i
    with pytest.raises(ValueError, match="titles"):
        image_grid(images, titles[:2])


def test_overlay_grid_signed_maps_are_zero_centred_per_image():
    images = _images(2)
    maps = np.zeros((2, 8, 10), dtype=np.float32)
    maps[0, 1, 1], maps[0, 2, 2] = 4.0, -2.0
    maps[1, 3, 3] = -0.5
    fig = overlay_grid(images, maps, ["a", "b"], signed=True, opacity=0.3)
    heat = fig.data[1]
    assert (heat.zmin, heat.zmax) == (-1.0, 1.0)
    assert heat.opacity == pytest.approx(0.3)
    z = decode_typed_array(heat.z)
    g = GridGeometry(**fig.layout.meta["grid"])
    r, c = g.origin(0)
    assert z[r + 1, c + 1] == pytest.approx(1.0) and z[r + 2, c + 2] == pytest.approx(-0.5)
    r, c = g.origin(1)
    assert z[r + 3, c + 3] == pytest.approx(-1.0)  # each map is scaled by its own max |value|
    assert np.isnan(z[0, 0])
    assert fig.data[2].visible is False


def test_overlay_grid_side_maps_pair_tiles_and_clicks_give_the_item():
    images = _images(3)
    maps = np.random.default_rng(1).normal(size=(3, 8, 10))
    cams = np.random.default_rng(2).random((3, 8, 10))
    fig = overlay_grid(images, maps, ["a", "b", "c"], side_maps=cams, ncols=2, signed=False)
    assert fig.layout.meta["group"] == 2 and fig.layout.meta["grid"]["n"] == 6
    assert fig.data[2].visible is True
    assert fig.data[1].zmin == 0.0  # unsigned maps use a sequential scale from zero
    assert [tile_at(fig, *_tile_centre(fig, t)) for t in range(6)] == [0, 0, 1, 1, 2, 2]
    main, side = decode_typed_array(fig.data[1].z), decode_typed_array(fig.data[2].z)
    assert np.all(np.isnan(main) | np.isnan(side))  # never two maps on one tile
    assert np.nanmin(main) >= 0 and np.nanmax(side) == pytest.approx(1.0)


def test_figures_are_json_safe_despite_nan_gaps():
    fig = overlay_grid(_images(2), np.ones((2, 8, 10)), ["a", "b"], side_maps=np.ones((2, 8, 10)))
    json.dumps(json.loads(fig.to_json()), allow_nan=False)


def test_normalise_map_handles_degenerate_maps():
    assert np.all(normalise_map(np.zeros((3, 3)), signed=True) == 0)
    m = normalise_map(np.array([[np.nan, 2.0], [-4.0, np.inf]]), signed=True)
    np.testing.assert_allclose(m, [[0, 0.5], [-1, 0]])
    np.testing.assert_allclose(normalise_map(np.array([[1.0, 3.0]]), signed=False), [[1 / 3, 1]])


def test_probability_bars_show_top_classes_in_order():
    probs = np.array([0.1, 0.5, 0.05, 0.35])
    fig = probability_bars(probs, ["a", "b", "c", "d"], top=3, highlight=3)
    bar = fig.data[0]
    assert list(bar.y) == ["a (0)", "d (3)", "b (1)"]  # drawn bottom-up: most probable on top
    assert list(bar.x) == pytest.approx([0.1, 0.35, 0.5])
    assert len({c for c in bar.marker.color}) == 2 and bar.marker.color[1] != bar.marker.color[0]
    with pytest.raises(ValueError, match="class names"):
        probability_bars(probs, ["a"])


def test_exports_hold_every_figure_and_row():
    figs = [probability_bars(np.array([0.2, 0.8]), ["x", "y"]) for _ in range(3)]
    page = figures_to_html(figs, title="view <1>", offline=False)
    assert page.count('class="tfa-figure"') == 3 and "view &lt;1&gt;" in page
    assert page.count("cdn.plot.ly") == 1
    csv_text = rows_to_csv(["rank", "score"], [(1, 0.5), (2, -0.25)])
    assert csv_text.splitlines() == ["rank,score", "1,0.5", "2,-0.25"]


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 16, 17, 32])
def test_fit_grid_gives_a_figure_inside_the_box_with_the_largest_tiles(n, group):
    box_w, box_h = 820, 560
    ncols, tile_px = fit_grid(n, box_w, box_h, group=group, colorbars=group, title="t")
    images, maps = _images(n, 32, 32), np.ones((n, 32, 32))
    titles = [f"{i}. #{i}<br>triangle 0.123" for i in range(n)]

    def figure(cols: int, px: int) -> go.Figure:
        side = maps if group == 2 else None
        return overlay_grid(images, maps, titles, ncols=cols, tile_px=px, side_maps=side, title="t")

    fig = figure(ncols, tile_px)
    assert fig.layout.width <= box_w and fig.layout.height <= box_h
    if tile_px < 120:  # not capped: one pixel more per tile would overflow for every column count
        for cols in range(1, n + 1):
            bigger = figure(cols, tile_px + 1)
            assert bigger.layout.width > box_w or bigger.layout.height > box_h, cols


def test_overlay_titles_are_centred_over_an_item_and_its_side_map():
    maps = np.ones((2, 8, 10))
    fig = overlay_grid(_images(2), maps, ["a", "b"], side_maps=maps, ncols=2)
    g = GridGeometry(**fig.layout.meta["grid"])
    assert [a.text for a in fig.layout.annotations] == ["a", "b"]
    for item, annotation in enumerate(fig.layout.annotations):
        left, right = g.title_position(2 * item)[0], g.title_position(2 * item + 1)[0]
        assert annotation.x == pytest.approx((left + right) / 2)


def test_gaps_between_tiles_are_transparent():
    fig = image_grid(_images(3), ["a", "b", "c"], ncols=2, selected=1)
    data = base64.b64decode(fig.data[0].source.split(",", 1)[1])
    rgba = np.asarray(Image.open(io.BytesIO(data)))
    g = GridGeometry(**fig.layout.meta["grid"])
    assert rgba.shape == (g.height, g.width, 4)
    r, c = g.origin(0)
    assert rgba[r, c, 3] == 255 and rgba[r - 1, c - 1, 3] == 0  # tile opaque, unframed gap clear
    r, c = g.origin(1)
    assert rgba[r - 1, c - 1, 3] == 255  # the selection frame is drawn
    assert rgba[0, 0, 3] == 0


def test_training_set_figures_stay_small_for_50000_images():
    rng = np.random.default_rng(0)

    def sizes(n: int) -> tuple[int, int]:
        scores, labels = rng.normal(size=n), rng.integers(0, 10, size=n)
        hist = score_histogram(scores, labels, [str(i) for i in range(10)], cut=2.0, k=8)
        xy = rng.normal(size=(n, 2))
        scatter = embedding_scatter(xy, labels, [str(i) for i in range(10)], scores=scores)
        return len(hist.to_json()), len(scatter.to_json())

    small, large = sizes(1_000), sizes(50_000)
    assert large[0] < 1.5 * small[0]  # the histogram is counted in Python: size independent of N
    # the map holds every point as binary (x, y float64, index int64, score): about 4 × 8 bytes
    # per point, × 4/3 for base64, plus a little per trace
    assert large[1] < 50_000 * 4 * 8 * 4 / 3 * 1.2


def test_score_histogram_counts_each_class():
    scores = np.array([0.0, 0.1, 0.2, 0.9, 1.0])
    fig = score_histogram(scores, [0, 0, 1, 1, 1], ["a", "b"], cut=0.9, k=2, bins=2)
    counts = {t.name: list(t.y) for t in fig.data}
    assert counts == {"a (0)": [2, 0], "b (1)": [1, 2]}
    assert fig.layout.shapes[0].x0 == 0.9 and "top-2 cut" in fig.layout.annotations[0].text
