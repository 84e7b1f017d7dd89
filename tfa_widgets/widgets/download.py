"""A button that downloads a file made in Python to the user's browser (not to the server)."""

from __future__ import annotations

from collections.abc import Callable

import anywidget
import traitlets

_ESM = r"""
export default {
  render({ model, el }) {
    const button = document.createElement("button");
    button.className = "jupyter-button widget-button tfa-download-button";
    button.textContent = "⤓ " + model.get("description");
    button.title = "Download to this computer";
    button.addEventListener("click", () => model.send({ event: "download" }));
    const onFile = (msg, buffers) => {
      if (!msg || msg.event !== "file" || !buffers.length) return;
      const blob = new Blob([buffers[0]], { type: msg.mime });
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = msg.name;
      document.body.appendChild(a);
      a.click();
      setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 10000);
    };
    model.on("msg:custom", onFile);
    model.on("change:description", () => { button.textContent = "⤓ " + model.get("description"); });
    el.appendChild(button);
    return () => model.off("msg:custom", onFile);
  },
};
"""


class DownloadButton(anywidget.AnyWidget):
    """A button; a click calls ``make()`` for ``(file name, MIME type, bytes)`` and downloads it.

    The file is made when clicked (so it shows the current view) and sent to the browser,
    which saves it like any download.
    """

    _esm = traitlets.Unicode(_ESM).tag(sync=True)
    description = traitlets.Unicode("Download").tag(sync=True)

    def __init__(
        self, description: str, make: Callable[[], tuple[str, str, bytes]], **kwargs
    ) -> None:
        super().__init__(description=description, **kwargs)
        self.make = make
        self.on_msg(self._on_frontend_msg)

    def download(self) -> tuple[str, str, bytes] | None:
        """Make the file and send it to the browser; return what was sent (None if nothing)."""
        made = self.make()
        if made is None:  # the maker reported its own error
            return None
        name, mime, data = made
        self.send({"event": "file", "name": name, "mime": mime}, buffers=[data])
        return made

    def _on_frontend_msg(self, _widget, content, _buffers) -> None:
        if isinstance(content, dict) and content.get("event") == "download":
            self.download()
