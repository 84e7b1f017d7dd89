"""The demos' TracIn checkpoints: recorded along the same run, cached, and scored as TracIn-CP."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from precision import float32_index_tolerance
from torch.utils.data import Subset

from tfa_widgets import TFAEngine
from tfa_widgets.data import DemoConfig, generate_demo, load_demo
from tfa_widgets.data.demo import initial_model
from tfa_widgets.data.demo_checkpoints import (
    CHECKPOINTS_FILE,
    CheckpointRecorder,
    checkpoint_epochs,
)
from tfa_widgets.data.train import TrainConfig, train_classifier

pytestmark = pytest.mark.portability

TINY = DemoConfig(
    n_train=120, n_test=60, n_patched_test=4, flip_groups=1, two_object_groups=1, train_copies=2
)
QUICK = TrainConfig(epochs=4, batch_size=32)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    return load_demo(2, tmp_path_factory.mktemp("cache"), progress=False, config=TINY,
                     train_config=QUICK)  # fmt: skip


def _one_cycle_rates(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step, from the schedule alone (no model, no training)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.25
    )
    rates = []
    for _ in range(config.epochs * steps_per_epoch):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_checkpoint_epochs_are_evenly_spaced_and_end_with_training():
    assert checkpoint_epochs(8) == [2, 4, 6, 8]
    assert checkpoint_epochs(12) == [3, 6, 9, 12]
    assert checkpoint_epochs(2) == [1, 2]


def test_recording_leaves_the_weights_unchanged_and_keeps_the_interval_rates():
    train, _, meta = generate_demo(2, TINY)
    plain = initial_model(len(meta.class_names), seed=0)
    train_classifier(plain, train.images, train.labels, QUICK, seed=0, progress=False)
    recorded = initial_model(len(meta.class_names), seed=0)
    recorder = CheckpointRecorder(QUICK.epochs)
    train_classifier(recorded, train.images, train.labels, QUICK, 0, False, recorder)
    # The same deterministic run: recording may not change a single bit of the weights.
    for name, value in plain.state_dict().items():
        assert torch.equal(value, recorded.state_dict()[name]), name
    assert len(recorder.checkpoints) == len(checkpoint_epochs(QUICK.epochs))
    last, _ = recorder.checkpoints[-1]
    for name, value in plain.state_dict().items():
        assert torch.equal(value, last[name]), f"the last checkpoint is the final model: {name}"
    steps = -(-len(train) // QUICK.batch_size)
    schedule = _one_cycle_rates(QUICK, steps)
    start = 0
    for epoch, (_, rate) in zip(checkpoint_epochs(QUICK.epochs), recorder.checkpoints, strict=True):
        interval = schedule[start * steps : epoch * steps]
        assert rate == pytest.approx(sum(interval) / len(interval), rel=1e-12)
        start = epoch


def test_checkpoints_are_cached_with_the_model_and_rerecorded_when_missing(tiny_demo):
    folder = tiny_demo.cache_dir
    assert (folder / CHECKPOINTS_FILE).is_file()
    again = load_demo(2, folder.parent, progress=False, config=TINY, train_config=QUICK)
    assert len(again.checkpoints) == len(tiny_demo.checkpoints) == 4  # after each of 4 epochs
    for (state, rate), (cached, cached_rate) in zip(
        tiny_demo.checkpoints, again.checkpoints, strict=True
    ):
        assert rate == cached_rate and state.keys() == cached.keys()
        assert all(torch.equal(state[k], cached[k]) for k in state)
    (folder / CHECKPOINTS_FILE).unlink()  # weights cached before checkpoints were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrained = load_demo(2, folder.parent, progress=False, config=TINY, train_config=QUICK)
    for name, value in tiny_demo.model.state_dict().items():
        assert torch.equal(value, retrained.model.state_dict()[name]), name
    (folder / CHECKPOINTS_FILE).write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="checkpoints .* unreadable"):
        load_demo(2, folder.parent, progress=False, config=TINY, train_config=QUICK)


def _gradients(model, items, dtype):
    """Per-example gradients ``[n, P]`` of the cross-entropy, by plain autograd in ``dtype``."""
    model = copy.deepcopy(model).to(dtype).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for image, label in items:
        loss = F.cross_entropy(model(image.to(dtype)[None]), torch.tensor([int(label)]))
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_demo_engine_scores_tracin_cp_as_the_rate_weighted_sum_over_checkpoints(tiny_demo):
    train = Subset(tiny_demo.train_set, range(24))
    engine = TFAEngine(
        tiny_demo.model, train, tiny_demo.test_set, checkpoints=tiny_demo.checkpoints,
        progress=False,
    )  # fmt: skip
    assert "tracin_cp" in tiny_demo.engine(progress=False).methods
    tests, targets = [0, 7], [1, 4]
    scores = engine.scores(tests, target=targets, method="tracin_cp").double()

    train_items = [train[i] for i in range(len(train))]
    test_items = [(tiny_demo.test_set[t][0], c) for t, c in zip(tests, targets, strict=True)]
    truth = torch.zeros_like(scores)
    float32_error = torch.zeros_like(scores)
    index_bound = torch.zeros_like(scores)
    num_params = sum(p.numel() for p in tiny_demo.model.parameters())
    for state, rate in tiny_demo.checkpoints:
        model = copy.deepcopy(tiny_demo.model)
        model.load_state_dict(state)
        g_train, g_test = (_gradients(model, train_items, torch.float64),
                           _gradients(model, test_items, torch.float64))  # fmt: skip
        exact = rate * (g_test @ g_train.T)
        truth += exact
        f_train, f_test = (_gradients(model, train_items, torch.float32),
                           _gradients(model, test_items, torch.float32))  # fmt: skip
        float32_error += (rate * (f_test.double() @ f_train.double().T) - exact).abs()
        norms = g_test.norm(dim=1)[:, None] * g_train.norm(dim=1)[None]
        index_bound += rate * float32_index_tolerance(num_params) * norms
    # The engine may err as much as float32 plain autograd does (twice, for its own gradients
    # and their dot product order), plus the float32 index's rounding of the dot products.
    allowed = 2 * float32_error + index_bound
    assert bool(((scores - truth).abs() <= allowed).all()), float((scores - truth).abs().max())
    assert float(truth.abs().max()) > 10 * float(allowed.max())  # the test can fail
