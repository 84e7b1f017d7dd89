"""The explorer's settings controls, and the plain settings value they describe."""

from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as W

from tfa_widgets.core.explanation import SmoothGrad
from tfa_widgets.core.reference_maps import REFERENCE_MAPS
from tfa_widgets.core.scoring import SCORERS
from tfa_widgets.widgets.messages import Message

MAX_K = 32
METHOD_LABELS = {name: scorer.label for name, scorer in SCORERS.items()}
REFERENCE_LABELS = {name: kind.label for name, kind in REFERENCE_MAPS.items()}


@dataclass(frozen=True)
class Settings:
    """What the user chose; ``engine_key`` is the part that changes the engine's answer."""

    target: str | int = "predicted"
    k: int = 8
    method: str = "grad_cos"
    opponents: bool = False
    smooth: SmoothGrad | None = None
    layer: str | None = None
    reference: str = "gradcam"
    reduction: str = "signed"
    times_input: bool = False
    show_gradcam: bool = False
    opacity: float = 0.6

    @property
    def engine_key(self) -> tuple:
        """Settings other than k and the target that need new scores or maps when they change.

        The reference map (its kind, the Grad-CAM layer) is not among them: it changes only the
        map shown beside.
        """
        return (self.method, self.opponents, self.smooth)


class Controls:
    """ipywidgets for every setting of the explorer.

    Parameters
    ----------
    class_names : list of str
        Offered as explicit targets after "predicted class" and "true label".
    num_train : int
        Size of the training set, which bounds k.
    methods : list of str
        Scorers offered (engine method names).
    k : int
        Initial number of training images.
    references : list of str, optional
        Reference map kinds offered (`TFAEngine.reference_kinds`; Grad-CAM only by default).
    """

    def __init__(
        self,
        class_names: list[str],
        num_train: int,
        methods: list[str],
        k: int = 8,
        references: list[str] | None = None,
    ):
        max_k = max(1, min(MAX_K, num_train))
        targets = [("predicted class", "predicted"), ("true label", "true")]
        targets += [(f"class {name} ({i})", i) for i, name in enumerate(class_names)]
        self.target = W.Dropdown(options=targets, value="predicted", description="Explain")
        slider = dict(
            layout=W.Layout(width="230px"),
            style={"description_width": "56px"},
            continuous_update=False,
        )
        self.k = W.IntSlider(
            value=min(max(1, k), max_k), min=1, max=max_k, description="top k", **slider
        )
        toggles = dict(style={"button_width": "auto"}, layout=W.Layout(width="auto"))
        self.direction = W.ToggleButtons(
            options=[("proponents", False), ("opponents", True)],
            value=False,
            tooltips=["training images that support the target", "training images against it"],
            **toggles,
        )
        self.method = W.ToggleButtons(
            options=[(METHOD_LABELS.get(m, m), m) for m in methods], value=methods[0], **toggles
        )
        self.reduction = W.ToggleButtons(
            options=[("signed", "signed"), ("|abs|", "abs")],
            value="signed",
            tooltips=["sum over colour channels, zero-centred", "sum of absolute values"],
            **toggles,
        )
        auto = W.Layout(width="auto")
        self.times_input = W.Checkbox(
            value=False, description="gradient × input", indent=False, layout=auto
        )
        self.opacity = W.FloatSlider(
            value=0.6,
            min=0.0,
            max=1.0,
            step=0.05,
            description="opacity",
            readout_format=".2f",
            **slider,
        )
        self.smooth = W.Checkbox(value=False, description="SmoothGrad", indent=False, layout=auto)
        self.smooth_n = W.IntSlider(value=8, min=1, max=64, description="samples", **slider)
        self.smooth_sigma = W.FloatSlider(
            value=0.15,
            min=0.0,
            max=1.0,
            step=0.01,
            description="noise σ",
            readout_format=".2f",
            **slider,
        )
        self.show_gradcam = W.Checkbox(
            value=False,
            description="reference map of each training image (baseline):",
            indent=False,
            layout=auto,
        )
        references = references or ["gradcam"]
        self.reference = W.ToggleButtons(
            options=[(REFERENCE_LABELS.get(r, r), r) for r in references],
            value="gradcam" if "gradcam" in references else references[0],
            **toggles,
        )
        self.layer = W.Text(
            value="",
            description="CAM layer",
            placeholder="default (last conv)",
            continuous_update=False,
            layout=W.Layout(width="230px"),
            style={"description_width": "70px"},
        )
        self.layer_message = Message("tfa-layer-error", max_width="560px")
        self.message = Message("tfa-controls-error")
        self.k.add_class("tfa-k")
        self.smooth.add_class("tfa-smooth")
        self.layer.add_class("tfa-layer")
        self.show_gradcam.add_class("tfa-baseline")
        self.reference.add_class("tfa-reference")
        self.reference.observe(
            lambda change: setattr(self.layer, "disabled", change["new"] != "gradcam"),
            names="value",
        )

        def group(*children: W.Widget) -> W.Box:
            return W.Box(
                list(children),
                layout=W.Layout(flex_flow="row wrap", align_items="center", margin="0 12px 0 0"),
            )

        self.widget = W.Box(
            [
                group(self.k, self.direction, self.method),
                group(self.smooth, self.smooth_n, self.smooth_sigma),
                group(self.opacity, self.reduction, self.times_input),
                group(self.show_gradcam, self.reference),
                # The layer's error under its field, not where the row happens to wrap.
                W.VBox(
                    [self.layer, self.layer_message.widget], layout=W.Layout(margin="0 12px 0 0")
                ),
                self.message.widget,
            ],
            layout=W.Layout(flex_flow="row wrap", align_items="center"),
        )
        self.widget.add_class("tfa-controls")

    def settings(self) -> Settings:
        """Return the current settings."""
        smooth = None
        if self.smooth.value:
            smooth = SmoothGrad(n=int(self.smooth_n.value), sigma=float(self.smooth_sigma.value))
        return Settings(
            target=self.target.value,
            k=int(self.k.value),
            method=self.method.value,
            opponents=bool(self.direction.value),
            smooth=smooth,
            layer=self.layer.value.strip() or None,
            reference=self.reference.value,
            reduction=self.reduction.value,
            times_input=bool(self.times_input.value),
            show_gradcam=bool(self.show_gradcam.value),
            opacity=float(self.opacity.value),
        )

    def engine_controls(self) -> list[W.Widget]:
        """Return the controls whose change needs the engine (new scores or maps)."""
        return [self.target, self.k, self.direction, self.method, self.smooth]

    def smoothing_controls(self) -> list[W.Widget]:
        """Return the SmoothGrad parameters (they matter only while smoothing is on)."""
        return [self.smooth_n, self.smooth_sigma]

    def display_controls(self) -> list[W.Widget]:
        """Return the controls that only change how computed maps are drawn."""
        return [self.reduction, self.times_input, self.show_gradcam, self.opacity]
