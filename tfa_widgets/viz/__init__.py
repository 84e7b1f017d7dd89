"""Pure functions from arrays to Plotly figures: galleries, overlays, probability bars, exports."""

from tfa_widgets.viz.export import figures_to_html, rows_to_csv
from tfa_widgets.viz.figures import fit_grid, image_grid, overlay_grid, probability_bars, tile_at
from tfa_widgets.viz.grid import (
    GridGeometry,
    decode_png_data_uri,
    decode_typed_array,
    tile_images,
    tile_maps,
)
from tfa_widgets.viz.scales import normalise_map

__all__ = [
    "GridGeometry",
    "decode_png_data_uri",
    "decode_typed_array",
    "figures_to_html",
    "fit_grid",
    "image_grid",
    "normalise_map",
    "overlay_grid",
    "probability_bars",
    "rows_to_csv",
    "tile_at",
    "tile_images",
    "tile_maps",
]
