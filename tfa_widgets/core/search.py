"""Top-k over a gradient index: every row scored a chunk at a time, or through FAISS.

`TFAEngine.top_k` asks `IndexSearch.candidates` for the best rows of the index for each test
and then, on a projected index, re-scores them exactly. The search reads the index only through
its ``chunks(rows)``, which yields ``(first_row, features [n, d], norms [n])``, so an index held
in memory and one mapped from shards on disk are searched alike, and never as a whole
``[N, d]`` at once.

- ``"exact"`` (the default) scores every row, ``chunk_mb`` of rows at a time, with the scorer's own
  formula, and keeps a running top-k: the same ranking as scoring all rows at once, ties
  broken by the lower training index.
- ``"faiss"`` and ``"ivf"`` search a FAISS structure built once from the index (see
  `tfa_widgets.core.faiss_search`): flat (every row, FAISS's kernels, the GPU build where
  present) or inverted lists (``nprobe`` of ``nlist`` clusters: approximate, for millions of
  rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tfa_widgets.core import faiss_search
from tfa_widgets.core.errors import IndexCacheError, InputError
from tfa_widgets.core.index_store import IndexStore, read_cached
from tfa_widgets.core.numerics import at_least_float32
from tfa_widgets.core.scoring import make_scorer
from tfa_widgets.core.search_terms import SearchTerm, aligned_chunks

SEARCHES = ("exact", "faiss", "ivf")


@dataclass(frozen=True)
class SearchSettings:
    """How `TFAEngine.top_k` finds the best training images in the gradient index.

    Parameters
    ----------
    kind : {"exact", "faiss", "ivf"}
        ``"exact"``: every row is scored, ``chunk_mb`` of rows at a time. ``"faiss"``: a FAISS flat
        inner-product search (``IndexFlatIP``) over rows pre-scaled so that it ranks by the
        score; the same ranking as ``"exact"`` up to float32 rounding. ``"ivf"``: FAISS inverted
        lists (``IndexIVFFlat``), which scan ``nprobe`` of ``nlist`` clusters of rows: much
        faster on millions of rows, and approximate (a true top-k row may be missed). Both
        FAISS kinds need the ``faiss`` extra (``pip install 'tfa-widgets[faiss]'``).
    chunk_mb : float
        Rows scored at once by ``"exact"`` and added at once to a FAISS structure, in MB of
        float32 features: few large chunks, since each costs a few passes of its own.
    nlist : int, optional
        Clusters of ``"ivf"``; by default about ``√N`` (at most ``N / 39``, so that each
        cluster is trained on 39 rows or more).
    nprobe : int
        Clusters ``"ivf"`` scans per query: more is slower and misses fewer rows. The default,
        64, found 0.986 of the exact top-100 in 81 ms on 1.28M gradient-like rows (nlist 1,131,
        `benchmarks/scale_search.py`); 32 found 0.960 in 47 ms.
    seed : int
        Seed of the rows ``"ivf"`` is trained on and of its k-means.

    Raises
    ------
    InputError
        When ``kind`` is unknown or a number is not a positive integer (``seed``: not
        negative).
    """

    kind: str = "exact"
    chunk_mb: float = 256
    nlist: int | None = None
    nprobe: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SEARCHES:
            raise InputError(f"unknown search {self.kind!r}; choose one of {SEARCHES}")
        if isinstance(self.chunk_mb, bool) or not isinstance(self.chunk_mb, int | float):
            raise InputError(f"search setting chunk_mb must be a number, got {self.chunk_mb!r}")
        if not self.chunk_mb > 0:
            raise InputError(f"search setting chunk_mb must be positive, got {self.chunk_mb!r}")
        for name, minimum in (("nlist", 1), ("nprobe", 1), ("seed", 0)):
            value = getattr(self, name)
            if name == "nlist" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(
                    f"search setting {name} must be an integer of at least {minimum}, got {value!r}"
                )

    def rows_per_chunk(self, width: int) -> int:
        """Return how many rows of ``width`` float32 numbers make a chunk of ``chunk_mb``.

        Parameters
        ----------
        width : int
            Numbers per row (the features of all the terms searched together).

        Returns
        -------
        int
            At least 1.
        """
        return max(1, int(self.chunk_mb * 2**20 // (4 * max(width, 1))))


def search_settings(search: str | SearchSettings) -> SearchSettings:
    """Return ``search`` as `SearchSettings` (a kind given alone takes the other defaults)."""
    if isinstance(search, SearchSettings):
        return search
    if isinstance(search, str):
        return SearchSettings(kind=search)
    raise InputError(f"search must be one of {SEARCHES} or SearchSettings, got {search!r}")


def exact_top_k(
    terms: Sequence[SearchTerm], method: str, k: int, opponents: bool, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(indices, scores)``, ``[B, k]`` each, of the best rows for each query.

    Every row is scored as `score` does, a chunk of ``chunk_rows`` at a time, and merged into a
    running top-k by a stable sort: among equal scores the lower training index comes first,
    as in a stable sort of all scores at once. Opponents are the lowest scores.
    """
    sign = -1.0 if opponents else 1.0
    # Scores are linear in the query: the weight and the sign go into it, once.
    queries = [sign * term.weight * at_least_float32(term.queries) for term in terms]
    best_values = best_indices = None
    for first, features, norms in aligned_chunks(terms, chunk_rows):
        scores = _chunk_scores(terms, queries, method, features, norms)
        values, indices = _contenders(scores, k)
        indices = indices + first
        if best_values is not None:
            values = torch.cat([best_values, values], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_values, best_indices = values.gather(1, order), indices.gather(1, order)
    return best_indices.cpu(), (sign * best_values).float().cpu()


def _contenders(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the values ``[B, m]`` and positions of a chunk's entries that may enter a top-k:
    every one at least the chunk's k-th best (ties included, so ``m >= k``), in position order.

    ``topk`` alone picks arbitrarily among entries tied with the k-th, so where the ``k + 1``-th
    ties with it every entry at least as high is kept; rows that keep fewer than ``m`` are
    padded with entries below their k-th best, which then never enter the top-k. (A stable sort
    of the whole chunk would cost ``n log n`` each time.)
    """
    count = values.shape[1]
    if count <= k:
        positions = torch.arange(count, device=values.device).expand_as(values)
        return values, positions
    top = values.topk(k + 1, dim=1)
    if bool((top.values[:, k - 1] > top.values[:, k]).all()):
        positions = top.indices[:, :k].sort(dim=1).values
        return values.gather(1, positions), positions
    kept = values >= top.values[:, k - 1 : k]
    width = int(kept.sum(dim=1).max())
    backwards = torch.arange(count, 0, -1, device=values.device)  # first position: largest key
    positions = (kept * backwards).topk(width, dim=1).indices.sort(dim=1).values
    return values.gather(1, positions), positions


def _chunk_scores(
    terms: Sequence[SearchTerm], queries: list, method: str, features: list, norms: list
) -> torch.Tensor:
    """Scores ``[B, n]`` of one chunk of rows for the (weighted) queries, summed over terms."""
    total = None
    for term, query, rows, row_norms in zip(terms, queries, features, norms, strict=True):
        dots = query @ rows.to(query).T
        part = make_scorer(method).index_scores(
            dots, row_norms.to(dots.device)[None, :], term.test_norms[:, None]
        )
        total = part if total is None else total + part
    return total


class IndexSearch:
    """Finds the best rows of gradient indexes; FAISS structures built once and cached.

    Parameters
    ----------
    settings : SearchSettings
        Which search, and its settings.
    store : IndexStore or path, optional
        The cache FAISS structures are kept in, beside the indexes and within the same budget
        (a directory alone: with the default budget; in memory only when ``None``).
    device : torch.device
        The engine's device: on CUDA, a FAISS GPU build (where installed) searches there.
    progress : bool
        Show a progress bar while a FAISS structure is built.

    Raises
    ------
    InputError
        When a FAISS search is asked for and FAISS is not installed.
    """

    def __init__(
        self,
        settings: SearchSettings,
        store: IndexStore | str | Path | None = None,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store if isinstance(store, IndexStore) else IndexStore(store)
        self.device = torch.device(device)
        self.progress = progress
        self.builds = 0
        self._structures: dict[str, object] = {}
        if settings.kind != "exact":
            faiss_search.require_faiss(settings.kind)

    def candidates(
        self, terms: Sequence[SearchTerm], method: str, count: int, opponents: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(indices, scores)``, ``[B, count]`` each: for each query the ``count``
        best rows by the index's scores (approximate when projected), best first, on the CPU.
        """
        if self.settings.kind == "exact":
            rows = self.settings.rows_per_chunk(sum(t.queries.shape[-1] for t in terms))
            return exact_top_k(terms, method, count, opponents, rows)
        structure = self._structure(terms, method)
        return faiss_search.search(structure, terms, method, count, opponents, self.settings.nprobe)

    def _structure(self, terms: Sequence[SearchTerm], method: str):
        fingerprint = faiss_search.fingerprint(terms, method, self.settings)
        if fingerprint not in self._structures:
            structure = self._load(fingerprint)
            if structure is None:
                structure = faiss_search.build(terms, method, self.settings, self.progress)
                self.builds += 1
                self._save(structure, fingerprint, terms)
            self._structures[fingerprint] = faiss_search.to_device(structure, self.device)
        return self._structures[fingerprint]

    def _path(self, fingerprint: str) -> Path | None:
        if self.store.directory is None:
            return None
        name = f"{faiss_search.PREFIX}{fingerprint[:32]}{faiss_search.SUFFIX}"
        return self.store.directory / name

    def _load(self, fingerprint: str):
        path = self._path(fingerprint)
        return read_cached(path, faiss_search.load, fingerprint, "rebuilding it", stacklevel=5)

    def _save(self, structure, fingerprint: str, terms: Sequence[SearchTerm]) -> None:
        path = self._path(fingerprint)
        if path is None:
            return
        try:
            faiss_search.save(structure, path, fingerprint)
        except IndexCacheError as error:
            warnings.warn(f"{error}; it is kept in memory for this engine only", stacklevel=5)
            return
        searched = [term.index.fingerprint for term in terms]  # in use: kept with the structure
        in_use = [self.store.path(f) for f in searched] + [
            self.store.shard_directory(f) for f in searched
        ]
        self.store.evict(keep=[path, *in_use])
