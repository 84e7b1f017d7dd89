"""Load user checkpoints safely: tensors only, never arbitrary unpickling."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tfa_widgets.core.errors import DatasetError

_STATE_KEYS = ("state_dict", "model_state_dict", "model")


def _read(path: Path, map_location: str | torch.device) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as err:  # safetensors raises its own error types
            raise DatasetError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise DatasetError(
            f"refused to load {path}: it holds Python objects that need arbitrary unpickling, "
            f"which can run code. Only tensors and plain containers are loaded "
            f"(torch.load(weights_only=True)). Save a state_dict instead: "
            f"torch.save(model.state_dict(), path). Details: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DatasetError(
            f"{path} is not a readable torch checkpoint (truncated or another format): {err}"
        ) from err


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DatasetError(
            f"{path} holds no state_dict: expected a mapping of parameter names to tensors, "
            f"or a dict with one under {', '.join(map(repr, _STATE_KEYS))}"
        )
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def _some_files(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "no files"


def load_checkpoint(
    path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor] | nn.Module:
    """Return the state_dict in ``path``, or ``model`` with it loaded (in eval mode).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, so a file that needs arbitrary unpickling is refused.

    Parameters
    ----------
    path : str or Path
        The checkpoint: a state_dict, or a dict holding one (e.g. under ``"state_dict"``).
    model : nn.Module, optional
        When given, the weights are loaded into it (all keys must match).
    map_location : str or torch.device
        Where the tensors are loaded.

    Returns
    -------
    dict or nn.Module
        The state_dict, or ``model`` with it loaded, in eval mode.

    Raises
    ------
    DatasetError
        When the file is missing, unreadable, refused, or does not fit ``model``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise DatasetError(
            f"checkpoint {path} is a directory, not a checkpoint file; pass the file inside it "
            f"saved by torch.save or safetensors (it holds {_some_files(path)})"
        )
    if not path.is_file():
        raise DatasetError(
            f"checkpoint {path} does not exist (expected a file saved by torch.save)"
        )
    state = _state_dict(_read(path, map_location), path)
    if model is None:
        return state
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise DatasetError(f"{path} does not fit {type(model).__name__}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise DatasetError(
            f"{path} does not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()
