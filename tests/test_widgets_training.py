"""The training-set views, each tab checked against the engine or an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_widgets_explorer import Patches, Spy, engine  # noqa: F401 - the shared engine fixture

from tfa_widgets.viz import GridGeometry
from tfa_widgets.widgets import Explorer
from tfa_widgets.widgets.audit import audit_rankings

DISTRIBUTION, COMPARE, MAP, AUDIT = range(4)


@pytest.fixture()
def spy(engine) -> Spy:  # noqa: F811
    spy = Spy(engine)
    spy.watched = (*Spy.watched, "scores", "top_k")
    return spy


@pytest.fixture()
def explorer(spy, tmp_path) -> Explorer:
    return Explorer(spy, progress=False, export_dir=tmp_path, page_size=12)


def _open(explorer: Explorer, tab: int):
    explorer.training.tabs.selected_index = tab
    assert explorer.training.message.text == ""
    return explorer.training.panels[tab]


def test_nothing_is_computed_before_a_tab_is_opened(explorer, spy):
    assert [name for name, _, _ in spy.calls if name in ("scores", "top_k")] == []


def test_distribution_counts_every_training_image_by_class_with_the_cut(explorer, engine):  # noqa: F811
    fig = _open(explorer, DISTRIBUTION).figure.figure
    e = explorer.explanation
    labels = engine.train_set.labels.numpy()
    expected = engine.scores(explorer.test, target=e.target).numpy()
    edges = np.histogram_bin_edges(expected, bins=60)
    for cls, name in enumerate(Patches.classes):
        [bars] = [t for t in fig.data if t.name == f"{name} ({cls})"]
        counts = np.asarray(bars.y)
        assert counts.sum() == int((labels == cls).sum())
        np.testing.assert_array_equal(counts, np.histogram(expected[labels == cls], edges)[0])
    assert fig.layout.shapes[0].x0 == pytest.approx(float(e.scores[-1]))
    explorer.controls.k.value = 3  # an open tab follows the selection
    assert fig is not explorer.training.panels[DISTRIBUTION].figure.figure
    cut = explorer.training.panels[DISTRIBUTION].figure.figure.layout.shapes[0].x0
    assert cut == pytest.approx(float(explorer.explanation.scores[-1]))


def test_two_scorers_side_by_side_with_their_overlap(explorer, engine):  # noqa: F811
    panel = _open(explorer, COMPARE)
    e = explorer.explanation
    assert panel.other.value == "grad_dot"
    theirs, _ = engine.top_k(explorer.test, e.k, target=e.target, method="grad_dot")
    both = set(e.train_indices.tolist()) & set(theirs.tolist())
    assert panel.overlap.value.startswith(f"{len(both)} of {e.k}")
    titles = [a.text for a in panel.right.figure.layout.annotations]
    assert [int(t.split("#")[1].split("<")[0]) for t in titles] == theirs.tolist()


def test_map_is_the_pca_of_the_index_and_a_click_shows_the_image(explorer, engine):  # noqa: F811
    panel = _open(explorer, MAP)
    classes = panel.figure.figure.data[:-1]
    n = len(engine.train_set)
    xy = np.zeros((n, 2))
    for trace in classes:  # one trace per class, each point's training index in customdata
        xy[np.asarray(trace.customdata)] = np.column_stack([trace.x, trace.y])
    assert sorted(np.concatenate([t.customdata for t in classes]).tolist()) == list(range(n))
    features = engine.build_index().features.double().numpy()
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T  # the two leading principal components, up to sign
    for axis in range(2):
        corr = np.corrcoef(xy[:, axis], expected[:, axis])[0, 1]
        # pca_lowrank is randomised but exact for rank 2 of 40 points up to float32 rounding
        assert abs(corr) > 0.999, axis
    top = panel.figure.figure.data[-1].customdata
    assert list(top) == explorer.explanation.train_indices.tolist()
    panel.figure.click(0.0, 0.0, customdata=5)
    assert "<td>5</td>" in explorer.training.picked_info.value
    panel.colour.value = "score"
    e = explorer.explanation
    expected_scores = engine.scores(explorer.test, target=e.target).double().numpy()
    for trace in panel.figure.figure.data[:-1]:
        colours = np.asarray(trace.marker.color, dtype=np.float64)
        np.testing.assert_array_equal(colours, expected_scores[np.asarray(trace.customdata)])


def _squared_gradient_norms(engine) -> np.ndarray:  # noqa: F811
    """‖∇θ ℓ(x_i, y_i)‖² of every training image by plain autograd in float64."""
    model = engine.model.double()
    try:
        out = []
        for image, label in engine.train_set:
            loss = torch.nn.functional.cross_entropy(
                model(image[None].double()), torch.tensor([label])
            )
            grads = torch.autograd.grad(loss, list(model.parameters()))
            out.append(sum(float((g**2).sum()) for g in grads))
    finally:
        model.float()
    return np.array(out)


def test_audit_self_influence_is_the_squared_gradient_norm(explorer, engine):  # noqa: F811
    panel = _open(explorer, AUDIT)
    expected = _squared_gradient_norms(engine)
    got = explorer.training.data.self_influence()
    # float32 per-example gradients: relative error a few 1e-6 of each norm; 1e-4 leaves margin
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    titles = [a.text for a in panel.influential.figure.layout.annotations]
    shown = [int(t.split("#")[1].split("<")[0]) for t in titles]
    assert expected[shown[0]] == pytest.approx(expected.max(), rel=1e-4)
    g = GridGeometry(**panel.influential.figure.layout.meta["grid"])
    r, c = g.origin(1)
    panel.influential.click(c + 1, r + 1)
    assert f"<td>{shown[1]}</td>" in explorer.training.picked_info.value


def test_audit_ranks_frequent_proponents_of_mistakes_first(explorer, engine):  # noqa: F811
    panel = _open(explorer, AUDIT)
    panel.run.click()
    assert explorer.training.message.text == ""
    mistakes = explorer._mistakes(None)
    assert f"over {len(mistakes)} misclassified" in panel.summary.value
    seen: dict[int, float] = {}
    for test in mistakes:
        indices, scores = engine.top_k(test, panel.k)
        for i, s in zip(indices.tolist(), scores.tolist(), strict=True):
            seen[i] = seen.get(i, 0.0) + 1.0 + s
    ranking, _ = audit_rankings(explorer.training.data, None, panel.k, progress=False)
    top = ranking[: len(seen)].tolist()
    assert set(top) == set(seen)  # every image that ever appears ranks above all that never do
    weights = [seen[i] for i in top]
    assert all(a >= b - 1e-9 for a, b in zip(weights, weights[1:], strict=False))


def test_rankings_are_kept_within_a_byte_budget_and_clicks_still_pick(explorer, spy):
    spy.watched = (*spy.watched, "self_scores")
    panel = _open(explorer, AUDIT)
    panel.show(explorer.view)
    assert sum(name == "self_scores" for name, _, _ in spy.calls) == 1  # the ranking was kept
    data = explorer.training.data
    n = len(data.labels())
    data._rankings.max_bytes = n * 8  # room for one ranking of every training image (int64)
    panel.run.click()
    assert explorer.training.message.text == ""
    assert len(data._rankings) == 1 and data._rankings.nbytes <= n * 8  # self-influence dropped
    g = GridGeometry(**panel.influential.figure.layout.meta["grid"])
    r, c = g.origin(0)
    panel.influential.click(c + 1, r + 1)  # the dropped ranking is still the one drawn
    top = int(np.argsort(-data.self_influence(panel.self_method.value), kind="stable")[0])
    assert f"<td>{top}</td>" in explorer.training.picked_info.value
