"""Plotly figures of evaluation summaries (`tfa_widgets.eval.plots`)."""

from tfa_widgets.eval.plots import bars_figure, curve_figure
from tfa_widgets.eval.summary import Summary


def test_curve_figure_picks_the_scorer_whatever_the_case_of_its_label():
    summaries = [
        Summary("insertion@10", "TFA [Grad-Cos]", -0.2, 0.1, 3),
        Summary("insertion@1", "TFA [Grad-Cos]", -0.1, 0.1, 3),
        Summary("insertion@1", "TFA [Grad-Dot]", -0.3, 0.1, 3),
        Summary("deletion@1", "TFA [Grad-Cos]", 0.5, 0.1, 3),
    ]
    (trace,) = curve_figure(summaries, "insertion", "grad-cos").data
    assert trace.name == "TFA [Grad-Cos]"
    assert list(trace.x) == [1.0, 10.0] and list(trace.y) == [-0.1, -0.2]
    assert len(curve_figure(summaries, "insertion").data) == 2


def test_bars_figure_has_one_panel_per_measure_with_values():
    summaries = [
        Summary("shortcut AP", "grad_cos", 0.9, 0.05, 3),
        Summary("shortcut AP", "random", 0.1, float("nan"), 1),
        Summary("LDS", "grad_cos", 0.2, 0.1, 3),
        Summary("LDS", "random", float("nan"), float("nan"), 0),
    ]
    figure = bars_figure(summaries, ["shortcut AP", "LDS", "absent"])
    assert [t.x.tolist() if hasattr(t.x, "tolist") else list(t.x) for t in figure.data] == [
        ["grad_cos", "random"],
        ["grad_cos"],
    ]
    assert list(figure.data[0].error_y.array) == [0.05, 0.0]
