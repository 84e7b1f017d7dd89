"""The gradient-index cache on disk: one file (or one directory of shards, see
`tfa_widgets.core.shards`) per fingerprint, within a size budget that the fitted
preconditioners (`tfa_widgets.core.preconditioner_store`) and the FAISS search structures
(`tfa_widgets.core.search`) kept in the same directory share.

The file name is the fingerprint of everything the index depends on, the weights included, so
switching between checkpoints (or back to earlier weights) finds each one's index again instead
of overwriting a single file. The files together stay within a size budget: after each save,
the least recently used ones (a load refreshes a file's modification time) are removed first.
A build that a crash or ``SIGKILL`` interrupted leaves a temporary file named after its process;
the next build removes those of dead processes (and any older than a day).

Before building, the store checks that it will be able to save what it builds, so a read-only
or misplaced cache fails in seconds, not after an hour of gradients; a save that fails anyway
(a full disk) keeps the index in memory with a warning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from tfa_widgets.core import faiss_search
from tfa_widgets.core.errors import IndexCacheError
from tfa_widgets.core.fingerprint import combine, state_fingerprint
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.index import (
    FORMAT_VERSION,
    GradientIndex,
    temporary_writer,
)
from tfa_widgets.core.logra import LOGRA_VERSION
from tfa_widgets.core.projection import SKETCH_VERSION
from tfa_widgets.core.shards import (
    SHARD_FORMAT,
    ShardBuilder,
    ShardedIndex,
    ShardLayout,
    load_or_build_sharded,
)

DEFAULT_BUDGET_MB = 8192
STALE_AFTER_S = 24 * 3600
PREFIX = "gradient-index-"
SUFFIX = ".safetensors"
#: Fitted preconditioners (`tfa_widgets.core.preconditioner_store`) share the directory and budget.
PRECONDITIONER_PREFIX = "preconditioner-"
#: The cached files' (prefix, suffix): indexes, fitted preconditioners, FAISS search structures.
CACHED_FILES = (
    (PREFIX, SUFFIX),
    (PRECONDITIONER_PREFIX, SUFFIX),
    (faiss_search.PREFIX, faiss_search.SUFFIX),
)

T = TypeVar("T")


def index_parts(
    gradients: GradientModel,
    *,
    model_name: str,
    data_fingerprint: str,
    loss: str,
    memory_budget_mb: float,
    projection_dim: int,
    projection_seed: int,
    index_dtype: str = "float32",
    projection: str = "countsketch",
) -> dict:
    """Return the named parts an index depends on; their `combine` is its fingerprint."""
    weights = dict(gradients.params)
    weights.update(gradients.frozen)
    return {
        "weights": state_fingerprint(weights),
        "model": model_name,
        "data": data_fingerprint,
        "params": combine(names=gradients.names),
        "loss": loss,
        "storage": combine(
            format=FORMAT_VERSION,
            sketch=SKETCH_VERSION,
            budget=memory_budget_mb,
            dim=projection_dim,
            seed=projection_seed,
            dtype=index_dtype,
            shards=SHARD_FORMAT,
            projection=projection,
            logra=LOGRA_VERSION,
        ),
    }


class IndexStore:
    """Gradient indexes kept in ``directory`` (nothing on disk when it is ``None``).

    Parameters
    ----------
    directory : path, optional
        The cache directory; created when the first index is saved.
    budget_mb : float
        Size of all cached files kept together (indexes, fitted preconditioners, FAISS search
        structures); least recently used ones are removed first.

    Raises
    ------
    IndexCacheError
        When ``directory`` exists and is not a directory.
    """

    def __init__(self, directory: str | Path | None, budget_mb: float = DEFAULT_BUDGET_MB):
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.budget_bytes = int(budget_mb * 2**20)
        if self.directory is not None and self.directory.exists() and not self.directory.is_dir():
            raise IndexCacheError(
                f"cache_dir {self.directory} is a file, not a directory; pass a directory "
                "(or cache_dir=None to keep the index in memory only)"
            )

    def path(self, fingerprint: str) -> Path | None:
        """Return the file of the index with this fingerprint (``None`` without a directory)."""
        if self.directory is None:
            return None
        return self.directory / f"{PREFIX}{fingerprint[:32]}{SUFFIX}"

    def shard_directory(self, fingerprint: str) -> Path | None:
        """Return the directory of the sharded index with this fingerprint (``None`` without
        a cache directory)."""
        path = self.path(fingerprint)
        return None if path is None else path.with_suffix("")

    def load_or_build_sharded(
        self, layout: ShardLayout, builder: ShardBuilder, part: tuple[int, int] | None = None
    ) -> tuple[ShardedIndex | None, bool]:
        """Return ``(index, built)``: the sharded index of ``layout``, its missing or corrupt
        shards computed first (only part ``i`` of ``n`` of them, and no index, with ``part``);
        see `load_or_build_sharded`."""
        directory = self.shard_directory(layout.fingerprint)
        self.check_writable(layout.fingerprint)
        self.remove_stale_temporaries()
        index, computed = load_or_build_sharded(directory, layout, builder, part)
        with contextlib.suppress(OSError):
            os.utime(directory)  # recently used: evicted last
        self.evict(keep=directory)
        return index, bool(computed)

    def load_or_build(
        self, parts: dict, build: Callable[[str, dict], GradientIndex]
    ) -> tuple[GradientIndex, bool]:
        """Return ``(index, built)``: the cached index for ``parts``, else ``build(fp, parts)``
        saved to the cache. A cached file that cannot be used is reported and rebuilt."""
        fingerprint = combine(**parts)
        index = self.load(fingerprint)
        if index is not None:
            return index, False
        self.check_writable(fingerprint)
        self.remove_stale_temporaries()
        index = build(fingerprint, parts)
        self.save(index)
        return index, True

    def load(self, fingerprint: str) -> GradientIndex | None:
        """Return the cached index, or ``None`` (with a warning when the file is unusable)."""
        return read_cached(
            self.path(fingerprint), GradientIndex.load, fingerprint, "rebuilding it", 4
        )

    def check_writable(self, fingerprint: str) -> None:
        """Raise `IndexCacheError` now if an index with this fingerprint could not be saved."""
        if self.directory is None:
            return
        advice = "pass another cache_dir, or cache_dir=None to keep the index in memory only"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as error:
            raise IndexCacheError(
                f"the gradient index cannot be saved in cache_dir {self.directory} "
                f"({error.strerror or error}); make it a writable directory, or {advice}"
            ) from error
        path = self.path(fingerprint)
        if path.is_dir():
            raise IndexCacheError(
                f"{path} is a directory where the gradient index file goes; remove it, or {advice}"
            )

    def save(self, index: GradientIndex) -> None:
        """Save ``index`` and keep the cache within its budget; on failure, warn and go on."""
        path = self.path(index.fingerprint)
        if path is None:
            return
        try:
            index.save(path)
        except IndexCacheError as error:
            warnings.warn(
                f"{error}; the index is kept in memory for this engine only", stacklevel=4
            )
            return
        self.evict(keep=path)

    def files(self) -> list[Path]:
        """Return the cached files (indexes, fitted preconditioners, search structures) and
        shard directories, least recently used first."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = [p for pre, suf in CACHED_FILES for p in self.directory.glob(f"{pre}*{suf}")]
        sharded = [path for path in self.directory.glob(f"{PREFIX}*") if path.is_dir()]
        return sorted([*found, *sharded], key=_mtime)

    def evict(self, keep: Path | Iterable[Path] | None = None) -> list[Path]:
        """Remove least recently used cached files until all fit the budget, except ``keep``
        (a path or several: what is in use); return the removed ones."""
        kept = {keep} if isinstance(keep, Path) else set(keep or ())
        files = self.files()
        total = sum(_size(path) for path in files)
        removed = []
        for path in files:
            if total <= self.budget_bytes:
                break
            if path in kept:
                continue
            total -= _size(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove temporary index files (and shards or manifests in shard directories) left by
        dead processes (or older than a day)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        removed = []
        temporaries = [t for p, _ in CACHED_FILES for t in self.directory.glob(f".{p}*.tmp")]
        temporaries += self.directory.glob(f"{PREFIX}*/.*.tmp")
        for temporary in temporaries:
            pid = temporary_writer(temporary)
            old = time.time() - _mtime(temporary) > STALE_AFTER_S
            if old or (pid is not None and not _alive(pid)):
                temporary.unlink(missing_ok=True)
                removed.append(temporary)
        return removed


def _alive(pid: int) -> bool:
    if pid <= 0:  # not a process id (0 and -1 would signal groups)
        return False
    if os.name == "nt":  # signal 0 would terminate the process there: rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(_size(inner) for inner in path.iterdir())
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_cached(
    path: Path | None,
    read: Callable[[Path, str], T],
    fingerprint: str,
    again: str,
    stacklevel: int,
) -> T | None:
    """Return ``read(path, fingerprint)`` of a cached file, marked recently used (evicted last).

    Parameters
    ----------
    path : Path or None
        The cached file (``None`` without a cache directory).
    read : callable
        Reads the file, checking its fingerprint; raises `IndexCacheError` when it is unusable.
    fingerprint : str
        The fingerprint the file must have.
    again : str
        What happens instead of an unusable file, for the warning (e.g. ``"rebuilding it"``).
    stacklevel : int
        The warning's stack level as the caller would give it.

    Returns
    -------
    object or None
        What ``read`` returned; ``None`` when the file is absent or unusable (then with a
        warning naming the problem).
    """
    if path is None or not path.is_file():
        return None
    try:
        value = read(path, fingerprint)
    except IndexCacheError as error:
        warnings.warn(f"{error}; {again}", stacklevel=stacklevel + 1)
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves its files
        os.utime(path)
    return value
