"""Executes notebooks/evaluation.ipynb headlessly at its small setting (TFA_EVAL_QUICK=1)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "evaluation.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluation_notebook_runs_and_shows_table_and_plots(demo_engine, monkeypatch):
    demo_engine.build_index()  # cached on disk: the kernel's engine loads it instead of rebuilding
    monkeypatch.setenv("TFA_EVAL_QUICK", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    texts, plots = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error"
            texts.append(output.get("text", ""))
            plots += "application/vnd.plotly.v1+json" in output.get("data", {})
    printed = "\n".join(texts)
    for needle in ("insertion@5", "deletion@25", "retrain Δloss", "pointing: object", "sanity ρ"):
        assert needle in printed
    assert "TFA [grad_cos] beats" in printed
    assert plots >= 8  # 4 curves, 3 bar charts, 1 map gallery
