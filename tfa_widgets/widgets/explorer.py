"""The Explorer: a test-image gallery linked to the TFA of its top-k training images."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import ipywidgets as W
import torch

from tfa_widgets.core.errors import InputError, TFAError
from tfa_widgets.core.explanation import Explanation
from tfa_widgets.core.maps import reduce_maps
from tfa_widgets.viz import overlay_grid, probability_bars, tile_at
from tfa_widgets.widgets.cache import ExplanationCache
from tfa_widgets.widgets.controls import Controls, Settings
from tfa_widgets.widgets.export import download_links, ranking_rows, write_view
from tfa_widgets.widgets.gallery import Gallery
from tfa_widgets.widgets.labels import as_label, label_text, own_class
from tfa_widgets.widgets.plotly_view import PlotlyLoader, PlotlyView

STYLE = """<style>
.tfa-error-box {background:#fdecea;color:#611a15;border:1px solid #f5c6cb;padding:6px 10px;
  border-radius:4px;font-family:sans-serif;font-size:13px}
.tfa-meta td {padding:1px 8px 1px 0;font-size:13px}
</style>"""


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
        Folder the export button writes to.
    progress : bool
        Show a progress bar while predicting the test set at start.

    Attributes
    ----------
    explanation : Explanation
        What is shown now. ``last_update_s`` is how long fetching it took (0 when cached).
    """

    def __init__(
        self,
        engine,
        *,
        k: int = 8,
        page_size: int = 24,
        export_dir: str | Path = "tfa-exports",
        progress: bool = True,
    ) -> None:
        if getattr(engine, "test_set", None) is None:
            raise InputError(
                "the explorer needs an engine with a test_set to pick test images from"
            )
        self.engine = engine
        self.class_names = list(engine.class_names)
        self.cache = ExplanationCache()
        self.export_dir = Path(export_dir)
        self.last_update_s = 0.0
        self.train_pos = 0
        self.explanation: Explanation | None = None

        self.controls = Controls(self.class_names, len(engine.train_set), self._methods(), k=k)
        self.gallery = Gallery(engine, self.select_test, page_size=page_size, progress=progress)
        self.status = W.HTML()
        self.error = W.HTML()
        self.caption = W.HTML()
        self.detail_info = W.HTML()
        self.export_links = W.HTML()
        self.export_button = W.Button(description="Export view", icon="download")
        self.export_button.on_click(lambda _: self._guarded(self.export))
        for widget, name in [
            (self.status, "tfa-status"),
            (self.error, "tfa-error"),
            (self.caption, "tfa-caption"),
            (self.detail_info, "tfa-meta"),
        ]:
            widget.add_class(name)

        self.test: int | torch.Tensor = self.gallery.selected
        self._explain()
        self._figures = {
            "test": PlotlyView(self._test_figure()),
            "probs": PlotlyView(self._probs_figure()),
            "topk": PlotlyView(self._topk_figure()),
            "detail": PlotlyView(self._detail_figure()),
        }
        self._figures["topk"].on_click(self.handle_topk_click)
        for name, fig in self._figures.items():
            fig.add_class(f"tfa-{name}")
        self._update_texts()
        self._wire()
        self.widget = self._layout()

    # ----- construction helpers
    def _methods(self) -> list[str]:
        """Scorers offered: `TFAEngine.methods`, the engine's default first."""
        default = getattr(self.engine, "method", "grad_cos")
        return sorted(self.engine.methods, key=lambda m: m != default)

    def _wire(self) -> None:
        c = self.controls
        for control in c.engine_controls():
            control.observe(lambda _: self._guarded(self.refresh), names="value")
        for control in c.smoothing_controls():
            control.observe(lambda _: c.smooth.value and self._guarded(self.refresh), names="value")
        for control in c.display_controls():
            control.observe(lambda _: self._guarded(self.redraw), names="value")

    def _layout(self) -> W.Widget:
        f = self._figures
        selected = W.VBox(
            [
                W.HTML("<b>Selected test image</b> (Grad-CAM of the target)"),
                f["test"],
                self.controls.target,
                f["probs"],
            ]
        )
        detail = W.VBox(
            [
                W.HTML("<b>Training image</b> (click one above)"),
                W.HBox([f["detail"], self.detail_info]),
            ]
        )
        export = W.HBox([self.export_button, self.export_links])
        return W.VBox(
            [
                PlotlyLoader(),
                W.HTML(
                    STYLE + "<h3 style='margin:4px 0'>Training feature attribution explorer</h3>"
                ),
                self.status,
                self.error,
                W.HBox([self.gallery.widget, selected]),
                self.controls.widget,
                self.caption,
                f["topk"],
                detail,
                export,
            ]
        )

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @classmethod
    def demo(cls, **kwargs) -> Explorer:
        """Return an explorer on the embedded demo (trained and indexed once, then cached)."""
        from tfa_widgets.data import load_demo

        engine = load_demo(progress=True).engine()
        engine.build_index()
        return cls(engine, **kwargs)

    # ----- public actions
    def settings(self) -> Settings:
        """Return the current settings of the controls."""
        return self.controls.settings()

    def select_test(self, test: int | torch.Tensor) -> None:
        """Explain test image ``test`` (index into the test set, or an image tensor [C, H, W]).

        If the engine rejects it, the error is shown and the previous image stays selected.
        """
        previous = (self.test, self.train_pos)

        def run() -> None:
            self.test, self.train_pos = test, 0
            try:
                self._explain()
            except Exception:
                self.test, self.train_pos = previous
                raise
            self.gallery.mark_selected(test if isinstance(test, int) else None)
            self.redraw()

        self._guarded(run)

    def select_train(self, rank: int) -> None:
        """Show the training image at position ``rank`` (0-based) of the top-k large."""
        if self.explanation is None or not 0 <= rank < self.explanation.k:
            return
        self.train_pos = int(rank)
        self._guarded(self.redraw)

    def handle_topk_click(self, x: float, y: float) -> int | None:
        """Select the training image at top-k figure coordinates ``(x, y)``; return its rank."""
        rank = tile_at(self._figures["topk"].figure, x, y)
        if rank is not None:
            self.select_train(rank)
        return rank

    def refresh(self) -> None:
        """Fetch the explanation for the current test image and settings, then redraw."""
        self._explain()
        self.train_pos = min(self.train_pos, self.explanation.k - 1)
        self.redraw()

    def redraw(self) -> None:
        """Redraw every figure from the current explanation (no engine call)."""
        f = self._figures
        f["test"].show(self._test_figure())
        f["probs"].show(self._probs_figure())
        f["topk"].show(self._topk_figure())
        f["detail"].show(self._detail_figure())
        self._update_texts()

    def export(self, folder: str | Path | None = None) -> tuple[Path, Path]:
        """Write the current view as HTML and the ranking as CSV; return both paths."""
        e = self.explanation
        figures = [
            self._test_figure(),
            self._probs_figure(),
            self._topk_figure(),
            self._detail_figure(),
        ]
        rows = ranking_rows(e, self.class_names)
        s = self.settings()
        test = f"test{e.test_index}" if e.test_index is not None else "image"
        direction = "opponents" if s.opponents else "proponents"
        stem = f"tfa_{test}_target{e.target}_{s.method}_{direction}_k{e.k}"
        title = f"TFA: {self._describe()}"
        paths = write_view(folder or self.export_dir, stem, figures, rows, title)
        self.export_links.value = (
            f"Saved <code>{html.escape(str(paths[0]))}</code> and "
            f"<code>{html.escape(str(paths[1]))}</code>. "
            + download_links(stem, figures, rows, title)
        )
        return paths

    # ----- engine
    def _resolve_target(self, target: str | int) -> int | str:
        if target == "predicted":
            if isinstance(self.test, int):
                return int(self.gallery.predicted[self.test])
            return int(torch.argmax(self.engine.predict(self.test)))
        if target == "true":
            if not isinstance(self.test, int):
                raise InputError("the true label is only known for images of the test set")
            label = self.gallery.labels[self.test]
            return "true" if isinstance(label, tuple) else int(label)
        return int(target)

    def _test_key(self) -> object:
        if isinstance(self.test, int):
            return self.test
        data = self.test.detach().cpu().contiguous().numpy().tobytes()
        return ("image", tuple(self.test.shape), hashlib.sha1(data).hexdigest())

    def _explain(self) -> None:
        s = self.settings()
        start = time.perf_counter()
        self.status.value = "⏳ computing…"
        target = self._resolve_target(s.target)
        key = (self._test_key(), target, *s.engine_key)

        def compute(k: int) -> Explanation:
            if s.layer and isinstance(target, int):  # a bad layer name fails before the slow part
                self.engine.gradcam(self._test_image(), target, layer=s.layer)
            e = self.engine.explain(
                self.test,
                k=k,
                target=target,
                smooth=s.smooth,
                opponents=s.opponents,
                method=s.method,
            )
            return self._with_layer(e, s.layer) if s.layer else e

        try:
            self.explanation, cached = self.cache.get(key, s.k, compute)
        except Exception:
            self.status.value = ""
            raise
        self.last_update_s = 0.0 if cached else time.perf_counter() - start
        how = "from cache" if cached else f"in {self.last_update_s:.2f} s"
        self.status.value = f"✓ {html.escape(self._describe(), quote=False)} ({how})"

    def _test_image(self) -> torch.Tensor:
        return self.engine.test_set[self.test][0] if isinstance(self.test, int) else self.test

    def _with_layer(self, e: Explanation, layer: str) -> Explanation:
        own = [own_class(as_label(y)) or 0 for y in e.train_labels]
        return dataclasses.replace(
            e,
            gradcam_test=self.engine.gradcam(e.test_image, e.target, layer=layer),
            gradcam_train=self.engine.gradcam(e.train_images, own, layer=layer),
        )

    def _guarded(self, action: Callable[[], object]) -> object:
        """Run ``action``; show an error in the app instead of raising, so the app keeps working."""
        try:
            result = action()
        except Exception as exc:  # the app must survive anything the engine raises
            self.show_error(exc)
            return None
        self.error.value = ""
        return result

    def show_error(self, exc: BaseException) -> None:
        """Show ``exc`` as a readable message (the traceback folded away for non-TFA errors)."""
        kind = "Invalid input" if isinstance(exc, TFAError) else type(exc).__name__
        details = ""
        if not isinstance(exc, TFAError):
            tb = html.escape("".join(traceback.format_exception(exc)))
            details = f"<details><summary>details</summary><pre>{tb}</pre></details>"
        self.error.value = (
            f"<div class='tfa-error-box'><b>{html.escape(kind)}:</b> "
            f"{html.escape(str(exc))}{details}</div>"
        )

    # ----- figures and texts
    def _name(self, cls: int) -> str:
        return label_text(cls, self.class_names)

    def _describe(self) -> str:
        e = self.explanation
        test = f"test #{e.test_index}" if e.test_index is not None else "custom image"
        direction = "opponents" if e.opponents else "proponents"
        smooth = f", SmoothGrad n={e.smooth.n} σ={e.smooth.sigma:g}" if e.smooth else ""
        return (
            f"{test}, target '{self._name(e.target)}': top {e.k} {direction} by "
            f"{e.method.replace('_', '-')}{smooth}"
        )

    def _maps(self) -> torch.Tensor:
        e, s = self.explanation, self.settings()
        inputs = e.train_images if s.times_input else None
        return reduce_maps(e.tfa_maps_raw, s.reduction, inputs=inputs)

    def _test_figure(self):
        e = self.explanation
        true = (
            label_text(as_label(e.test_label), self.class_names)
            if e.test_label is not None
            else "?"
        )
        title = (
            f"true {true} · predicted {self._name(e.predicted)}<br>target {self._name(e.target)}"
        )
        return overlay_grid(
            e.test_display[None],
            e.gradcam_test[None],
            [title],
            signed=False,
            opacity=self.settings().opacity,
            ncols=1,
            tile_px=200,
            map_label="Grad-CAM",
        )

    def _probs_figure(self):
        e = self.explanation
        return probability_bars(e.probabilities, self.class_names, highlight=e.target)

    def _train_titles(self) -> list[str]:
        e = self.explanation
        return [
            f"{r}. #{int(i)} {label_text(as_label(y), self.class_names)}<br>score {float(v):.3f}"
            for r, (i, v, y) in enumerate(
                zip(e.train_indices, e.scores, e.train_labels, strict=True), start=1
            )
        ]

    def _topk_figure(self):
        e, s = self.explanation, self.settings()
        direction = "opponents" if e.opponents else "proponents"
        return overlay_grid(
            e.train_display,
            self._maps(),
            self._train_titles(),
            signed=s.reduction == "signed",
            opacity=s.opacity,
            ncols=8,
            side_maps=e.gradcam_train if s.show_gradcam else None,
            side_title="Grad-CAM (own label)",
            selected=self.train_pos,
            tile_px=80,
            title=f"Top {e.k} {direction}: TFA map of each training image for this test prediction",
        )

    def _detail_figure(self):
        e, s, p = self.explanation, self.settings(), self.train_pos
        return overlay_grid(
            e.train_display[p : p + 1],
            self._maps()[p : p + 1],
            [self._train_titles()[p]],
            signed=s.reduction == "signed",
            opacity=s.opacity,
            ncols=1,
            side_maps=e.gradcam_train[p : p + 1],
            side_title="Grad-CAM (own label)",
            tile_px=200,
        )

    def _update_texts(self) -> None:
        e, p = self.explanation, self.train_pos
        index = int(e.train_indices[p])
        rows = {
            "rank": str(p + 1),
            "training index": str(index),
            "label": label_text(as_label(e.train_labels[p]), self.class_names),
            "score": f"{float(e.scores[p]):.4f}",
        }
        info = getattr(self.engine.train_set, "item_info", None)
        if callable(info):
            rows.update({str(k): str(v) for k, v in info(index).items()})
        self.detail_info.value = (
            "<table class='tfa-meta'>"
            + "".join(
                f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                for k, v in rows.items()
            )
            + "</table>"
        )
        ranked = ", ".join(f"#{int(i)}" for i in e.train_indices)
        self.caption.value = f"<b>{html.escape(self._describe(), quote=False)}</b>: {ranked}"
