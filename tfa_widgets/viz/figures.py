"""Pure functions from arrays to Plotly figures: image galleries, map overlays, probability bars.

Images travel as PNG data URIs and maps as base64 float32 arrays, so figure widgets send compact
messages. Every figure built here keeps the same trace structure whatever its inputs (an image
trace, then two heatmap traces for overlays), so a displayed ``FigureWidget`` can be updated in
place. Grid figures carry their tile layout in ``layout.meta["grid"]``, so a click at ``(x, y)``
maps back to a tile with :func:`tile_at`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import plotly.graph_objects as go

from tfa_widgets.viz.grid import (
    GridGeometry,
    png_data_uri,
    tile_alpha,
    tile_images,
    tile_maps,
    typed_array,
)
from tfa_widgets.viz.scales import (
    MISTAKE_COLOR,
    SELECTED_COLOR,
    SIGNED_COLORSCALE,
    UNSIGNED_COLORSCALE,
    as_numpy,
    hex_color,
    normalise_map,
)

TITLE_LINE_PX = 13
TITLE_CHAR_PX = 7
COLORBAR_PX = 70


def _images_hw3(images) -> np.ndarray:
    """Return display images as a float array ``[n, H, W, 3]`` (accepts tensors and a list)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("need at least one image")
        images = np.stack([as_numpy(im) for im in images])
    arr = as_numpy(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected display images of shape [n, H, W, 3], got {list(arr.shape)}")
    return arr


def _geometry(n: int, ncols: int, h: int, w: int, tile_px: int, title_lines: int) -> GridGeometry:
    scale = tile_px / max(h, w)
    pad = max(1, math.ceil(3 / scale))
    band = math.ceil((title_lines * TITLE_LINE_PX + 4) / scale) if title_lines else 0
    return GridGeometry(
        n=n, ncols=max(1, min(ncols, max(n, 1))), tile_h=h, tile_w=w, pad=pad, band=band
    )


def _grid_figure(
    composite: np.ndarray,
    alpha: np.ndarray,
    geometry: GridGeometry,
    titles: Sequence[str],
    title_colors: Sequence[str | None],
    *,
    tile_px: int,
    heatmaps: Sequence[go.Heatmap] = (),
    colorbars: int = 0,
    title: str | None = None,
    group: int = 1,
) -> go.Figure:
    annotations = []
    for i, text in enumerate(titles):
        if not text:
            continue
        x, y = geometry.title_position(i)
        if group > 1:  # one title centred over the item's tiles
            x = (x + geometry.title_position(min(i + group - 1, geometry.n - 1))[0]) / 2
        annotations.append(
            dict(
                x=x,
                y=y,
                xref="x",
                yref="y",
                text=text,
                showarrow=False,
                font=dict(size=10, color=title_colors[i] or "#222"),
            )
        )
    top = 28 if title else 4
    right = 6 + COLORBAR_PX * colorbars
    width, height = _figure_size(geometry, tile_px, colorbars, title)
    layout = go.Layout(
        width=width,
        height=height,
        margin=dict(l=6, r=right, t=top, b=6, pad=0),
        xaxis=dict(visible=False, range=[-0.5, geometry.width - 0.5], constrain="domain"),
        yaxis=dict(
            visible=False, range=[geometry.height - 0.5, -0.5], scaleanchor="x", constrain="domain"
        ),
        annotations=annotations,
        title=dict(text=title or "", x=0.01, y=0.99, yanchor="top", font=dict(size=13)),
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="white",
        dragmode=False,
        hovermode="closest",
        meta={"grid": asdict(geometry), "group": group},
    )
    image = go.Image(source=png_data_uri(composite, alpha), hoverinfo="none", name="images")
    return go.Figure(data=[image, *heatmaps], layout=layout)


def fit_grid(
    n: int,
    box_w: int,
    box_h: int,
    *,
    image_hw: tuple[int, int] = (32, 32),
    group: int = 1,
    title_lines: int = 2,
    colorbars: int = 1,
    title: str | None = "title",
    max_tile_px: int = 120,
) -> tuple[int, int]:
    """Return ``(items per row, tile_px)`` giving the largest tiles for which a grid fits a box.

    ``n`` items of ``image_hw`` pixels, each of ``group`` tiles side by side (a TFA map and its
    Grad-CAM), with ``title_lines`` lines of title above each row, must fit ``box_w x box_h``
    screen pixels together with the colour bars and the figure title, as :func:`overlay_grid`
    draws them.

    Parameters
    ----------
    n : int
        Number of items (at least 1 is assumed).
    box_w, box_h : int
        Width and height of the box in screen pixels.
    image_hw : tuple of int
        Height and width in pixels of each image.
    group : int
        Tiles per item, side by side (2 for a map beside its Grad-CAM).
    title_lines : int
        Lines of title above each row of tiles.
    colorbars : int
        Colour bars drawn in the right margin.
    title : str, optional
        The figure title (its length widens the figure; ``None`` for no title).
    max_tile_px : int
        The largest tile size tried, in screen pixels.

    Returns
    -------
    tuple of int
        ``(items per row, tile_px)``: among the row widths from 1 to ``n``, the one allowing
        the largest tiles (the fewest items per row on a tie); ``(1, 8)`` when nothing larger
        than 8 pixels fits.
    """
    n, group = max(1, int(n)), max(1, int(group))
    h, w = image_hw
    best = (1, 8)
    for ncols in range(1, n + 1):
        for tile_px in range(max_tile_px, best[1], -1):
            geometry = _geometry(n * group, ncols * group, h, w, tile_px, title_lines)
            width, height = _figure_size(geometry, tile_px, colorbars, title)
            if width <= box_w and height <= box_h:
                best = (ncols, tile_px)
                break
    return best


def _figure_size(
    geometry: GridGeometry, tile_px: int, colorbars: int, title: str | None
) -> tuple[int, int]:
    """Return the ``(width, height)`` in screen pixels of a grid figure."""
    scale = tile_px / max(geometry.tile_h, geometry.tile_w)
    right = 6 + COLORBAR_PX * colorbars
    # Wide enough for the figure title whatever k (a title of one tile's width was cut at k = 1).
    width = max(int(geometry.width * scale) + 6 + right, TITLE_CHAR_PX * len(title or "") + 16)
    return width, int(geometry.height * scale) + (28 if title else 4) + 6


def tile_at(fig: go.Figure, x: float, y: float) -> int | None:
    """Return which item of a grid figure was clicked at data coordinates ``(x, y)``, or None.

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        A figure made by `image_grid` or `overlay_grid`.
    x, y : float
        The clicked point in data coordinates.

    Returns
    -------
    int or None
        The item's index (with side maps, both tiles of an item give the item), or None
        outside every tile.

    Raises
    ------
    ValueError
        When the figure was not made by these functions (no grid in ``layout.meta``).
    """
    meta = fig.layout.meta or {}
    if "grid" not in meta:
        raise ValueError("figure has no grid layout in layout.meta; build it with tfa_widgets.viz")
    tile = GridGeometry(**meta["grid"]).index_at(x, y)
    return None if tile is None else tile // int(meta.get("group", 1))


def image_grid(
    images,
    titles: Sequence[str],
    *,
    ncols: int = 6,
    mistakes: Sequence[bool] | None = None,
    selected: int | None = None,
    tile_px: int = 80,
    title: str | None = None,
) -> go.Figure:
    """Return a gallery of thumbnails with a title above each, mistakes framed red, selection blue.

    Parameters
    ----------
    images : array or list
        ``[n, H, W, 3]`` display images in [0, 1] (or uint8), or a list of ``[H, W, 3]``.
    titles : sequence of str
        One string per image (``<br>`` breaks lines).
    ncols : int
        Thumbnails per row.
    mistakes : sequence of bool, optional
        Per image, True frames it red and colours its title red.
    selected : int, optional
        Index of the image framed blue.
    tile_px : int
        Displayed size in screen pixels of the longer side of each thumbnail.
    title : str, optional
        Title of the figure.

    Returns
    -------
    plotly.graph_objects.Figure
        One image trace of all thumbnails; `tile_at` maps a click on it to an image.

    Raises
    ------
    ValueError
        When the images are not ``[n, H, W, 3]`` (or none are given) or there is not one
        title per image.
    """
    arr = _images_hw3(images)
    n, h, w, _ = arr.shape
    if len(titles) != n:
        raise ValueError(f"got {n} images but {len(titles)} titles")
    lines = max((t.count("<br>") + 1 for t in titles), default=1)
    geometry = _geometry(n, ncols, h, w, tile_px, lines)
    mistakes = list(mistakes) if mistakes is not None else [False] * n
    borders = [MISTAKE_COLOR if bad else None for bad in mistakes]
    if selected is not None and 0 <= selected < n:
        borders[selected] = SELECTED_COLOR
    colors = [hex_color(MISTAKE_COLOR) if bad else None for bad in mistakes]
    composite = tile_images(arr, geometry, borders)
    alpha = tile_alpha(geometry, borders)
    return _grid_figure(composite, alpha, geometry, titles, colors, tile_px=tile_px, title=title)


def _heatmap(
    z: np.ndarray,
    *,
    signed: bool,
    opacity: float,
    label: str,
    slot: int,
    visible: bool,
    plot_px: float,
) -> go.Heatmap:
    return go.Heatmap(
        z=typed_array(z),
        x0=0,
        dx=1,
        y0=0,
        dy=1,
        colorscale=SIGNED_COLORSCALE if signed else UNSIGNED_COLORSCALE,
        zmin=-1.0 if signed else 0.0,
        zmax=1.0,
        opacity=float(opacity),
        hoverongaps=False,
        hovertemplate=label + " %{z:.2f}<extra></extra>",
        showscale=visible,
        colorbar=dict(
            title=dict(text=label, side="right"),
            x=1.0 + (8 + COLORBAR_PX * slot) / plot_px,  # side by side in the right margin
            xanchor="left",
            len=0.9,
            thickness=12,
        ),
        visible=visible,
        name=label,
    )


def overlay_grid(
    images,
    maps,
    titles: Sequence[str],
    *,
    signed: bool = True,
    opacity: float = 0.6,
    ncols: int = 4,
    side_maps=None,
    map_label: str = "TFA",
    side_label: str = "Grad-CAM",
    selected: int | None = None,
    tile_px: int = 96,
    title: str | None = None,
) -> go.Figure:
    """Return images with their maps overlaid, optionally each beside a second map (e.g. Grad-CAM).

    Each map is scaled on its own: signed maps to [-1, 1] around zero on a diverging scale, unsigned
    maps to [0, 1] on a sequential scale. The overlay opacity is the heatmap trace's ``opacity``.

    Parameters
    ----------
    images : array or list
        ``[n, H, W, 3]`` display images in [0, 1].
    maps : array
        ``[n, H, W]`` maps, one per image.
    titles : sequence of str
        One string per image (``<br>`` breaks lines).
    signed : bool
        Scale the maps around zero on a diverging scale (else [0, 1], sequential).
    opacity : float
        Opacity of the overlaid maps.
    ncols : int
        Items per row (an item with a side map takes two tiles).
    side_maps : array, optional
        ``[n, H, W]`` non-negative maps shown on a copy of each image beside it, or None (the
        item's title is then centred over both tiles).
    map_label, side_label : str
        Names of the two maps in colour bars and hover texts.
    selected : int, optional
        Item framed blue (both of its tiles with side maps).
    tile_px : int
        Displayed size in screen pixels of the longer side of each tile.
    title : str, optional
        Title of the figure.

    Returns
    -------
    plotly.graph_objects.Figure
        An image trace and two heatmap traces over it (the second hidden without side maps);
        `tile_at` maps a click to an item.

    Raises
    ------
    ValueError
        When the images, maps, side maps and titles do not match in number and size.
    """
    arr = _images_hw3(images)
    n, h, w, _ = arr.shape
    maps = as_numpy(maps)
    if maps.shape != (n, h, w):
        raise ValueError(f"expected maps of shape [{n}, {h}, {w}], got {list(maps.shape)}")
    if len(titles) != n:
        raise ValueError(f"got {n} images but {len(titles)} titles")
    main = [normalise_map(m, signed) for m in maps]
    group = 1
    side: list[np.ndarray | None] = [None] * n
    if side_maps is not None:
        side_arr = as_numpy(side_maps)
        if side_arr.shape != (n, h, w):
            raise ValueError(f"expected side maps [{n}, {h}, {w}], got {list(side_arr.shape)}")
        group = 2
        arr = np.repeat(arr, 2, axis=0)
        main = [m for pair in zip(main, [None] * n, strict=True) for m in pair]
        side = [m for pair in zip([None] * n, side_arr, strict=True) for m in pair]
        side = [None if m is None else normalise_map(m, False) for m in side]
        titles = [t for pair in zip(titles, [""] * n, strict=True) for t in pair]
    lines = max((t.count("<br>") + 1 for t in titles), default=1)
    geometry = _geometry(len(titles), ncols * group, h, w, tile_px, lines)
    borders: list = [None] * geometry.n
    if selected is not None and 0 <= selected < n:
        for j in range(group):
            borders[selected * group + j] = SELECTED_COLOR
    composite = tile_images(arr, geometry, borders)
    colorbars = 1 + (side_maps is not None)
    plot_px = _figure_size(geometry, tile_px, colorbars, title)[0] - 12 - COLORBAR_PX * colorbars
    heatmaps = [
        _heatmap(
            tile_maps(main, geometry),
            signed=signed,
            opacity=opacity,
            label=map_label,
            slot=0,
            visible=True,
            plot_px=plot_px,
        ),
        _heatmap(
            tile_maps(side, geometry),
            signed=False,
            opacity=opacity,
            label=side_label,
            slot=1,
            visible=side_maps is not None,
            plot_px=plot_px,
        ),
    ]
    return _grid_figure(
        composite,
        tile_alpha(geometry, borders),
        geometry,
        list(titles),
        [None] * geometry.n,
        tile_px=tile_px,
        heatmaps=heatmaps,
        colorbars=colorbars,
        title=title,
        group=group,
    )


def probability_bars(
    probabilities,
    class_names: Sequence[str],
    *,
    top: int = 5,
    highlight: int | None = None,
    title: str | None = "Prediction",
) -> go.Figure:
    """Return a bar chart of the ``top`` most probable classes, ``highlight`` coloured.

    Parameters
    ----------
    probabilities : array
        One probability per class.
    class_names : sequence of str
        The class names, in class order.
    top : int
        How many classes are shown, most probable first (at least one).
    highlight : int, optional
        The class drawn in the selection colour (e.g. the explained target).
    title : str, optional
        Title of the figure.

    Returns
    -------
    plotly.graph_objects.Figure
        Horizontal bars, most probable at the top.

    Raises
    ------
    ValueError
        When there is not one probability per class name.
    """
    probs = as_numpy(probabilities).reshape(-1)
    if probs.size != len(class_names):
        raise ValueError(f"got {probs.size} probabilities for {len(class_names)} class names")
    order = np.argsort(-probs, kind="stable")[: max(1, top)]
    colors = [hex_color(SELECTED_COLOR) if int(c) == highlight else "#b0b0b0" for c in order]
    bar = go.Bar(
        x=[float(probs[c]) for c in order][::-1],
        y=[f"{class_names[c]} ({c})" for c in order][::-1],
        orientation="h",
        marker=dict(color=colors[::-1]),
        text=[f"{probs[c]:.3f}" for c in order][::-1],
        textposition="auto",
        hovertemplate="%{y}: %{x:.4f}<extra></extra>",
    )
    layout = go.Layout(
        width=320,
        height=60 + 26 * len(order),
        margin=dict(l=10, r=10, t=30 if title else 6, b=24),
        xaxis=dict(range=[0, 1], title=None, fixedrange=True),
        yaxis=dict(automargin=True, fixedrange=True),
        title=dict(text=title or "", x=0.01, font=dict(size=13)),
        plot_bgcolor="white",
        showlegend=False,
    )
    return go.Figure(data=[bar], layout=layout)
