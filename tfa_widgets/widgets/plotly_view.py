"""A small Plotly figure widget: figure as JSON, redrawn with ``Plotly.react``, clicks sent back.

In the browser a figure wider than the place it is given is scaled down to fit (titles too, not
below 7 px), and follows a dark JupyterLab/Voila theme (transparent background; titles, labels
and ticks in the text colour the theme gives the page around the figure, redrawn when the theme's
style sheet arrives after its mark).

Plotly's own ``FigureWidget`` ships its 5 MB bundle as every widget's module. Voila evaluates one
copy per widget when the page loads, and anywidget stops delivering Python's updates to a widget
whose module is not ready within 2 s, so on a busy machine an app with several figures renders but
never updates. Here plotly.js is sent once, by one hidden :class:`PlotlyLoader`, and each
:class:`PlotlyView` has a module of a few lines that waits for it. Where the server serves
plotly.js as a file (``tfa-widgets demo|serve``), the loader has the page fetch it from there
instead: the widget state then shrinks from 5.6 MB to 0.65 MB on the demo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import resources

import anywidget
import plotly.graph_objects as go
import traitlets

PLOTLY_URL_ENV = "TFA_PLOTLY_URL"  # tfa_widgets.serving.PLOTLY_URL_ENV (not imported: Jupyter
# server's modules would load into every kernel)

_LOADER_ESM = r"""
function load(model) {
  if (window.Plotly || window.__tfaPlotlyLoading) return;
  window.__tfaPlotlyLoading = true;
  const script = document.createElement("script");
  const url = model.get("url");
  if (url) {
    // Served by the app's Voila: fetched as a file (compiled in the background) instead of
    // crossing the websocket. The bundle's UMD header sees no AMD or CommonJS on a Voila page
    // and sets window.Plotly.
    script.src = new URL(url, document.baseURI).href;
  } else {
    // A blob: script (allowed wherever anywidget's blob: modules are); the wrapper hides AMD
    // and CommonJS so the bundle sets window.Plotly.
    const wrap = ["(function (define, module, exports) {\n", "\n}).call(window);"];
    const code = wrap[0] + model.get("source") + wrap[1];
    script.src = URL.createObjectURL(new Blob([code], { type: "text/javascript" }));
  }
  document.head.appendChild(script);
}
// JupyterLab and Notebook 7 turn some keys into notebook commands before a widget sees them
// (the top-k slider ignored the arrow keys). Lumino leaves a key alone when, walking up from the
// focused element, it meets data-lm-suppress-shortcuts before an element a shortcut's selector
// matches; command-mode selectors end in ":focus", which the focused element itself matches, so
// the mark goes on every element of the controls that takes the focus (and on the controls).
function markFocused(event) {
  event.target.setAttribute("data-lm-suppress-shortcuts", "true");
}
function suppressShortcuts() {
  const controls = document.querySelectorAll(".tfa-controls");
  for (const el of controls) {
    el.setAttribute("data-lm-suppress-shortcuts", "true");
    el.addEventListener("focusin", markFocused, true); // added once, however often called
  }
  return controls.length > 0;
}
function markControls() {
  if (suppressShortcuts()) return;
  const watch = new MutationObserver(() => { if (suppressShortcuts()) watch.disconnect(); });
  watch.observe(document.body, { childList: true, subtree: true });
}
export default {
  initialize({ model }) { load(model); },
  render({ model }) { load(model); markControls(); },
};
"""

_VIEW_ESM = """
function whenPlotly() {
  return new Promise((resolve) => {
    const poll = () => (window.Plotly ? resolve(window.Plotly) : setTimeout(poll, 30));
    poll();
  });
}
// JupyterLab and Voila mark a dark theme with data-jp-theme-light="false" on <body>.
function darkTheme() {
  return document.body.dataset.jpThemeLight === "false";
}
// The colour of the text around the figure (the theme's, as the HTML titles beside it get it).
function textColour(el) {
  return getComputedStyle(el).color || "#e0e0e0";
}
// The figure as drawn here: scaled down (never up) to the width it is given, so it reflows to
// a narrow notebook column instead of being cut off, and in the colours of the page's theme
// (``fg``: the text colour of a dark theme, null in a light one).
function fitted(spec, width, fg) {
  const layout = JSON.parse(JSON.stringify(spec.layout || {}));
  const scale = layout.width && width > 0 && width < layout.width ? width / layout.width : 1;
  if (scale < 1) {
    layout.width = Math.floor(layout.width * scale);
    if (layout.height) layout.height = Math.floor(layout.height * scale);
    for (const side of ["l", "r", "t", "b"]) {
      if (layout.margin && layout.margin[side]) layout.margin[side] *= scale;
    }
    for (const a of layout.annotations || []) {
      const size = Math.max(7, ((a.font || {}).size || 10) * scale);
      a.font = Object.assign({}, a.font, { size });
    }
  }
  if (fg) {
    layout.paper_bgcolor = "rgba(0,0,0,0)";
    layout.plot_bgcolor = "rgba(0,0,0,0)";
    layout.font = Object.assign({}, layout.font, { color: fg });
    if (layout.title) layout.title.font = Object.assign({}, layout.title.font, { color: fg });
    for (const a of layout.annotations || []) {
      const plain = !a.font || !a.font.color || a.font.color === "#222";
      if (plain) a.font = Object.assign({}, a.font, { color: fg });
    }
    for (const axis of ["xaxis", "yaxis"]) {
      const own = layout[axis];
      if (own) layout[axis] = Object.assign({ color: fg, gridcolor: "#555" }, own);
    }
  }
  return layout;
}
// The width this figure may take: its container's, less its siblings' in a flex row. (The
// figure's own element is as wide as what it draws, so measuring it would never shrink.)
function available(el) {
  const parent = el.parentElement;
  if (!parent) return 0;
  const style = getComputedStyle(parent);
  let width = parent.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  if (style.display.includes("flex") && !style.flexDirection.startsWith("column")) {
    for (const sibling of parent.children) if (sibling !== el) width -= sibling.offsetWidth;
  }
  return width;
}
export default {
  async render({ model, el }) {
    const div = document.createElement("div");
    el.appendChild(div);
    el.style.maxWidth = "100%";
    const Plotly = await whenPlotly();
    const config = { displayModeBar: false, responsive: false, doubleClick: false };
    let drawnWidth = -1;
    let drawnTheme = null;
    let listening = false;
    const theme = () => (darkTheme() ? textColour(el) : null);
    const draw = async () => {
      const spec = model.get("spec");
      drawnWidth = available(el);
      drawnTheme = theme();
      await Plotly.react(div, spec.data, fitted(spec, drawnWidth, drawnTheme), config);
      if (!listening) {
        listening = true;
        div.on("plotly_click", (event) => {
          const p = event.points && event.points[0];
          if (p) {
            const data = p.customdata === undefined ? null : p.customdata;
            model.send({ event: "click", x: p.x, y: p.y, curve: p.curveNumber, customdata: data });
          }
        });
      }
    };
    // A figure in a hidden place (a tab not selected: no offset parent) is drawn once it is
    // shown (its container then gets a size, which the resize observer below sees), so a page
    // draws only what it shows.
    const drawIfShown = () => (el.offsetParent !== null ? draw() : (drawnWidth = -1));
    await drawIfShown();
    model.on("change:spec", drawIfShown);
    const resized = new ResizeObserver(() => { if (available(el) !== drawnWidth) drawIfShown(); });
    if (el.parentElement) resized.observe(el.parentElement);
    // A theme switch marks <body> and loads the theme's CSS, maybe only after the mark: redraw
    // whenever the theme or its text colour is no longer the one drawn, also once a style sheet
    // added to the page has loaded.
    const restyle = () => { if (theme() !== drawnTheme) drawIfShown(); };
    const themed = new MutationObserver((records) => {
      for (const record of records) {
        for (const node of record.addedNodes) {
          if (node.tagName === "LINK") node.addEventListener("load", restyle, { once: true });
        }
      }
      restyle();
    });
    themed.observe(document.body, {
      attributes: true,
      attributeFilter: ["data-jp-theme-light", "data-jp-theme-name", "style", "class"],
    });
    themed.observe(document.head, { childList: true });
    return () => {
      model.off("change:spec", drawIfShown);
      resized.disconnect();
      themed.disconnect();
      Plotly.purge(div);
    };
  },
};
"""


class PlotlyLoader(anywidget.AnyWidget):
    """Invisible widget that loads plotly.js into the page once, for every :class:`PlotlyView`.

    Where the server says where the page finds plotly.js (``$TFA_PLOTLY_URL``, set by
    ``tfa-widgets demo|serve``: see :mod:`tfa_widgets.serving`), the page loads it from there;
    elsewhere (JupyterLab, Notebook 7, another Voila) the bundle is sent with the widget.

    It also marks the explorer's controls (``.tfa-controls``), and each of their elements when it
    takes the focus, so that JupyterLab and Notebook 7 leave their keys to them (the arrow keys of
    the top-k slider).
    """

    _esm = traitlets.Unicode(_LOADER_ESM).tag(sync=True)
    source = traitlets.Unicode().tag(sync=True)
    url = traitlets.Unicode().tag(sync=True)

    def __init__(self, **kwargs) -> None:
        url = os.environ.get(PLOTLY_URL_ENV, "")
        source = "" if url else _plotly_source()
        super().__init__(source=source, url=url, **kwargs)
        self.layout.display = "none"


class PlotlyView(anywidget.AnyWidget):
    """Shows a Plotly figure; ``figure`` holds the go.Figure shown, ``on_click`` reports clicks.

    A :class:`PlotlyLoader` must be displayed on the same page (the explorer includes one).
    """

    _esm = traitlets.Unicode(_VIEW_ESM).tag(sync=True)
    spec = traitlets.Dict().tag(sync=True)

    def __init__(self, figure: go.Figure, **kwargs) -> None:
        super().__init__(**kwargs)
        self._figure = figure
        self._click_handlers: list[Callable[[float, float], None]] = []
        self._pick_handlers: list[Callable[[object], None]] = []
        self.spec = _to_spec(figure)
        self.on_msg(self._on_frontend_msg)

    @property
    def figure(self) -> go.Figure:
        """The figure currently shown."""
        return self._figure

    def show(self, figure: go.Figure) -> None:
        """Replace the figure shown (the browser redraws only what changed)."""
        self._figure = figure
        self.spec = _to_spec(figure)

    def on_click(self, handler: Callable[[float, float], None]) -> None:
        """Call ``handler(x, y)`` with the data coordinates of every click on the figure."""
        self._click_handlers.append(handler)

    def on_pick(self, handler: Callable[[object], None]) -> None:
        """Call ``handler(customdata)`` with the data of every clicked point that carries some."""
        self._pick_handlers.append(handler)

    def click(self, x: float, y: float, customdata: object = None) -> None:
        """Act as if the user clicked at data coordinates ``(x, y)`` (on a point with data)."""
        for handler in self._click_handlers:
            handler(float(x), float(y))
        if customdata is not None:
            for pick in self._pick_handlers:
                pick(customdata)

    def _on_frontend_msg(self, _widget, content, _buffers) -> None:
        if isinstance(content, dict) and content.get("event") == "click":
            self.click(content["x"], content["y"], content.get("customdata"))


def _plotly_source() -> str:
    return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_text()


def _to_spec(figure: go.Figure) -> dict:
    """Return ``figure`` as plain JSON data (NumPy arrays become base64 typed arrays)."""
    return json.loads(figure.to_json())
