"""Attribution measures (`tfa_widgets.eval.attribution`) and patch measures for every scorer of
an engine on a demo-like dataset, one seed (data + training) at a time; tidy rows out.

Per seed the rows hold, for each scorer of the engine and a random attributor:

- ``mislabelling AUC`` (↑), ``shortcut AP`` (↑), ``identical class@s`` (↑),
  ``top-k cardinality`` (↑), ``randomisation ρ`` (↓), and ``LDS`` (↑) when subset models are
  given: quanda's definitions (see `tfa_widgets.eval.attribution`).
- What the pixel maps add (on the *fooled* test images: patched, of another class, predicted as the
  shortcut class): ``proponents patched`` (share of the top-k proponents carrying the patch),
  ``TFA mass on patch`` and ``Grad-CAM mass on patch`` (share of |map| on each patched
  proponent's patch), ``Grad-CAM test mass on patch`` (Grad-CAM of the fooled test image, on its
  own patch: the FA reference, the same for every scorer) and ``cue found by TFA`` /
  ``cue found by Grad-CAM``: the share of fooled test images for which, in most of their patched
  proponents' maps, the strongest patch-sized block of pixels lies on the patch (what a user who
  only looked at the maps would see).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.nn import functional
from tqdm.auto import tqdm

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.core.errors import InputError
from tfa_widgets.eval import attribution as measures
from tfa_widgets.eval.attribution import random_subsets
from tfa_widgets.eval.localisation import mass_in_mask
from tfa_widgets.eval.masking import pixel_importance
from tfa_widgets.eval.sanity import randomised_copy

RANDOM = "random"


def self_scores(engine: TFAEngine, method: str) -> torch.Tensor | None:
    """Return each training image's score against itself in float64, ``[N]``
    (`TFAEngine.self_scores`: grad-dot ``‖g_i‖²``, TracIn-CP ``Σ_c η_c ‖g_i^c‖²``), or None for
    a scorer the engine has no self-scores for (grad-cos: 1 for every image)."""
    try:
        return engine.self_scores(method=method).double()
    except InputError:
        return None


def score_matrix(engine: TFAEngine, tests: Sequence[int], targets: Sequence[int], method: str):
    """Return ``[T, N]`` scores of every training image for each test image and target (one
    batched query: the preconditioned scorers form the training gradients once for all)."""
    if method == RANDOM:
        raise InputError("the random attributor has no engine scores; use random_scores")
    if not len(tests):
        return torch.zeros(0, engine.num_train, dtype=torch.float64)
    tests, targets = [int(t) for t in tests], [int(c) for c in targets]
    return engine.scores(tests, target=targets, method=method).double()


def random_scores(t: int, n: int, seed: int) -> torch.Tensor:
    """Return ``[t, n]`` uniform random scores from a generator seeded with ``seed``."""
    return torch.rand(t, n, generator=torch.Generator().manual_seed(int(seed))).double()


def predicted(engine: TFAEngine, tests: Sequence[int]) -> list[int]:
    """Return the model's predicted class of each test image."""
    return [int(engine.predict(int(t)).argmax()) for t in tests]


def fooled_tests(demo, engine: TFAEngine) -> list[int]:
    """Return patched test images of another class that the model predicts as the shortcut."""
    meta = demo.metadata
    pool = meta.patched_test_other
    pairs = zip(pool, predicted(engine, pool), strict=True)
    return [t for t, c in pairs if c == meta.shortcut_class]


def top_block_on_patch(map_: torch.Tensor, patch: torch.Tensor, block: int) -> bool:
    """Return whether the ``block x block`` window of largest |map| mass is centred on ``patch``."""
    importance = pixel_importance(map_)[None, None].double()
    sums = functional.avg_pool2d(importance, block, stride=1)[0, 0]
    row, col = divmod(int(sums.argmax()), sums.shape[1])
    return bool(patch[row + block // 2, col + block // 2])


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def patch_measures(demo, engine: TFAEngine, fooled: Sequence[int], method: str, k: int) -> dict:
    """Return the map measures on the fooled test images for one scorer (see module docstring)."""
    meta = demo.metadata
    block = meta.config.patch_size
    per_test: dict[str, list[float]] = {}
    target = meta.shortcut_class
    tests = [int(t) for t in fooled]
    tops, _ = engine.top_k(tests, k, target=[target] * len(tests), method=method)
    for test, indices in zip(fooled, tops, strict=True):
        patched = [j for j, i in enumerate(indices.tolist()) if i in meta.train_patch_boxes]
        add = per_test.setdefault
        add("proponents patched", []).append(len(patched) / k)
        image = engine.test_set[test][0]
        test_cam = engine.gradcam(image, target)
        add("Grad-CAM test mass on patch", []).append(
            mass_in_mask(test_cam, meta.patch_mask("test", test))
        )
        if not patched:
            continue
        chosen = indices[patched]
        tfa = engine.tfa_maps(test, chosen, target=target, method=method)
        images = torch.stack([engine.train_set[int(i)][0] for i in chosen])
        cams = engine.gradcam(images, [int(engine.train_set[int(i)][1]) for i in chosen])
        masks = [meta.patch_mask("train", int(i)) for i in chosen]
        for name, maps in (("TFA", tfa), ("Grad-CAM", cams)):
            add(f"{name} mass on patch", []).append(
                _mean([mass_in_mask(m, mask) for m, mask in zip(maps, masks, strict=True)])
            )
            hits = [top_block_on_patch(m, mask, block) for m, mask in zip(maps, masks, strict=True)]
            add(f"cue found by {name}", []).append(float(sum(hits) > len(hits) / 2))
    return {name: _mean(values) for name, values in per_test.items()}


def attribution_values(
    demo,
    engine: TFAEngine,
    tests: Sequence[int],
    scorer: str,
    *,
    k: int,
    seed: int,
    randomised: TFAEngine | None,
    shortcut_tests: Sequence[int],
    lds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Return every attribution measure of one scorer (or ``"random"``) on one seed's data.

    ``lds``: ``(subsets [M, N], outputs [M, T])`` of models retrained on subsets (outputs on
    ``tests``), or None to skip the LDS.
    """
    meta = demo.metadata
    targets = predicted(engine, tests)
    n = engine.num_train
    if scorer == RANDOM:
        explanations = random_scores(len(tests), n, seed)
        shortcut = random_scores(len(shortcut_tests), n, seed + 1)
        self_influence = random_scores(1, n, seed + 2)[0]
        again = random_scores(len(tests), n, seed + 3)
    else:
        explanations = score_matrix(engine, tests, targets, scorer)
        shortcut_targets = [meta.shortcut_class] * len(shortcut_tests)
        shortcut = score_matrix(engine, shortcut_tests, shortcut_targets, scorer)
        self_influence = self_scores(engine, scorer)
        again = None if randomised is None else score_matrix(randomised, tests, targets, scorer)
    values: dict[str, float] = {}
    if self_influence is not None and meta.flipped_labels:
        values["mislabelling AUC"] = measures.mislabelling_detection(
            self_influence, sorted(meta.flipped_labels)
        )
    if len(shortcut_tests):
        values["shortcut AP"] = _mean(
            measures.shortcut_detection(shortcut, sorted(meta.train_patch_boxes))
        )
    labels = demo.train_set.labels
    values["identical class@5"] = _mean(measures.identical_class(explanations, labels, targets, 5))
    values[f"top-{k} cardinality"] = measures.top_k_cardinality(explanations, k)
    if again is not None:
        values["randomisation ρ"] = _mean(measures.randomisation_correlation(explanations, again))
    if lds is not None:
        values["LDS"] = _mean(measures.linear_datamodeling(explanations, *lds))
    return values


def randomised_engine(
    engine: TFAEngine, seed: int, checkpoints: Sequence[tuple[dict, float]] = ()
) -> TFAEngine:
    """Return an engine like ``engine`` on a copy of its model with every layer re-initialised
    (and each TracIn checkpoint in ``checkpoints`` likewise, at its own rate)."""
    randomised_checkpoints = [
        (randomised_copy(engine.model, "all", seed=seed + 1 + c).state_dict(), rate)
        for c, (_, rate) in enumerate(checkpoints)
    ]
    return TFAEngine(
        randomised_copy(engine.model, "all", seed=seed),
        engine.train_set,
        engine.test_set,
        loss=engine.loss,
        params=engine.param_names,
        settings=engine.settings,
        checkpoints=randomised_checkpoints or None,
        progress=False,
    )


def subset_outputs(
    demo,
    subsets: torch.Tensor,
    tests: Sequence[int],
    targets: Sequence[int],
    seed: int,
    progress: bool = False,
) -> torch.Tensor:
    """Return ``[M, T]``: the target logit of each test image under a model retrained on each
    subset (the demo's architecture and training settings, seeded by ``seed`` and the subset).

    ``progress`` shows a bar over the M subset models (each one is a full training run)."""
    from tfa_widgets.data.demo import initial_model
    from tfa_widgets.data.train import train_classifier

    images, labels = demo.train_set.images, demo.train_set.labels
    tested = torch.stack([demo.test_set[int(t)][0] for t in tests])
    config = demo.train_config
    rows = []
    bar = tqdm(subsets, desc="LDS subset models", unit="model", disable=not progress)
    for j, chosen in enumerate(bar):
        model = initial_model(len(demo.class_names), seed * 1000 + j)
        train_classifier(model, images[chosen], labels[chosen], config, seed + j, progress=False)
        with torch.no_grad():
            logits = model(tested)
        rows.append(logits[torch.arange(len(tests)), torch.as_tensor(list(targets))])
    return torch.stack(rows).double()


def seed_rows(
    demo,
    engine: TFAEngine,
    tests: Sequence[int],
    seed: int,
    *,
    k: int,
    groups: Sequence[str] = ("attribution", "patch"),
    lds_models: int = 0,
    lds_alpha: float = 0.5,
    randomisation: bool = True,
    max_fooled: int | None = None,
    scorers: Sequence[str] | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Return tidy rows of the attribution (every scorer + random) and patch measures, one seed.

    Each row's ``kind`` is ``"attribution"`` or ``"patch"``; ``test_index`` is -1 (one value per
    seed, over all its test images). The groups run in the order given (a run stopped early
    keeps the first).

    ``lds_models`` subset models are retrained for the LDS (0: no LDS); ``randomisation=False``
    skips the model-randomisation measure (it builds a second index); ``max_fooled`` keeps only
    the first fooled test images (all by default); ``scorers`` are the engine's scorers to
    measure (all of ``engine.methods`` by default); ``on_rows`` is called with the rows so far
    after each scorer (to save them as the run goes).
    """
    rows: list[dict] = []

    def add(values: dict, scorer: str, kind: str) -> None:
        rows.extend(
            {"measure": m, "method": scorer, "scorer": scorer, "kind": kind,
             "seed": seed, "test_index": -1, "value": float(v)}
            for m, v in values.items()
        )  # fmt: skip

    fooled = fooled_tests(demo, engine)[:max_fooled]
    scorers = list(engine.methods if scorers is None else scorers)

    def attribution_group() -> None:
        lds = None
        if lds_models:
            subsets = random_subsets(engine.num_train, lds_models, lds_alpha, seed)
            lds = (
                subsets,
                subset_outputs(
                    demo, subsets, tests, predicted(engine, tests), seed, progress=engine.progress
                ),
            )
        randomised = randomised_engine(engine, seed, demo.checkpoints) if randomisation else None
        for scorer in [*scorers, RANDOM]:
            values = attribution_values(
                demo, engine, tests, scorer, k=k, seed=seed, randomised=randomised,
                shortcut_tests=fooled, lds=lds,
            )  # fmt: skip
            if randomised is None:
                values.pop("randomisation ρ", None)
            add(values, scorer, "attribution")
            if on_rows is not None:
                on_rows(list(rows))

    def patch_group() -> None:
        for scorer in scorers if fooled else []:
            values = patch_measures(demo, engine, fooled, scorer, k)
            add(values | {"fooled tests": len(fooled)}, scorer, "patch")
            if on_rows is not None:
                on_rows(list(rows))

    run = {"attribution": attribution_group, "patch": patch_group}
    unknown = [g for g in groups if g not in run]
    if unknown:
        raise InputError(f"unknown measure groups {unknown}; choose from {sorted(run)}")
    for group in dict.fromkeys(groups):
        run[group]()
    return rows
