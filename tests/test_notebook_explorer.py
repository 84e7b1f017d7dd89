"""The Voila app notebook runs headlessly and displays the explorer widget without errors."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explorer.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.mark.notebook
@pytest.mark.slow
def test_explorer_notebook_executes_and_shows_the_explorer(demo_engine, tmp_path):
    demo_engine.build_index()  # the kernel loads model and index from the shared cache
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Traceback" not in stderr
    views = [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
    assert views, "the last cell must display the Explorer widget"
    shown = "".join(o.get("data", {}).get("text/plain", "") for o in views)
    assert "VBox" in shown
