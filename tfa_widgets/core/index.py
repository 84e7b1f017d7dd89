"""The gradient index: per-example training gradients (exact or projected) kept on disk.

An index stores, for every training example, its loss gradient (or a random projection of
it when the exact gradients exceed a memory budget) and the exact gradient norm. Files are
safetensors with metadata naming what they were built from, written atomically and checked
on load (format, fingerprints, shapes, checksum).
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from tqdm.auto import tqdm

from tfa_widgets.core.errors import IndexCacheError, NonFiniteError
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.projection import RandomProjector
from tfa_widgets.core.scorers import at_least_float32

FORMAT_VERSION = "tfa-gradient-index/2"


@dataclass
class GradientIndex:
    """Training gradients ready for scoring.

    ``features`` are exact gradients ``[N, P]`` when ``projection_dim`` is ``None``, else
    projected gradients ``[N, d]``. ``norms`` are the exact gradient norms ``[N]``.
    """

    features: torch.Tensor
    norms: torch.Tensor
    fingerprint: str
    projection_dim: int | None = None
    projection_seed: int = 0
    parts: dict | None = None
    _projector: RandomProjector | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def projected(self) -> bool:
        """Whether the features are random projections rather than exact gradients."""
        return self.projection_dim is not None

    def __len__(self) -> int:
        return self.features.shape[0]

    def projector(self, num_params: int) -> RandomProjector:
        """Return the projector that made the features (built once, then reused)."""
        if self._projector is None or self._projector.num_params != num_params:
            self._projector = RandomProjector(num_params, self.projection_dim, self.projection_seed)
        return self._projector

    def project_query(self, test_grads: torch.Tensor) -> torch.Tensor:
        """Return test gradients ``[.., P]`` as the features were made: projected ``[.., d]``
        by the same projection, or as they are (in the features' dtype and device) when exact."""
        query = test_grads.to(self.features.dtype)
        if self.projected:
            query = self.projector(test_grads.shape[-1]).project(query)
        return query.to(self.features.device)

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first_row, features [n, d], norms [n])`` for consecutive slices of ``rows``
        rows (the last one shorter; all rows at once when ``None``), as views."""
        step = rows or max(len(self), 1)
        for first in range(0, len(self), step):
            yield first, self.features[first : first + step], self.norms[first : first + step]

    def dots(self, test_grads: torch.Tensor) -> torch.Tensor:
        """Return ``<g_i, g_t>`` for every training example (approximate when projected):
        ``[N]`` for one test gradient ``[P]``, ``[N, B]`` for many ``[B, P]``."""
        return self.features @ self.project_query(test_grads).transpose(0, -1)

    def save(self, path: Path) -> None:
        """Write the index to ``path`` atomically (a temporary file, then a rename).

        Raises
        ------
        IndexCacheError
            When the file cannot be written; no temporary file is left behind.
        """
        path = Path(path)
        tensors = {
            "features": self.features.detach().cpu().contiguous(),
            "norms": self.norms.detach().cpu().contiguous(),
        }
        metadata = {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "projection_dim": str(self.projection_dim or 0),
            "projection_seed": str(self.projection_seed),
            "checksum": str(_checksum(tensors)),
            **{f"part.{k}": str(v) for k, v in (self.parts or {}).items()},
        }
        temporary = temporary_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(temporary), metadata=metadata)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except (OSError, SafetensorError) as error:
            raise IndexCacheError(f"could not write the gradient index {path} ({error})") from error
        finally:
            temporary.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> GradientIndex:
        """Read an index, raising `IndexCacheError` saying why when it cannot be used."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise IndexCacheError(f"gradient index {path} is unreadable ({error})") from error
        if metadata.get("format") != FORMAT_VERSION:
            raise IndexCacheError(
                f"gradient index {path} has format {metadata.get('format')!r}, "
                f"expected {FORMAT_VERSION!r}"
            )
        if metadata.get("fingerprint") != fingerprint:
            raise IndexCacheError(
                f"gradient index {path} was built for another model, dataset or parameter "
                f"selection ({_describe_mismatch(metadata)})"
            )
        if set(tensors) != {"features", "norms"} or (
            tensors["features"].shape[0] != tensors["norms"].shape[0]
        ):
            raise IndexCacheError(
                f"gradient index {path} is missing data or has inconsistent shapes"
            )
        if str(_checksum(tensors)) != metadata.get("checksum"):
            raise IndexCacheError(f"gradient index {path} is corrupt (checksum mismatch)")
        dim = int(metadata["projection_dim"])
        return cls(
            features=tensors["features"],
            norms=tensors["norms"],
            fingerprint=fingerprint,
            projection_dim=dim or None,
            projection_seed=int(metadata["projection_seed"]),
            parts={k[5:]: v for k, v in metadata.items() if k.startswith("part.")},
        )


def temporary_path(path: Path) -> Path:
    """Return where `GradientIndex.save` writes ``path`` first: a hidden name that records
    the writing process (``.NAME.PID@HOST.tmp``), so a later build can tell whether it died."""
    return path.with_name(f".{path.name}.{os.getpid()}@{_host()}.tmp")


def temporary_writer(temporary: Path) -> int | None:
    """Return the process id that writes a `temporary_path` on this host, else ``None``.

    Names from before the host was recorded (``.NAME.PID.tmp``) count as this host's.
    """
    stem = temporary.name.removesuffix(".tmp")
    writer = stem.rsplit(".", 1)[-1] if stem != temporary.name else ""
    pid, _, host = writer.partition("@")
    return int(pid) if pid.isdigit() and host in ("", _host()) else None


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _checksum(tensors: dict[str, torch.Tensor]) -> int:
    value = 0
    for name in sorted(tensors):
        value = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), value)
    return value


def _describe_mismatch(metadata: dict) -> str:
    parts = {k[5:]: v for k, v in metadata.items() if k.startswith("part.")}
    return ", ".join(f"{k}={str(v)[:12]}" for k, v in sorted(parts.items())) or "no details"


def build_index(
    gradient_model: GradientModel,
    load_batch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    num_examples: int,
    *,
    fingerprint: str,
    batch_size: int = 64,
    memory_budget_mb: float = 1024,
    projection_dim: int = 4096,
    projection_seed: int = 0,
    parts: dict | None = None,
    progress: bool = True,
) -> GradientIndex:
    """Compute the gradient of every training example and return the index.

    Exact gradients are kept when ``N × P`` float32 values fit ``memory_budget_mb``;
    otherwise each batch is projected to ``projection_dim`` as it is computed.

    Parameters
    ----------
    load_batch : callable
        Maps a list of training indices to ``(images, encoded_targets)`` on the model's device.
    """
    num_params = gradient_model.num_params
    exact = num_examples * num_params * 4 <= memory_budget_mb * 2**20
    projector = None if exact else RandomProjector(num_params, projection_dim, projection_seed)
    width = num_params if exact else projector.dim
    features = norms = None
    batches = range(0, num_examples, batch_size)
    with tqdm(total=num_examples, desc="gradient index", unit="img", disable=not progress) as bar:
        for start in batches:
            indices = list(range(start, min(start + batch_size, num_examples)))
            images, targets = load_batch(indices)
            if features is None:  # kept on the device the gradients are computed on
                features = images.new_zeros(num_examples, width, dtype=torch.float32)
                norms = images.new_empty(num_examples, dtype=torch.float32)
            rows = slice(start, indices[-1] + 1)
            pieces = gradient_model.per_sample_grad_pieces(images, targets)
            grad_norms = store_batch(pieces, features[rows], projector)
            _check_gradients(grad_norms, indices)
            norms[rows] = grad_norms
            bar.update(len(indices))
    return GradientIndex(
        features=features,
        norms=norms,
        fingerprint=fingerprint,
        projection_dim=None if exact else projector.dim,
        projection_seed=projection_seed,
        parts=parts,
    )


def store_batch(
    pieces: Iterable[torch.Tensor],
    rows: torch.Tensor,
    projector: RandomProjector | None,
    by_gather: bool | None = None,
) -> torch.Tensor:
    """Write consecutive gradient blocks ``[B, n_j]`` into ``rows`` of the features, exact or
    projected, one block at a time; return the gradient norms ``[B]``.

    On the CPU no block outlives its turn, so the ``[B, P]`` gradients are never held at once;
    on CUDA (or with ``by_gather``) the projection gathers over all ``P``, so the blocks are
    joined first.
    """
    by_gather = rows.is_cuda if by_gather is None else by_gather
    squared_norms = rows.new_zeros(rows.shape[0])
    joined = []
    start = 0
    for piece in pieces:
        squared_norms += torch.linalg.vector_norm(at_least_float32(piece), dim=1).square()
        if projector is None:
            rows[:, start : start + piece.shape[1]] = piece
        elif by_gather:
            joined.append(piece)
        else:
            projector.accumulate(rows, piece, start)
        start += piece.shape[1]
    if joined:
        rows.copy_(projector.project(torch.cat(joined, dim=1), by_gather=True))
    return squared_norms.sqrt()


def _check_gradients(norms: torch.Tensor, indices: list[int]) -> None:
    # A gradient holds a NaN or an infinity exactly when its norm is not finite (or it
    # overflows float range, which is as unusable).
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(
            f"the loss gradients of training examples {[indices[i] for i in bad][:10]} are not "
            f"finite (NaN or inf); check those images, their labels and the model weights"
        )
