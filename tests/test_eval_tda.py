"""Per-seed attribution and patch measures of the engine's scorers (`tfa_widgets.eval.tda`)."""

from __future__ import annotations

import math

import pytest
import torch
from core_models import small_cnn, small_dataset
from torch import nn

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.core.errors import InputError
from tfa_widgets.data import DemoConfig, load_demo
from tfa_widgets.data.train import TrainConfig
from tfa_widgets.eval import tda
from tfa_widgets.eval.tda import (
    RANDOM,
    random_scores,
    randomised_engine,
    seed_rows,
    self_scores,
    subset_outputs,
    top_block_on_patch,
)


def test_top_block_on_patch_finds_a_bright_block_only_where_it_is():
    patch = torch.zeros(16, 16, dtype=torch.bool)
    patch[2:6, 9:13] = True
    map_ = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    map_[:, 2:6, 9:13] += 1.0  # the strongest 4x4 block is the patch itself
    assert top_block_on_patch(map_, patch, 4)
    elsewhere = torch.zeros(16, 16, dtype=torch.bool)
    elsewhere[10:14, 1:5] = True
    assert not top_block_on_patch(map_, elsewhere, 4)
    # Negative attributions count by magnitude, as in every other measure here.
    assert top_block_on_patch(-map_, patch, 4)


def test_grad_dot_self_scores_are_squared_float64_gradient_norms():
    model, train = small_cnn(), small_dataset(10)
    engine = TFAEngine(model, train, progress=False)
    expected = []
    for image, label in train:
        loss = nn.functional.cross_entropy(model(image[None]), label[None])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(sum(float((g**2).sum()) for g in grads))
    # float64 gradients, but the index stores norms in float32 (relative rounding 6e-8, doubled
    # by squaring): 1e-6 leaves a margin of eight.
    assert torch.allclose(
        self_scores(engine, "grad_dot"), torch.tensor(expected, dtype=torch.float64), rtol=1e-6
    )
    assert self_scores(engine, "grad_cos") is None  # 1 for every image: no ranking


def test_model_randomisation_randomises_the_tracin_checkpoints_too():
    model, train = small_cnn(), small_dataset(6)
    checkpoints = [(small_cnn(seed=s).state_dict(), rate) for s, rate in ((1, 0.5), (2, 0.25))]
    engine = TFAEngine(model, train, train, checkpoints=checkpoints, progress=False)
    randomised = randomised_engine(engine, 3, checkpoints)
    assert "tracin_cp" in randomised.methods
    scores = randomised.scores(0, target=1, method="tracin_cp")
    original = engine.scores(0, target=1, method="tracin_cp")
    assert not torch.allclose(scores, original, rtol=0.1)
    assert randomised_engine(engine, 3).methods == [m for m in engine.methods if m != "tracin_cp"]


def test_random_scores_follow_the_seed():
    assert torch.equal(random_scores(2, 5, 3), random_scores(2, 5, 3))
    assert not torch.equal(random_scores(2, 5, 3), random_scores(2, 5, 4))


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    config = DemoConfig(
        n_train=240, n_test=90, n_patched_test=12, flip_groups=1, two_object_groups=1,
        train_copies=3,
    )  # fmt: skip
    return load_demo(
        seed=0,
        cache_dir=tmp_path_factory.mktemp("tiny-demo"),
        progress=False,
        config=config,
        train_config=TrainConfig(epochs=4, batch_size=64),
    )


def test_seed_rows_give_every_measure_for_every_scorer_and_the_random_attributor(tiny_demo):
    engine = tiny_demo.engine(progress=False, cache_dir=None)
    scorers = ["grad_cos", "grad_dot"]
    saved = []
    rows = seed_rows(
        tiny_demo, engine, [0, 1, 2], seed=7, k=2, lds_models=3, scorers=scorers,
        on_rows=saved.append,
    )  # fmt: skip
    # The rows so far after each scorer (and the random attributor), growing to all of them.
    assert [{r["method"] for r in done if r["kind"] == "attribution"} for done in saved[:3]] == [
        {"grad_cos"}, {"grad_cos", "grad_dot"}, {"grad_cos", "grad_dot", RANDOM},
    ]  # fmt: skip
    assert saved[-1] == rows
    table = {(r["kind"], r["method"], r["measure"]): r["value"] for r in rows}
    for scorer in (*scorers, RANDOM):
        for measure in ("identical class@5", "top-2 cardinality", "randomisation ρ", "LDS"):
            value = table[("attribution", scorer, measure)]
            assert -1.0 <= value <= 1.0 or math.isnan(value)
    # Self-influence ranks exist for grad-dot and random, not for grad-cos (constant 1).
    assert ("attribution", "grad_dot", "mislabelling AUC") in table
    assert ("attribution", "grad_cos", "mislabelling AUC") not in table
    assert all(r["seed"] == 7 for r in rows)
    fooled = [r for r in rows if r["measure"] == "fooled tests"]
    if fooled:  # a briefly trained model may be fooled by no patched test image
        assert {r["method"] for r in fooled} == set(scorers)
        share = table[("patch", "grad_cos", "proponents patched")]
        assert 0.0 <= share <= 1.0


def test_subset_outputs_count_their_retrained_models_on_a_bar_only_when_asked(tiny_demo, capsys):
    subsets = tda.random_subsets(len(tiny_demo.train_set), 2, 0.5, seed=3)
    outputs = subset_outputs(tiny_demo, subsets, [0, 1, 2], [0, 1, 0], seed=7, progress=True)
    assert outputs.shape == (2, 3)
    assert torch.isfinite(outputs).all()
    bar = capsys.readouterr().err
    assert "LDS subset models" in bar and "2/2" in bar
    subset_outputs(tiny_demo, subsets[:1], [0], [0], seed=7)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("scorer", ["tracin_cp", "influence"])
def test_seed_rows_measure_tracin_cp_and_the_preconditioned_scorers(tiny_demo, scorer):
    engine = tiny_demo.engine(progress=False, cache_dir=None)
    assert scorer in engine.methods  # TracIn-CP: the demo's checkpoints
    rows = seed_rows(
        tiny_demo, engine, [0, 1], seed=7, k=2, groups=("attribution",), randomisation=False,
        scorers=[scorer],
    )  # fmt: skip
    table = {r["measure"]: r["value"] for r in rows if r["method"] == scorer}
    assert 0.0 <= table["identical class@5"] <= 1.0
    assert 0.0 < table["top-2 cardinality"] <= 1.0
    if scorer == "tracin_cp":  # Σ_c η_c ‖g_i^c‖² ranks the flipped labels
        assert 0.0 <= table["mislabelling AUC"] <= 1.0


def test_seed_rows_run_the_groups_in_the_order_given(tiny_demo, monkeypatch):
    engine = tiny_demo.engine(progress=False, cache_dir=None)
    # One fooled test image whatever the briefly trained model predicts, and a stand-in for the
    # patch measures: this test is about the order of the groups, not their values.
    monkeypatch.setattr(tda, "fooled_tests", lambda demo, engine: [0])
    monkeypatch.setattr(tda, "patch_measures", lambda *args: {"proponents patched": 0.5})
    saved = []
    rows = seed_rows(
        tiny_demo, engine, [0, 1], seed=7, k=2, groups=("patch", "attribution"),
        randomisation=False, scorers=["grad_cos"], on_rows=saved.append,
    )  # fmt: skip
    assert [r["kind"] for r in saved[0]] == ["patch", "patch"]  # the measure and "fooled tests"
    assert [r["kind"] for r in rows[:2]] == ["patch", "patch"]
    assert {r["kind"] for r in rows[2:]} == {"attribution"}
    with pytest.raises(InputError, match="unknown measure groups"):
        seed_rows(tiny_demo, engine, [0], seed=7, k=2, groups=("maps",), scorers=["grad_cos"])
