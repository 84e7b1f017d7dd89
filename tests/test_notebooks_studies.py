"""The two worked studies run end to end, and their printed findings hold."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def _run(name: str) -> tuple[nbformat.NotebookNode, str]:
    """Execute a notebook in a fresh python3 kernel; return it and all its stdout text."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name} must be committed without outputs"
    )
    # The kernel inherits TFA_CACHE_DIR from conftest, so it reuses the demo trained for the run.
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    streams = [
        out
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
        if out.output_type == "stream"
    ]
    stderr = "".join(out.get("text", "") for out in streams if out.get("name") == "stderr")
    # A notebook shows stderr as a red box: no dependency's notice may reach the reader.
    assert "Warning" not in stderr, f"{name} prints to stderr: {stderr[:2000]}"
    return nb, "".join(out.get("text", "") for out in streams)


def _figures(nb: nbformat.NotebookNode) -> int:
    return sum(
        "application/vnd.plotly.v1+json" in out.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
    )


def test_shortcut_detection_notebook(demo):
    nb, text = _run("shortcut_detection.ipynb")
    assert _figures(nb) >= 6
    found = re.search(r"(\d+) of (\d+) proponents carry the planted patch", text)
    assert found and int(found.group(1)) >= 1, text
    ratio = re.search(r"TFA maps: mass on the patch / area share = ([\d.]+)", text)
    assert ratio and float(ratio.group(1)) > 1.0, text


def test_harmful_examples_notebook(demo):
    nb, text = _run("harmful_examples.ipynb")
    assert _figures(nb) >= 5
    found = re.search(r"hold ([\d.]+) of the (\d+) harmful training images on average", text)
    assert found and float(found.group(1)) >= 1.0, text
