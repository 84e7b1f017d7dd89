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


def predict_test_set(
    engine, progress: bool = True, batch_size: int = 256
) -> tuple[list[Label], np.ndarray]:
    """Return ``(labels, predicted classes)`` of every test image of ``engine``.

    Runs once when the explorer starts, in batches with a progress bar; the gallery filters use it.
    The predicted class is the arg-max of the engine's probabilities.
    """
    test_set = engine.test_set
    labels: list[Label] = []
    predicted: list[np.ndarray] = []
    starts = range(0, len(test_set), batch_size)
    for start in tqdm(starts, desc="Predicting test images", disable=not progress):
        items = [test_set[i] for i in range(start, min(start + batch_size, len(test_set)))]
        labels.extend(as_label(y) for _, y in items)
        batch = torch.stack([torch.as_tensor(x) for x, _ in items])
        predicted.append(engine.predict_batch(batch).argmax(dim=1).numpy())
    return labels, np.concatenate(predicted).astype(np.int64)


class Gallery:
    """Pages of test thumbnails titled with true and predicted class, mistakes framed red.

    Parameters
    ----------
    engine : TFAEngine
        Supplies the test set, class names, predictions and the display transform.
    on_select : callable
        Called with the test index of a clicked thumbnail.

    The first misclassified test image (else the first) starts selected.
    page_size, ncols, tile_px : int
        Thumbnails per page, per row, and their size in screen pixels.
    """

    def __init__(
        self,
        engine,
        on_select: Callable[[int], None],
        *,
        page_size: int = 24,
        ncols: int = 6,
        tile_px: int = 64,
        progress: bool = True,
    ) -> None:
        self.engine = engine
        self.class_names = list(engine.class_names)
        self.on_select = on_select
        self.page_size, self.ncols, self.tile_px = int(page_size), int(ncols), int(tile_px)
        self.labels, self.predicted = predict_test_set(engine, progress)
        self.mistakes = np.array(
            [is_mistake(y, int(p)) for y, p in zip(self.labels, self.predicted, strict=True)],
            dtype=bool,
        )
        self.page = 0
        mistakes = np.flatnonzero(self.mistakes)
        self.selected: int | None = int(mistakes[0]) if len(mistakes) else 0
        self._thumbs = BytesLRU(THUMBNAIL_CACHE_BYTES)

        classes = [("any", ANY)] + [(f"{n} ({i})", i) for i, n in enumerate(self.class_names)]
        self.true_filter = W.Dropdown(options=classes, value=ANY, description="True class")
        self.pred_filter = W.Dropdown(options=classes, value=ANY, description="Predicted")
        self.mistakes_only = W.Checkbox(value=False, description="Misclassified only", indent=False)
        self.prev_button = W.Button(description="◀ Prev", layout=W.Layout(width="80px"))
        self.next_button = W.Button(description="Next ▶", layout=W.Layout(width="80px"))
        self.page_label = W.HTML()
        for control in (self.true_filter, self.pred_filter, self.mistakes_only):
            control.observe(self._on_filter, names="value")
        self.prev_button.on_click(lambda _: self.set_page(self.page - 1))
        self.next_button.on_click(lambda _: self.set_page(self.page + 1))
        self.figure = PlotlyView(self._build_figure())
        self.figure.on_click(self.handle_click)
        self.figure.add_class("tfa-gallery")
        self._update_page_label()
        self.widget = W.VBox(
            [
                W.HTML("<b>Test images</b> (click one to explain it)"),
                W.HBox([self.true_filter, self.pred_filter]),
                W.HBox([self.mistakes_only, self.prev_button, self.next_button, self.page_label]),
                self.figure,
            ]
        )

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

    def mark_selected(self, index: int | None) -> None:
        """Frame test image ``index`` as selected (when it is on the current page)."""
        if index != self.selected:
            self.selected = index
            self.redraw()

    # ----- drawing
    def thumbnail(self, i: int) -> np.ndarray:
        """Return the display image ``[H, W, 3]`` of test image ``i`` (cached)."""
        if i not in self._thumbs:
            image = self.engine.test_set[i][0]
            self._thumbs[i] = self.engine.to_display(image).detach().cpu().float().numpy()
        return self._thumbs[i]

    def title(self, i: int) -> str:
        """Return the title of thumbnail ``i``: index, true class and predicted class."""
        mark = " ✗" if self.mistakes[i] else ""
        true = label_text(self.labels[i], self.class_names)
        pred = label_text(int(self.predicted[i]), self.class_names)
        return f"#{i} {true}<br>→ {pred}{mark}"

    def _build_figure(self):
        page = self.page_indices()
        if not page:
            blank = np.ones((1, *self.thumbnail(0).shape), dtype=np.float32)
            return image_grid(blank, ["no match"], ncols=self.ncols, tile_px=self.tile_px)
        selected = page.index(self.selected) if self.selected in page else None
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
        self.figure.show(self._build_figure())
        self._update_page_label()
