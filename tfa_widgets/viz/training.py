"""Figures over the whole training set: score histograms by class and 2-D maps of the index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from tfa_widgets.viz.scales import SIGNED_COLORSCALE, as_numpy

CLASS_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def class_colour(cls: int) -> str:
    """Return the colour of class ``cls`` (ten colours, repeated)."""
    return CLASS_COLOURS[int(cls) % len(CLASS_COLOURS)]


def score_histogram(
    scores,
    labels: Sequence[int],
    class_names: Sequence[str],
    *,
    cut: float,
    k: int,
    opponents: bool = False,
    bins: int = 60,
    width: int = 560,
    height: int = 300,
) -> go.Figure:
    """Return the histogram of every training image's score, stacked by class, with the top-k cut.

    Counted here (one bar per bin and class), so the figure's size does not grow with the
    training set. ``cut`` is the k-th score (the last one shown); the title says how far it stands
    from the bulk, in standard deviations, so a user sees whether the top-k stand out or tie.
    """
    values = as_numpy(scores).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if values.shape != labels.shape:
        raise ValueError(f"got {values.size} scores but {labels.size} labels")
    edges = np.histogram_bin_edges(values, bins=bins)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    traces = [
        go.Bar(
            x=centres,
            y=np.histogram(values[labels == cls], bins=edges)[0],
            width=widths,
            name=f"{class_names[cls]} ({cls})" if 0 <= cls < len(class_names) else str(cls),
            marker=dict(color=class_colour(cls), line=dict(width=0)),
            hovertemplate="score %{x:.3f}: %{y} images<extra>%{fullData.name}</extra>",
        )
        for cls in np.unique(labels)
    ]
    spread = float(values.std()) or 1.0
    z = (cut - float(values.mean())) / spread
    side = "below" if opponents else "above"
    title = f"Scores of all {values.size} training images: the top-{k} cut is {abs(z):.1f} σ {side}"
    layout = go.Layout(
        width=width,
        height=height,
        barmode="stack",
        bargap=0,
        margin=dict(l=40, r=10, t=36, b=36),
        title=dict(text=title, x=0.01, font=dict(size=13)),
        xaxis=dict(title="score"),
        yaxis=dict(title="training images", type="log"),
        shapes=[
            dict(type="line", x0=cut, x1=cut, yref="paper", y0=0, y1=1, line=dict(dash="dash"))
        ],
        annotations=[
            dict(x=cut, y=1, yref="paper", text=f"top-{k} cut", showarrow=False, yanchor="bottom")
        ],
        legend=dict(font=dict(size=10)),
        plot_bgcolor="white",
    )
    return go.Figure(data=traces, layout=layout)


def embedding_scatter(
    xy,
    labels: Sequence[int],
    class_names: Sequence[str],
    *,
    scores=None,
    title: str = "",
    highlight: Sequence[int] = (),
    width: int = 560,
    height: int = 420,
) -> go.Figure:
    """Return a 2-D map of the training set: one point per image, coloured by class or by score.

    One trace per class (its name in the legend and the hover), then one trace outlining the
    ``highlight`` points (e.g. the top-k). ``scores`` (one per point) colours every point on one
    diverging scale instead of by class. Each point's ``customdata`` is its training index, for
    clicks. Arrays travel as binary, so 50,000 points stay a few hundred kilobytes.
    """
    xy = as_numpy(xy)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != labels.size:
        raise ValueError(f"expected xy [{labels.size}, 2], got {list(xy.shape)}")
    values = None if scores is None else as_numpy(scores).reshape(-1)
    bound = 1.0 if values is None else (float(np.abs(values).max(initial=0.0)) or 1.0)
    traces = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        if values is None:
            marker = dict(size=4, color=class_colour(cls))
            hover = "#%{customdata} " + name + "<extra></extra>"
        else:
            marker = dict(
                size=4,
                color=values[members],
                colorscale=SIGNED_COLORSCALE,
                cmin=-bound,
                cmax=bound,
                showscale=not traces,
                colorbar=dict(title=dict(text="score", side="right"), thickness=12),
            )
            hover = "#%{customdata} " + name + "<br>score %{marker.color:.3f}<extra></extra>"
        traces.append(
            go.Scattergl(
                x=xy[members, 0],
                y=xy[members, 1],
                mode="markers",
                marker=marker,
                customdata=members,
                hovertemplate=hover,
                name=f"{name} ({cls})",
            )
        )
    chosen = np.asarray(list(highlight), dtype=np.int64)
    traces.append(
        go.Scattergl(
            x=xy[chosen, 0],
            y=xy[chosen, 1],
            mode="markers",
            customdata=chosen,
            marker=dict(size=10, color="rgba(0,0,0,0)", line=dict(color="black", width=2)),
            hovertemplate="#%{customdata} (top-k)<extra></extra>",
            name="top-k",
        )
    )
    layout = go.Layout(
        width=width,
        height=height,
        margin=dict(l=10, r=10, t=36, b=10),
        title=dict(text=title, x=0.01, font=dict(size=13)),
        xaxis=dict(visible=False),
        yaxis=dict(visible=False),
        showlegend=values is None,
        legend=dict(font=dict(size=10)),
        hovermode="closest",
        plot_bgcolor="white",
    )
    return go.Figure(data=traces, layout=layout)
