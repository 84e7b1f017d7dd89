"""One-line messages for the user: errors shown next to the control that caused them, and status."""

from __future__ import annotations

import html
import logging

import ipywidgets as W

from tfa_widgets.core.errors import TFAError

log = logging.getLogger("tfa_widgets.explorer")


def error_text(exc: BaseException) -> str:
    """Return one line naming the problem: a TFAError's message, else the error's first line.

    The traceback of an unexpected error goes to the ``tfa_widgets.explorer`` logger, not to the
    user.
    """
    if isinstance(exc, TFAError):
        return str(exc)
    log.error("explorer action failed", exc_info=exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; the previous view is still shown"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Message:
    """An HTML line that shows an error (or nothing), placed next to one group of controls."""

    def __init__(self, name: str, max_width: str | None = None) -> None:
        self.widget = W.HTML(layout=W.Layout(margin="0 0 0 4px", max_width=max_width))
        self.widget.add_class("tfa-error")
        self.widget.add_class(name)

    @property
    def text(self) -> str:
        """The message shown (HTML), empty when there is none."""
        return self.widget.value

    def show(self, exc: BaseException | None) -> None:
        """Show ``exc`` as one line, or clear the line when ``exc`` is None."""
        self.widget.value = (
            ""
            if exc is None
            else f"<span class='tfa-error-box'>⚠ {html.escape(error_text(exc))}</span>"
        )
