"""Views of the whole training set, linked to the selected test image.

Four tabs: the score distribution of the selected test image over every training image, two
scorers side by side, a 2-D map of the index, and a training-set audit. A tab computes only
when it is open (nothing before the first paint), and caches what does not change.
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from tfa_widgets.viz import image_grid, tile_at
from tfa_widgets.viz.training import embedding_scatter, score_histogram
from tfa_widgets.widgets.audit import TrainingData, audit_rankings
from tfa_widgets.widgets.controls import METHOD_LABELS
from tfa_widgets.widgets.labels import label_text
from tfa_widgets.widgets.messages import Message
from tfa_widgets.widgets.plotly_view import PlotlyView
from tfa_widgets.widgets.progress import progress_in
from tfa_widgets.widgets.view import View

AUDIT_SHOWN = 16


class ScoreDistribution:
    """Histogram of the selected test image's score against every training image, by class."""

    title = "Score distribution"

    def __init__(self, data: TrainingData) -> None:
        self.data = data
        self.figure = PlotlyView(go.Figure())
        self.figure.add_class("tfa-distribution")
        self.widget = self.figure

    def show(self, view: View) -> None:
        """Draw the distribution for ``view``'s test image, target and scorer."""
        e = view.explanation
        scores = self.data.scores(view)
        self.figure.show(
            score_histogram(
                scores,
                self.data.labels(),
                view.class_names,
                cut=float(e.scores[-1]),
                k=e.k,
                opponents=e.opponents,
            )
        )


class ScorerComparison:
    """The top-k of the current scorer beside the top-k of another one, and their overlap."""

    title = "Compare scorers"

    def __init__(self, data: TrainingData, methods: list[str]) -> None:
        self.data = data
        self.other = W.Dropdown(
            options=[(METHOD_LABELS.get(m, m), m) for m in methods],
            description="against",
            layout=W.Layout(width="220px"),
        )
        self.overlap = W.HTML()
        self.left, self.right = PlotlyView(go.Figure()), PlotlyView(go.Figure())
        self.left.add_class("tfa-compare-left")
        self.right.add_class("tfa-compare-right")
        self.widget = W.VBox(
            [
                W.HBox([self.other, self.overlap]),
                W.Box([self.left, self.right], layout=W.Layout(flex_flow="row wrap")),
            ]
        )

    def show(self, view: View) -> None:
        """Draw the top-k of ``view``'s scorer and of the chosen other scorer."""
        e = view.explanation
        if self.other.value == e.method and len(self.other.options) > 1:
            self.other.value = next(v for _, v in self.other.options if v != e.method)
        other_indices, other_scores = self.data.top_k(view, self.other.value)
        mine = [int(i) for i in e.train_indices]
        theirs = [int(i) for i in other_indices]
        both = set(mine) & set(theirs)
        self.overlap.value = (
            f"{len(both)} of {e.k} training images in both top-{e.k} "
            f"(Jaccard {len(both) / len(set(mine) | set(theirs)):.2f})"
        )
        for figure, method, indices, scores in (
            (self.left, e.method, mine, e.scores),
            (self.right, self.other.value, theirs, other_scores),
        ):
            figure.show(self._grid(view, method, indices, scores, both))

    def _grid(self, view: View, method: str, indices, scores, both: set) -> go.Figure:
        titles = [
            f"{r}. #{i}<br>{float(s):.3f}"
            for r, (i, s) in enumerate(zip(indices, scores, strict=True), 1)
        ]
        return image_grid(
            self.data.pictures(indices),
            titles,
            ncols=8,
            mistakes=[i not in both for i in indices],
            tile_px=48,
            title=f"{METHOD_LABELS.get(method, method)} (red: not in the other top-k)",
        )


class TrainingMap:
    """A 2-D map of the index features (PCA; UMAP when umap-learn is installed)."""

    title = "Map"

    def __init__(self, data: TrainingData, on_pick: Callable[[int], None]) -> None:
        self.data = data
        self.colour = W.ToggleButtons(
            options=[("by class", "class"), ("by score", "score")],
            value="class",
            style={"button_width": "auto"},
        )
        self.method = W.ToggleButtons(
            options=self.data.embedding_methods(), style={"button_width": "auto"}
        )
        self.progress = W.Output()
        self.figure = PlotlyView(go.Figure())
        self.figure.add_class("tfa-map")
        self.figure.on_pick(lambda index: on_pick(int(index)))
        self.widget = W.VBox([W.HBox([self.colour, self.method]), self.progress, self.figure])

    def show(self, view: View) -> None:
        """Draw the map, coloured as chosen, with ``view``'s top-k outlined."""
        with progress_in(self.progress):
            xy = self.data.embedding(self.method.value)
        scores = self.data.scores(view) if self.colour.value == "score" else None
        name = "UMAP" if self.method.value == "umap" else "PCA"
        self.figure.show(
            embedding_scatter(
                xy,
                self.data.labels(),
                view.class_names,
                scores=scores,
                highlight=[int(i) for i in view.explanation.train_indices],
                title=f"{name} of the training gradients (click a point to see the image)",
            )
        )


class Audit:
    """Which training images drive many mistakes, and which have the highest self-influence."""

    title = "Audit"

    def __init__(self, data: TrainingData, on_pick: Callable[[int], None], k: int = 8) -> None:
        self.data, self.on_pick, self.k = data, on_pick, k
        classes = [("all mistakes", -1)] + [
            (f"mistakes of true class {n}", i) for i, n in enumerate(data.class_names)
        ]
        self.scope = W.Dropdown(options=classes, value=-1, layout=W.Layout(width="260px"))
        self.run = W.Button(description="Run audit", icon="search")
        self.self_method = W.Dropdown(
            options=[(METHOD_LABELS.get(m, m), m) for m in data.self_influence_methods()],
            description="self-influence by",
            style={"description_width": "110px"},
            layout=W.Layout(width="260px"),
        )
        self.summary = W.HTML()
        self.progress = W.Output()
        self.frequent = PlotlyView(go.Figure())
        self.influential = PlotlyView(go.Figure())
        self.frequent.add_class("tfa-audit-frequent")
        self.influential.add_class("tfa-audit-self")
        self._shown: dict[str, np.ndarray] = {}  # the two rankings drawn now, for clicks
        self.frequent.on_click(lambda x, y: self._pick("frequent", self.frequent, x, y))
        self.influential.on_click(lambda x, y: self._pick("self", self.influential, x, y))
        self.widget = W.VBox(
            [
                W.Box(
                    [self.scope, self.run, self.summary, self.self_method],
                    layout=W.Layout(flex_flow="row wrap", align_items="center"),
                ),
                self.progress,
                W.Box([self.frequent, self.influential], layout=W.Layout(flex_flow="row wrap")),
            ]
        )

    def show(self, view: View) -> None:
        """Draw the self-influence ranking (cheap); the mistakes ranking runs on the button."""
        method = self.self_method.value
        self._shown["self"] = self.data.self_influence_ranking(method)
        name = METHOD_LABELS.get(method, method)
        self._draw("self", self.influential, f"Highest self-influence ({name}, score with itself)")

    def audit(self) -> None:
        """Rank training images by how often and how strongly they are proponents of mistakes."""
        scope = None if self.scope.value == -1 else int(self.scope.value)
        with progress_in(self.progress):
            ranking, tests = self.data.ranking(
                ("mistakes", scope, self.k), lambda: audit_rankings(self.data, scope, self.k)
            )
        self._shown["frequent"] = ranking
        self.summary.value = f"over {tests} misclassified test images, top-{self.k} each"
        self._draw("frequent", self.frequent, "Most frequent proponents of mistakes")

    def _draw(self, name: str, figure: PlotlyView, title: str) -> None:
        shown = [int(i) for i in self._shown[name][:AUDIT_SHOWN]]
        labels = self.data.labels()
        titles = [
            f"{r}. #{i}<br>{label_text(int(labels[i]), self.data.class_names)}"
            for r, i in enumerate(shown, 1)
        ]
        figure.show(image_grid(self.data.pictures(shown), titles, ncols=8, tile_px=48, title=title))

    def _pick(self, name: str, figure: PlotlyView, x: float, y: float) -> None:
        tile = tile_at(figure.figure, x, y)
        if tile is not None:
            self.on_pick(int(self._shown[name][tile]))


class TrainingSetViews:
    """The four training-set tabs, and the training image picked in any of them.

    Parameters
    ----------
    data : TrainingData
        What the tabs compute from (scores, labels, pictures, embeddings), cached.
    methods : list of str
        The scorers the engine offers.
    guard : callable
        Runs an action, reporting failures on the given message line (the explorer's).
    """

    def __init__(self, data: TrainingData, methods: list[str], guard) -> None:
        self.data = data
        self.guard = guard
        self.message = Message("tfa-training-error")
        self.picked = PlotlyView(go.Figure())
        self.picked.add_class("tfa-picked")
        self.picked.layout.display = "none"  # until an image is picked
        self.picked_info = W.HTML("Click a training image in a tab to see it here.")
        self.panels = [
            ScoreDistribution(data),
            ScorerComparison(data, methods),
            TrainingMap(data, self.pick),
            Audit(data, self.pick),
        ]
        self.tabs = W.Tab(children=[p.widget for p in self.panels])
        self.tabs.titles = tuple(p.title for p in self.panels)
        self.tabs.selected_index = None
        self._view: View | None = None
        self._drawn: dict[int, object] = {}
        self.tabs.observe(lambda _: self._draw_open(), names="selected_index")
        comparison, tmap, audit = self.panels[1], self.panels[2], self.panels[3]
        for control in (comparison.other, tmap.colour, tmap.method, audit.self_method):
            control.observe(lambda _: self._draw_open(force=True), names="value")
        audit.run.on_click(lambda _: self.guard(audit.audit, self.message))
        self.widget = W.VBox(
            [
                W.HTML("<b>The whole training set</b> (open a tab)"),
                self.message.widget,
                self.tabs,
                W.HBox([self.picked, self.picked_info]),
            ]
        )
        self.widget.add_class("tfa-training-set")

    def show(self, view: View) -> None:
        """Remember ``view`` and redraw the open tab (closed tabs redraw when opened)."""
        self._view = view
        self._draw_open()

    def _draw_open(self, force: bool = False) -> None:
        tab = self.tabs.selected_index
        if tab is None or self._view is None:
            return
        key = (self._view.key, self._view.explanation.k, self._view.settings.opponents)
        if force or self._drawn.get(tab) != key:
            panel = self.panels[tab]
            self.guard(lambda: panel.show(self._view), self.message)
            self._drawn[tab] = key

    def pick(self, index: int) -> None:
        """Show training image ``index`` with its label and metadata."""
        picture = self.data.pictures([index])
        label = label_text(int(self.data.labels()[index]), self.data.class_names)
        self.picked.show(image_grid(picture, [f"#{index} {label}"], ncols=1, tile_px=128))
        self.picked.layout.display = None
        self.picked_info.value = self.data.info_table(index)
