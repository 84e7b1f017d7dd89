"""FAISS structures over gradient indexes, scaled so that inner products rank by the score.

A row of a structure is ``r_i f_i``: the index's features ``f_i`` times `score_scale` of the
exact gradient norm (``1 / ‖g_i‖`` for Grad-Cos, 1 for Grad-Dot), the rows of several terms
(TracIn-CP checkpoints) side by side. A query is ``± w q_t f_t``, likewise scaled, times the
term's weight, negated for opponents. Their inner product is then the engine's score (on a
projected index, the score from projected gradients), so FAISS's largest inner products are the
best rows: ``IndexFlatIP`` scans all of them, ``IndexIVFFlat`` the ``nprobe`` clusters nearest the
query, after k-means on a seeded sample of rows.

A structure is saved as one file, written to a temporary name and renamed: a magic line, FAISS's
own serialisation, then a JSON trailer (fingerprint, size, CRC-32) and its length in 8 bytes. The
trailer and the checksum are checked before FAISS reads a byte, so a truncated or corrupt file
is reported and rebuilt instead of crashing the reader.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tfa_widgets.core.errors import IndexCacheError, InputError
from tfa_widgets.core.fingerprint import combine
from tfa_widgets.core.index import temporary_path
from tfa_widgets.core.numerics import at_least_float32, reciprocal_or_zero
from tfa_widgets.core.search_terms import SearchTerm, aligned_chunks

FORMAT_VERSION = "tfa-search/1"
MAGIC = b"TFA-SEARCH/1\n"
PREFIX = "search-"
SUFFIX = ".faiss"
TRAINING_ROWS_PER_LIST = 64  # FAISS wants 39 at least, and samples 256 at most
MIN_ROWS_PER_LIST = 39
_TRAILER_LENGTH = struct.Struct("<Q")
_READ_BLOCK = 1 << 24


def require_faiss(kind: str):
    """Return the ``faiss`` module.

    Raises
    ------
    InputError
        When FAISS is not installed, naming the extra that installs it.
    """
    try:
        import faiss
    except ImportError as error:
        raise InputError(
            f"search={kind!r} needs FAISS, which is not installed: pip install "
            "'tfa-widgets[faiss]' (faiss-cpu; a FAISS GPU build searches on CUDA), or use "
            "search='exact'"
        ) from error
    return faiss


def default_nlist(rows: int) -> int:
    """Return the IVF clusters for ``rows`` rows: about ``√rows``, at most ``rows / 39``."""
    return max(1, min(round(math.sqrt(rows)), rows // MIN_ROWS_PER_LIST))


def fingerprint(terms: Sequence[SearchTerm], method: str, settings) -> str:
    """Return the fingerprint of the structure for these indexes, scorer and settings (the
    search-time ``nprobe`` and ``chunk_mb`` are not part of it)."""
    ivf = settings.kind == "ivf"
    return combine(
        format=FORMAT_VERSION,
        kind=settings.kind,
        nlist=settings.nlist if ivf else None,
        seed=settings.seed if ivf else None,
        method=method,
        indexes=[term.index.fingerprint for term in terms],
    )


def scaled_rows(
    terms: Sequence[SearchTerm], method: str, chunk_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, rows [n, D])``: the rows of the structure in float32, a chunk at a
    time."""
    for first, features, norms in aligned_chunks(terms, chunk_rows):
        parts = [
            at_least_float32(rows).float() * score_scale(method, row_norms).to(rows.device)[:, None]
            for rows, row_norms in zip(features, norms, strict=True)
        ]
        yield first, _contiguous(torch.cat(parts, dim=1))


def scaled_queries(terms: Sequence[SearchTerm], method: str, opponents: bool) -> np.ndarray:
    """Return the queries ``[B, D]`` whose inner products with `scaled_rows` are the scores
    (negated for opponents)."""
    sign = -1.0 if opponents else 1.0
    parts = [
        sign
        * term.weight
        * at_least_float32(term.queries).float()
        * score_scale(method, term.test_norms).to(term.queries.device)[:, None]
        for term in terms
    ]
    return _contiguous(torch.cat(parts, dim=1))


def _contiguous(rows: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)


def build(terms: Sequence[SearchTerm], method: str, settings, progress: bool = True):
    """Return a FAISS structure holding every row of the terms' indexes, scaled.

    Raises
    ------
    InputError
        When ``settings.nlist`` exceeds the number of rows.
    """
    faiss = require_faiss(settings.kind)
    rows = len(terms[0].index)
    dim = sum(term.queries.shape[-1] for term in terms)
    if settings.kind == "ivf":
        nlist = settings.nlist or default_nlist(rows)
        if nlist > rows:
            raise InputError(f"search nlist={nlist} exceeds the {rows} rows of the index")
        structure = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
        )
        structure.cp.seed = settings.seed
        structure.train(_training_sample(terms, method, settings, rows, nlist))
    else:
        structure = faiss.IndexFlatIP(dim)
    description = f"{settings.kind} search structure"
    with tqdm(total=rows, desc=description, unit="row", disable=not progress) as bar:
        for _, block in scaled_rows(terms, method, settings.rows_per_chunk(dim)):
            structure.add(block)
            bar.update(block.shape[0])
    return structure


def _training_sample(terms, method: str, settings, rows: int, nlist: int) -> np.ndarray:
    """A seeded sample of ``64 × nlist`` scaled rows (all of them when fewer), in row order."""
    generator = torch.Generator().manual_seed(settings.seed)
    size = min(rows, TRAINING_ROWS_PER_LIST * nlist)
    chosen = torch.randperm(rows, generator=generator)[:size].sort().values
    sample = []
    width = sum(term.queries.shape[-1] for term in terms)
    for first, block in scaled_rows(terms, method, settings.rows_per_chunk(width)):
        inside = chosen[(chosen >= first) & (chosen < first + block.shape[0])] - first
        sample.append(block[inside.numpy()])
    return np.concatenate(sample)


def search(
    structure, terms: Sequence[SearchTerm], method: str, count: int, opponents: bool, nprobe: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(indices, scores)``, ``[B, count]`` each, best first, on the CPU.

    An IVF search whose probed clusters hold fewer than ``count`` rows for a query is repeated
    for that query over all clusters.
    """
    queries = scaled_queries(terms, method, opponents)
    ivf = hasattr(structure, "nprobe")
    if ivf:
        structure.nprobe = min(nprobe, structure.nlist)
    values, indices = structure.search(queries, count)
    short = (indices < 0).any(axis=1)
    if ivf and short.any():
        structure.nprobe = structure.nlist
        values[short], indices[short] = structure.search(queries[short], count)
    sign = -1.0 if opponents else 1.0
    return torch.from_numpy(indices), sign * torch.from_numpy(values)


def to_device(structure, device: torch.device):
    """Return ``structure`` on the GPU of ``device`` when it is CUDA and a FAISS GPU build is
    installed, else ``structure`` itself (the CPU build searches on the CPU)."""
    faiss = require_faiss("faiss")
    if device.type != "cuda" or not hasattr(faiss, "index_cpu_to_gpus_list"):
        return structure
    if faiss.get_num_gpus() == 0:
        return structure
    return faiss.index_cpu_to_gpus_list(structure, gpus=[device.index or 0])


def save(structure, path: Path, fingerprint: str) -> None:
    """Write ``structure`` to ``path`` atomically (a temporary file, then a rename).

    Raises
    ------
    IndexCacheError
        When the file cannot be written; no temporary file is left behind.
    """
    faiss = require_faiss("faiss")
    path = Path(path)
    temporary = temporary_path(path)
    written = {"size": 0, "checksum": 0}

    def write(data: bytes) -> int:
        written["size"] += len(data)
        written["checksum"] = zlib.crc32(data, written["checksum"])
        return handle.write(data)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(MAGIC)
            faiss.write_index(structure, faiss.PyCallbackIOWriter(write))
            trailer = json.dumps({"format": FORMAT_VERSION, "fingerprint": fingerprint, **written})
            handle.write(trailer.encode())
            handle.write(_TRAILER_LENGTH.pack(len(trailer.encode())))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        raise IndexCacheError(f"could not write the search structure {path} ({error})") from error
    finally:
        temporary.unlink(missing_ok=True)


def load(path: Path, fingerprint: str):
    """Read a structure written by `save`.

    Raises
    ------
    IndexCacheError
        When the file is truncated, corrupt (checksum), of another format or fingerprint, or
        unreadable.
    """
    faiss = require_faiss("faiss")
    try:
        with open(path, "rb") as handle:
            trailer = _trailer(handle, path)
            if trailer.get("fingerprint") != fingerprint:
                raise IndexCacheError(f"search structure {path} was built for another index")
            if _checksum(handle, trailer["size"]) != trailer["checksum"]:
                raise IndexCacheError(f"search structure {path} is corrupt (checksum mismatch)")
            handle.seek(len(MAGIC))
            return faiss.read_index(faiss.PyCallbackIOReader(handle.read))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, struct.error) as error:
        raise IndexCacheError(f"search structure {path} is unreadable ({error})") from error


def _trailer(handle, path: Path) -> dict:
    if handle.read(len(MAGIC)) != MAGIC:
        raise IndexCacheError(f"{path} is not a search structure of format {FORMAT_VERSION!r}")
    end = handle.seek(0, os.SEEK_END)
    handle.seek(end - _TRAILER_LENGTH.size)
    (length,) = _TRAILER_LENGTH.unpack(handle.read(_TRAILER_LENGTH.size))
    start = end - _TRAILER_LENGTH.size - length
    if start < len(MAGIC):
        raise IndexCacheError(f"search structure {path} is truncated")
    handle.seek(start)
    trailer = json.loads(handle.read(length))
    if trailer.get("format") != FORMAT_VERSION or len(MAGIC) + trailer["size"] != start:
        raise IndexCacheError(f"search structure {path} is truncated or of another format")
    return trailer


def _checksum(handle, size: int) -> int:
    handle.seek(len(MAGIC))
    value, remaining = 0, size
    while remaining > 0:
        block = handle.read(min(_READ_BLOCK, remaining))
        if not block:
            break
        value = zlib.crc32(block, value)
        remaining -= len(block)
    return value


def score_scale(method: str, norms: torch.Tensor) -> torch.Tensor:
    """Return the factor each gradient is scaled by so that the inner product of a scaled
    training gradient and a scaled test gradient is the score.

    Grad-Cos: ``1 / ‖g‖`` (0 for a zero gradient), for the training and the test gradient
    alike; Grad-Dot and each TracIn-CP term: 1. A search for the largest inner products of
    scaled rows (FAISS) then ranks by the score itself.

    Parameters
    ----------
    method : str
        An index scorer's name.
    norms : Tensor
        Gradient norms ``[n]``.

    Returns
    -------
    Tensor
        The factors ``[n]``, float32 at least.
    """
    norms = at_least_float32(norms)
    return reciprocal_or_zero(norms) if method == "grad_cos" else torch.ones_like(norms)
