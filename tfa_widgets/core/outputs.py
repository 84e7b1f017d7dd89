"""How a model's raw output becomes the logits ``[B, num_classes]`` every computation uses.

A plain classifier returns that tensor. A mapping with a ``"logits"`` tensor (Hugging Face
``ModelOutput``s, ``{"logits": ...}``) is read without help. Anything else (a tuple, another
mapping, logits of another shape) needs the engine's ``output=`` callable, which maps the
model's output to the logits: ``output=lambda out: out[0]`` for a tuple,
``output=lambda out: out[:, None]`` with ``loss="bce"`` for a single logit per image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tfa_widgets.core.errors import InputError

OutputFn = Callable[[Any], torch.Tensor]


def read_logits(raw: Any, output: OutputFn | None = None) -> torch.Tensor:
    """Return the logits ``[B, num_classes]`` in a model's output ``raw``.

    Raises
    ------
    InputError
        When the output (after ``output``, if given) is not such a tensor.
    """
    if output is not None:
        raw = output(raw)
    elif isinstance(raw, Mapping) and isinstance(raw.get("logits"), torch.Tensor):
        raw = raw["logits"]
    source = "the engine's output= callable" if output is not None else "the model"
    if not isinstance(raw, torch.Tensor):
        keys = f" with keys {list(raw)[:5]}" if isinstance(raw, Mapping) else ""
        raise InputError(
            f"{source} returns a {type(raw).__name__}{keys}, not a logits tensor "
            "[B, num_classes]; pass output= to the engine to pick the logits, e.g. "
            "output=lambda out: out[0] for a tuple or output=lambda out: out['scores']"
        )
    if raw.dim() != 2:
        raise InputError(
            f"{source} returns logits of shape {tuple(raw.shape)}, expected [B, num_classes] "
            "(2 dimensions); for one logit per image pass output=lambda out: out[:, None] "
            "and loss='bce'"
        )
    return raw


def logits_function(model: nn.Module, output: OutputFn | None) -> Callable[..., torch.Tensor]:
    """Return ``images -> logits``: the model followed by `read_logits` (for Captum)."""

    def logits(images: torch.Tensor) -> torch.Tensor:
        return read_logits(model(images), output)

    return logits
