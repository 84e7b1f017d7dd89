"""``tfa-widgets``: start the explorer on the embedded demo, or serve any notebook with Voila.

``tfa-widgets demo`` trains the demo model and builds its gradient index when they are not cached
yet (with progress bars), prints the URL, then replaces itself with a Voila server on the explorer
notebook. ``tfa-widgets serve NOTEBOOK`` serves a given notebook the same way. Either way a page's
kernel ends when the page closes, and a kernel left with no page ends after ``--idle-timeout``
seconds (see :mod:`tfa_widgets.serving`). ``tfa-widgets clean-cache`` deletes the cache directory
(trained demo model, gradient indexes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import nbformat

from tfa_widgets import serving

EXPLORER_INTRO = """\
Pick a test image in the gallery (filter by true or predicted class, or show mistakes only). The
panels show its prediction, Grad-CAM for the class being explained, and the training images that
drove that prediction most (or worked against it), each with its TFA map: which regions of that
training image mattered. Click a training image to see it large with its metadata."""

EXPLORER_CODE = """import warnings

import torch

# Dependencies' deprecation notices (torch.jit.script from inside a library) are not the user's.
warnings.filterwarnings(
    "ignore", category=FutureWarning, module=r"(torch|torchvision|captum)(\\.|$)"
)
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


def voila_command(
    notebook: Path,
    host: str,
    port: int,
    idle_timeout_s: int = serving.KERNEL_IDLE_TIMEOUT_S,
    pool_size: int = 0,
    app: bool = False,
) -> list[str]:
    """Return the command line serving ``notebook`` with Voila on ``host:port``.

    ``idle_timeout_s``, ``pool_size`` and ``app`` are those of
    :func:`tfa_widgets.serving.voila_options`.
    """
    voila = Path(sys.executable).with_name("voila")
    program = [str(voila)] if voila.exists() else [shutil.which("voila") or "voila"]
    return [
        *program,
        str(notebook),
        "--no-browser",
        f"--port={port}",
        f"--Voila.ip={host}",
        *serving.voila_options(idle_timeout_s, pool_size, app),
    ]


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


def serve(command: list[str], host: str, port: int) -> NoReturn:
    """Print the URL, then replace this process with the Voila ``command`` (its kernels get
    :func:`tfa_widgets.serving.kernel_environment`)."""
    print(f"Explorer at http://{host}:{port}/  (Ctrl-C stops the server)", flush=True)
    os.environ.update(serving.kernel_environment())
    os.execvp(command[0], command)


def clean_cache() -> int:
    """Delete the cache dir (``$TFA_CACHE_DIR`` or ``~/.cache/tfa-widgets``); return 0, or 2."""
    from tfa_widgets.data import cache_dir

    path = Path(cache_dir()).resolve()
    protected = [Path.home().resolve(), Path.cwd().resolve()]
    if any(path == p or path in p.parents for p in protected):
        print(
            f"tfa-widgets: refusing to delete {path}: it holds your home or working directory;"
            " point TFA_CACHE_DIR at a directory of its own",
            file=sys.stderr,
        )
        return 2
    if not path.exists():
        print(f"No cache at {path}")
        return 0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path)
    print(f"Deleted {path} ({size / 2**20:.1f} MiB)")
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


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
        p.add_argument(
            "--idle-timeout",
            type=_non_negative,
            default=serving.KERNEL_IDLE_TIMEOUT_S,
            metavar="SECONDS",
            help="shut down a kernel left idle with no open page after this long (0: never; "
            "default %(default)s)",
        )
        p.add_argument(
            "--pool-size",
            type=_non_negative,
            default=0,
            help="kernels kept ready with the notebook already run, for a faster first page "
            "(default %(default)s)",
        )
        if name == "demo":
            p.add_argument("--no-serve", action="store_true", help="only build what is missing")
            p.add_argument(
                "--data",
                choices=("shapes", "digits"),
                default="shapes",
                help="embedded dataset: generated shapes, or scikit-learn's handwritten digits",
            )
    sub.add_parser("clean-cache", help="delete the cache (demo model, gradient indexes)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tfa-widgets`` command line; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "clean-cache":
        return clean_cache()
    if args.command == "demo":
        prepare_demo(args.data)
        notebook = find_explorer_notebook()
        serving.trust_notebook(notebook)  # our own app: no "not trusted" warning on each page
    elif args.notebook.is_file():
        notebook = args.notebook.resolve()
    else:
        print(f"tfa-widgets: no notebook at {args.notebook}", file=sys.stderr)
        return 2
    command = voila_command(
        notebook, args.host, args.port, args.idle_timeout, args.pool_size, args.command == "demo"
    )
    if args.command == "demo" and args.no_serve:
        env = " ".join(f"{k}={v}" for k, v in serving.kernel_environment().items())
        print(f"Demo ready. Serve it with: {env} {shlex.join(command)}")
        return 0
    serve(command, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
