"""``tfa-widgets``: start the explorer on the embedded demo, or serve any notebook with Voila.

``tfa-widgets demo`` trains the demo model and builds its gradient index when they are not cached
yet (with progress bars), prints the URL, then replaces itself with a Voila server on the explorer
notebook. ``tfa-widgets serve NOTEBOOK`` serves a given notebook the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import nbformat

EXPLORER_INTRO = """\
Pick a test image in the gallery (filter by true or predicted class, or show mistakes only). The
panels show its prediction, Grad-CAM for the class being explained, and the training images that
drove that prediction most (or worked against it), each with its TFA map: which regions of that
training image mattered. Click a training image to see it large with its metadata."""

EXPLORER_CODE = """import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
# One thread: the demo model is small; on a busy CPU more threads make clicks slow and erratic.
torch.set_num_threads(1)

from tfa_widgets.widgets import Explorer

Explorer.demo()"""


def explorer_notebook() -> nbformat.NotebookNode:
    """Return the explorer notebook (the Voila app), without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(EXPLORER_INTRO),
        nbformat.v4.new_code_cell(EXPLORER_CODE),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def find_explorer_notebook() -> Path:
    """Return ``notebooks/explorer.ipynb`` of a repo checkout, else a copy in the cache dir."""
    checkout = Path(__file__).resolve().parents[1] / "notebooks" / "explorer.ipynb"
    if checkout.is_file():
        return checkout
    from tfa_widgets.data import cache_dir

    copy = Path(cache_dir()) / "explorer.ipynb"
    copy.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(explorer_notebook(), copy)
    return copy


def voila_command(notebook: Path, host: str, port: int) -> list[str]:
    """Return the command line serving ``notebook`` with Voila on ``host:port``."""
    voila = Path(sys.executable).with_name("voila")
    program = [str(voila)] if voila.exists() else [shutil.which("voila") or "voila"]
    return [*program, str(notebook), "--no-browser", f"--port={port}", f"--Voila.ip={host}"]


def prepare_demo(data: str = "shapes") -> None:
    """Train (or load) a demo model and build (or load) its gradient index, with progress.

    ``data`` names the embedded dataset; it is passed on to the explorer notebook's kernel
    through ``$TFA_DEMO_DATA``.
    """
    from tfa_widgets.data.digits import DEMO_DATA_ENV, load_named_demo

    os.environ[DEMO_DATA_ENV] = data
    print("[1/2] Demo model: loading from the cache, or training it (once)...", flush=True)
    demo = load_named_demo(data, progress=True)
    print("[2/2] Gradient index: loading from the cache, or building it (once)...", flush=True)
    demo.engine().build_index()


def serve(notebook: Path, host: str, port: int) -> NoReturn:
    """Print the URL, then replace this process with Voila serving ``notebook``."""
    command = voila_command(notebook, host, port)
    print(f"Explorer at http://{host}:{port}/  (Ctrl-C stops the server)", flush=True)
    os.execvp(command[0], command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfa-widgets",
        description="Start the explorer on the embedded demo, or serve a notebook with Voila.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("demo", "build the demo (model, index) if missing, then serve the explorer with Voila"),
        ("serve", "serve a notebook with Voila"),
    ]:
        p = sub.add_parser(name, help=help_text)
        if name == "serve":
            p.add_argument("notebook", type=Path, help="the .ipynb file to serve")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on")
        p.add_argument("--port", type=int, default=8866, help="port to listen on")
        if name == "demo":
            p.add_argument("--no-serve", action="store_true", help="only build what is missing")
            p.add_argument(
                "--data",
                choices=("shapes", "digits"),
                default="shapes",
                help="embedded dataset: generated shapes, or scikit-learn's handwritten digits",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tfa-widgets`` command line; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        prepare_demo(args.data)
        notebook = find_explorer_notebook()
        if args.no_serve:
            command = " ".join(voila_command(notebook, args.host, args.port))
            print(f"Demo ready. Serve it with: {command}")
            return 0
        serve(notebook, args.host, args.port)
    if not args.notebook.is_file():
        print(f"tfa-widgets: no notebook at {args.notebook}", file=sys.stderr)
        return 2
    serve(args.notebook.resolve(), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
