"""Turning figures and rankings into files a user can keep: one HTML page, one CSV table."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence

import plotly.graph_objects as go


def figures_to_html(
    figures: Sequence[go.Figure], *, title: str = "tfa-widgets view", offline: bool = True
) -> str:
    """Return one standalone HTML page holding ``figures`` one after another.

    Parameters
    ----------
    figures : sequence of plotly.graph_objects.Figure
        The figures, in page order.
    title : str
        Page title and heading.
    offline : bool
        Embed plotly.js (about 4 MB) so the page opens without internet; otherwise the page
        loads plotly.js from its CDN.

    Returns
    -------
    str
        The HTML page.
    """
    parts = []
    for i, fig in enumerate(figures):
        include = ("cdn" if not offline else True) if i == 0 else False
        parts.append(fig.to_html(full_html=False, include_plotlyjs=include))
    body = "\n".join(f'<div class="tfa-figure">{p}</div>' for p in parts)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n"
    )


def rows_to_csv(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Return ``rows`` under ``header`` as CSV text.

    Parameters
    ----------
    header : sequence of str
        Column names.
    rows : sequence of sequences
        One sequence of values per row.

    Returns
    -------
    str
        The CSV text, one line per row.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
