"""Exporting the explorer's current view: figures as one HTML page, the ranking as CSV."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from tfa_widgets.viz import figures_to_html, rows_to_csv
from tfa_widgets.widgets.labels import as_label, label_text

CSV_HEADER = ("rank", "train_index", "label", "label_name", "score")


def ranking_rows(explanation, class_names: Sequence[str]) -> list[tuple]:
    """Return one CSV row ``(rank, train index, label, label name, score)`` per training image."""
    rows = []
    for rank, (idx, score, y) in enumerate(
        zip(
            explanation.train_indices.tolist(),
            explanation.scores.tolist(),
            explanation.train_labels,
            strict=True,
        ),
        start=1,
    ):
        label = as_label(y)
        label_value = "+".join(map(str, label)) if isinstance(label, tuple) else label
        rows.append((rank, int(idx), label_value, label_text(label, class_names), float(score)))
    return rows


def write_view(
    folder: str | Path,
    stem: str,
    figures: Sequence[go.Figure],
    rows: Sequence[Sequence],
    title: str,
) -> tuple[Path, Path]:
    """Write ``<stem>.html`` (offline page of the figures) and ``<stem>.csv``; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html_path, csv_path = folder / f"{stem}.html", folder / f"{stem}.csv"
    html_path.write_text(figures_to_html(figures, title=title, offline=True), encoding="utf-8")
    csv_path.write_text(rows_to_csv(CSV_HEADER, rows), encoding="utf-8")
    return html_path, csv_path


def download_links(
    stem: str, figures: Sequence[go.Figure], rows: Sequence[Sequence], title: str
) -> str:
    """Return HTML with data-URI download links (the HTML page loads plotly.js online)."""
    page = figures_to_html(figures, title=title, offline=False).encode("utf-8")
    table = rows_to_csv(CSV_HEADER, rows).encode("utf-8")

    def link(data: bytes, mime: str, name: str) -> str:
        uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return f'<a download="{html.escape(name)}" href="{uri}">{html.escape(name)}</a>'

    return (
        f"Download: {link(page, 'text/html', stem + '.html')} · "
        f"{link(table, 'text/csv', stem + '.csv')}"
    )
