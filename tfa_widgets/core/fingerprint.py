"""Content fingerprints of models and datasets, used to key caches on disk."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm


def _update_with_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Return a hex digest of named tensors (a state dict)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        _update_with_tensor(digest, state[name])
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Return a hex digest of the model's class, parameters and buffers."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return hashlib.sha256(
        (type(model).__qualname__ + state_fingerprint(state)).encode()
    ).hexdigest()


def dataset_fingerprint(dataset: Dataset, progress: bool = True) -> str:
    """Return a hex digest of a dataset's content.

    A dataset with a ``fingerprint`` string attribute is trusted to describe its content and
    nothing of the content is read: a dataset whose content changes must change the attribute
    too, or caches built for the old content are used. Otherwise every image and label is hashed.
    """
    declared = getattr(dataset, "fingerprint", None)
    if isinstance(declared, str) and declared:
        return hashlib.sha256(f"declared:{declared}:{len(dataset)}".encode()).hexdigest()
    digest = hashlib.sha256(f"{type(dataset).__qualname__}:{len(dataset)}".encode())
    items = range(len(dataset))
    if progress and len(dataset) > 5000:
        items = tqdm(items, desc="fingerprinting training set", unit="img")
    for i in items:
        image, label = dataset[i]
        _update_with_tensor(digest, torch.as_tensor(image))
        _update_with_tensor(digest, torch.as_tensor(label))
    return digest.hexdigest()


def combine(**parts) -> str:
    """Return one digest of named parts (strings, numbers, lists)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
