"""A gradient index too large for one file: fixed-size shards and a manifest in a directory.

Layout of ``gradient-index-<fingerprint>/``::

    manifest.json              format, fingerprint, projection (kind, dimension, seed and, for
                               LoGra, the layers' layout), rows, width, rows per shard, dtype,
                               the complete shards with their checksums, what was wrong
    shard-00000.safetensors    rows [0, R): "features" [R, d], "norms" [R] (and "scales" [R])
    shard-00001.safetensors    rows [R, 2R) ...

Each shard is written as soon as its rows are computed (a temporary file, fsync, a rename), so
a build holds one shard and the model in memory whatever ``N`` is, and a build that is
interrupted (Ctrl-C, ``kill -9``, a node lost) resumes on the next call from the shards on disk:
a shard file exists whole or not at all, and its checksum says whether it is intact. Every shard
is computed from the same batches (aligned to the shard's first row) whichever process computes
it and whenever, so a resumed build or one split across processes stores the numbers an
uninterrupted one-process build stores, up to the thread count's reduction order.

Loading checks every shard's checksum by plain reads (the page cache, not the process's
memory) and then maps the shards' features (``numpy.memmap`` at the safetensors data offset):
the index costs the process its norms (``4 N`` bytes), not ``N × d`` floats. A shard that is
corrupt is recomputed with a warning, and the manifest names what was wrong.

Half-precision storage (``dtype="float16"``) keeps each row divided by its own norm (kept in
float32 as ``scales``), so no gradient overflows or underflows float16's range; a dot product of
a stored row ``f`` with a query ``q`` then errs by at most ``(2^-11 + 2^-25 √d) ‖f‖ ‖q‖`` beyond
float32's own rounding (each coordinate rounded once to 11 significant bits, or to the subnormal
spacing ``2^-24``), i.e. a grad-cos score moves by at most about ``5e-4`` (``‖f‖ ≈ ‖g‖``). The
exact norms stay float32, and exact re-scoring (``top_k``) does not read the features at all.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tfa_widgets.core.errors import IndexCacheError, InputError
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.index import (
    IndexQueries,
    check_gradients,
    compute_rows,
    save_atomically,
    storage_projector,
    stores_exact,
    temporary_path,
)
from tfa_widgets.core.logra import FactorisedProjector
from tfa_widgets.core.projection import RandomProjector

SHARD_FORMAT = "tfa-gradient-shards/1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NUMPY = {"F32": np.float32, "F16": np.float16}
_READ_BLOCK = 16 * 2**20  # bytes per read while checksumming: bounded memory


def check_dtype(dtype: str) -> str:
    """Return ``dtype`` after checking it is a storage dtype of sharded indexes.

    Raises
    ------
    InputError
        When ``dtype`` is not ``"float32"`` or ``"float16"``.
    """
    if dtype not in DTYPES:
        raise InputError(f"index_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class ShardLayout:
    """What a sharded index holds and how it is cut: the manifest without its progress."""

    fingerprint: str
    num_rows: int
    width: int
    rows_per_shard: int
    dtype: str = "float32"
    projection_dim: int | None = None
    projection_seed: int = 0
    parts: dict = field(default_factory=dict)
    projection: str = "countsketch"
    projection_layout: list | None = None

    @property
    def num_shards(self) -> int:
        """How many shards cover the rows."""
        return math.ceil(self.num_rows / self.rows_per_shard)

    def rows(self, shard: int) -> range:
        """Return the training rows of ``shard``."""
        first = shard * self.rows_per_shard
        return range(first, min(first + self.rows_per_shard, self.num_rows))

    def same_content(self, other: ShardLayout) -> bool:
        """Whether ``other`` stores the same rows the same way (its shard size may differ)."""
        return replace(other, rows_per_shard=self.rows_per_shard) == self


def rows_per_shard(width: int, dtype: str, shard_mb: float) -> int:
    """Return how many rows of ``width`` values of ``dtype`` fit a shard of ``shard_mb``."""
    itemsize = DTYPES[dtype].itemsize
    return max(1, int(shard_mb * 2**20 // (width * itemsize)))


def shard_path(directory: Path, shard: int) -> Path:
    """Return the file of ``shard`` in an index directory."""
    return Path(directory) / f"shard-{shard:05d}.safetensors"


# ------------------------------------------------------------------ shard files
def write_shard(
    directory: Path, layout: ShardLayout, shard: int, features: torch.Tensor, norms: torch.Tensor
) -> int:
    """Write one shard atomically and return its checksum.

    Parameters
    ----------
    directory : Path
        The index directory.
    layout : ShardLayout
        The index the shard belongs to.
    shard : int
        Which shard.
    features : torch.Tensor
        Its rows ``[n, width]`` in float32.
    norms : torch.Tensor
        The exact gradient norms ``[n]``.

    Returns
    -------
    int
        The CRC-32 of the stored tensors (as `shard_checksum` reads it back).

    Raises
    ------
    IndexCacheError
        When the file cannot be written (no temporary file is left behind).
    """
    tensors = _stored_tensors(layout.dtype, features.detach().float().cpu(), norms.float().cpu())
    checksum = _checksum(tensors)
    rows = layout.rows(shard)
    metadata = {
        "format": SHARD_FORMAT,
        "fingerprint": layout.fingerprint,
        "shard": str(shard),
        "first_row": str(rows.start),
        "rows": str(len(rows)),
        "checksum": str(checksum),
    }
    save_atomically(tensors, metadata, shard_path(directory, shard), "the index shard")
    return checksum


def _stored_tensors(dtype: str, features: torch.Tensor, norms: torch.Tensor) -> dict:
    if dtype == "float32":
        return {"features": features.contiguous(), "norms": norms.contiguous()}
    scales = torch.linalg.vector_norm(features, dim=1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return {
        "features": (features / scales[:, None]).to(DTYPES[dtype]).contiguous(),
        "norms": norms.contiguous(),
        "scales": scales.contiguous(),
    }


def _checksum(tensors: dict[str, torch.Tensor]) -> int:
    value = 0
    for name in sorted(tensors):
        value = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), value)
    return value


def _header(path: Path) -> tuple[dict, dict, int]:
    """Return ``(metadata, tensors, data_start)`` of a safetensors file, reading its header
    only: ``tensors`` maps names to ``{"dtype", "shape", "data_offsets"}``."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return metadata, header, 8 + length


def shard_problem(directory: Path, layout: ShardLayout, shard: int) -> str | None:
    """Return what is wrong with a shard file (``"missing"``, a corrupt header, other
    metadata, shapes, a checksum mismatch), or ``None`` when it is intact.

    The checksum is computed by plain reads in blocks, so a check costs no memory.
    """
    path = shard_path(directory, shard)
    if not path.is_file():
        return "missing"
    try:
        metadata, tensors, start = _header(path)
    except (OSError, ValueError, struct.error) as error:
        return f"unreadable header ({error})"
    rows = layout.rows(shard)
    expected = {
        "format": SHARD_FORMAT,
        "fingerprint": layout.fingerprint,
        "shard": str(shard),
        "first_row": str(rows.start),
        "rows": str(len(rows)),
    }
    wrong = [key for key, value in expected.items() if metadata.get(key) != value]
    if wrong:
        return f"metadata {wrong} do not match the manifest"
    stored = {"float32": "F32", "float16": "F16"}[layout.dtype]
    kinds = {"features": ([len(rows), layout.width], stored), "norms": ([len(rows)], "F32")}
    if layout.dtype != "float32":
        kinds["scales"] = ([len(rows)], "F32")
    found = {name: (info.get("shape"), info.get("dtype")) for name, info in tensors.items()}
    if found != kinds:
        return "tensors missing or of the wrong shape or dtype"
    try:
        checksum = _file_checksum(path, start, tensors)
    except OSError as error:
        return f"unreadable data ({error})"
    if str(checksum) != metadata.get("checksum"):
        return "checksum mismatch"
    return None


def _file_checksum(path: Path, start: int, tensors: dict) -> int:
    value = 0
    with open(path, "rb") as handle:
        for name in sorted(tensors):
            first, last = tensors[name]["data_offsets"]
            handle.seek(start + first)
            remaining = last - first
            while remaining > 0:
                block = handle.read(min(_READ_BLOCK, remaining))
                if not block:
                    raise OSError(f"{path} is truncated")
                value = zlib.crc32(block, value)
                remaining -= len(block)
    return value


def _map_shard(path: Path) -> dict[str, torch.Tensor]:
    """Return the shard's tensors mapped from the file (copy-on-write: nothing is read now)."""
    _, tensors, start = _header(path)
    mapped = {}
    for name, info in tensors.items():
        first, _ = info["data_offsets"]
        array = np.memmap(
            path, dtype=_NUMPY[info["dtype"]], mode="c", offset=start + first,
            shape=tuple(info["shape"]),
        )  # fmt: skip
        mapped[name] = torch.from_numpy(array)
    return mapped


# ------------------------------------------------------------------ manifest
def read_manifest(directory: Path) -> dict | None:
    """Return the manifest of an index directory, or ``None`` when absent or unreadable."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == SHARD_FORMAT else None


def layout_of(manifest: dict) -> ShardLayout:
    """Return the layout a manifest describes."""
    return ShardLayout(**manifest["layout"])


def write_manifest(
    directory: Path, layout: ShardLayout, checksums: dict[int, int], problems: dict[int, str]
) -> None:
    """Write the manifest atomically: the layout, the complete shards and their checksums,
    whether the index is complete, and what was found wrong (and recomputed).

    Raises
    ------
    IndexCacheError
        When the manifest cannot be written.
    """
    manifest = {
        "format": SHARD_FORMAT,
        "layout": asdict(layout),
        "complete": len(checksums) == layout.num_shards,
        "shards": {
            str(s): {"rows": len(layout.rows(s)), "checksum": c}
            for s, c in sorted(checksums.items())
        },
        "problems": {str(s): problem for s, problem in sorted(problems.items())},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(directory) / MANIFEST
    temporary = temporary_path(path)
    try:
        temporary.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary, path)
    except OSError as error:
        raise IndexCacheError(f"could not write the index manifest {path} ({error})") from error
    finally:
        temporary.unlink(missing_ok=True)


def _recorded_checksum(directory: Path, shard: int) -> int:
    metadata, _, _ = _header(shard_path(directory, shard))
    return int(metadata["checksum"])


# ------------------------------------------------------------------ the index
class ShardedIndex(IndexQueries):
    """A gradient index read from shards on disk: features mapped, norms in memory.

    Parameters
    ----------
    directory : Path
        The index directory.
    layout : ShardLayout
        What it holds (kept as ``shard_layout``; ``layout`` is, as on `GradientIndex`, the
        layers' layout of a LoGra projection).
    shards : list of dict
        Each shard's mapped tensors (`_map_shard`), in row order.
    """

    def __init__(self, directory: Path, layout: ShardLayout, shards: list[dict]) -> None:
        self.directory = Path(directory)
        self.shard_layout = layout
        self.fingerprint = layout.fingerprint
        self.projection_dim = layout.projection_dim
        self.projection_seed = layout.projection_seed
        self.projection = layout.projection
        self.layout = layout.projection_layout
        self.parts = layout.parts
        self.device = torch.device("cpu")
        self._shards = shards
        self._projector: RandomProjector | None = None
        self.norms = torch.cat([shard["norms"] for shard in shards])  # a copy, in memory

    @classmethod
    def open(cls, directory: Path, layout: ShardLayout) -> ShardedIndex:
        """Map the shards of a complete index (checked already by `shard_problem`)."""
        shards = [_map_shard(shard_path(directory, s)) for s in range(layout.num_shards)]
        return cls(directory, layout, shards)

    def __len__(self) -> int:
        return self.shard_layout.num_rows

    @property
    def approximate(self) -> bool:
        """Whether scores from the features are approximate: projected, or stored in float16
        (then ``top_k`` re-scores its candidates exactly)."""
        return self.projected or self.shard_layout.dtype != "float32"

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first_row, features [n, d], norms [n])`` shard by shard (in pieces of
        ``rows`` when given), features in float32 on the index's device.

        Float32 features are the mapped file itself on the CPU; float16 ones are scaled back
        into a float32 copy of the piece.
        """
        for shard, tensors in enumerate(self._shards):
            first = self.shard_layout.rows(shard).start
            count = tensors["norms"].shape[0]
            step = rows or count
            for offset in range(0, count, step):
                piece = slice(offset, offset + step)
                features = tensors["features"][piece]
                if "scales" in tensors:
                    features = features.float() * tensors["scales"][piece, None]
                norms = self.norms[first + offset : first + offset + features.shape[0]]
                yield first + offset, features.to(self.device), norms

    @property
    def features(self) -> torch.Tensor:
        """All features ``[N, d]`` in float32, read into memory (for small indexes: the
        training-set audit's embedding); scoring goes through `chunks` instead."""
        return torch.cat([features for _, features, _ in self.chunks()])

    def to(self, device: torch.device) -> ShardedIndex:
        """Serve chunks and norms on ``device`` (the shards stay mapped); return the index."""
        self.device = torch.device(device)
        self.norms = self.norms.to(self.device)
        return self


# ------------------------------------------------------------------ building
@dataclass
class ShardBuilder:
    """Computes shards of an index: the gradients, the data in batches, the storage settings.

    Parameters
    ----------
    gradient_model : GradientModel
        The per-example gradients.
    load_batches : callable
        Maps lists of training indices (the batches, in order) to an iterable of
        ``(images, encoded_targets)`` in the same order.
    num_examples : int
        ``N``.
    batch_size : int
        Images per batch; batches start at each shard's first row.
    memory_budget_mb, projection_dim, projection_seed, projection
        As `tfa_widgets.core.index.build_index` takes them (exact or projected features,
        CountSketch or LoGra).
    shard_mb : float
        Size of a shard's features; a build holds one shard in memory.
    dtype : {"float32", "float16"}
        How features are stored.
    progress : bool
        Show a progress bar.
    """

    gradient_model: GradientModel
    load_batches: Callable[[list[list[int]]], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    num_examples: int
    batch_size: int
    memory_budget_mb: float
    projection_dim: int
    projection_seed: int
    shard_mb: float = 64
    dtype: str = "float32"
    progress: bool = True
    projection: str = "countsketch"

    @functools.cached_property
    def projector(self) -> RandomProjector | FactorisedProjector | None:
        """The projection of the stored rows (``None``: exact gradients)."""
        return storage_projector(
            self.gradient_model.num_params,
            self.num_examples,
            self.memory_budget_mb,
            self.projection_dim,
            self.projection_seed,
            self.projection,
            self.gradient_model,
        )

    @property
    def factorised(self) -> bool:
        """Whether the rows are LoGra projections (asked for, on a model with factored
        layers, of gradients too large to store exactly; see `storage_projector`)."""
        return (
            not self.exact
            and self.projection == "logra"
            and self.gradient_model.factored is not None
        )

    @property
    def exact(self) -> bool:
        """Whether the rows are exact gradients (see `stores_exact`)."""
        return stores_exact(
            self.gradient_model.num_params, self.num_examples, self.memory_budget_mb
        )

    @property
    def width(self) -> int:
        """Values per stored row: ``P`` exact, ``d`` projected (no projector is made)."""
        num_params = self.gradient_model.num_params
        if self.factorised:
            return self.projector.dim
        return num_params if self.exact else min(self.projection_dim, num_params)

    def layout(self, fingerprint: str, parts: dict) -> ShardLayout:
        """Return the layout of the index these settings build."""
        if self.exact:
            kind, dim = "exact", None
        elif self.factorised:  # the projector is remade from the dimension asked for
            kind, dim = "logra", self.projection_dim
        else:
            kind, dim = "countsketch", self.width
        return ShardLayout(
            fingerprint=fingerprint,
            num_rows=self.num_examples,
            width=self.width,
            rows_per_shard=rows_per_shard(self.width, self.dtype, self.shard_mb),
            dtype=self.dtype,
            projection_dim=dim,
            projection_seed=self.projection_seed,
            parts=dict(parts),
            projection=kind,
            projection_layout=(
                [list(entry) for entry in self.projector.layout] if self.factorised else None
            ),
        )

    def build(
        self,
        directory: Path,
        layout: ShardLayout,
        shards: Sequence[int],
        written: Callable[[int, int], None],
    ) -> None:
        """Compute ``shards`` and write each one as soon as its rows are done, calling
        ``written(shard, checksum)`` after each."""
        batches, owners = [], []
        for shard in shards:
            rows = layout.rows(shard)
            for first in range(rows.start, rows.stop, self.batch_size):
                batches.append(list(range(first, min(first + self.batch_size, rows.stop))))
                owners.append(shard)
        total = sum(len(batch) for batch in batches)
        buffer = norms = None
        bar = tqdm(total=total, desc="gradient index shards", unit="img", disable=not self.progress)
        with bar:
            for indices, shard, (images, targets) in zip(
                batches, owners, self.load_batches(batches), strict=True
            ):
                rows = layout.rows(shard)
                if buffer is None:
                    buffer = images.new_zeros(
                        layout.rows_per_shard, layout.width, dtype=torch.float32
                    )
                    norms = images.new_zeros(layout.rows_per_shard, dtype=torch.float32)
                local = slice(indices[0] - rows.start, indices[-1] + 1 - rows.start)
                buffer[local].zero_()
                norms[local] = compute_rows(
                    self.gradient_model, images, targets, buffer[local], self.projector
                )
                check_gradients(norms[local], indices)
                bar.update(len(indices))
                if indices[-1] + 1 == rows.stop:
                    count = len(rows)
                    written(
                        shard, write_shard(directory, layout, shard, buffer[:count], norms[:count])
                    )


def load_or_build_sharded(
    directory: Path,
    layout: ShardLayout,
    builder: ShardBuilder | None,
    part: tuple[int, int] | None = None,
) -> tuple[ShardedIndex | None, list[int]]:
    """Return the sharded index in ``directory``, computing the shards that are missing or
    corrupt first.

    Parameters
    ----------
    directory : Path
        The index directory (created when missing).
    layout : ShardLayout
        The index wanted; an existing manifest's shard size is kept when its content matches
        (shards of another layout fail their check and are computed again).
    builder : ShardBuilder, optional
        Computes missing shards; without one, missing shards are an error (a gather step).
    part : (i, n), optional
        Compute only shards ``s`` with ``s % n == i`` and return ``None``: one of ``n``
        processes or cluster jobs. The manifest is then left to the gather step.

    Returns
    -------
    index : ShardedIndex or None
        The index, or ``None`` for a part.
    computed : list of int
        The shards computed by this call.

    Raises
    ------
    IndexCacheError
        Without a ``builder``, when shards are missing or corrupt (naming them); when a shard or
        the manifest cannot be written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = _settle_layout(directory, layout)
    mine = range(layout.num_shards) if part is None else range(part[0], layout.num_shards, part[1])
    problems = {s: shard_problem(directory, layout, s) for s in mine}
    todo = [s for s, problem in problems.items() if problem is not None]
    broken = {s: p for s, p in problems.items() if p not in (None, "missing")}
    for shard, problem in broken.items():
        warnings.warn(
            f"gradient index shard {shard_path(directory, shard)}: {problem}; recomputing it",
            stacklevel=3,
        )
    if todo and builder is None:
        missing = {s: problems[s] for s in todo}
        raise IndexCacheError(
            f"the sharded index {directory} lacks {len(todo)} of {layout.num_shards} shards "
            f"({_describe(missing)}); run the parts that compute them again (shard s belongs to "
            "part s % n), then gather"
        )
    if part is None:
        checksums = {s: _recorded_checksum(directory, s) for s in mine if problems[s] is None}
        recorded = _recorded_problems(directory) | broken

        def written(shard: int, checksum: int) -> None:
            checksums[shard] = checksum
            write_manifest(directory, layout, checksums, recorded)

        write_manifest(directory, layout, checksums, recorded)
    else:

        def written(shard: int, checksum: int) -> None:
            pass

    if todo:
        builder.build(directory, layout, todo, written)
    if part is not None:
        return None, todo
    _remove_extra_shards(directory, layout)
    return ShardedIndex.open(directory, layout), todo


def _settle_layout(directory: Path, layout: ShardLayout) -> ShardLayout:
    """Return the layout to build: the manifest's when it stores the same content (its shard
    size wins, so a resume or a part does not depend on today's ``shard_mb``), else
    ``layout`` (shards of another layout then fail `shard_problem` and are overwritten)."""
    manifest = read_manifest(directory)
    if manifest is not None:
        existing = layout_of(manifest)
        if existing.same_content(layout):
            return existing
    return layout


def _remove_extra_shards(directory: Path, layout: ShardLayout) -> None:
    """Remove shard files past the last shard (left by a layout with smaller shards)."""
    for path in directory.glob("shard-*.safetensors"):
        number = path.name.removeprefix("shard-").removesuffix(".safetensors")
        if not number.isdigit() or int(number) >= layout.num_shards:
            path.unlink(missing_ok=True)


def _recorded_problems(directory: Path) -> dict[int, str]:
    manifest = read_manifest(directory) or {}
    return {int(s): p for s, p in manifest.get("problems", {}).items()}


def _describe(problems: dict[int, str]) -> str:
    listed = ", ".join(f"shard {s}: {p}" for s, p in list(problems.items())[:8])
    return listed + (", ..." if len(problems) > 8 else "")
