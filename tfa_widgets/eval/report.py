"""Run every measure for every method over several test images and seeds; return tidy rows.

One *unit* is a (seed, test image) pair. For each unit the explained class is the model's
prediction; each scorer picks the top-k proponents; each map kind highlights their pixels; every
measure gives one number per unit and method (averaged over the k training images where a measure
is per image). `summarise` reports mean ± standard deviation over units.

Measures (the arrow says which direction is better for a faithful map):

- ``insertion@p`` (↓): relative test-loss change (change / loss before) of one SGD step on the
  proponents keeping only their top p% pixels (`tfa_widgets.eval.perturbation`), the paper's test;
  ``insertion mean`` (↓) averages it over p.
- ``deletion@p`` (↑): the same with the top p% removed; ``deletion mean`` (↑). ``deletion |shift|``
  (↑): mean over p of ``|deletion@p - unmasked|``, how much removing the pixels changes the step's
  effect in either direction (direction-free: do the pixels matter at all).
- ``retrain Δloss`` (↑) / ``retrain Δprob`` (↓): fine-tuning with the top ``retrain_p``% of each
  proponent removed, against a control run (`tfa_widgets.eval.retraining`). Fine-tuning runs on the
  k proponents plus ``retrain_replay`` other training images drawn with the unit's seed.
- ``pointing: R`` (↑), ``mass in R`` (↑), ``positive mass in R`` (↑) for each region R (e.g. the
  object mask, the planted patch) that a training image has (`tfa_widgets.eval.localisation`).
- ``sanity ρ (L)`` (↓): Spearman correlation of the maps before and after re-initialising the
  layers L of the model (`tfa_widgets.eval.sanity`).
- ``unmasked step`` and ``blank step`` (references, no direction): relative test-loss change of one
  step on the unmasked proponents, and on blank ones (every pixel at the baseline, same labels).
  Both depend on the scorer only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.explanation import SmoothGrad
from tfa_widgets.eval.baselines import MAP_KINDS, SCORERS, all_methods, method_maps
from tfa_widgets.eval.localisation import mass_in_mask, pointing_game
from tfa_widgets.eval.masking import channel_mean, fill, remove_top
from tfa_widgets.eval.perturbation import (
    OneStep,
    perturbation_curve,
    relative_change,
)
from tfa_widgets.eval.retraining import finetune, load_all, retraining_effect
from tfa_widgets.eval.sanity import map_rank_correlation, randomised_copy

MEASURE_GROUPS = ("insertion", "deletion", "retraining", "localisation", "sanity")
Regions = Callable[[int], dict[str, torch.Tensor | None]]


@dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation run, all fixed before looking at any test image.

    Parameters
    ----------
    k : int
        Proponents per test image.
    ps : tuple of float
        Percentages of pixels kept (insertion) or removed (deletion).
    lr : float
        SGD learning rate of the one-step test: small, so that the step stays near its first-order
        regime (at the demo's training rate 0.1 every masked step saturates the test loss at 0).
    retrain_lr : float
        SGD learning rate of fine-tuning (at 0.1, steps on masked images diverge to NaN).
    smooth : SmoothGrad
        SmoothGrad settings of ``tfa_smooth`` (its seed is replaced by the unit's seed).
    retrain_p : float
        Percentage of pixels removed from each proponent before fine-tuning.
    retrain_epochs, retrain_replay, retrain_batch_size : int
        Fine-tuning epochs, number of other training images mixed in, batch size.
    randomise : tuple of str
        Layers re-initialised for the sanity check (``"last"``, ``"all"``).
    measures : tuple of str
        Which groups of `MEASURE_GROUPS` to run.
    scorers, kinds : tuple of str
        The methods: every scorer with every map kind.
    """

    k: int = 8
    ps: tuple[float, ...] = (1, 5, 10, 25, 50)
    lr: float = 1e-4
    retrain_lr: float = 1e-3
    smooth: SmoothGrad = SmoothGrad(n=8, sigma=0.15)
    retrain_p: float = 10.0
    retrain_epochs: int = 5
    retrain_replay: int = 24
    retrain_batch_size: int = 32
    randomise: tuple[str, ...] = ("last", "all")
    measures: tuple[str, ...] = MEASURE_GROUPS
    scorers: tuple[str, ...] = SCORERS
    kinds: tuple[str, ...] = MAP_KINDS

    def __post_init__(self) -> None:
        unknown = [m for m in self.measures if m not in MEASURE_GROUPS]
        if unknown:
            raise InputError(f"unknown measures {unknown}; choose from {MEASURE_GROUPS}")
        if self.k < 1:
            raise InputError(f"k must be at least 1, got {self.k}")


def dataset_regions(dataset) -> Regions:
    """Return a region provider giving each training image's ``mask(i)`` as ``"object"``."""
    if not hasattr(dataset, "mask"):
        return lambda i: {}
    return lambda i: {"object": dataset.mask(i)}


def _unit_seed(seed: int, test: int) -> int:
    return 1_000_003 * int(seed) + int(test)


class _Unit:
    """Shared state of one (seed, test image) pair."""

    def __init__(self, engine, test: int, seed: int, config: EvalConfig) -> None:
        self.test, self.seed = test, seed
        self.map_seed = _unit_seed(seed, test)
        self.target = int(engine.predict(test).argmax())
        image = engine.test_set[test][0]
        self.step = OneStep(engine.model, image, self.target, lr=config.lr, loss=engine.loss)
        self.image = image


def evaluate(
    engine,
    tests_by_seed: dict[int, Sequence[int]],
    config: EvalConfig | None = None,
    *,
    regions: Regions | None = None,
    baseline: torch.Tensor | None = None,
    progress: bool = True,
) -> list[dict]:
    """Return one row per (measure, method, seed, test image): every measure for every method.

    Parameters
    ----------
    engine : TFAEngine
        Engine on the trained model, with a ``test_set``.
    tests_by_seed : dict
        Seed -> test indices evaluated with it (see `tfa_widgets.eval.setups`). The seed drives
        the random maps, the SmoothGrad noise, the fine-tuning order and its replay images.
    config : EvalConfig, optional
        Measures, methods and their settings (the defaults when ``None``).
    regions : callable, optional
        Training index -> ``{region name: bool mask [H, W] or None}``; by default the training
        set's ``mask(i)`` as ``"object"``.
    baseline : torch.Tensor, optional
        Fill value per channel; by default the training set's channel mean.
    progress : bool
        Show a progress bar over the test images.

    Returns
    -------
    list of dict
        Rows with ``measure``, ``method``, ``scorer``, ``kind``, ``seed``, ``test_index``,
        ``target`` and ``value``; `summarise` and `format_report` read them.

    Raises
    ------
    InputError
        When the engine has no test set, cannot score with a configured scorer (not in
        ``engine.methods``), or there is nothing to evaluate.
    """
    config = config or EvalConfig()
    if engine.test_set is None:
        raise InputError("the evaluation needs an engine with a test_set")
    regions = regions or dataset_regions(engine.train_set)
    baseline = channel_mean(engine.train_set) if baseline is None else baseline
    offered = engine.methods
    missing = [scorer for scorer in config.scorers if scorer not in offered]
    if missing:
        raise InputError(f"the engine cannot score with {missing}; it offers {offered}")
    methods = all_methods(config.scorers, config.kinds)
    plan = [(int(seed), int(t)) for seed, tests in tests_by_seed.items() for t in tests]
    if not plan:
        raise InputError("nothing to evaluate: give at least one seed with one test image")
    data = load_all(engine.train_set) if "retraining" in config.measures else None
    rows: list[dict] = []
    randomised: dict = {}
    for seed, test in tqdm(plan, desc="evaluating", disable=not progress):
        unit = _Unit(engine, test, seed, config)
        if "sanity" in config.measures and seed not in randomised:
            randomised = {seed: _randomised_engines(engine, config, seed)}
        for scorer in config.scorers:
            indices, _ = engine.top_k(test, config.k, target=unit.target, method=scorer)
            images = torch.stack([engine.train_set[int(i)][0] for i in indices])
            labels = [engine.train_set[int(i)][1] for i in indices]
            everything = torch.ones(len(images), *images.shape[-2:], dtype=torch.bool)
            blank = fill(images, everything, baseline)
            full, blank_change = unit.step.loss_changes(torch.stack([images, blank]), labels)
            control = None
            if data is not None:
                subset = _retrain_subset(
                    len(data[0]), indices, config.retrain_replay, unit.map_seed
                )
                control = _finetune(engine, data, subset, {}, config, unit.map_seed)
            for method in (m for m in methods if m.scorer == scorer):
                maps = method_maps(
                    method, engine, test, indices, unit.target, seed=unit.map_seed,
                    smooth=config.smooth,
                )  # fmt: skip
                values = {
                    "unmasked step": relative_change(full, unit.step.loss_before),
                    "blank step": relative_change(blank_change, unit.step.loss_before),
                }
                values |= _perturbation(unit, images, labels, maps, full, baseline, config)
                if control is not None:
                    edited = remove_top(images, maps, config.retrain_p, baseline)
                    replace = {j: edited[j] for j in range(len(indices))}
                    tuned = _finetune(engine, data, subset, replace, config, unit.map_seed)
                    effect = retraining_effect(control, tuned, unit.image, unit.target, engine.loss)
                    values["retrain Δloss"] = effect["loss_change"]
                    values["retrain Δprob"] = effect["prob_change"]
                if "localisation" in config.measures:
                    values |= _localisation(maps, indices, regions)
                if "sanity" in config.measures:
                    for layers, other in randomised[seed].items():
                        again = method_maps(
                            method, other, test, indices, unit.target, seed=unit.map_seed,
                            smooth=config.smooth,
                        )  # fmt: skip
                        values[f"sanity ρ ({layers})"] = _nanmean(map_rank_correlation(maps, again))
                rows += [
                    {
                        "measure": measure,
                        "method": method.label,
                        "scorer": method.scorer,
                        "kind": method.kind,
                        "seed": seed,
                        "test_index": test,
                        "target": unit.target,
                        "value": float(value),
                    }
                    for measure, value in values.items()
                ]
    return rows


def _perturbation(unit: _Unit, images, labels, maps, full, baseline, config) -> dict:
    values: dict[str, float] = {}
    before = unit.step.loss_before
    for mode in ("insertion", "deletion"):
        if mode not in config.measures:
            continue
        curve = perturbation_curve(unit.step, images, labels, maps, config.ps, mode, baseline)
        relative = {p: relative_change(change, before) for p, change in curve.items()}
        values |= {f"{mode}@{p:g}": r for p, r in relative.items()}
        values[f"{mode} mean"] = _nanmean(list(relative.values()))
        if mode == "deletion":
            reference = relative_change(full, before)
            shifts = [abs(r - reference) for r in relative.values()]
            values["deletion |shift|"] = _nanmean(shifts)
    return values


def _localisation(maps: torch.Tensor, indices: torch.Tensor, regions: Regions) -> dict:
    per_measure: dict[str, list[float]] = {}
    for map_, index in zip(maps, indices, strict=True):
        for name, mask in regions(int(index)).items():
            if mask is None or not bool(torch.as_tensor(mask).any()):
                continue
            per_measure.setdefault(f"pointing: {name}", []).append(pointing_game(map_, mask))
            per_measure.setdefault(f"mass in {name}", []).append(mass_in_mask(map_, mask))
            positive = mass_in_mask(map_, mask, part="positive")
            per_measure.setdefault(f"positive mass in {name}", []).append(positive)
    return {measure: _nanmean(values) for measure, values in per_measure.items()}


def _randomised_engines(engine, config: EvalConfig, seed: int) -> dict:
    from tfa_widgets.core.engine import TFAEngine

    return {
        layers: TFAEngine(
            randomised_copy(engine.model, layers, seed=_unit_seed(seed, 7919)),
            engine.train_set,
            engine.test_set,
            loss=engine.loss,
            params=engine.param_names,
            progress=False,
        )
        for layers in config.randomise
    }


def _retrain_subset(n: int, indices: torch.Tensor, replay: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chosen = set(int(i) for i in indices)
    others = [int(i) for i in torch.randperm(n, generator=generator) if int(i) not in chosen]
    return torch.cat([indices.long(), torch.tensor(others[:replay], dtype=torch.long)])


def _finetune(engine, data, subset: torch.Tensor, replace: dict, config: EvalConfig, seed: int):
    images, labels = data
    return finetune(
        engine.model,
        images[subset],
        [labels[int(i)] for i in subset],
        epochs=config.retrain_epochs,
        lr=config.retrain_lr,
        batch_size=config.retrain_batch_size,
        seed=seed,
        loss=engine.loss,
        replace=replace,
    )


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
