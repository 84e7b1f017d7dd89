"""Updating a displayed Plotly ``FigureWidget`` in place from a freshly built figure."""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go


def make_widget(fig: go.Figure, on_click: Callable | None = None) -> go.FigureWidget:
    """Return a ``FigureWidget`` of a complete figure, with ``on_click`` bound to every trace.

    The figure is complete before it is wrapped: a widget changed between creation and display can
    render empty in Voila.
    """
    widget = go.FigureWidget(fig)
    if on_click is not None:
        for trace in widget.data:
            trace.on_click(on_click)
    return widget


def sync_figure(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Make ``widget`` show ``fig`` in one message, keeping its traces (and their click handlers).

    Both must have the same number and types of traces, which the builders in ``tfa_widgets.viz``
    guarantee for figures of one kind.
    """
    if len(widget.data) != len(fig.data) or any(
        a.type != b.type for a, b in zip(widget.data, fig.data, strict=True)
    ):
        raise ValueError("sync_figure needs figures with the same trace structure")
    with widget.batch_update():
        for target, source in zip(widget.data, fig.data, strict=True):
            target.update(source.to_plotly_json(), overwrite=True)
        widget.layout.update(fig.layout.to_plotly_json(), overwrite=True)
