"""The maps compared in the evaluation: TFA and the baselines it has to beat.

A *method* is a scorer (which training images are the top-k proponents: ``grad_cos`` and
``grad_dot`` by default, any of the engine's ``methods``) together with a map kind (which
pixels of each of those images are highlighted):

- ``random``: uniform noise, seeded; it ignores model and data (the chance level).
- ``gradcam``: Grad-CAM of the training image for its own label (the two-step baseline: TDA to find
  the image, then ordinary feature attribution on it).
- ``saliency``: the plain input gradient of the training image's own-label logit (what
  ``engine.saliency`` gives, batched).
- ``integrated_gradients`` (offered, not in the default `MAP_KINDS`): Integrated Gradients of the
  training image's own-label logit. Every reference map of
  `tfa_widgets.core.reference_maps.REFERENCE_MAPS` is a kind here, computed by
  ``engine.reference_maps``.
- ``tfa``: the TFA map ``grad_x S(z_i, z_t)`` of the scorer.
- ``tfa_smooth``: the same averaged over noisy copies (SmoothGrad).

Maps come back as ``[k, H, W]`` or ``[k, C, H, W]``; the measures rank pixels by their magnitude
(`tfa_widgets.eval.masking.pixel_importance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.explanation import SmoothGrad
from tfa_widgets.core.reference_maps import REFERENCE_MAPS
from tfa_widgets.core.scoring import SCORERS as REGISTERED_SCORERS

MAP_KINDS = ("random", "gradcam", "saliency", "tfa", "tfa_smooth")
OFFERED_KINDS = ("random", *REFERENCE_MAPS, "tfa", "tfa_smooth")
SCORERS = ("grad_cos", "grad_dot")  # evaluated by default; any of the engine's methods may be
MAP_LABELS = {
    "random": "random",
    **{name: cls.label for name, cls in REFERENCE_MAPS.items()},
    "tfa": "TFA",
    "tfa_smooth": "TFA+SmoothGrad",
}
SCORER_LABELS = {name: scorer.label for name, scorer in REGISTERED_SCORERS.items()}


@dataclass(frozen=True)
class Method:
    """A scorer choosing the training images and a map kind highlighting their pixels.

    Parameters
    ----------
    scorer : str
        A registered scorer (`tfa_widgets.core.scoring.SCORERS`, e.g. ``"grad_cos"``): the
        score that picks the top-k proponents; the engine must offer it (`TFAEngine.methods`).
    kind : str
        One of `OFFERED_KINDS`: ``"random"``, a reference map (``"gradcam"``: Grad-CAM of the
        training image for its own label, ``"saliency"``, ``"integrated_gradients"``), ``"tfa"``
        or ``"tfa_smooth"``.

    Raises
    ------
    InputError
        When ``scorer`` or ``kind`` is unknown.
    """

    scorer: str
    kind: str

    def __post_init__(self) -> None:
        if self.scorer not in REGISTERED_SCORERS:
            raise InputError(
                f"unknown scorer {self.scorer!r}; choose one of {tuple(REGISTERED_SCORERS)}"
            )
        if self.kind not in OFFERED_KINDS:
            raise InputError(f"unknown map kind {self.kind!r}; choose one of {OFFERED_KINDS}")

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``"TFA [Grad-Cos]"``."""
        return f"{MAP_LABELS[self.kind]} [{SCORER_LABELS[self.scorer]}]"


def all_methods(
    scorers: tuple[str, ...] = SCORERS, kinds: tuple[str, ...] = MAP_KINDS
) -> list[Method]:
    """Return every combination of scorer and map kind, scorer-major."""
    return [Method(scorer, kind) for scorer in scorers for kind in kinds]


def random_maps(k: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Return ``k`` uniform random maps ``[k, H, W]`` from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(k, height, width, generator=generator)


def method_maps(
    method: Method,
    engine,
    test: int | torch.Tensor,
    train_indices: torch.Tensor,
    target: int,
    *,
    seed: int,
    smooth: SmoothGrad,
) -> torch.Tensor:
    """Return the maps of ``method`` for the training images: ``[k, H, W]`` or ``[k, C, H, W]``.

    Parameters
    ----------
    method : Method
        The scorer and the map kind.
    engine : TFAEngine
        Supplies model, training set, Grad-CAM, saliency and TFA maps.
    test : int or torch.Tensor
        The test image: an index into the engine's test set, or an image ``[C, H, W]``.
    train_indices : torch.Tensor
        The training images to map, ``[k]``.
    target : int
        The explained class of the test image (used by TFA; the baselines use each training
        image's own label).
    seed : int
        Seed of the random maps and of the SmoothGrad noise (replaces ``smooth.seed``).
    smooth : SmoothGrad
        Settings of ``tfa_smooth``.

    Returns
    -------
    torch.Tensor
        ``[k, H, W]`` for random and Grad-CAM maps, ``[k, C, H, W]`` for saliency, Integrated
        Gradients and TFA.
    """
    indices = torch.as_tensor(train_indices, dtype=torch.long)
    if method.kind in ("tfa", "tfa_smooth"):
        noise = (
            SmoothGrad(n=smooth.n, sigma=smooth.sigma, seed=seed)
            if method.kind == "tfa_smooth"
            else None
        )
        return engine.tfa_maps(test, indices, target=target, smooth=noise, method=method.scorer)
    images = torch.stack([engine.train_set[int(i)][0] for i in indices])
    if method.kind == "random":
        return random_maps(len(indices), images.shape[-2], images.shape[-1], seed)
    own = [engine.own_label_class(engine.train_set[int(i)][1]) for i in indices]
    return engine.reference_maps(images, own, method.kind)
