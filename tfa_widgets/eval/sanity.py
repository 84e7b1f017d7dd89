"""Model-parameter randomisation test (Adebayo et al. 2018) and Spearman rank correlation.

A map that explains the model must change when the model's weights are replaced by random ones.
`randomised_copy` re-initialises the weights of a copy of the model (the last layer, or all layers);
the maps of the original and the randomised model are then compared by the Spearman rank
correlation of their pixel importances (`tfa_widgets.eval.masking.pixel_importance`). High
correlation means the map hardly depends on the model: the check fails. A map that ignores the model
(e.g. a random map with a fixed seed, or an edge detector) has correlation 1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.masking import pixel_importance


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Return the 1-based ranks of a 1-D tensor, ties sharing their average rank (float64)."""
    values = values.detach().reshape(-1).to(torch.float64)
    n = values.numel()
    sorted_values, order = torch.sort(values, stable=True)
    starts = torch.ones(n, dtype=torch.bool, device=values.device)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    groups = int(group[-1]) + 1 if n else 0
    sums = torch.zeros(groups, dtype=torch.float64, device=values.device).index_add_(
        0, group, positions
    )
    counts = torch.bincount(group, minlength=groups).to(torch.float64)
    ranks = torch.empty(n, dtype=torch.float64, device=values.device)
    ranks[order] = (sums / counts)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the Spearman rank correlation of two equally sized tensors (flattened).

    Ties get average ranks (as `scipy.stats.spearmanr`).

    Parameters
    ----------
    a, b : torch.Tensor
        Tensors with the same number of elements (at least two).

    Returns
    -------
    float
        The correlation in [-1, 1]; NaN when either input is constant.

    Raises
    ------
    InputError
        When the sizes differ or there are fewer than two values.
    """
    if a.numel() != b.numel():
        raise InputError(f"cannot correlate tensors of {a.numel()} and {b.numel()} elements")
    if a.numel() < 2:
        raise InputError("a rank correlation needs at least two values")
    ra = average_ranks(a)
    rb = average_ranks(b)
    ra = ra - ra.mean()
    rb = rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    if denominator == 0.0:
        return float("nan")
    return float((ra * rb).sum()) / denominator


def map_rank_correlation(maps_a: torch.Tensor, maps_b: torch.Tensor) -> list[float]:
    """Return the Spearman correlation of pixel importances per map of two stacks ``[k, ...]``."""
    if maps_a.shape[0] != maps_b.shape[0]:
        raise InputError(f"got {maps_a.shape[0]} and {maps_b.shape[0]} maps to compare")
    ia = pixel_importance(maps_a, stacked=True)
    ib = pixel_importance(maps_b, stacked=True)
    return [spearman(x, y) for x, y in zip(ia, ib, strict=True)]


def _resettable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(False))
    ]


def randomised_copy(
    model: nn.Module, layers: str | Sequence[str] = "last", seed: int = 0
) -> nn.Module:
    """Return a copy of ``model`` in eval mode with the weights of some layers re-initialised.

    Parameters
    ----------
    model : nn.Module
        The trained model; it is copied, not modified.
    layers : str or sequence of str
        ``"last"`` (the last layer with weights, in registration order: usually the classifier),
        ``"all"`` (every layer with weights; BatchNorm layers are reset to identity statistics), or
        the module names to re-initialise.
    seed : int
        Seed of the new random weights.

    Returns
    -------
    nn.Module
        The randomised copy.

    Raises
    ------
    InputError
        When the model has no resettable layer or ``layers`` names none of them.
    """
    randomised = copy.deepcopy(model).eval()
    candidates = _resettable(randomised)
    if not candidates:
        raise InputError("the model has no layers with resettable weights to randomise")
    if layers == "last":
        chosen = [candidates[-1]]
    elif layers == "all":
        chosen = candidates
    elif isinstance(layers, str):
        raise InputError(f"layers must be 'last', 'all' or a list of module names, got {layers!r}")
    else:
        by_name = dict(candidates)
        unknown = [name for name in layers if name not in by_name]
        if unknown:
            raise InputError(f"no resettable layer named {unknown}; the model has {list(by_name)}")
        chosen = [(name, by_name[name]) for name in layers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, module in chosen:
            module.reset_parameters()
    return randomised
