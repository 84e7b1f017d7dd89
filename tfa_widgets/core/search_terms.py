"""The terms a search scores: indexes with their queries, read chunk by chunk in step.

TracIn-CP sums a score over checkpoints, each with its own index; the other scorers have one
term. Every index is read through ``chunks(rows)`` (see `tfa_widgets.core.search`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tfa_widgets.core.errors import IndexCacheError


@dataclass
class SearchTerm:
    """One index searched and the queries against it (TracIn-CP: one per checkpoint).

    ``queries`` are the test gradients as the index's features were made
    (``index.project_query``), ``[B, d]``; ``test_norms`` ``[B]`` are the norms the scorer
    divides by; the term's scores are multiplied by ``weight`` and summed over terms.
    """

    index: object
    queries: torch.Tensor
    test_norms: torch.Tensor
    weight: float = 1.0


def aligned_chunks(
    terms: Sequence[SearchTerm], rows: int
) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
    """Yield ``(first_row, features, norms)`` with one ``[n, d]`` and one ``[n]`` per term.

    Raises
    ------
    IndexCacheError
        When the indexes of the terms do not yield the same rows (indexes of different sizes).
    """
    streams = [term.index.chunks(rows) for term in terms]
    while True:
        pieces = [next(stream, None) for stream in streams]
        if all(piece is None for piece in pieces):
            return
        firsts = {None if p is None else (p[0], p[1].shape[0]) for p in pieces}
        if len(firsts) != 1:
            raise IndexCacheError(
                f"the gradient indexes searched together do not hold the same rows ({firsts}); "
                "rebuild them"
            )
        yield pieces[0][0], [p[1] for p in pieces], [p[2] for p in pieces]
