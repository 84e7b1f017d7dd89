"""The docs build's notebook handling: what makes a notebook run again, and what a page shows.

Skipped without the ``docs`` extra (``pip install -e ".[docs]"``), which ``make docs`` installs.
"""

from __future__ import annotations

import html
import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("mkdocs")

HOOK = Path(__file__).resolve().parent.parent / "docs" / "hooks" / "build.py"


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location("tfa_docs_build", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_docstring_edits_do_not_make_the_notebooks_run_again(hook):
    code = 'def f(x):\n    """Return x."""\n    return x\n'
    reworded = 'def f(x):\n    """Return ``x``.\n\n    More.\n    """\n    return x\n'
    changed = 'def f(x):\n    """Return x."""\n    return x + 1\n'
    assert hook._without_docstrings(code) == hook._without_docstrings(reworded)
    assert hook._without_docstrings(code) != hook._without_docstrings(changed)


def test_a_page_shows_plotly_figures_as_divs_and_leaves_out_stderr(hook, tmp_path):
    figure = {"data": [{"type": "bar", "y": [1, 2]}], "layout": {"title": {"text": "a < b"}}}
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('kept')")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="kept\n"),
        nbformat.v4.new_output("stream", name="stderr", text="progress 100%\n"),
        nbformat.v4.new_output("display_data", data={hook.PLOTLY_MIME: figure}),
    ]
    nb.cells = [cell]
    executed = tmp_path / "executed" / "study.ipynb"
    executed.parent.mkdir()
    nbformat.write(nb, executed)

    page = hook._rendered(executed)

    assert page == tmp_path / "studies" / "study.ipynb"
    outputs = nbformat.read(page, as_version=4).cells[0].outputs
    assert [o.get("name") for o in outputs] == ["stdout", None]
    div = outputs[1]["data"]["text/html"]
    assert list(outputs[1]["data"]) == ["text/html"]
    assert div.startswith('<div class="tfa-plotly" data-figure="') and "<" not in div[30:-8]
    spec = div.split('data-figure="', 1)[1].rsplit('"', 1)[0]
    assert json.loads(html.unescape(spec)) == figure
