"""The evaluation runner and its summaries, on a tiny engine and on hand-made rows."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tfa_widgets import SmoothGrad, TFAEngine
from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.baselines import MAP_KINDS, Method, all_methods
from tfa_widgets.eval.perturbation import OneStep
from tfa_widgets.eval.report import EvalConfig, evaluate
from tfa_widgets.eval.setups import draw, random_test_images
from tfa_widgets.eval.summary import direction, format_table, paired_wins, summarise

pytestmark = pytest.mark.portability


class _Squares(Dataset):
    """Random float64 8x8 images with an object mask (the centre square) for every image."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64)
        self.labels = torch.randint(0, 3, (n,), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def mask(self, i: int) -> torch.Tensor:
        out = torch.zeros(8, 8, dtype=torch.bool)
        out[2:6, 2:6] = True
        return out


@pytest.fixture(scope="module")
def tiny_engine():
    """A float64 engine: the steps' loss changes (lr = 1e-4) are differences of nearly equal
    losses, which float32 would leave with three significant digits, and those machine-dependent."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 3),
        )
        .double()
        .eval()
    )
    return TFAEngine(model, _Squares(24, 1), _Squares(6, 2), progress=False)


@pytest.fixture(scope="module")
def tiny_rows(tiny_engine):
    config = EvalConfig(
        k=3, ps=(10, 50), smooth=SmoothGrad(n=2), retrain_epochs=2, retrain_replay=5,
        retrain_batch_size=4,
    )  # fmt: skip
    return evaluate(tiny_engine, {0: [0], 1: [3]}, config, progress=False)


def _values(rows, measure, kind, scorer="grad_cos"):
    return [
        r["value"]
        for r in rows
        if (r["measure"], r["kind"], r["scorer"]) == (measure, kind, scorer)
    ]


def test_every_method_gets_every_measure(tiny_rows):
    methods = {m.label for m in all_methods()}
    assert {r["method"] for r in tiny_rows} == methods
    measures = {r["measure"] for r in tiny_rows}
    expected = {
        "insertion@10",
        "insertion@50",
        "deletion@10",
        "deletion@50",
        "insertion mean",
        "deletion |shift|",
    }
    expected |= {"retrain Δloss", "retrain Δprob", "pointing: object", "mass in object"}
    expected |= {"sanity ρ (last)", "sanity ρ (all)", "unmasked step", "blank step"}
    assert expected <= measures
    for measure in measures:  # one value per unit for each method
        for method in methods:
            units = {
                (r["seed"], r["test_index"])
                for r in tiny_rows
                if r["measure"] == measure and r["method"] == method
            }
            assert units == {(0, 0), (1, 3)}


def test_unmasked_step_matches_an_independent_step(tiny_engine, tiny_rows):
    target = int(tiny_engine.predict(3).argmax())
    indices, _ = tiny_engine.top_k(3, 3, target=target, method="grad_dot")
    images = torch.stack([tiny_engine.train_set[int(i)][0] for i in indices])
    labels = [tiny_engine.train_set[int(i)][1] for i in indices]
    step = OneStep(tiny_engine.model, tiny_engine.test_set[3][0], target, lr=EvalConfig().lr)
    expected = step.loss_change(images, labels) / step.loss_before
    got = [
        r["value"]
        for r in tiny_rows
        if r["measure"] == "unmasked step" and r["scorer"] == "grad_dot" and r["test_index"] == 3
    ]
    # The report takes the vmapped step, `loss_change` plain autograd. Each loss is float64, its
    # logits sums of 257 terms whose absolute values add up to less than 1 (the conv layers'
    # sums are as small): rounding at most gamma_257 ~ 3e-14 (precision.py) on a loss change of
    # about 8e-5, so 1e-6 relative leaves a margin of over 1000; another step (other images,
    # labels, lr) misses it.
    assert got == pytest.approx([expected] * len(MAP_KINDS), rel=1e-6)


def test_sanity_separates_model_free_maps_from_model_maps(tiny_rows):
    assert _values(tiny_rows, "sanity ρ (all)", "random") == pytest.approx([1.0, 1.0])
    assert max(_values(tiny_rows, "sanity ρ (all)", "tfa")) < 0.99
    assert max(_values(tiny_rows, "sanity ρ (all)", "saliency")) < 0.99


def test_localisation_values_are_shares(tiny_rows):
    for measure in ("pointing: object", "mass in object", "positive mass in object"):
        for kind in MAP_KINDS:
            assert all(0.0 <= v <= 1.0 for v in _values(tiny_rows, measure, kind))


def test_summaries_and_table(tiny_rows):
    summaries = summarise(tiny_rows)
    by_key = {(s.measure, s.method): s for s in summaries}
    label = Method("grad_cos", "tfa").label
    values = _values(tiny_rows, "deletion@50", "tfa")
    s = by_key[("deletion@50", label)]
    assert s.n == 2 and s.mean == pytest.approx(sum(values) / 2)
    assert s.std == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    table = format_table(summaries)
    assert "deletion@50 ↑" in table and label in table and s.cell() in table
    lines = table.splitlines()
    assert lines[0].startswith("measure") and set(lines[1]) <= {"-", " "}
    assert [line.split()[0] for line in lines[2:8]] == [
        "insertion@10",
        "insertion@50",
        "insertion",
    ] + ["deletion@10", "deletion@50", "deletion"]


def test_paired_wins_and_directions():
    rows = [
        {"measure": "deletion@5", "method": m, "seed": 0, "test_index": t, "value": v}
        for m, t, v in [
            ("a", 0, 0.1),
            ("b", 0, 0.2),
            ("a", 1, 0.5),
            ("b", 1, 0.4),
            ("a", 2, 0.3),
            ("b", 2, float("nan")),
        ]
    ]
    assert paired_wins(rows, "deletion@5", "a", "b") == (1, 2)
    assert direction("insertion@5") == "↓" and direction("deletion |shift|") == "↑"
    assert direction("sanity ρ (all)") == "↓" and direction("unmasked step") == ""
    summary = summarise(rows)
    assert [(s.method, s.n) for s in summary] == [("a", 3), ("b", 2)]


def test_config_and_draws_check_input():
    with pytest.raises(InputError, match="measures"):
        EvalConfig(measures=("speed",))
    with pytest.raises(InputError, match="map kind"):
        Method("grad_cos", "lime")
    assert draw(range(10), 3, 0) == draw(range(10), 3, 0)
    assert len(set(draw(range(10), 10, 1))) == 10
    with pytest.raises(InputError, match="pool"):
        draw(range(3), 4, 0)
    by_seed = random_test_images(50, 4, [0, 1])
    assert by_seed[0] != by_seed[1] and all(len(v) == 4 for v in by_seed.values())
