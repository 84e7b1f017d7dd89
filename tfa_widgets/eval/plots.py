"""Plotly figures of evaluation summaries: perturbation curves and bar charts with error bars."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tfa_widgets.eval.summary import Summary, direction


def _error(s: Summary) -> float:
    return 0.0 if math.isnan(s.std) else s.std


def _of_scorer(method: str, scorer_label: str) -> bool:
    """Whether ``method`` (``"TFA [Grad-Cos]"``) is of ``scorer_label`` (any case)."""
    return not scorer_label or method.lower().endswith(f"[{scorer_label.lower()}]")


def curve_figure(summaries: Sequence[Summary], mode: str, scorer_label: str = "") -> go.Figure:
    """Return the relative test-loss change against p per method, ``mode`` insertion or deletion."""
    points: dict[str, list[tuple[float, Summary]]] = {}
    for s in summaries:
        match = re.fullmatch(rf"{mode}@([\d.]+)", s.measure)
        if match and s.n and _of_scorer(s.method, scorer_label):
            points.setdefault(s.method, []).append((float(match.group(1)), s))
    fig = go.Figure()
    for method, values in points.items():
        values.sort(key=lambda item: item[0])
        fig.add_trace(
            go.Scatter(
                x=[p for p, _ in values],
                y=[s.mean for _, s in values],
                error_y={"type": "data", "array": [_error(s) for _, s in values]},
                mode="lines+markers",
                name=method,
            )
        )
    better = "higher" if direction(f"{mode}@1") == "↑" else "lower"
    fig.update_layout(
        title=f"{mode.capitalize()}: one SGD step on masked proponents ({better} is better)",
        xaxis_title=f"p (% of pixels {'kept' if mode == 'insertion' else 'removed'})",
        yaxis_title="test-loss change / test loss before",
        xaxis_type="log",
        template="plotly_white",
        height=420,
    )
    return fig


def bars_figure(summaries: Sequence[Summary], measures: Sequence[str]) -> go.Figure:
    """Return one bar chart per measure (mean ± std per method), side by side."""
    measures = [m for m in measures if any(s.measure == m and s.n for s in summaries)]
    fig = make_subplots(
        rows=1,
        cols=max(len(measures), 1),
        subplot_titles=[f"{m} {direction(m)}" for m in measures],
    )
    methods = list(dict.fromkeys(s.method for s in summaries))
    for col, measure in enumerate(measures, start=1):
        chosen = {s.method: s for s in summaries if s.measure == measure and s.n}
        fig.add_trace(
            go.Bar(
                x=[m for m in methods if m in chosen],
                y=[chosen[m].mean for m in methods if m in chosen],
                error_y={
                    "type": "data",
                    "array": [_error(chosen[m]) for m in methods if m in chosen],
                },
                showlegend=False,
                marker_color="#4c78a8",
            ),
            row=1,
            col=col,
        )
    fig.update_layout(template="plotly_white", height=460, margin={"b": 160})
    fig.update_xaxes(tickangle=45)
    return fig
