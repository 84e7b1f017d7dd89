"""Choosing the parameters that gradients are taken over, and eval mode."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from tfa_widgets.core.errors import InputError

ParamSpec = Iterable[str | nn.Module | nn.Parameter] | None


def ensure_eval(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode, warning when it was training.

    In train mode BatchNorm uses batch statistics and dropout is random, so per-sample
    gradients would depend on the rest of the batch.
    """
    if model.training:
        warnings.warn(
            "the model was in train mode; switching it to eval mode so that BatchNorm uses its "
            "running statistics and dropout is off (per-sample gradients must not depend on the "
            "batch)",
            stacklevel=3,
        )
        model.eval()
    return model


def select_parameter_names(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Return the names of the parameters gradients are taken over.

    Parameters
    ----------
    params : iterable of str, nn.Module or nn.Parameter, optional
        ``None`` selects all trainable parameters. A string selects the parameter of that
        name, or every trainable parameter of the submodule of that name (e.g. ``"fc"``).
    """
    named = dict(model.named_parameters())
    trainable = [name for name, p in named.items() if p.requires_grad]
    if params is None:
        if not trainable:
            raise InputError("the model has no trainable parameters")
        return trainable
    if isinstance(params, str | nn.Module | nn.Parameter):
        params = [params]
    modules = dict(model.named_modules())
    by_identity = {id(p): name for name, p in named.items()}
    chosen: list[str] = []
    for item in params:
        chosen.extend(_names_of(item, named, modules, by_identity))
    if not chosen:
        raise InputError(f"the parameter selection {params!r} selects no parameters")
    return [name for name in named if name in set(chosen)]


def _names_of(item, named: dict, modules: dict, by_identity: dict) -> list[str]:
    if isinstance(item, nn.Parameter):
        if id(item) not in by_identity:
            raise InputError("a selected parameter does not belong to the model")
        return [by_identity[id(item)]]
    if isinstance(item, nn.Module):
        names = [by_identity.get(id(p)) for p in item.parameters()]
        if None in names:
            raise InputError(f"the selected module {type(item).__name__} is not part of the model")
        return names
    if isinstance(item, str):
        if item in named:
            return [item]
        if item in modules and item != "":
            return [f"{item}.{n}" for n, _ in modules[item].named_parameters()]
        raise InputError(
            f"unknown parameter or module name {item!r}; parameters are e.g. "
            f"{list(named)[:6]}, modules e.g. {[m for m in modules if m][:6]}"
        )
    raise InputError(f"cannot select parameters with {item!r}: use names, modules or parameters")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return all parameters and buffers of ``model`` as detached tensors."""
    state = {name: p.detach() for name, p in model.named_parameters()}
    state.update({name: b.detach() for name, b in model.named_buffers()})
    return state
