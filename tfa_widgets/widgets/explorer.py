"""The Explorer: a test-image gallery linked to the TFA of its top-k training images."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ipywidgets as W
import numpy as np
import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.explanation import Explanation
from tfa_widgets.core.memory_cache import BytesLRU
from tfa_widgets.widgets.audit import TrainingData
from tfa_widgets.widgets.cache import ExplanationCache
from tfa_widgets.widgets.controls import Controls, Settings
from tfa_widgets.widgets.download import DownloadButton
from tfa_widgets.widgets.export import page_bytes, ranking_rows, table_bytes, write_view
from tfa_widgets.widgets.gallery import Gallery
from tfa_widgets.widgets.labels import has_class
from tfa_widgets.widgets.messages import Message
from tfa_widgets.widgets.panels import ProponentStrip, SelectedTestPanel, TrainingDetail
from tfa_widgets.widgets.plotly_view import PlotlyLoader
from tfa_widgets.widgets.progress import transient_output
from tfa_widgets.widgets.training import TrainingSetViews
from tfa_widgets.widgets.view import CamMaps, View

STYLE = """<style>
.tfa-error-box {background:#fdecea;color:#611a15;border:1px solid #f5c6cb;padding:2px 8px;
  border-radius:4px;font-family:sans-serif;font-size:12px;display:inline-block;white-space:normal}
.tfa-meta td {padding:1px 8px 1px 0;font-size:13px}
.tfa-caption {font-size:13px;line-height:1.3}
</style>"""
CAM_CACHE_BYTES = 64 * 2**20  # Grad-CAM at a chosen layer: 33 ImageNet maps are 6.6 MB


class Explorer:
    """Linked widgets: pick a test image, see which regions of which training images drove it.

    Display it as the last expression of a notebook cell (or with ``IPython.display.display``).

    Parameters
    ----------
    engine : TFAEngine
        An engine with a ``test_set``; every number shown comes from it.
    k : int
        Initial number of training images (the slider goes from 1 to 32).
    page_size : int
        Test thumbnails per gallery page.
    export_dir : str or Path
        Folder on the server the "Save on server" button writes to.
    progress : bool
        Show a progress bar (gone when done) while predicting the test set at start.
    background : bool, optional
        Explain the first test image in a background thread, so the page shows the gallery as
        soon as the predictions exist and the other panels fill in after (a gallery click
        meanwhile is explained next, without waiting). ``None``, the default: in a Jupyter
        kernel (a notebook, Voila), not elsewhere (a script, the tests).

    Raises
    ------
    InputError
        When the engine has no test set.

    Attributes
    ----------
    view : View or None
        What is shown now; the selected test image is ``view.test``. None only when no test
        image could be explained at start (the message under the gallery says why).
    last_update_s : float
        How long fetching the shown explanation took (0 when cached).
    """

    def __init__(
        self,
        engine,
        *,
        k: int = 8,
        page_size: int = 24,
        export_dir: str | Path = "tfa-exports",
        progress: bool = True,
        background: bool | None = None,
    ) -> None:
        if getattr(engine, "test_set", None) is None:
            raise InputError(
                "the explorer needs an engine with a test_set to pick test images from"
            )
        self.engine = engine
        self.class_names = tuple(engine.class_names)
        self.cache = ExplanationCache()
        self.export_dir = Path(export_dir)
        self.last_update_s = 0.0
        self.view: View | None = None
        self._cams = BytesLRU(CAM_CACHE_BYTES)
        # One action at a time touches the engine and the panels (the first view may be computed
        # in a background thread); a click meanwhile waits in _pending instead of blocking.
        self._busy = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending: int | torch.Tensor | None = None
        self._loading = False

        self.controls = Controls(
            list(self.class_names),
            len(engine.train_set),
            self._methods(),
            k=k,
            references=list(getattr(engine, "reference_kinds", ["gradcam"])),
        )
        self.status = W.HTML()
        self.status.add_class("tfa-status")
        self.caption = W.HTML()
        self.caption.add_class("tfa-caption")
        self.gallery_message = Message("tfa-gallery-error")
        self.export_message = Message("tfa-export-error")
        with transient_output():
            self.gallery = Gallery(
                engine,
                self.select_test,
                lambda: self.selected_index,
                page_size=page_size,
                progress=progress,
            )
        self.selected = SelectedTestPanel(self.controls.target)
        self.strip = ProponentStrip(self.select_train)
        self.detail = TrainingDetail(engine.train_set)
        self.export_note = W.HTML()
        self.export_note.add_class("tfa-export-note")
        self.export_button = W.Button(
            description="Save on server", icon="save", layout=W.Layout(width="auto")
        )
        self.export_button.on_click(lambda _: self._guarded(self.export, self.export_message))
        self.download_html = DownloadButton("view (HTML)", self._html_file)
        self.download_csv = DownloadButton("ranking (CSV)", self._csv_file)

        self.training = TrainingSetViews(
            TrainingData(engine, self._mistakes), self._methods(), self._guarded
        )

        self._wire()
        self.widget = self._layout()
        first = self.gallery.first_choice()
        if background is None:
            background = _in_kernel()
        if background:
            self._loading = True
            self.caption.value = f"<i>Explaining test image #{first}…</i>"
            threading.Thread(target=self._explain_first, args=(first,), daemon=True).start()
        else:
            self.select_test(first)

    # ----- construction helpers
    def _methods(self) -> list[str]:
        """Scorers offered: `TFAEngine.methods`, the engine's default first."""
        default = getattr(self.engine, "method", "grad_cos")
        return sorted(self.engine.methods, key=lambda m: m != default)

    def _wire(self) -> None:
        c = self.controls
        for control in c.engine_controls():
            control.observe(lambda _: self._guarded(self.refresh, c.message), names="value")
        for control in c.smoothing_controls():
            control.observe(
                lambda _: c.smooth.value and self._guarded(self.refresh, c.message), names="value"
            )
        for control in c.display_controls():
            control.observe(lambda _: self._guarded(self.redraw, c.message), names="value")
        for control in (c.layer, c.reference):  # a new map beside, from the cached explanation
            control.observe(lambda _: self._guarded(self.refresh, c.message), names="value")

    def _layout(self) -> W.Widget:
        title = W.HTML(
            STYLE + "<b style='font-size:15px'>Training feature attribution explorer</b>"
        )
        header = W.Box(
            [title, self.status],
            layout=W.Layout(flex_flow="row wrap", align_items="baseline", grid_gap="0 16px"),
        )
        gallery = W.VBox([self.gallery.widget, self.gallery_message.widget])
        gallery.layout = W.Layout(flex="0 1 auto", min_width="0", margin="0 8px 0 0")
        strip = W.VBox(
            [self.caption, self.strip.widget],
            layout=W.Layout(flex="1 1 420px", min_width="0"),
        )
        main = W.Box(
            [gallery, self.selected.widget, strip],
            layout=W.Layout(flex_flow="row wrap", align_items="flex-start", width="100%"),
        )
        export = W.Box(
            [
                W.HTML("<b>Export</b>"),
                self.download_html,
                self.download_csv,
                self.export_button,
                self.export_note,
                self.export_message.widget,
            ],
            layout=W.Layout(flex_flow="row wrap", align_items="center", grid_gap="4px 8px"),
        )
        root = W.VBox(
            [
                PlotlyLoader(),
                header,
                self.controls.widget,
                main,
                self.detail.widget,
                export,
                self.training.widget,
            ],
            layout=W.Layout(width="100%"),
        )
        root.add_class("tfa-explorer")
        return root

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @classmethod
    def demo(cls, data: str | None = None, **kwargs) -> Explorer:
        """Return an explorer on an embedded demo (trained and indexed once, then cached).

        Parameters
        ----------
        data : {"shapes", "digits"}, optional
            ``"shapes"`` (generated, the default) or ``"digits"`` (scikit-learn's digits);
            ``None`` reads ``$TFA_DEMO_DATA``, which ``tfa-widgets demo --data`` sets.
        **kwargs
            Keyword arguments of `Explorer` (``k``, ``page_size``, ...).

        Returns
        -------
        Explorer
            The explorer, ready to display.
        """
        from tfa_widgets.data.digits import load_named_demo

        with transient_output():
            engine = load_named_demo(data, progress=True).engine()
            engine.build_index()
        return cls(engine, **kwargs)

    # ----- what is selected (one owner: the view shown)
    @property
    def explanation(self) -> Explanation | None:
        """The explanation shown now."""
        return self.view.explanation if self.view is not None else None

    @property
    def test(self) -> int | torch.Tensor | None:
        """The selected test image: a test-set index or a custom image tensor."""
        return self.view.test if self.view is not None else None

    @property
    def selected_index(self) -> int | None:
        """The test-set index of the selected test image (None for a custom image)."""
        return self.explanation.test_index if self.view is not None else None

    @property
    def train_pos(self) -> int:
        """Rank (0-based) of the training image shown large."""
        return self.view.rank if self.view is not None else 0

    def settings(self) -> Settings:
        """Return the current settings of the controls.

        Returns
        -------
        Settings
            Target, k, scorer, proponents or opponents, SmoothGrad, Grad-CAM layer, channel
            reduction and the display choices.
        """
        return self.controls.settings()

    # ----- public actions
    def select_test(self, test: int | torch.Tensor) -> None:
        """Explain test image ``test`` (index into the test set, or an image tensor [C, H, W]).

        If the engine rejects it, the error is shown under the gallery and the previous image
        stays selected and shown.

        Parameters
        ----------
        test : int or torch.Tensor
            An index into the test set, or an image ``[C, H, W]`` in model space.
        """
        with self._pending_lock:
            if self._loading:  # the first view is being computed: this one comes next
                self._pending = test
                return
        self._guarded(
            lambda: self._show(self._view_for(test, self.settings())), self.gallery_message
        )

    def select_train(self, rank: int) -> None:
        """Show the training image at position ``rank`` (0-based) of the top-k large.

        Parameters
        ----------
        rank : int
            Position in the top-k; out-of-range ranks (or no view shown) are ignored.
        """
        if self.view is None or not 0 <= rank < self.view.explanation.k:
            return
        self._guarded(
            lambda: self._show(dataclasses.replace(self.view, rank=int(rank))),
            self.controls.message,
        )

    def refresh(self) -> None:
        """Fetch the explanation for the selected test image and current settings, then redraw."""
        if self.view is None:
            return
        self._show(self._view_for(self.view.test, self.settings(), self.view.rank))

    def redraw(self) -> None:
        """Redraw every panel with the current display settings (no engine call)."""
        if self.view is not None:
            self._show(dataclasses.replace(self.view, settings=self.settings()))

    def export(self, folder: str | Path | None = None) -> tuple[Path, Path]:
        """Write the view as HTML and the ranking as CSV on the server; return both paths.

        The paths are also shown in the explorer's export note.

        Parameters
        ----------
        folder : str or Path, optional
            Where to write (the explorer's ``export_dir`` when ``None``).

        Returns
        -------
        html_path, csv_path : Path
            The files written.
        """
        paths = write_view(
            folder or self.export_dir, self._stem(), self._figures(), self._rows(), self._title()
        )
        self.export_note.value = (
            "Saved on the server (the machine running this app): "
            + " and ".join(f"<code>{html.escape(str(p))}</code>" for p in paths)
        )
        return paths

    def _explain_first(self, test: int | torch.Tensor | None) -> None:
        """Show ``test``, then every test image clicked meanwhile (the latest), in this thread."""
        while test is not None:
            self._guarded(
                lambda test=test: self._show(self._view_for(test, self.settings())),
                self.gallery_message,
            )
            with self._pending_lock:
                test, self._pending = self._pending, None
                self._loading = test is not None
        if self.view is not None and self.view.settings != self.settings():
            self._guarded(self.refresh, self.controls.message)  # a control changed meanwhile

    # ----- computing a view
    def _view_for(self, test: int | torch.Tensor, s: Settings, rank: int = 0) -> View:
        """Return the view of ``test`` under settings ``s`` (the engine resolves the query once;
        its key and target key the caches)."""
        start = time.perf_counter()
        query = self.engine.query(test, s.target)
        key = (query.key, query.target, *s.engine_key)
        layer = self._checked_layer(s.layer)

        def compute(k: int) -> Explanation:
            return self.engine.explain(
                query, k=k, smooth=s.smooth, opponents=s.opponents, method=s.method, layer=layer
            )

        explanation, cached = self.cache.get(key, s.k, compute)
        self.last_update_s = 0.0 if cached else time.perf_counter() - start
        return View(
            explanation=explanation,
            settings=s,
            rank=min(rank, explanation.k - 1),
            cams=self._cams_for(explanation, key, layer, s.reference),
            class_names=self.class_names,
            key=key,
        )

    def _checked_layer(self, layer: str | None) -> str | None:
        """Return ``layer`` if the engine can compute Grad-CAM there, else ``None`` (the default
        layer), with the engine's reason shown beside the layer field, so every other control
        keeps working."""
        message = self.controls.layer_message
        if layer:
            try:
                self.engine.gradcam_layer_name(layer)
            except InputError as exc:
                message.show(exc)
                return None
        message.show(None)
        return layer or None

    def _cams_for(self, e: Explanation, key, layer: str | None, kind: str = "gradcam") -> CamMaps:
        """Return the reference maps of kind ``kind`` (Grad-CAM at ``layer``): the explanation's
        own Grad-CAM when it was computed there, else computed once for this test image and
        kept. Saliency and Integrated Gradients are shown as absolute values summed over
        channels."""
        name = self.engine.gradcam_layer_name(layer) if kind == "gradcam" else None
        if kind == "gradcam" and name == e.gradcam_layer:
            return CamMaps(e.gradcam_test, e.gradcam_train, name)
        slot = (key, kind, name)
        stored = self._cams.get(slot)
        if stored is None or stored.train.shape[0] < e.k:
            own = [self.engine.own_label_class(y) for y in e.train_labels]
            both = torch.cat([e.test_image[None], e.train_images])
            targets = [e.target, *own]
            if kind == "gradcam":
                maps = self.engine.gradcam(both, targets, layer=layer)
            else:
                maps = self.engine.reference_maps(both, targets, kind=kind)
            if maps.dim() == 4:  # per channel: how much each pixel matters, either sign
                maps = maps.abs().sum(dim=1)
            stored = CamMaps(maps[0], maps[1:], name, kind)
            self._cams[slot] = stored
        return CamMaps(stored.test, stored.train[: e.k], name, kind)

    # ----- showing a view
    def _show(self, view: View) -> None:
        """Make ``view`` the one shown and redraw every panel, each widget sending one message."""
        panels = [self.selected, self.strip, self.detail]
        widgets = [
            self.caption,
            self.gallery.figure,
            self.selected.figure,
            self.selected.probabilities,
            self.strip.figure,
            self.detail.figure,
            self.detail.info,
        ]
        previous = self.view
        redraw_gallery = previous is None or view.explanation.test_index != self.selected_index
        self.view = view
        try:
            with contextlib.ExitStack() as stack:
                for widget in widgets:
                    stack.enter_context(widget.hold_sync())
                for panel in panels:
                    panel.show(view)
                if redraw_gallery:
                    self.gallery.redraw()
                self.caption.value = f"<b>{html.escape(view.describe(), quote=False)}</b>"
        except BaseException:  # drawing failed half-way: show the previous view whole again
            self.view = previous
            if previous is not None:
                self._show(previous)
            raise
        self.training.show(view)

    def _mistakes(self, true_class: int | None) -> list[int]:
        """Return the misclassified test images (of ``true_class``, or all)."""
        g = self.gallery
        return [
            int(i)
            for i in np.flatnonzero(g.mistakes)
            if true_class is None or has_class(g.labels[i], true_class)
        ]

    def _guarded(self, action: Callable[[], object], message: Message) -> object:
        """Run ``action`` with the status showing work; report any failure on ``message``.

        Whatever happens (an error, an interrupt), the status is reset and the previous view
        stays whole, so the app keeps working.
        """
        with self._busy:
            self.status.value = "⏳ computing…"
            try:
                result = action()
            except (Exception, KeyboardInterrupt) as exc:  # the app must survive anything
                message.show(exc)
                return None
            finally:
                self.status.value = self._status_text()
        for other in (self.gallery_message, self.controls.message, self.export_message):
            other.show(None)
        return result

    def _status_text(self) -> str:
        if self.view is None:
            return ""
        how = "from cache" if self.last_update_s == 0 else f"in {self.last_update_s:.2f} s"
        return f"✓ {html.escape(self.view.describe(), quote=False)} ({how})"

    # ----- exports
    def _figures(self) -> list:
        return [
            self.selected.figure.figure,
            self.selected.probabilities.figure,
            self.strip.figure.figure,
            self.detail.figure.figure,
        ]

    def _rows(self) -> list[tuple]:
        return ranking_rows(self.explanation, self.class_names)

    def _title(self) -> str:
        return f"TFA: {self.view.describe()}"

    def _stem(self) -> str:
        e, s = self.explanation, self.view.settings
        test = f"test{e.test_index}" if e.test_index is not None else "image"
        direction = "opponents" if s.opponents else "proponents"
        return f"tfa_{test}_target{e.target}_{s.method}_{direction}_k{e.k}"

    def _html_file(self) -> tuple[str, str, bytes] | None:
        return self._guarded(
            lambda: (
                self._stem() + ".html",
                "text/html",
                page_bytes(self._figures(), self._title()),
            ),
            self.export_message,
        )

    def _csv_file(self) -> tuple[str, str, bytes] | None:
        return self._guarded(
            lambda: (self._stem() + ".csv", "text/csv", table_bytes(self._rows())),
            self.export_message,
        )


def _in_kernel() -> bool:
    """Return whether this runs in a Jupyter kernel (where a page shows the widgets)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
