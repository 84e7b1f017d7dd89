"""The gradient index: per-example training gradients (exact or projected) kept on disk.

An index stores, for every training example, its loss gradient (or a random projection of
it when the exact gradients exceed a memory budget) and the exact gradient norm. Files are
safetensors with metadata naming what they were built from, written atomically and checked
on load (format, fingerprints, shapes, checksum).
"""

from __future__ import annotations

import json
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
from tfa_widgets.core.logra import FactorisedProjector, make_projector, projection_kind
from tfa_widgets.core.numerics import at_least_float32
from tfa_widgets.core.projection import RandomProjector

FORMAT_VERSION = "tfa-gradient-index/2"


class IndexQueries:
    """What every index kind answers from its `chunks`: the query projection and the dots.

    A subclass provides ``chunks(rows)``, ``projection_dim``, ``projection_seed`` and a
    ``_projector`` attribute (``None`` until first used).
    """

    projection_dim: int | None
    projection_seed: int
    projection: str = "countsketch"
    layout: list | None = None
    _projector: RandomProjector | FactorisedProjector | None

    @property
    def projected(self) -> bool:
        """Whether the features are random projections rather than exact gradients."""
        return self.projection_dim is not None

    @property
    def approximate(self) -> bool:
        """Whether scores from the features are approximate (then ``top_k`` re-scores its
        candidates exactly)."""
        return self.projected

    def projector(self, num_params: int) -> RandomProjector | FactorisedProjector:
        """Return the projector that made the features (built once, then reused)."""
        if self._projector is None or self._projector.num_params != num_params:
            if self.projection == "logra":
                self._projector = FactorisedProjector(
                    self.layout, self.projection_dim, self.projection_seed
                )
            else:
                self._projector = RandomProjector(
                    num_params, self.projection_dim, self.projection_seed
                )
        return self._projector

    def project_query(self, test_grads: torch.Tensor) -> torch.Tensor:
        """Return the test gradients ``[.., P]`` as the features are stored: projected by the
        projection that made them, unchanged when exact; float32 at least."""
        query = at_least_float32(test_grads)
        return self.projector(test_grads.shape[-1]).project(query) if self.projected else query

    def dots(self, test_grads: torch.Tensor) -> torch.Tensor:
        """Return ``<g_i, g_t>`` for every training example (approximate when projected):
        ``[N]`` for one test gradient ``[P]``, ``[N, B]`` for many ``[B, P]``; one chunk of
        rows at a time (`chunks`)."""
        query = self.project_query(test_grads).float()
        parts = [
            features.float() @ query.to(features.device).transpose(0, -1)
            for _, features, _ in self.chunks()
        ]
        return torch.cat(parts)


@dataclass
class GradientIndex(IndexQueries):
    """Training gradients ready for scoring, held in memory (one file on disk).

    ``features`` are exact gradients ``[N, P]`` when ``projection_dim`` is ``None``, else
    projected gradients ``[N, d]``, ``d`` at most the ``projection_dim`` asked for (the
    projector made from it decides). ``norms`` are the exact gradient norms ``[N]``.
    ``projection`` names the projection (``"countsketch"`` or ``"logra"``, see
    `tfa_widgets.core.logra`); a factorised one keeps the ``layout`` of the parameters it was
    made for, so the index projects a query on its own.
    """

    features: torch.Tensor
    norms: torch.Tensor
    fingerprint: str
    projection_dim: int | None = None
    projection_seed: int = 0
    parts: dict | None = None
    projection: str = "countsketch"
    layout: list | None = None
    _projector: RandomProjector | FactorisedProjector | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __len__(self) -> int:
        return self.features.shape[0]

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first_row, features [n, d], norms [n])``, ``rows`` rows at a time (all of
        them at once when ``None``); views, not copies."""
        step = rows or max(1, len(self))
        for first in range(0, len(self), step):
            yield first, self.features[first : first + step], self.norms[first : first + step]

    def to(self, device: torch.device) -> GradientIndex:
        """Move the features and norms to ``device`` (in place) and return the index."""
        self.features = self.features.to(device)
        self.norms = self.norms.to(device)
        return self

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
            "projection": self.projection,
            "projection_layout": json.dumps(self.layout),
            "checksum": str(_checksum(tensors)),
            **{f"part.{k}": str(v) for k, v in (self.parts or {}).items()},
        }
        save_atomically(tensors, metadata, path, "the gradient index")

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
            projection=metadata.get("projection", "countsketch"),
            layout=json.loads(metadata.get("projection_layout", "null")),
        )


def save_atomically(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, what: str
) -> None:
    """Write ``tensors`` and ``metadata`` as safetensors to ``path`` atomically: to its
    `temporary_path` first, synced to disk, then renamed over ``path``.

    Parameters
    ----------
    tensors : dict of str to Tensor
        Contiguous CPU tensors.
    metadata : dict of str to str
        The file's metadata.
    path : Path
        Where the file goes; its folder is created if missing.
    what : str
        What the file holds, for the error message (e.g. ``"the gradient index"``).

    Raises
    ------
    IndexCacheError
        When the file cannot be written; no temporary file is left behind.
    """
    temporary = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, SafetensorError) as error:
        raise IndexCacheError(f"could not write {what} {path} ({error})") from error
    finally:
        temporary.unlink(missing_ok=True)


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
    load_batches: Callable[[list[list[int]]], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    num_examples: int,
    *,
    fingerprint: str,
    batch_size: int = 64,
    memory_budget_mb: float = 1024,
    projection_dim: int = 4096,
    projection_seed: int = 0,
    projection: str = "countsketch",
    parts: dict | None = None,
    progress: bool = True,
) -> GradientIndex:
    """Compute the gradient of every training example and return the index.

    Exact gradients are kept when ``N × P`` float32 values fit ``memory_budget_mb``;
    otherwise each batch is projected to ``projection_dim`` as it is computed.

    Parameters
    ----------
    load_batches : callable
        Maps lists of training indices (the batches, in order) to an iterable of
        ``(images, encoded_targets)`` on the model's device, one per batch, in the same order.
    projection : {"logra", "countsketch"}
        The projection (see `make_projector`): ``"logra"`` is taken where the model's layers
        are factored, the CountSketch otherwise; the index records which.
    """
    projector = storage_projector(
        gradient_model.num_params,
        num_examples,
        memory_budget_mb,
        projection_dim,
        projection_seed,
        projection,
        gradient_model,
    )
    factorised = isinstance(projector, FactorisedProjector)
    width = gradient_model.num_params if projector is None else projector.dim
    features = norms = None
    batches = [
        list(range(start, min(start + batch_size, num_examples)))
        for start in range(0, num_examples, batch_size)
    ]
    with tqdm(total=num_examples, desc="gradient index", unit="img", disable=not progress) as bar:
        for indices, (images, targets) in zip(batches, load_batches(batches), strict=True):
            if features is None:  # kept on the device the gradients are computed on
                features = images.new_zeros(num_examples, width, dtype=torch.float32)
                norms = images.new_empty(num_examples, dtype=torch.float32)
            rows = slice(indices[0], indices[-1] + 1)
            norms[rows] = compute_rows(gradient_model, images, targets, features[rows], projector)
            check_gradients(norms[rows], indices)
            bar.update(len(indices))
    index = GradientIndex(
        features=features,
        norms=norms,
        fingerprint=fingerprint,
        projection_dim=None if projector is None else projection_dim,
        projection_seed=projection_seed,
        parts=parts,
        projection="exact" if projector is None else projection_kind(projector),
        layout=projector.layout if factorised else None,
    )
    index._projector = projector  # the queries reuse it (its random matrices)
    return index


def storage_projector(
    num_params: int,
    num_examples: int,
    memory_budget_mb: float,
    projection_dim: int,
    projection_seed: int,
    projection: str = "countsketch",
    gradient_model: GradientModel | None = None,
) -> RandomProjector | FactorisedProjector | None:
    """Return the projector an index of ``num_examples`` rows stores its features with:
    ``None`` when it `stores_exact` gradients; the factorised one for ``projection="logra"``
    on a model whose layers are factored (``gradient_model`` given), else the CountSketch."""
    if stores_exact(num_params, num_examples, memory_budget_mb):
        return None
    if projection == "logra" and gradient_model is not None:
        return make_projector(projection, gradient_model, projection_dim, projection_seed)
    return RandomProjector(num_params, projection_dim, projection_seed)


def stores_exact(num_params: int, num_examples: int, memory_budget_mb: float) -> bool:
    """Whether an index keeps exact gradients: while ``N × P`` float32 values fit
    ``memory_budget_mb`` (else projected ones)."""
    return num_examples * num_params * 4 <= memory_budget_mb * 2**20


def compute_rows(
    gradient_model: GradientModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    projector: RandomProjector | FactorisedProjector | None,
) -> torch.Tensor:
    """Write the stored features of one batch into ``rows`` ``[B, width]``; return the exact
    gradient norms ``[B]``."""
    if isinstance(projector, FactorisedProjector):
        return projector.store_batch(gradient_model.factored, images, targets, rows)
    pieces = gradient_model.per_sample_grad_pieces(images, targets)
    return store_batch(pieces, rows, projector)


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


def check_gradients(norms: torch.Tensor, indices: list[int]) -> None:
    """Raise `NonFiniteError` naming the training examples whose gradient norm is not finite."""
    # A gradient holds a NaN or an infinity exactly when its norm is not finite (or it
    # overflows float range, which is as unusable).
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(
            f"the loss gradients of training examples {[indices[i] for i in bad][:10]} are not "
            f"finite (NaN or inf); check those images, their labels and the model weights"
        )
