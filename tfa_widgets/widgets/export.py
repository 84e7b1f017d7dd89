"""Exporting the explorer's current view: figures as one HTML page, the ranking as CSV."""

from __future__ import annotations

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
    """Write ``<stem>.html`` (offline page of the figures) and ``<stem>.csv``; return both paths.

    The paths are absolute: they are on the machine running the kernel, which may not be the
    user's.
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    html_path, csv_path = folder / f"{stem}.html", folder / f"{stem}.csv"
    html_path.write_bytes(page_bytes(figures, title))
    csv_path.write_bytes(table_bytes(rows))
    return html_path, csv_path


def page_bytes(figures: Sequence[go.Figure], title: str) -> bytes:
    """Return the self-contained HTML page of ``figures`` (plotly.js embedded: opens offline)."""
    return figures_to_html(figures, title=title, offline=True).encode("utf-8")


def table_bytes(rows: Sequence[Sequence]) -> bytes:
    """Return the ranking ``rows`` as CSV bytes."""
    return rows_to_csv(CSV_HEADER, rows).encode("utf-8")
