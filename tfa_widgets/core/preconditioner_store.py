"""Fitted preconditioners (EK-FAC factors, TRAK kernels) on disk, beside the gradient indexes.

One safetensors file per fingerprint of everything a fit depends on: the weights, the training
data, the parameter selection, the loss and the scorer's own settings (damping, K-FAC or
EK-FAC, Fisher, TRAK's dimension, seed and checkpoints). Files are written atomically (a
temporary file named after its process, then a rename), carry a checksum, and count against
the cache budget of the `IndexStore` they share a directory with. A file that cannot be used
(truncated, corrupt, another format) is reported with a warning and the preconditioner is
fitted again: never a traceback, never a wrong answer.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from tfa_widgets.core.errors import IndexCacheError
from tfa_widgets.core.fingerprint import combine, state_fingerprint
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.index import save_atomically
from tfa_widgets.core.index_store import (
    PRECONDITIONER_PREFIX,
    SUFFIX,
    IndexStore,
    read_cached,
)

FORMAT_VERSION = "tfa-preconditioner/1"


def preconditioner_parts(
    gradients: GradientModel,
    *,
    model_name: str,
    data_fingerprint: str,
    settings: dict,
    checkpoints: list[str] | None = None,
) -> dict:
    """Return the named parts a fitted preconditioner depends on; their `combine` is its
    fingerprint.

    Parameters
    ----------
    gradients : GradientModel
        The model's weights, selected parameters and loss.
    settings : dict
        The scorer's cache settings (``Scorer.cache_settings``).
    checkpoints : list of str, optional
        Fingerprints of the checkpoints a fit over checkpoints uses.
    """
    weights = dict(gradients.params)
    weights.update(gradients.frozen)
    return {
        "format": FORMAT_VERSION,
        "weights": state_fingerprint(weights),
        "model": model_name,
        "data": data_fingerprint,
        "params": combine(names=gradients.names),
        "loss": gradients.loss,
        "settings": combine(**settings),
        "checkpoints": combine(states=checkpoints or []),
    }


class PreconditionerStore:
    """Fitted preconditioners kept in an `IndexStore`'s directory, within its budget."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store

    def path(self, fingerprint: str) -> Path | None:
        """Return the file of the fit with this fingerprint (``None`` without a directory)."""
        if self.store.directory is None:
            return None
        return self.store.directory / f"{PRECONDITIONER_PREFIX}{fingerprint[:32]}{SUFFIX}"

    def load(self, fingerprint: str) -> dict[str, torch.Tensor] | None:
        """Return the cached tensors, or ``None`` (with a warning when the file is unusable)."""
        return read_cached(self.path(fingerprint), _read, fingerprint, "fitting it again", 4)

    def check_writable(self, fingerprint: str) -> None:
        """Raise `IndexCacheError` now if a fit could not be saved (before fitting)."""
        self.store.check_writable(fingerprint)

    def save(self, fingerprint: str, tensors: dict[str, torch.Tensor], parts: dict) -> None:
        """Save a fit atomically and keep the cache within its budget; on failure, warn."""
        path = self.path(fingerprint)
        if path is None:
            return
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        metadata = {
            "format": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "checksum": str(_checksum(tensors)),
            **{f"part.{k}": str(v) for k, v in parts.items()},
        }
        try:
            save_atomically(tensors, metadata, path, "the fitted preconditioner")
        except IndexCacheError as error:
            warnings.warn(f"{error}; it is kept in memory for this engine only", stacklevel=4)
            return
        self.store.evict(keep=path)


def _read(path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise IndexCacheError(f"fitted preconditioner {path} is unreadable ({error})") from error
    if metadata.get("format") != FORMAT_VERSION or metadata.get("fingerprint") != fingerprint:
        raise IndexCacheError(
            f"fitted preconditioner {path} has another format or fingerprint "
            f"({metadata.get('format')!r})"
        )
    if str(_checksum(tensors)) != metadata.get("checksum"):
        raise IndexCacheError(f"fitted preconditioner {path} is corrupt (checksum mismatch)")
    return tensors


def _checksum(tensors: dict[str, torch.Tensor]) -> int:
    value = 0
    for name in sorted(tensors):
        value = zlib.crc32(name.encode(), value)
        value = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), value)
    return value
