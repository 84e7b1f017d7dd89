"""What the explorer shows at one moment: one value every panel draws from.

The explorer replaces its :class:`View` in one assignment once everything in it is computed, so
the selected test image and what is on screen can never disagree (an interrupted or rejected
update leaves the previous view whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfa_widgets.core.explanation import Explanation
from tfa_widgets.widgets.controls import METHOD_LABELS, REFERENCE_LABELS, Settings
from tfa_widgets.widgets.labels import as_label, label_text


@dataclass(frozen=True)
class CamMaps:
    """A reference map of the test image (for the target) and of each training image (own
    label), ``[H, W]`` and ``[k, H, W]``, non-negative.

    Parameters
    ----------
    test, train : torch.Tensor
        The maps (saliency and Integrated Gradients: absolute values summed over channels).
    layer : str or None
        The Grad-CAM layer; None for maps without one.
    kind : str
        The reference map kind (`TFAEngine.reference_kinds`).
    """

    test: torch.Tensor
    train: torch.Tensor
    layer: str | None
    kind: str = "gradcam"

    @property
    def label(self) -> str:
        """The kind's name for people, e.g. "Grad-CAM"."""
        return REFERENCE_LABELS.get(self.kind, self.kind)

    def describe(self) -> str:
        """Return e.g. "Grad-CAM layer layer3.1.conv2" or "reference map Integrated Gradients"."""
        if self.kind == "gradcam":
            return f"Grad-CAM layer {self.layer}"
        return f"reference map {self.label}"


@dataclass(frozen=True)
class View:
    """One explanation, how to draw it, which training image is shown large, and its Grad-CAMs.

    Parameters
    ----------
    key : hashable
        Identifies the test image and the engine settings (the explanation cache's key).
    rank : int
        Position in the top-k of the training image shown large (0-based).
    """

    explanation: Explanation
    settings: Settings
    rank: int
    cams: CamMaps
    class_names: tuple[str, ...]
    key: object = None

    @property
    def test(self) -> int | torch.Tensor:
        """The selected test image: its test-set index, or the custom image itself."""
        e = self.explanation
        return e.test_index if e.test_index is not None else e.test_image

    def name(self, cls: int) -> str:
        """Return the name of class ``cls``."""
        return label_text(cls, self.class_names)

    def maps(self) -> torch.Tensor:
        """Return the TFA maps ``[k, H, W]`` reduced as the settings say."""
        s = self.settings
        return self.explanation.reduced_maps(s.reduction, s.times_input)

    def train_titles(self) -> list[str]:
        """Return one short two-line title per training image: rank, index, label and score."""
        e = self.explanation
        return [
            f"{r}. #{int(i)}<br>{label_text(as_label(y), self.class_names)} {float(v):.3f}"
            for r, (i, v, y) in enumerate(
                zip(e.train_indices, e.scores, e.train_labels, strict=True), start=1
            )
        ]

    def ranking_title(self) -> str:
        """Return e.g. "Top 8 proponents", or "Top proponent" for k = 1."""
        e = self.explanation
        direction = "opponent" if e.opponents else "proponent"
        return f"Top {direction}" if e.k == 1 else f"Top {e.k} {direction}s"

    def describe(self) -> str:
        """Return one line naming test image, target, ranking, scorer, smoothing and the
        reference map (kind, and layer for Grad-CAM)."""
        e = self.explanation
        test = f"test #{e.test_index}" if e.test_index is not None else "custom image"
        smooth = f", SmoothGrad n={e.smooth.n} σ={e.smooth.sigma:g}" if e.smooth else ""
        method = METHOD_LABELS.get(e.method, e.method)
        return (
            f"{test}, target '{self.name(e.target)}': {self.ranking_title().lower()} by "
            f"{method}{smooth}; {self.cams.describe()}"
        )
