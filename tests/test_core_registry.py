"""One source of truth for the scorers: the registry of `tfa_widgets.core.scoring`, read by the
engine, the explorer and the evaluation."""

from __future__ import annotations

import pytest
from core_models import small_cnn, small_dataset

from tfa_widgets import InputError, TFAEngine
from tfa_widgets.core.scoring import SCORERS, IndexScorer, make_scorer
from tfa_widgets.eval.baselines import SCORER_LABELS, Method
from tfa_widgets.eval.report import EvalConfig, evaluate
from tfa_widgets.widgets.controls import METHOD_LABELS


@pytest.fixture(scope="module")
def engine() -> TFAEngine:
    return TFAEngine(small_cnn(), small_dataset(8), small_dataset(2, seed=2), progress=False)


def test_the_index_scorers_are_the_gradient_similarities():
    served = [name for name in SCORERS if isinstance(make_scorer(name), IndexScorer)]
    assert served == ["grad_cos", "grad_dot", "tracin_cp"]


def test_the_engine_offers_registered_scorers_with_their_labels(engine):
    assert engine.methods == ["grad_cos", "grad_dot", "influence", "relatif", "trak"]
    assert engine.method_labels == {name: SCORERS[name].label for name in engine.methods}
    with pytest.raises(InputError, match=r"unknown scoring method 'lissa'; choose one of \("):
        engine.top_k(0, 2, method="lissa")
    with pytest.raises(InputError, match="'tracin_cp' needs checkpoints given to the engine"):
        engine.scores(0, method="tracin_cp")


def test_the_explorer_and_the_evaluation_label_scorers_as_the_registry_does():
    for name, scorer in SCORERS.items():
        assert METHOD_LABELS[name] == SCORER_LABELS[name] == scorer.label
    assert Method("influence", "integrated_gradients").label == (
        "Integrated Gradients [Influence (EK-FAC)]"
    )
    with pytest.raises(InputError, match="unknown scorer 'lissa'"):
        Method("lissa", "tfa")


def test_the_evaluation_refuses_a_scorer_the_engine_does_not_offer(engine):
    with pytest.raises(InputError, match=r"cannot score with \['tracin_cp'\]"):
        evaluate(engine, {0: [0]}, EvalConfig(scorers=("tracin_cp",)), progress=False)
