"""MkDocs hooks of the tfa-widgets site: fail on incomplete docstrings, render the studies.

- ``on_config``: the build fails when a public name lacks a complete NumPy-style docstring, or
  when a public name is missing from the API reference pages (``docs/api/*.md``).
- ``on_files``: the worked-study notebooks of ``notebooks/`` are executed headlessly on the
  embedded demo (the evaluation notebook at its quick setting, ``TFA_EVAL_QUICK=1``, unless the
  environment says otherwise), and the executed copies are handed to mkdocs-jupyter. Executed
  copies are kept under ``build/docs-notebooks`` keyed by the notebook and the package's code
  (docstrings aside), so a rebuild with no code changed does not run them again. Plotly outputs
  become a ``<div>`` drawn by ``javascripts/plotly-figures.js`` with the plotly.js shipped in the
  plotly package: the site loads nothing from outside.
"""

from __future__ import annotations

import ast
import hashlib
import html
import json
import logging
import os
import sys
import time
from pathlib import Path

import nbformat
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))

import public_api  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
STUDIES = ("shortcut_detection.ipynb", "harmful_examples.ipynb", "evaluation.ipynb")
EXECUTED = ROOT / "build" / "docs-notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
log = logging.getLogger("mkdocs.hooks.tfa")


def on_config(config):
    """Fail the build on a public name without a complete docstring or without a reference page."""
    problems = [str(p) for p in public_api.problems()]
    problems += [
        f"{name}: not in the API reference (docs/api/*.md)"
        for name in public_api.unreferenced(ROOT / "docs" / "api")
    ]
    if problems:
        raise PluginError("incomplete public API docs:\n  " + "\n  ".join(problems))
    return config


@event_priority(100)  # before mkdocs-jupyter wraps the notebooks
def on_files(files: Files, config) -> Files:
    """Add the executed study notebooks and plotly.js to the site's files."""
    os.environ.setdefault("TFA_EVAL_QUICK", "1")
    for name in STUDIES:
        page = _rendered(_executed(NOTEBOOKS / name))  # <folder>/studies/<name>
        src_dir = str(page.parents[1])
        files.append(
            File(f"studies/{name}", src_dir, config["site_dir"], config["use_directory_urls"])
        )
    import plotly

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    files.append(File.generated(config, "javascripts/plotly.min.js", abs_src_path=str(plotly_js)))
    return files


def _executed(source: Path) -> Path:
    """Return the executed copy of a notebook, running it unless one for this code exists."""
    key = hashlib.sha256(source.read_bytes() + _sources_digest()).hexdigest()[:16]
    target = EXECUTED / key / "executed" / source.name
    if target.exists():
        return target
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(source, as_version=4)
    start = time.perf_counter()
    try:
        NotebookClient(
            nb,
            timeout=3600,  # per cell; the first trains the demo when it is not cached
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
    except CellExecutionError as error:
        raise PluginError(
            f"notebook {source.name} failed while building the docs:\n{error}"
        ) from error
    log.info("executed %s in %.0f s", source.name, time.perf_counter() - start)
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def _rendered(executed: Path) -> Path:
    """Return the page version of an executed notebook: Plotly as divs, no stderr.

    Stderr holds progress bars and library deprecation warnings, noise on a page; an error in a
    cell has already failed the build.
    """
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        outputs = [o for o in cell.get("outputs", []) if o.get("name") != "stderr"]
        for output in outputs:
            if PLOTLY_MIME in output.get("data", {}):
                output["data"] = {"text/html": _plotly_div(output["data"][PLOTLY_MIME])}
        if cell.cell_type == "code":
            cell.outputs = outputs
    target = executed.parents[1] / "studies" / executed.name
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def _plotly_div(figure: dict) -> str:
    spec = html.escape(json.dumps(figure, separators=(",", ":")), quote=True)
    return f'<div class="tfa-plotly" data-figure="{spec}"></div>'


def _sources_digest() -> bytes:
    """Digest of the package's code without its docstrings, and of the evaluation setting.

    Docstring edits change no output, so they do not make the notebooks run again.
    """
    digest = hashlib.sha256(os.environ.get("TFA_EVAL_QUICK", "").encode())
    for path in sorted((ROOT / "tfa_widgets").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(_without_docstrings(path.read_text()).encode())
    return digest.digest()


def _without_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)
