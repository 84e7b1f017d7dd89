"""Tiling many images (and maps) into one composite array, and mapping clicks back to tiles."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class GridGeometry:
    """Pixel layout of ``n`` equally sized tiles in rows of ``ncols``.

    Each tile is a ``tile_h x tile_w`` image surrounded by a border of ``pad`` pixels, with a band
    of ``band`` pixels above it for the title. All sizes are in image pixels.

    Parameters
    ----------
    n : int
        Number of tiles.
    ncols : int
        Tiles per row.
    tile_h, tile_w : int
        Size of each tile's image.
    pad : int
        Border around each image.
    band : int
        Height of the title band above each tile.

    Raises
    ------
    ValueError
        When a size is out of range.
    """

    n: int
    ncols: int
    tile_h: int
    tile_w: int
    pad: int = 2
    band: int = 0

    def __post_init__(self) -> None:
        if self.n < 0 or self.ncols < 1 or self.tile_h < 1 or self.tile_w < 1:
            raise ValueError(f"invalid grid geometry: {self}")

    @property
    def nrows(self) -> int:
        """Number of rows (at least one, so an empty grid still has a size)."""
        return max(1, -(-self.n // self.ncols))

    @property
    def cell_w(self) -> int:
        """Width of one cell: tile plus its border."""
        return self.tile_w + 2 * self.pad

    @property
    def cell_h(self) -> int:
        """Height of one cell: title band, tile and its border."""
        return self.band + self.tile_h + 2 * self.pad

    @property
    def width(self) -> int:
        """Width of the composite in pixels."""
        return self.ncols * self.cell_w

    @property
    def height(self) -> int:
        """Height of the composite in pixels."""
        return self.nrows * self.cell_h

    def origin(self, i: int) -> tuple[int, int]:
        """Return ``(row, col)`` pixel of the top-left corner of tile ``i``'s image.

        Parameters
        ----------
        i : int
            Index of the tile.

        Returns
        -------
        row, col : int
            Pixel coordinates in the composite.
        """
        r, c = divmod(i, self.ncols)
        return r * self.cell_h + self.band + self.pad, c * self.cell_w + self.pad

    def title_position(self, i: int) -> tuple[float, float]:
        """Return ``(x, y)`` data coordinates of the centre of tile ``i``'s title band.

        Parameters
        ----------
        i : int
            Index of the tile.

        Returns
        -------
        x, y : float
            Where the title is placed.
        """
        r, c = divmod(i, self.ncols)
        return c * self.cell_w + (self.cell_w - 1) / 2, r * self.cell_h + (self.band - 1) / 2

    def index_at(self, x: float, y: float) -> int | None:
        """Return the tile under data coordinates ``(x, y)`` (a click), or None if none.

        Parameters
        ----------
        x, y : float
            Data coordinates of the click.

        Returns
        -------
        int or None
            Index of the tile, or None outside every tile.
        """
        if not (np.isfinite(x) and np.isfinite(y)):
            return None
        col, row = int(np.floor((x + 0.5) / self.cell_w)), int(np.floor((y + 0.5) / self.cell_h))
        if not (0 <= col < self.ncols and 0 <= row < self.nrows):
            return None
        i = row * self.ncols + col
        return i if i < self.n else None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Return RGB images ``[..., H, W, 3]`` as uint8, scaling floats in [0, 1] to [0, 255]."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def tile_images(
    images: np.ndarray,
    geometry: GridGeometry,
    borders: Sequence[tuple[int, int, int] | None] | None = None,
) -> np.ndarray:
    """Return the uint8 composite ``[height, width, 3]`` of RGB ``images [n, H, W, 3]``.

    Parameters
    ----------
    images : numpy.ndarray
        ``[n, H, W, 3]``, uint8 or floats in [0, 1].
    geometry : GridGeometry
        The layout; its ``n``, ``tile_h`` and ``tile_w`` must match the images.
    borders : sequence, optional
        An RGB colour per tile for its frame (None leaves it background).

    Returns
    -------
    numpy.ndarray
        The composite, uint8.

    Raises
    ------
    ValueError
        When the images do not match the geometry.
    """
    imgs = to_uint8(images)
    g = geometry
    if imgs.ndim != 4 or imgs.shape[0] != g.n or imgs.shape[1:] != (g.tile_h, g.tile_w, 3):
        raise ValueError(
            f"expected images of shape [{g.n}, {g.tile_h}, {g.tile_w}, 3], got {list(imgs.shape)}"
        )
    out = np.empty((g.height, g.width, 3), dtype=np.uint8)
    out[...] = BACKGROUND
    for i in range(g.n):
        r, c = g.origin(i)
        colour = borders[i] if borders is not None else None
        if colour is not None and g.pad > 0:
            out[r - g.pad : r + g.tile_h + g.pad, c - g.pad : c + g.tile_w + g.pad] = colour
        out[r : r + g.tile_h, c : c + g.tile_w] = imgs[i]
    return out


def tile_alpha(
    geometry: GridGeometry, borders: Sequence[tuple[int, int, int] | None] | None = None
) -> np.ndarray:
    """Return the uint8 alpha ``[height, width]`` of a composite: opaque on tiles and frames.

    The gaps between tiles are transparent, so a grid takes the page's background (a dark theme
    shows no white box).
    """
    g = geometry
    alpha = np.zeros((g.height, g.width), dtype=np.uint8)
    for i in range(g.n):
        r, c = g.origin(i)
        framed = borders is not None and borders[i] is not None
        grow = g.pad if framed else 0
        alpha[r - grow : r + g.tile_h + grow, c - grow : c + g.tile_w + grow] = 255
    return alpha


def tile_maps(maps: Sequence[np.ndarray | None], geometry: GridGeometry) -> np.ndarray:
    """Return the float composite ``[height, width]`` of maps ``[H, W]``; NaN where none.

    Parameters
    ----------
    maps : sequence of numpy.ndarray or None
        One map ``[tile_h, tile_w]`` per tile, or None for a tile without one.
    geometry : GridGeometry
        The layout.

    Returns
    -------
    numpy.ndarray
        The composite, float32, NaN outside the maps.

    Raises
    ------
    ValueError
        When there is not one map per tile or a map has another size.
    """
    g = geometry
    if len(maps) != g.n:
        raise ValueError(f"expected {g.n} maps, got {len(maps)}")
    out = np.full((g.height, g.width), np.nan, dtype=np.float32)
    for i, m in enumerate(maps):
        if m is None:
            continue
        m = np.asarray(m, dtype=np.float32)
        if m.shape != (g.tile_h, g.tile_w):
            raise ValueError(
                f"map {i} has shape {list(m.shape)}, expected [{g.tile_h}, {g.tile_w}]"
            )
        r, c = g.origin(i)
        out[r : r + g.tile_h, c : c + g.tile_w] = m
    return out


def png_data_uri(composite: np.ndarray, alpha: np.ndarray | None = None) -> str:
    """Return an RGB uint8 array ``[H, W, 3]`` as a ``data:image/png;base64,...`` URI.

    ``alpha`` (uint8 ``[H, W]``) makes it an RGBA PNG: 0 is transparent.
    """
    buf = io.BytesIO()
    rgb = to_uint8(composite)
    if alpha is None:
        Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    else:
        Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png_data_uri(uri: str) -> np.ndarray:
    """Return the RGB uint8 array ``[H, W, 3]`` held by a PNG data URI (inverse of png_data_uri).

    Parameters
    ----------
    uri : str
        A ``data:image/png;base64,...`` URI.

    Returns
    -------
    numpy.ndarray
        The image.
    """
    data = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def typed_array(z: np.ndarray) -> dict:
    """Return a 2-D float array as a Plotly typed-array spec (base64 float32; NaN stays NaN).

    Figure widgets would otherwise send 2-D arrays as nested JSON lists, where NaN is invalid.
    """
    arr = np.ascontiguousarray(z, dtype="<f4")
    if arr.ndim != 2:
        raise ValueError(f"typed_array needs a 2-D array, got shape {list(arr.shape)}")
    return {
        "dtype": "f4",
        "bdata": base64.b64encode(arr.tobytes()).decode("ascii"),
        "shape": f"{arr.shape[0]}, {arr.shape[1]}",
    }


def decode_typed_array(spec) -> np.ndarray:
    """Return the float32 array held by a typed-array spec from `typed_array`.

    Parameters
    ----------
    spec : dict or array-like
        A typed-array spec (``dtype``, ``bdata``, ``shape``), or plain nested lists.

    Returns
    -------
    numpy.ndarray
        The array.
    """
    if not isinstance(spec, dict):
        return np.asarray(spec, dtype=np.float32)
    shape = tuple(int(n) for n in str(spec["shape"]).split(","))
    return np.frombuffer(base64.b64decode(spec["bdata"]), dtype="<f4").reshape(shape)
