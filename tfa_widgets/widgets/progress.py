"""Progress shown while slow work runs, then removed, so no finished bar stays on the page."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ipywidgets as W


@contextlib.contextmanager
def transient_output() -> Iterator[None]:
    """Show what the body displays (progress bars) in a notebook or Voila, and remove it at the end.

    Outside a kernel the body runs as is. An error raised by the body is re-raised after the
    output is removed (an ``Output`` widget would otherwise swallow it into the removed area).
    """
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        yield
        return
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        yield
        return
    out = W.Output()
    # Replaced by an empty output at the end: a closed widget left in the cell's outputs would
    # show "Error displaying widget: model not found" in Voila.
    handle = display(out, display_id=True)
    error: BaseException | None = None
    with out:
        try:
            yield
        except BaseException as exc:  # re-raised below, outside the widget
            error = exc
    handle.update(HTML(""))
    out.close()
    if error is not None:
        raise error


@contextlib.contextmanager
def progress_in(out: W.Output) -> Iterator[None]:
    """Show the body's progress bars in ``out`` (a widget on the page) and clear it at the end.

    Work started by a click has no cell to print to, so its progress needs a place of its own.
    An error raised by the body is re-raised (an ``Output`` widget would swallow it).
    """
    error: BaseException | None = None
    with out:
        try:
            yield
        except BaseException as exc:  # re-raised below, outside the widget
            error = exc
    out.clear_output()
    out.outputs = ()  # also where no front end applies the clearing (and syncs it back)
    if error is not None:
        raise error
