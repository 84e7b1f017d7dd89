"""The test-image gallery: predictions for every test image, filters, pages and click-to-select."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W
import numpy as np
import torch
from tqdm.auto import tqdm

from tfa_widgets.core.memory_cache import BytesLRU
from tfa_widgets.viz import image_grid, tile_at
from tfa_widgets.widgets.labels import Label, as_label, has_class, is_mistake, label_text
from tfa_widgets.widgets.plotly_view import PlotlyView

# About 100 display images of 224 pixels (four pages of 24), or 5,000 of 32 pixels.
THUMBNAIL_CACHE_BYTES = 64 * 2**20

ANY = -1
UNUSABLE = -1
"""Predicted class of a test image the model cannot take (NaN values, wrong shape)."""


def predict_test_set(
    engine, progress: bool = True, batch_size: int = 256
) -> tuple[list[Label], np.ndarray]:
    """Return ``(labels, predicted classes)`` of every test image of ``engine``.

    Runs once when the explorer starts, in batches with a progress bar that goes when done; the
    gallery filters use it. The predicted class is the arg-max of the engine's probabilities, or
    ``UNUSABLE`` for an image the model cannot take (NaN or infinite values, a wrong shape).
    """
    test_set = engine.test_set
    labels: list[Label] = []
    predicted = np.full(len(test_set), UNUSABLE, dtype=np.int64)
    starts = range(0, len(test_set), batch_size)
    for start in tqdm(starts, desc="Predicting test images", disable=not progress, leave=False):
        indices = range(start, min(start + batch_size, len(test_set)))
        items = [test_set[i] for i in indices]
        labels.extend(as_label(y) for _, y in items)
        images = [torch.as_tensor(x) for x, _ in items]
        usable = [i for i, x in zip(indices, images, strict=True) if _usable(x, engine)]
        if usable:
            batch = torch.stack([images[i - start] for i in usable])
            predicted[usable] = engine.predict_batch(batch).argmax(dim=1).numpy()
    return labels, predicted


def _usable(image: torch.Tensor, engine) -> bool:
    shape = getattr(engine, "image_shape", tuple(image.shape))
    return tuple(image.shape) == tuple(shape) and bool(torch.isfinite(image).all())


class Gallery:
    """Pages of test thumbnails titled with true and predicted class, mistakes framed red.

    Parameters
    ----------
    engine : TFAEngine
        Supplies the test set, class names, predictions and the display transform.
    on_select : callable
        Called with the test index of a clicked thumbnail.
    selected : callable
        Returns the test index the explorer shows now (or None), framed blue.
    page_size, ncols, tile_px : int
        Thumbnails per page, per row, and their size in screen pixels.
    """

    def __init__(
        self,
        engine,
        on_select: Callable[[int], None],
        selected: Callable[[], int | None] = lambda: None,
        *,
        page_size: int = 24,
        ncols: int = 6,
        tile_px: int = 46,
        progress: bool = True,
    ) -> None:
        self.engine = engine
        self.class_names = list(engine.class_names)
        self.on_select = on_select
        self.selected = selected
        self.page_size, self.ncols, self.tile_px = int(page_size), int(ncols), int(tile_px)
        self.labels, self.predicted = predict_test_set(engine, progress)
        self.usable = self.predicted != UNUSABLE
        self.mistakes = np.array(
            [
                ok and is_mistake(y, int(p))
                for y, p, ok in zip(self.labels, self.predicted, self.usable, strict=True)
            ],
            dtype=bool,
        )
        self.page = 0
        self._thumbs = BytesLRU(THUMBNAIL_CACHE_BYTES)

        classes = [("any", ANY)] + [(f"{n} ({i})", i) for i, n in enumerate(self.class_names)]
        narrow = dict(layout=W.Layout(width="170px"), style={"description_width": "62px"})
        self.true_filter = W.Dropdown(options=classes, value=ANY, description="True", **narrow)
        self.pred_filter = W.Dropdown(options=classes, value=ANY, description="Predicted", **narrow)
        self.mistakes_only = W.Checkbox(
            value=False, description="Mistakes only", indent=False, layout=W.Layout(width="auto")
        )
        buttons = dict(layout=W.Layout(width="auto", min_width="70px"))
        self.prev_button = W.Button(description="◀ Prev", **buttons)
        self.next_button = W.Button(description="Next ▶", **buttons)
        self.page_label = W.HTML()
        for control in (self.true_filter, self.pred_filter, self.mistakes_only):
            control.observe(self._on_filter, names="value")
        self.prev_button.on_click(lambda _: self.set_page(self.page - 1))
        self.next_button.on_click(lambda _: self.set_page(self.page + 1))
        self.figure = PlotlyView(self._build_figure())
        self.figure.on_click(self.handle_click)
        self.figure.add_class("tfa-gallery")
        self._update_page_label()
        wrap = W.Layout(flex_flow="row wrap", align_items="center")
        self.widget = W.VBox(
            [
                W.HTML("<b>Test images</b> (click one to explain it)"),
                W.Box([self.true_filter, self.pred_filter], layout=wrap),
                W.Box(
                    [self.mistakes_only, self.prev_button, self.next_button, self.page_label],
                    layout=wrap,
                ),
                self.figure,
            ],
            layout=W.Layout(flex="0 1 auto", min_width="0"),
        )
        self.widget.add_class("tfa-gallery-panel")

    def first_choice(self) -> int:
        """Return the test image to show first: the first mistake, else the first usable one."""
        for candidates in (np.flatnonzero(self.mistakes), np.flatnonzero(self.usable)):
            if len(candidates):
                return int(candidates[0])
        return 0

    # ----- filtering and paging
    def filtered(self) -> np.ndarray:
        """Return the test indices passing the current filters, in order."""
        keep = np.ones(len(self.labels), dtype=bool)
        if self.true_filter.value != ANY:
            cls = int(self.true_filter.value)
            keep &= np.array([has_class(y, cls) for y in self.labels], dtype=bool)
        if self.pred_filter.value != ANY:
            keep &= self.predicted == int(self.pred_filter.value)
        if self.mistakes_only.value:
            keep &= self.mistakes
        return np.flatnonzero(keep)

    @property
    def num_pages(self) -> int:
        """Number of pages of the filtered gallery (at least one)."""
        return max(1, -(-len(self.filtered()) // self.page_size))

    def page_indices(self) -> list[int]:
        """Return the test indices shown on the current page."""
        start = self.page * self.page_size
        return [int(i) for i in self.filtered()[start : start + self.page_size]]

    def set_page(self, page: int) -> None:
        """Show page ``page`` (clamped to the valid range)."""
        self.page = int(np.clip(page, 0, self.num_pages - 1))
        self.redraw()

    def _on_filter(self, _change=None) -> None:
        self.page = 0
        self.redraw()

    # ----- selection
    def handle_click(self, x: float, y: float) -> int | None:
        """Select the thumbnail at figure coordinates ``(x, y)``; return its test index or None."""
        tile = tile_at(self.figure.figure, x, y)
        page = self.page_indices()
        if tile is None or tile >= len(page):
            return None
        self.on_select(page[tile])
        return page[tile]

    # ----- drawing
    def thumbnail(self, i: int) -> np.ndarray:
        """Return the display image ``[H, W, 3]`` of test image ``i`` (cached; grey if unusable)."""
        if i not in self._thumbs:
            image = torch.as_tensor(self.engine.test_set[i][0])
            if self.usable[i]:
                picture = self.engine.to_display(image).detach().cpu().float().numpy()
            else:
                height, width = self.engine.image_shape[-2:]
                picture = np.full((height, width, 3), 0.5, dtype=np.float32)
            self._thumbs[i] = picture
        return self._thumbs[i]

    def title(self, i: int) -> str:
        """Return the title of thumbnail ``i``: index, true class and predicted class."""
        mark = " ✗" if self.mistakes[i] else ""
        true = label_text(self.labels[i], self.class_names)
        if not self.usable[i]:
            return f"#{i} {true}<br>unusable"
        pred = label_text(int(self.predicted[i]), self.class_names)
        return f"#{i} {true}<br>→ {pred}{mark}"

    def _build_figure(self):
        page = self.page_indices()
        if not page:
            blank = np.ones((1, *self.thumbnail(0).shape), dtype=np.float32)
            return image_grid(blank, ["no match"], ncols=self.ncols, tile_px=self.tile_px)
        current = self.selected()
        selected = page.index(current) if current in page else None
        return image_grid(
            np.stack([self.thumbnail(i) for i in page]),
            [self.title(i) for i in page],
            ncols=self.ncols,
            mistakes=[bool(self.mistakes[i]) for i in page],
            selected=selected,
            tile_px=self.tile_px,
        )

    def _update_page_label(self) -> None:
        n = len(self.filtered())
        self.page_label.value = f"page {self.page + 1} / {self.num_pages} ({n} images)"
        self.prev_button.disabled = self.page <= 0
        self.next_button.disabled = self.page >= self.num_pages - 1

    def redraw(self) -> None:
        """Redraw the current page and the page label."""
        with self.figure.hold_sync():
            self.figure.show(self._build_figure())
        self._update_page_label()
