"""Masking, localisation and rank correlation against values worked out by hand (and scipy)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from tfa_widgets.core.errors import InputError, NonFiniteError
from tfa_widgets.eval.localisation import mass_in_mask, pointing_game
from tfa_widgets.eval.masking import (
    channel_mean,
    fill,
    keep_top,
    pixel_importance,
    remove_top,
    top_count,
    top_p_mask,
)
from tfa_widgets.eval.sanity import (
    average_ranks,
    map_rank_correlation,
    randomised_copy,
    spearman,
)

pytestmark = pytest.mark.portability

MAP = torch.tensor(
    [
        [0.1, -0.9, 0.3, 0.0],
        [0.5, 0.2, -0.05, 0.8],
        [0.0, 0.0, 0.7, -0.6],
        [0.4, 0.01, 0.02, 0.03],
    ]
)


def test_top_count_rounds_half_up():
    assert top_count(25, 16) == 4
    assert top_count(10, 16) == 2  # 1.6 -> 2
    assert top_count(1, 16) == 0  # 0.16 -> 0
    assert top_count(3.125, 16) == 1  # 0.5 -> 1
    assert top_count(0, 16) == 0
    assert top_count(100, 16) == 16
    with pytest.raises(InputError, match="percentage"):
        top_count(150, 16)


def test_top_p_mask_selects_largest_magnitudes():
    mask = top_p_mask(MAP, 25)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in [(0, 1), (1, 3), (2, 2), (2, 3)]:  # |-0.9|, 0.8, 0.7, |-0.6|
        expected[r, c] = True
    assert torch.equal(mask, expected)
    assert int(top_p_mask(MAP, 50).sum()) == 8


def test_top_p_mask_breaks_ties_by_position():
    flat = torch.ones(3, 3)
    mask = top_p_mask(flat, 100 * 4 / 9)  # 4 of 9 pixels, all tied
    assert mask.reshape(-1).tolist() == [True] * 4 + [False] * 5


def test_raw_maps_rank_by_summed_channel_magnitude():
    raw = torch.zeros(2, 2, 2)
    raw[0, 0, 0], raw[1, 0, 0] = 1.0, -1.0  # signed sum 0, magnitude 2
    raw[0, 1, 1] = 1.5  # magnitude 1.5
    assert torch.equal(pixel_importance(raw), torch.tensor([[2.0, 0.0], [0.0, 1.5]]))
    assert top_p_mask(raw, 25)[0, 0]
    stacked = top_p_mask(torch.stack([raw, -raw]), 50, stacked=True)
    assert stacked.shape == (2, 2, 2) and int(stacked.sum()) == 4


def test_masking_rejects_bad_maps():
    with pytest.raises(NonFiniteError):
        top_p_mask(torch.tensor([[float("nan"), 1.0]]), 50)
    with pytest.raises(InputError, match="shape"):
        top_p_mask(torch.zeros(5), 50)


def test_fill_keep_and_remove_are_complementary():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    maps = torch.stack([MAP, -MAP.T])
    baseline = torch.tensor([-1.0, -2.0, -3.0])
    kept = keep_top(images, maps, 25, baseline)
    removed = remove_top(images, maps, 25, baseline)
    selected = top_p_mask(maps, 25, stacked=True)
    for i in range(2):
        for c in range(3):
            assert torch.equal(kept[i, c][selected[i]], images[i, c][selected[i]])
            assert bool((kept[i, c][~selected[i]] == baseline[c]).all())
            assert bool((removed[i, c][selected[i]] == baseline[c]).all())
            assert torch.equal(removed[i, c][~selected[i]], images[i, c][~selected[i]])
    assert torch.equal(remove_top(images, maps, 0, baseline), images)
    assert torch.equal(keep_top(images, maps, 100, baseline), images)
    with pytest.raises(InputError, match="channels"):
        fill(images, selected, torch.zeros(2))


def test_channel_mean_matches_stacked_mean():
    images = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    dataset = [(x, 0) for x in images]
    # channel_mean sums in float64 and rounds the result to float32 once: within u * |mean| of
    # the float64 mean (u = 6e-8, |mean| < 1). A float32 mean would be off by up to
    # gamma_80 * mean |x| ~ 4e-6 on some CPUs: the reference is float64 too.
    expected = images.double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(channel_mean(dataset).double(), expected, rtol=0, atol=1e-7)


def test_pointing_game_hits_misses_and_ties():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    assert pointing_game(MAP, mask) == 1.0  # max |m| = 0.9 at (0, 1)
    assert pointing_game(MAP.flip(0), mask) == 0.0  # 0.9 moves to (3, 1)
    assert pointing_game(torch.ones(4, 4), mask) == pytest.approx(4 / 16)
    two = torch.zeros(4, 4)
    two[0, 0] = two[3, 3] = 5.0
    assert pointing_game(two, mask) == 0.5
    with pytest.raises(InputError, match="empty"):
        pointing_game(MAP, torch.zeros(4, 4, dtype=torch.bool))


def test_mass_in_mask_by_hand():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    total_abs = float(MAP.abs().sum())
    inside_abs = 0.1 + 0.9 + 0.5 + 0.2
    assert mass_in_mask(MAP, mask) == pytest.approx(inside_abs / total_abs)
    total_pos = float(MAP.clamp(min=0).sum())
    assert mass_in_mask(MAP, mask, part="positive") == pytest.approx((0.1 + 0.5 + 0.2) / total_pos)
    assert math.isnan(mass_in_mask(torch.zeros(4, 4), mask))
    assert mass_in_mask(torch.ones(3, 4, 4), mask) == pytest.approx(0.25)
    with pytest.raises(InputError, match="part"):
        mass_in_mask(MAP, mask, part="negative")


def test_average_ranks_and_spearman_match_scipy():
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0])
    assert average_ranks(values).tolist() == scipy.stats.rankdata(values.numpy()).tolist()
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.normal(size=50)
        b = a + rng.normal(size=50)
        b[::7] = 0.0  # ties
        expected = scipy.stats.spearmanr(a, b).statistic
        assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, abs=1e-12)


def test_spearman_on_known_permutations():
    x = torch.arange(10.0)
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    swapped = x.clone()
    swapped[[0, 9]] = swapped[[9, 0]]  # sum d^2 = 2 * 81: rho = 1 - 6 * 162 / (10 * 99)
    assert spearman(x, swapped) == pytest.approx(1 - 6 * 162 / 990)
    assert math.isnan(spearman(x, torch.ones(10)))
    with pytest.raises(InputError):
        spearman(x, x[:5])


def test_map_rank_correlation_per_map():
    maps = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    same = map_rank_correlation(maps, -maps)  # importance ignores the sign
    assert same == pytest.approx([1.0, 1.0, 1.0])
    other = map_rank_correlation(maps, maps.flip(-1))
    assert all(r < 0.9 for r in other)


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


def test_randomised_copy_resets_chosen_layers_only():
    model = _tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    last = randomised_copy(model, "last", seed=1)
    assert torch.equal(last[0].weight, model[0].weight)
    assert not torch.equal(last[3].weight, model[3].weight)
    every = randomised_copy(model, "all", seed=1)
    assert not torch.equal(every[0].weight, model[0].weight)
    assert torch.equal(randomised_copy(model, ["3"], seed=1)[3].weight, last[3].weight)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    with pytest.raises(InputError, match="no resettable layer"):
        randomised_copy(model, ["classifier"])


def test_randomisation_changes_input_gradients():
    model = _tiny_net()
    images = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(2))

    def saliency(net):
        x = images.clone().requires_grad_(True)
        net(x)[:, 0].sum().backward()
        return x.grad

    correlations = map_rank_correlation(
        saliency(model), saliency(randomised_copy(model, "all", seed=7))
    )
    assert max(correlations) < 0.9
    assert map_rank_correlation(saliency(model), saliency(model)) == pytest.approx([1.0] * 4)
