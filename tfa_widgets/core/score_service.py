"""Scores of every training image for resolved queries, from the index or exactly, and top-k.

With an exact index a query is one matrix product against it. With a projected index the
scores are approximate; ``top_k`` re-scores its ``max(rescore, 2k)`` best candidates exactly
(one forward-mode pass over them), and ``scores(exact=True)`` re-scores every training image.
The preconditioned scorers (influence, RelatIF, TRAK) are exact and go through
`PreconditionedScorers`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tfa_widgets.core.data_access import TrainingData
from tfa_widgets.core.errors import InputError
from tfa_widgets.core.gradients import batched_apply
from tfa_widgets.core.numerics import at_least_float32
from tfa_widgets.core.preconditioned import PreconditionedScorers
from tfa_widgets.core.queries import tests_per_product
from tfa_widgets.core.query import Query
from tfa_widgets.core.scoring import IndexScorer, make_scorer
from tfa_widgets.core.search import IndexSearch
from tfa_widgets.core.search_terms import SearchTerm
from tfa_widgets.core.terms import TermIndexes, WeightTerm
from tfa_widgets.core.test_gradients import TestGradients

TestVectors = tuple[WeightTerm, torch.Tensor, torch.Tensor]
"""A term, its query vectors ``[B, P]`` and their norms ``[B]``."""


class ScoreService:
    """Scores, self-scores and top-k of one engine.

    Parameters
    ----------
    training : TrainingData
        The training set.
    terms : callable
        Maps a method to the `WeightTerm` values its score sums over.
    indexes : TermIndexes
        Builds or loads each term's index.
    test_gradients : TestGradients
        The test gradients of each query.
    preconditioned : PreconditionedScorers
        Influence, RelatIF and TRAK.
    search : IndexSearch
        How ``top_k`` finds candidates in the index (every row, or FAISS).
    batch_size, rescore : int
        Training images per batch; candidates re-scored by ``top_k`` on a projected index.
    progress : bool
        Show a progress bar while re-scoring every training image.
    """

    def __init__(
        self,
        training: TrainingData,
        terms: Callable[[str], list[WeightTerm]],
        indexes: TermIndexes,
        test_gradients: TestGradients,
        preconditioned: PreconditionedScorers,
        search: IndexSearch,
        batch_size: int,
        rescore: int,
        progress: bool,
    ) -> None:
        self.training, self.terms, self.indexes = training, terms, indexes
        self.test_gradients, self.preconditioned = test_gradients, preconditioned
        self.search = search
        self.batch_size, self.rescore, self.progress = batch_size, rescore, progress

    def scores(self, queries: list[Query], method: str, exact: bool) -> torch.Tensor:
        """Return scores ``[B, N]`` on the CPU, re-scored exactly when ``exact`` and the index
        is projected."""
        scorer = make_scorer(method)
        if not isinstance(scorer, IndexScorer):
            inputs = self._preconditioned_inputs(queries, method)
            return self.preconditioned.scores(method, *inputs, exact=exact).float().cpu()
        terms = self.terms(method)
        approximate = any(self.indexes.ensure(term).approximate for term in terms)
        score = self._all_exact_scores if exact and approximate else self._index_scores
        rows = [score(group, scorer) for group in self._groups(queries, terms)]
        return torch.cat(rows).float().cpu()

    def self_scores(self, method: str) -> torch.Tensor:
        """Return each training image's score against itself ``[N]`` from the index's norms.

        Raises
        ------
        InputError
            For Grad-Cos (1 by definition).
        """
        if not isinstance(make_scorer(method), IndexScorer):
            return self.preconditioned.self_scores(method).float().cpu()
        if method == "grad_cos":
            raise InputError(
                "the grad-cos self-score is 1 for every training image by definition (the "
                "cosine of a gradient with itself); use method='grad_dot' or 'tracin_cp'"
            )
        total = sum(
            term.weight * at_least_float32(self.indexes.ensure(term).norms).square()
            for term in self.terms(method)
        )
        return total.float().cpu()

    def top_k(
        self, queries: list[Query], k: int, opponents: bool, method: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return indices and scores ``[B, k]`` of the best (or worst) training images."""
        sign = -1.0 if opponents else 1.0
        scorer = make_scorer(method)
        if not isinstance(scorer, IndexScorer):
            inputs = self._preconditioned_inputs(queries, method)
            return self.preconditioned.top_k(method, *inputs, k, opponents, self.rescore)
        terms = self.terms(method)
        approximate = any(self.indexes.ensure(term).approximate for term in terms)
        pool = min(len(self.training), max(self.rescore, 2 * k)) if approximate else k
        chosen, values = [], []
        for group in self._groups(queries, terms):
            vectors = self._test_vectors(group, scorer)
            found = self.search.candidates(self._search_terms(vectors), method, pool, opponents)
            if not approximate:
                chosen.append(found[0])
                values.append(found[1])
                continue
            for i, row in enumerate(found[0]):
                one = [(term, grads[i : i + 1], norms[i : i + 1]) for term, grads, norms in vectors]
                exact = self._exact_scores(one, scorer, row.tolist())[0]
                best, order = (sign * exact).topk(k)
                chosen.append(row[order.cpu()][None])
                values.append((sign * best).float().cpu()[None])
        return torch.cat(chosen), torch.cat(values)

    def _test_vectors(self, queries: list[Query], scorer: IndexScorer) -> list[TestVectors]:
        """Each term with the scorer's query vectors ``[B, P]`` of ``queries`` and their norms
        ``[B]``, formed once for the search and the re-scoring (each is a pass over ``P``
        numbers per query: about 10-35 ms for a ResNet-18 on one CPU core)."""
        result = []
        for term in self.terms(scorer.name):
            grads = [scorer.query(self.test_gradients.get(term, query)) for query in queries]
            grads = grads[0][None] if len(grads) == 1 else torch.stack(grads)
            result.append((term, grads, at_least_float32(grads).norm(dim=1)))
        return result

    def _search_terms(self, vectors: list[TestVectors]) -> list[SearchTerm]:
        """The index of each term with the query vectors as its features were made."""
        terms = []
        for term, grads, norms in vectors:
            index = self.indexes.ensure(term)
            terms.append(SearchTerm(index, index.project_query(grads), norms, term.weight))
        return terms

    def _preconditioned_inputs(
        self, queries: list[Query], method: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Test gradients ``[T, B, P]`` and the probabilities of their targets ``[T, B]``, per
        term (the checkpoints for TRAK over checkpoints, else the model)."""
        return preconditioned_inputs(
            self.preconditioned, self.terms(method), self.test_gradients, queries, method
        )

    @staticmethod
    def _groups(queries: list[Query], terms: list[WeightTerm]) -> list[list[Query]]:
        """``queries`` in groups whose query vectors, over all terms, fit `tests_per_product`."""
        size = tests_per_product(sum(term.gradients.num_params for term in terms))
        return [queries[start : start + size] for start in range(0, len(queries), size)]

    def _index_scores(self, queries: list[Query], scorer: IndexScorer) -> torch.Tensor:
        """Scores ``[B, N]`` from the index: the query vectors against it."""
        total = None
        for term, grads, norms in self._test_vectors(queries, scorer):
            index = self.indexes.ensure(term)
            dots = index.dots(grads).T
            part = term.weight * scorer.index_scores(dots, index.norms[None, :], norms[:, None])
            total = part if total is None else total + part
        return total

    def _all_exact_scores(self, queries: list[Query], scorer: IndexScorer) -> torch.Tensor:
        """Exact scores ``[B, N]`` of every training image, a batch of images at a time."""
        vectors = self._test_vectors(queries, scorer)
        chunks = [c.tolist() for c in torch.arange(len(self.training)).split(self.batch_size)]
        batches = zip(chunks, self.training.batches(chunks), strict=True)
        progress = tqdm(batches, desc="exact scores", unit="batch", disable=not self.progress)
        rows = [self._exact_scores(vectors, scorer, c, batch) for c, batch in progress]
        return torch.cat(rows, dim=1)

    def _exact_scores(
        self, vectors: list[TestVectors], scorer: IndexScorer, indices: list[int], batch=None
    ) -> torch.Tensor:
        """Exact scores ``[B, len(indices)]`` of some training images against the query vectors
        of `_test_vectors` (``batch``: their images and targets when loaded already), by forward
        mode."""
        images, targets = batch if batch is not None else self.training.batch(indices)
        total = None
        for term, grads, test_norms in vectors:
            index = self.indexes.ensure(term)
            norms = index.norms[torch.as_tensor(indices, device=index.norms.device)]
            rows = []
            for test_grad, test_norm in zip(grads, test_norms, strict=True):
                dots = batched_apply(
                    functools.partial(term.gradients.dots_along, direction=test_grad),
                    self.batch_size,
                    images,
                    targets,
                )
                rows.append(scorer.index_scores(dots, norms.to(dots.device), test_norm))
            part = term.weight * torch.stack(rows)
            total = part if total is None else total + part
        return total


def preconditioned_inputs(
    preconditioned: PreconditionedScorers,
    terms: list[WeightTerm],
    test_gradients: TestGradients,
    queries: list[Query],
    method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the test gradients ``[T, B, P]`` of ``queries`` under each term's weights and the
    probabilities ``[T, B]`` of their targets, as `PreconditionedScorers` takes them.

    Parameters
    ----------
    preconditioned : PreconditionedScorers
        The engine's preconditioned scorers.
    terms : list of WeightTerm
        The weights ``method`` sums over (the model, or TRAK's checkpoints).
    test_gradients : TestGradients
        The test gradients of each query.
    queries : list of Query
        Resolved tests.
    method : str
        A preconditioned scorer.

    Returns
    -------
    tuple of Tensor
        Gradients ``[T, B, P]`` and probabilities ``[T, B]``.
    """
    grads = torch.stack([torch.stack([test_gradients.get(t, q) for q in queries]) for t in terms])
    images = torch.stack([q.image for q in queries])
    classes = torch.tensor([q.target for q in queries])
    return grads, preconditioned.probabilities(method, images, classes)
