"""Data-attribution quality measures, to quanda's published definitions (quanda 0.5.0).

They judge *which training images* a scorer picks, not the pixel maps. Every function takes
explanations as a score matrix ``[T, N]`` (test images x training images, higher = more
supportive) or self-influences ``[N]``, so any attributor can be measured: the engine's scorers,
peers, a random baseline. `tfa_widgets.eval.quanda_bridge` runs quanda's own metric classes on
the engine for comparison, where quanda is installed.

- `mislabelling_detection`: quanda's ``MislabelingDetectionMetric`` (↑): training images ranked by
  self-influence, highest first; the curve is the share of the mislabelled ones found among the
  first j; the score is the trapezoidal area under that curve divided by N (1 for a perfect
  ranking as N grows, about 0.5 for a random one).
- `shortcut_detection`: ``ShortcutDetectionMetric`` (↑): per test image, the area under the
  precision-recall curve (average precision, ties resolved as torcheval's ``binary_auprc``) of its
  scores for separating the shortcut training images from the rest; mean over test images.
- `identical_class`: ``ClassDetectionMetric`` (↑): share of the top-s training images whose label
  is the explained class of the test image, mean over test images.
- `top_k_cardinality`: ``TopKCardinalityMetric`` (↑): distinct training images among all top-k
  sets over the count of their entries (1: every test image gets its own proponents).
- `randomisation_correlation`: ``ModelRandomizationMetric`` (↓): Spearman correlation per test
  image of the scores of the trained model and of a re-initialised copy; mean.
- `linear_datamodeling`: ``LinearDatamodelingMetric`` (↑): for subsets S_j of the training set, the
  Spearman correlation over j of the attribution's prediction ``Σ_{i∈S_j} τ_i`` and the output of a
  model retrained on S_j (the test image's target logit); mean over test images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.sanity import spearman


def _matrix(explanations: torch.Tensor, n: int | None = None) -> torch.Tensor:
    scores = torch.as_tensor(explanations).double()
    if scores.dim() != 2:
        raise InputError(f"explanations must be a [T, N] matrix, got shape {tuple(scores.shape)}")
    if n is not None and scores.shape[1] != n:
        raise InputError(f"explanations have {scores.shape[1]} columns for {n} training images")
    return scores


def detection_curve(self_influence: torch.Tensor, flagged: Sequence[int]) -> torch.Tensor:
    """Return the share of ``flagged`` images found among the first j of the ranking, ``[N]``."""
    values = torch.as_tensor(self_influence).double().reshape(-1)
    flagged = torch.as_tensor(list(flagged), dtype=torch.long)
    if flagged.numel() == 0:
        raise InputError("mislabelling detection needs at least one mislabelled training image")
    hit = torch.zeros(len(values), dtype=torch.bool)
    hit[flagged] = True
    order = values.argsort(descending=True, stable=True)
    return hit[order].double().cumsum(0) / flagged.numel()


def mislabelling_detection(self_influence: torch.Tensor, mislabelled: Sequence[int]) -> float:
    """Return quanda's mislabelling detection score: area under the detection curve over N."""
    curve = detection_curve(self_influence, mislabelled)
    return float(torch.trapezoid(curve) / len(curve))


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Return the area under the precision-recall curve of ``scores`` for bool ``positive``.

    Tied scores form one threshold (as torcheval's ``binary_auprc`` and scikit-learn's
    ``average_precision_score``): ``Σ_thresholds (R_j − R_{j−1}) P_j``.
    """
    scores = torch.as_tensor(scores).double().reshape(-1)
    positive = torch.as_tensor(positive, dtype=torch.bool).reshape(-1)
    total = int(positive.sum())
    if total == 0:
        raise InputError("average precision needs at least one positive")
    order = scores.argsort(descending=True, stable=True)
    ranked, hits = scores[order], positive[order].double()
    true_pos, seen = hits.cumsum(0), torch.arange(1, len(hits) + 1, dtype=torch.float64)
    last_of_tie = torch.ones(len(ranked), dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]
    precision, recall = (true_pos / seen)[last_of_tie], (true_pos / total)[last_of_tie]
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((steps * precision).sum())


def shortcut_detection(explanations: torch.Tensor, shortcut: Sequence[int]) -> list[float]:
    """Return the average precision of each test image's scores for the shortcut images."""
    scores = _matrix(explanations)
    positive = torch.zeros(scores.shape[1], dtype=torch.bool)
    positive[torch.as_tensor(list(shortcut), dtype=torch.long)] = True
    return [average_precision(row, positive) for row in scores]


def identical_class(
    explanations: torch.Tensor, train_labels: torch.Tensor, targets: Sequence[int], s: int = 1
) -> list[float]:
    """Return, per test image, the share of its top-``s`` training images labelled its target."""
    scores = _matrix(explanations, len(train_labels))
    top = scores.topk(min(s, scores.shape[1]), dim=1).indices
    labels = torch.as_tensor(train_labels)[top]
    return (labels == torch.as_tensor(list(targets))[:, None]).double().mean(1).tolist()


def top_k_cardinality(explanations: torch.Tensor, k: int) -> float:
    """Return distinct training images among all top-``k`` sets over their total count."""
    scores = _matrix(explanations)
    top = scores.topk(k, dim=1).indices
    return top.unique().numel() / top.numel()


def randomisation_correlation(explanations: torch.Tensor, randomised: torch.Tensor) -> list[float]:
    """Return the Spearman correlation per test image of trained and randomised-model scores."""
    a, b = _matrix(explanations), _matrix(randomised)
    if a.shape != b.shape:
        raise InputError(f"score matrices differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return [spearman(x, y) for x, y in zip(a, b, strict=True)]


def linear_datamodeling(
    explanations: torch.Tensor, subsets: torch.Tensor, outputs: torch.Tensor
) -> list[float]:
    """Return the LDS per test image.

    Parameters
    ----------
    explanations : ``[T, N]`` scores.
    subsets : bool ``[M, N]``: which training images each retrained model saw.
    outputs : ``[M, T]``: each retrained model's output on each test image (quanda uses the logit
        of the explained class).
    """
    scores = _matrix(explanations)
    chosen = torch.as_tensor(subsets, dtype=torch.float64)
    outputs = torch.as_tensor(outputs, dtype=torch.float64)
    if chosen.shape[1] != scores.shape[1] or outputs.shape != (len(chosen), len(scores)):
        raise InputError(
            f"LDS needs subsets [M, N] and outputs [M, T]; got {tuple(chosen.shape)} and "
            f"{tuple(outputs.shape)} for explanations {tuple(scores.shape)}"
        )
    predicted = chosen @ scores.T  # [M, T]
    return [spearman(predicted[:, t], outputs[:, t]) for t in range(len(scores))]


def random_subsets(n: int, m: int, alpha: float, seed: int) -> torch.Tensor:
    """Return ``m`` random subsets of ``range(n)`` of size ``round(alpha n)`` as bool ``[m, n]``."""
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")
    generator = torch.Generator().manual_seed(int(seed))
    size = max(1, round(alpha * n))
    out = torch.zeros(m, n, dtype=torch.bool)
    for row in out:
        row[torch.randperm(n, generator=generator)[:size]] = True
    return out
