"""The explorer's panels for one explanation: the selected test, the top-k strip, the detail.

Each panel owns its widgets and has one ``show(view)`` that redraws them from a
:class:`~tfa_widgets.widgets.view.View`; the explorer calls it inside ``hold_sync`` so the browser
gets one message per widget.
"""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets as W
import plotly.graph_objects as go

from tfa_widgets.viz import fit_grid, overlay_grid, probability_bars, tile_at
from tfa_widgets.widgets.labels import as_label, label_text
from tfa_widgets.widgets.plotly_view import PlotlyView
from tfa_widgets.widgets.view import View

TEST_TILE_PX = 180
STRIP_BOX_PX = (820, 560)
"""Width and height the top-k strip is laid out for: with the controls above it, it fits a
1440x900 screen beside the gallery and the selected test image at every k up to 32, with or
without the Grad-CAM baseline (the browser tests check it). Narrower places scale it down."""
DETAIL_TILE_PX = 180


def _blank(width: int, height: int) -> go.Figure:
    """Return an empty figure of ``width x height`` pixels: a panel's place until its first view."""
    hidden = dict(visible=False)
    return go.Figure(
        layout=dict(
            width=width,
            height=height,
            margin=dict(l=0, r=0, t=0, b=0),
            xaxis=hidden,
            yaxis=hidden,
            paper_bgcolor="rgba(0,0,0,0)",
            plot_bgcolor="rgba(0,0,0,0)",
        )
    )


class SelectedTestPanel:
    """The selected test image with Grad-CAM of the target, the target choice and probabilities."""

    def __init__(self, target: W.Widget) -> None:
        self.figure = PlotlyView(_blank(TEST_TILE_PX, TEST_TILE_PX))
        self.probabilities = PlotlyView(_blank(230, 40))
        self.figure.add_class("tfa-test")
        self.probabilities.add_class("tfa-probs")
        target.layout.width = "230px"
        target.style.description_width = "50px"
        self.widget = W.VBox(
            [W.HTML("<b>Selected test image</b>"), self.figure, target, self.probabilities],
            layout=W.Layout(width="240px", flex="0 0 auto"),
        )
        self.widget.add_class("tfa-selected")

    def show(self, view: View) -> None:
        """Draw the test image of ``view`` with its Grad-CAM, and its class probabilities."""
        e = view.explanation
        true = (
            label_text(as_label(e.test_label), view.class_names)
            if e.test_label is not None
            else "?"
        )
        title = f"true {true} · predicted {view.name(e.predicted)}<br>target {view.name(e.target)}"
        self.figure.show(
            overlay_grid(
                e.test_display[None],
                view.cams.test[None],
                [title],
                signed=False,
                opacity=view.settings.opacity,
                ncols=1,
                tile_px=TEST_TILE_PX,
                map_label=view.cams.label,
            )
        )
        bars = probability_bars(e.probabilities, list(view.class_names), highlight=e.target)
        self.probabilities.show(bars.update_layout(width=230))


class ProponentStrip:
    """The top-k training images with their TFA maps, optionally beside their Grad-CAM.

    Parameters
    ----------
    on_rank : callable
        Called with the rank (0-based) of a clicked training image.
    """

    def __init__(self, on_rank: Callable[[int], None]) -> None:
        self.on_rank = on_rank
        self.figure = PlotlyView(_blank(*STRIP_BOX_PX))
        self.figure.add_class("tfa-topk")
        self.figure.on_click(self.handle_click)
        self.widget = self.figure

    def show(self, view: View) -> None:
        """Draw the top-k of ``view``, its selected training image framed."""
        e, s = view.explanation, view.settings
        group = 2 if s.show_gradcam else 1
        baseline = f" (right of each: {view.cams.label} of its own label)" if s.show_gradcam else ""
        title = f"{view.ranking_title()}: TFA map of each training image{baseline}"
        image_hw = tuple(e.train_display.shape[1:3])
        ncols, tile_px = fit_grid(
            e.k, *STRIP_BOX_PX, image_hw=image_hw, group=group, colorbars=group, title=title
        )
        self.figure.show(
            overlay_grid(
                e.train_display,
                view.maps(),
                view.train_titles(),
                signed=s.reduction == "signed",
                opacity=s.opacity,
                ncols=ncols,
                side_maps=view.cams.train if s.show_gradcam else None,
                side_label=view.cams.label,
                selected=view.rank,
                tile_px=tile_px,
                title=title,
            )
        )

    def handle_click(self, x: float, y: float) -> int | None:
        """Select the training image at figure coordinates ``(x, y)``; return its rank or None."""
        rank = tile_at(self.figure.figure, x, y)
        if rank is not None:
            self.on_rank(rank)
        return rank


class TrainingDetail:
    """One training image of the top-k, large, with its metadata (and its Grad-CAM if asked)."""

    def __init__(self, train_set) -> None:
        self.train_set = train_set
        self.figure = PlotlyView(_blank(DETAIL_TILE_PX, DETAIL_TILE_PX))
        self.info = W.HTML()
        self.figure.add_class("tfa-detail")
        self.info.add_class("tfa-meta")
        self.widget = W.VBox(
            [
                W.HTML("<b>Training image</b> (click one in the top-k)"),
                W.HBox([self.figure, self.info]),
            ]
        )

    def show(self, view: View) -> None:
        """Draw training image ``view.rank`` of the top-k and its metadata table."""
        e, s, p = view.explanation, view.settings, view.rank
        self.figure.show(
            overlay_grid(
                e.train_display[p : p + 1],
                view.maps()[p : p + 1],
                [view.train_titles()[p]],
                signed=s.reduction == "signed",
                opacity=s.opacity,
                ncols=1,
                side_maps=view.cams.train[p : p + 1] if s.show_gradcam else None,
                side_label=view.cams.label,
                tile_px=DETAIL_TILE_PX,
            )
        )
        self.info.value = self._table(view)

    def _table(self, view: View) -> str:
        e, p = view.explanation, view.rank
        index = int(e.train_indices[p])
        rows = {
            "rank": str(p + 1),
            "training index": str(index),
            "label": label_text(as_label(e.train_labels[p]), view.class_names),
            "score": f"{float(e.scores[p]):.4f}",
        }
        info = getattr(self.train_set, "item_info", None)
        if callable(info):
            rows.update({str(k): str(v) for k, v in info(index).items()})
        cells = "".join(
            f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
            for k, v in rows.items()
        )
        return f"<table class='tfa-meta'>{cells}</table>"
