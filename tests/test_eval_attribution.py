"""Data-attribution measures (quanda's definitions) on attributors with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import average_precision_score

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.attribution import (
    average_precision,
    detection_curve,
    identical_class,
    linear_datamodeling,
    mislabelling_detection,
    random_subsets,
    randomisation_correlation,
    shortcut_detection,
    top_k_cardinality,
)

N = 200


def test_mislabelling_detection_perfect_worst_and_random_rankings():
    flagged = [3, 50, 120, 199]
    perfect = torch.zeros(N)
    perfect[flagged] = 1.0
    # All four found in the first four places: the curve is 1/4, 2/4, 3/4, then 1 for N-3 more
    # points, so its trapezoidal area is (1/4+2/4)/2 + (2/4+3/4)/2 + (3/4+1)/2 + (N-4).
    expected = ((0.25 + 0.5) / 2 + (0.5 + 0.75) / 2 + (0.75 + 1) / 2 + (N - 4)) / N
    assert mislabelling_detection(perfect, flagged) == pytest.approx(expected, rel=1e-12)
    # Found last: the curve is 0 up to N-4 and then 1/4..1, area (0+1/4)/2+(1/4+2/4)/2+...
    worst = -perfect
    last = ((0 + 0.25) / 2 + (0.25 + 0.5) / 2 + (0.5 + 0.75) / 2 + (0.75 + 1) / 2) / N
    assert mislabelling_detection(worst, flagged) == pytest.approx(last, rel=1e-12)
    # A random ranking places each flagged image uniformly, so the expected area is about 1/2;
    # over 400 draws the mean's standard error is below 0.3/sqrt(400) = 0.015: allow 5 of them.
    generator = torch.Generator().manual_seed(0)
    draws = [
        mislabelling_detection(torch.rand(N, generator=generator), flagged) for _ in range(400)
    ]
    assert sum(draws) / len(draws) == pytest.approx(0.5, abs=0.075)


def test_detection_curve_counts_found_images_in_rank_order():
    curve = detection_curve(torch.tensor([0.1, 0.9, 0.5, 0.7]), [0, 2])
    assert curve.tolist() == [0.0, 0.0, 0.5, 1.0]
    with pytest.raises(InputError, match="at least one"):
        detection_curve(torch.rand(4), [])


def test_average_precision_matches_scikit_learn_with_ties():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.randint(0, 6, (60,), generator=generator).double()  # many ties
        positive = torch.rand(60, generator=generator) < 0.3
        positive[0] = True
        ours = average_precision(scores, positive)
        assert ours == pytest.approx(average_precision_score(positive, scores), abs=1e-12)


def test_shortcut_detection_perfect_and_reversed_attributor():
    shortcut = list(range(0, N, 10))
    indicator = torch.zeros(N)
    indicator[shortcut] = 1.0
    explanations = torch.stack([indicator + 0.01 * torch.rand(N), -indicator])
    perfect, reversed_ = shortcut_detection(explanations, shortcut)
    assert perfect == pytest.approx(1.0, abs=1e-12)
    # Reversed: the negatives tie at 0 above the positives tied at -1, so the only threshold
    # with a positive reaches recall 1 at precision m / N.
    assert reversed_ == pytest.approx(len(shortcut) / N, abs=1e-12)


def test_identical_class_perfect_and_wrong_attributor():
    labels = torch.arange(N) % 5
    targets = [0, 3, 4]
    perfect = torch.stack([(labels == t).double() for t in targets])
    assert identical_class(perfect, labels, targets, s=5) == [1.0, 1.0, 1.0]
    assert identical_class(-perfect, labels, targets, s=5) == [0.0, 0.0, 0.0]
    with pytest.raises(InputError, match="columns"):
        identical_class(perfect[:, :10], labels, targets)


def test_top_k_cardinality_shared_and_disjoint_top_sets():
    same = torch.arange(N).double().expand(4, N)
    assert top_k_cardinality(same, k=5) == pytest.approx(5 / 20)
    disjoint = torch.zeros(4, N)
    for t in range(4):
        disjoint[t, 5 * t : 5 * t + 5] = 1.0
    assert top_k_cardinality(disjoint, k=5) == 1.0


def test_randomisation_correlation_identical_and_reversed():
    scores = torch.rand(3, N, generator=torch.Generator().manual_seed(2))
    assert randomisation_correlation(scores, scores) == pytest.approx([1.0] * 3)
    assert randomisation_correlation(scores, -scores) == pytest.approx([-1.0] * 3)
    with pytest.raises(InputError, match="shape"):
        randomisation_correlation(scores, scores[:2])


def test_linear_datamodeling_is_one_for_the_true_additive_effects_and_near_zero_for_noise():
    generator = torch.Generator().manual_seed(3)
    effects = torch.randn(2, N, generator=generator)  # the true additive effect of each image
    subsets = random_subsets(N, 50, 0.5, seed=4)
    outputs = subsets.double() @ effects.T.double()  # a model whose output is exactly additive
    assert linear_datamodeling(effects, subsets, outputs) == pytest.approx([1.0, 1.0])
    noise = torch.randn(2, N, generator=generator)
    # Spearman of 50 independent pairs has standard deviation about 1/sqrt(49) = 0.14.
    assert all(abs(r) < 0.6 for r in linear_datamodeling(noise, subsets, outputs))
    with pytest.raises(InputError, match="subsets"):
        linear_datamodeling(effects, subsets[:, :10], outputs)


def test_random_subsets_have_the_asked_size_and_follow_the_seed():
    subsets = random_subsets(N, 6, 0.3, seed=5)
    assert subsets.sum(1).tolist() == [60] * 6
    assert torch.equal(subsets, random_subsets(N, 6, 0.3, seed=5))
    assert not torch.equal(subsets, random_subsets(N, 6, 0.3, seed=6))
    with pytest.raises(InputError, match="alpha"):
        random_subsets(N, 2, 1.0, seed=0)


def test_average_precision_needs_a_positive():
    with pytest.raises(InputError, match="positive"):
        average_precision(torch.rand(4), torch.zeros(4, dtype=torch.bool))
    assert not math.isnan(average_precision(torch.rand(4), torch.tensor([1, 0, 0, 0])))


def test_summary_tables_know_which_way_each_new_measure_is_better():
    from tfa_widgets.eval.summary import direction

    for measure in ("mislabelling AUC", "shortcut AP", "identical class@5", "top-8 cardinality",
                    "LDS", "TFA mass on patch", "cue found by TFA"):  # fmt: skip
        assert direction(measure) == "↑", measure
    assert direction("randomisation ρ") == "↓"
    assert direction("fooled tests") == ""
