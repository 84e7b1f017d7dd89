"""Top-k over the gradient index: chunked exact search and FAISS flat and IVF, against brute force.

The brute force is the score of every row in float64 from the same float32 features, sorted
stably (ties: lower training index first). A search in float32 can only differ from it where two
scores are closer than twice its rounding error, so each test checks that the scores it ranks
are further apart than that (`precision.ranking_margin`) before comparing rankings.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from core_models import small_cnn, small_dataset
from precision import gamma, ranking_margin

from tfa_widgets import IndexCacheError, InputError, SearchSettings, TFAEngine
from tfa_widgets.core import faiss_search
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.index_store import IndexStore
from tfa_widgets.core.scoring import make_scorer
from tfa_widgets.core.search import IndexSearch, SearchTerm, exact_top_k, search_settings


def score(method, dots, train_norms, test_norms):
    """The scorer's own score of ``⟨g_i, g_t⟩`` and the norms (the brute-force reference)."""
    return make_scorer(method).index_scores(dots, train_norms, test_norms)


faiss = pytest.importorskip("faiss", reason="FAISS search needs the faiss extra")


def _mb(rows: int, width: int) -> float:
    """``chunk_mb`` for chunks of ``rows`` rows of ``width`` float32 numbers."""
    return rows * width * 4 / 2**20


def _index(features: torch.Tensor, norms: torch.Tensor, name: str = "a") -> GradientIndex:
    return GradientIndex(features=features, norms=norms, fingerprint=f"test-index-{name}")


def _random_index(rows: int, dim: int, seed: int, name: str = "a") -> GradientIndex:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=generator)
    # Exact norms differ from the features' own norms, as in a projected index.
    factors = torch.empty(rows).uniform_(0.5, 2.0, generator=generator)
    return _index(features, features.norm(dim=1) * factors, name)


def _terms(indexes, queries, weights=None) -> list[SearchTerm]:
    weights = weights or [1.0] * len(indexes)
    return [
        SearchTerm(index, q, q.norm(dim=1), w)
        for index, q, w in zip(indexes, queries, weights, strict=True)
    ]


def _brute_force(terms, method: str) -> torch.Tensor:
    """Scores ``[B, N]`` in float64 from the same float32 numbers."""
    return sum(
        t.weight
        * score(
            method,
            t.queries.double() @ t.index.features.double().T,
            t.index.norms.double()[None, :],
            t.queries.double().norm(dim=1)[:, None],
        )
        for t in terms
    )


def _rounding_bound(terms, method: str) -> torch.Tensor:
    """Per query, a bound on the float32 error of any score: a ``d``-term dot product is off by
    ``gamma(d) Σ|a_k b_k| <= gamma(d) ‖a‖‖b‖``, its scaling by up to four roundings (``4u``
    relative), and FAISS's pre-scaled factors by as many again."""
    total = 0
    for t in terms:
        d = t.queries.shape[1]
        products = t.queries.double().norm(dim=1)[:, None] * t.index.features.double().norm(dim=1)
        scales = score(
            method, products, t.index.norms.double(), t.queries.double().norm(dim=1)[:, None]
        )
        total = total + abs(t.weight) * (gamma(d + 8) * scales.abs()).max(dim=1).values
    return total


def _check_ranking(indices, values, terms, method: str, k: int, opponents: bool):
    sign = -1.0 if opponents else 1.0
    truth = _brute_force(terms, method)
    bound = _rounding_bound(terms, method)
    for row in range(truth.shape[0]):
        assert ranking_margin(sign * truth[row], k) > 2 * float(bound[row]), "scores too close"
        order = (sign * truth[row]).sort(descending=True, stable=True).indices[:k]
        assert indices[row].tolist() == order.tolist()
        torch.testing.assert_close(
            values[row].double(), truth[row, order], rtol=0, atol=float(bound[row])
        )


@pytest.mark.portability
@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
@pytest.mark.parametrize("opponents", [False, True])
def test_exact_and_flat_top_k_equal_brute_force(method, opponents, tmp_path):
    index = _random_index(300, 24, seed=3)
    queries = torch.randn(3, 24, generator=torch.Generator().manual_seed(4))
    terms = _terms([index], [queries])
    k = 10
    indices, values = exact_top_k(terms, method, k, opponents, chunk_rows=37)
    _check_ranking(indices, values, terms, method, k, opponents)
    flat = IndexSearch(SearchSettings("faiss", chunk_mb=_mb(37, 24)), tmp_path, progress=False)
    indices, values = flat.candidates(terms, method, k, opponents)
    _check_ranking(indices, values, terms, method, k, opponents)


@pytest.mark.portability
@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_a_sum_of_terms_is_searched_as_one_score(kind, tmp_path):
    """TracIn-CP: two checkpoints' indexes, weighted by their learning rates."""
    indexes = [_random_index(200, 16, seed=5, name="c0"), _random_index(200, 8, seed=6, name="c1")]
    generator = torch.Generator().manual_seed(7)
    queries = [torch.randn(2, 16, generator=generator), torch.randn(2, 8, generator=generator)]
    terms = _terms(indexes, queries, weights=[0.5, 2.0])
    search = IndexSearch(SearchSettings(kind, chunk_mb=_mb(64, 24)), tmp_path, progress=False)
    indices, values = search.candidates(terms, "grad_dot", 8, opponents=False)
    _check_ranking(indices, values, terms, "grad_dot", 8, opponents=False)


@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
@pytest.mark.parametrize("opponents", [False, True])
@pytest.mark.parametrize("chunk_rows", [5, 20, 50])
def test_chunks_smaller_or_larger_than_k_keep_ties_in_index_order(method, opponents, chunk_rows):
    # Small integers: every dot product is exact in float32, and grad-cos divides only by
    # powers of two, so equal rows score exactly equal and the rankings must match exactly.
    generator = torch.Generator().manual_seed(8)
    distinct = torch.randint(-3, 4, (6, 5), generator=generator).float()
    features = distinct[torch.randint(0, 6, (50,), generator=generator)]
    norms = 2.0 ** torch.randint(0, 3, (50,), generator=generator).float()
    queries = torch.randint(-3, 4, (2, 5), generator=generator).float()
    index = _index(features, norms)
    terms = [SearchTerm(index, queries, torch.ones(2))]
    sign = -1.0 if opponents else 1.0
    truth = sign * score(
        method,
        queries.double() @ features.double().T,
        norms.double(),
        torch.ones((), dtype=torch.float64),
    )
    assert (truth[:, None, :] == truth[:, :, None]).sum() > 2 * 50, "no ties to break"
    k = 12
    indices, values = exact_top_k(terms, method, k, opponents, chunk_rows)
    expected = truth.sort(dim=1, descending=True, stable=True).indices[:, :k]
    assert indices.tolist() == expected.tolist()
    assert values.double().tolist() == (sign * truth.gather(1, expected)).tolist()


def _clustered(rows: int, dim: int, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around random centres (gradients cluster by class and by pattern), and queries
    drawn the same way."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(0, clusters, (rows + 20,), generator=generator)
    points = centres[labels] + 0.4 * torch.randn(rows + 20, dim, generator=generator)
    return points[:rows], points[rows:]


def test_ivf_recall_against_exact_top_k(tmp_path):
    features, queries = _clustered(20000, 32, clusters=200, seed=9)
    index = _index(features, features.norm(dim=1))
    terms = _terms([index], [queries])
    k = 50
    exact, _ = exact_top_k(terms, "grad_cos", k, False, chunk_rows=4096)
    recalls = {}
    nlist = faiss_search.default_nlist(20000)
    for nprobe in (1, 16, nlist):
        settings = SearchSettings("ivf", chunk_mb=_mb(4096, 32), nprobe=nprobe)
        found, _ = IndexSearch(settings, tmp_path, progress=False).candidates(
            terms, "grad_cos", k, opponents=False
        )
        hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True)]
        recalls[nprobe] = sum(hits) / exact.numel()
    print(f"IVF recall of the exact top-{k} by nprobe (nlist {nlist}): {recalls}")
    assert recalls[1] < recalls[16], "probing more clusters must find more"
    assert recalls[16] >= 0.95
    assert recalls[nlist] == 1.0  # every cluster probed: exhaustive


def test_ivf_probes_every_cluster_when_the_probed_ones_hold_too_few_rows(tmp_path):
    features, queries = _clustered(400, 8, clusters=4, seed=10)
    terms = _terms([_index(features, features.norm(dim=1))], [queries])
    settings = SearchSettings("ivf", nlist=10, nprobe=1)
    found, values = IndexSearch(settings, tmp_path, progress=False).candidates(
        terms, "grad_dot", 300, opponents=False
    )
    assert bool((found >= 0).all()) and found.shape == (20, 300)
    assert all(len(set(row.tolist())) == 300 for row in found)


def test_the_structure_is_cached_and_a_corrupt_one_is_rebuilt(tmp_path):
    index = _random_index(500, 16, seed=11)
    terms = _terms([index], [torch.randn(2, 16, generator=torch.Generator().manual_seed(12))])
    settings = SearchSettings("ivf", nlist=8, nprobe=8)
    first = IndexSearch(settings, tmp_path, progress=False)
    expected = first.candidates(terms, "grad_cos", 5, opponents=True)
    assert first.builds == 1
    (path,) = tmp_path.glob(f"{faiss_search.PREFIX}*{faiss_search.SUFFIX}")
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"
    second = IndexSearch(settings, tmp_path, progress=False)
    torch.testing.assert_close(second.candidates(terms, "grad_cos", 5, opponents=True), expected)
    assert second.builds == 0
    data = bytearray(path.read_bytes())
    for damage in (lambda b: b.__setitem__(len(b) // 2, b[len(b) // 2] ^ 0xFF), bytearray.clear):
        damaged = bytearray(data)
        damage(damaged)
        path.write_bytes(bytes(damaged))
        third = IndexSearch(settings, tmp_path, progress=False)
        with pytest.warns(UserWarning, match="search structure .* rebuilding it"):
            result = third.candidates(terms, "grad_cos", 5, opponents=True)
        torch.testing.assert_close(result, expected)
        assert third.builds == 1
    assert path.read_bytes() == bytes(data), "the rebuilt structure is saved again"


def test_structures_share_the_cache_budget_least_recently_used_first(tmp_path):
    indexes = {name: _random_index(1000, 64, seed=21, name=name) for name in "abc"}
    queries = torch.randn(1, 64, generator=torch.Generator().manual_seed(22))
    one = 1000 * 64 * 4  # bytes of a flat structure's rows, the bulk of its file
    store = IndexStore(tmp_path, budget_mb=3.5 * one / 2**20)  # three files of `one` fit
    settings = SearchSettings("faiss")
    paths = {}
    for age, name in enumerate("ab"):
        IndexSearch(settings, store, progress=False).candidates(
            _terms([indexes[name]], [queries]), "grad_cos", 3, False
        )
        (paths[name],) = set(tmp_path.glob(f"{faiss_search.PREFIX}*")) - set(paths.values())
        os.utime(paths[name], (1000 + age, 1000 + age))  # "a" older than "b"
    assert store.files() == [paths["a"], paths["b"]]
    reloaded = IndexSearch(settings, store, progress=False)
    reloaded.candidates(_terms([indexes["a"]], [queries]), "grad_cos", 3, False)
    assert reloaded.builds == 0  # loaded, so recently used: "b" is now the oldest
    searched = store.path(indexes["c"].fingerprint)  # the index searched: the oldest file
    searched.write_bytes(bytes(one))
    os.utime(searched, (10, 10))
    IndexSearch(settings, store, progress=False).candidates(
        _terms([indexes["c"]], [queries]), "grad_cos", 3, False
    )
    left = set(tmp_path.glob(f"{faiss_search.PREFIX}*"))
    assert len(left) == 2 and paths["a"] in left and paths["b"] not in left
    assert searched.exists(), "the index being searched is in use: kept"
    assert sum(path.stat().st_size for path in [*left, searched]) <= store.budget_bytes
    # An engine keeps its structures in its own cache, within its cache_budget_mb.
    engine = _engine("faiss", cache_dir=tmp_path / "engine", cache_budget_mb=1)
    assert engine._search.store is engine.index_store


def test_a_structure_belongs_to_its_index_and_scorer(tmp_path):
    index = _random_index(100, 8, seed=13)
    terms = _terms([index], [torch.randn(1, 8, generator=torch.Generator().manual_seed(14))])
    settings = SearchSettings("faiss")
    search = IndexSearch(settings, tmp_path, progress=False)
    search.candidates(terms, "grad_cos", 3, False)
    search.candidates(terms, "grad_dot", 3, False)
    other = _terms([_random_index(100, 8, seed=15, name="b")], [terms[0].queries])
    search.candidates(other, "grad_cos", 3, False)
    assert search.builds == 3
    assert len(list(tmp_path.glob(f"{faiss_search.PREFIX}*"))) == 3
    path = next(tmp_path.glob(f"{faiss_search.PREFIX}*"))
    with pytest.raises(IndexCacheError, match="another index"):
        faiss_search.load(path, "some other fingerprint")


def test_without_faiss_a_faiss_search_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    for kind in ("faiss", "ivf"):
        with pytest.raises(InputError, match=r"pip install 'tfa-widgets\[faiss\]'"):
            IndexSearch(SearchSettings(kind))
        with pytest.raises(InputError, match=f"search='{kind}' needs FAISS"):
            TFAEngine(small_cnn(), small_dataset(4), progress=False, search=kind)
    IndexSearch(SearchSettings("exact"))  # the default needs nothing more


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ("annoy", "unknown search 'annoy'"),
        (SearchSettings, "search must be one of"),
        ({"kind": "ivf"}, "search must be one of"),
    ],
)
def test_bad_search_settings_are_refused(search, message):
    with pytest.raises(InputError, match=message):
        search_settings(search)


@pytest.mark.parametrize(
    ("field", "value"),
    [("nlist", 0), ("nprobe", 1.5), ("seed", -1), ("nprobe", True)],
)
def test_bad_search_numbers_are_refused(field, value):
    with pytest.raises(InputError, match=f"search setting {field} must be an integer"):
        SearchSettings("ivf", **{field: value})


def test_indexes_of_different_rows_are_not_searched_together():
    terms = _terms(
        [_random_index(10, 4, seed=16), _random_index(12, 4, seed=17, name="b")],
        [torch.ones(1, 4), torch.ones(1, 4)],
    )
    with pytest.raises(IndexCacheError, match="do not hold the same rows"):
        exact_top_k(terms, "grad_dot", 3, False, chunk_rows=8)


def test_an_ivf_with_more_clusters_than_rows_is_refused(tmp_path):
    terms = _terms([_random_index(10, 4, seed=18)], [torch.ones(1, 4)])
    search = IndexSearch(SearchSettings("ivf", nlist=11), tmp_path, progress=False)
    with pytest.raises(InputError, match="nlist=11 exceeds the 10 rows"):
        search.candidates(terms, "grad_dot", 3, False)


# ----------------------------------------------------------------- through the engine


def _engine(search, **kwargs) -> TFAEngine:
    model = small_cnn().float()
    return TFAEngine(
        model,
        small_dataset(40),
        small_dataset(4, seed=7),
        progress=False,
        search=search,
        **kwargs,
    )


@pytest.mark.portability
@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("method", ["grad_cos", "grad_dot"])
def test_engine_top_k_is_the_same_with_every_search(projected, method, tmp_path):
    settings = {"memory_budget_mb": 1e-3, "projection_dim": 32} if projected else {}
    engines = {
        kind: _engine(
            SearchSettings(kind, chunk_mb=_mb(7, 32)), cache_dir=tmp_path / kind, **settings
        )
        for kind in ("exact", "faiss")
    }
    # An IVF probing all its clusters is exhaustive too.
    engines["ivf"] = _engine(
        SearchSettings("ivf", nlist=4, nprobe=4), cache_dir=tmp_path / "ivf", **settings
    )
    for opponents in (False, True):
        sign = -1.0 if opponents else 1.0
        exact = engines["exact"].scores([0, 1, 2, 3], method=method, exact=True)
        num_params = engines["exact"]._model_term.gradients.num_params
        scale = 1.0 if method == "grad_cos" else float(exact.abs().max())
        tolerance = 4 * gamma(num_params) * scale  # as in test_core_queries
        reference = engines["exact"].top_k([0, 1, 2, 3], 5, method=method, opponents=opponents)
        for kind, engine in engines.items():
            indices, values = engine.top_k([0, 1, 2, 3], 5, method=method, opponents=opponents)
            if projected:
                # The candidates come from the projected scores, so a true top-5 image may be
                # missed; every search must find the same candidates and re-score them alike.
                assert indices.tolist() == reference[0].tolist(), kind
                torch.testing.assert_close(values, reference[1], rtol=0, atol=tolerance)
                continue
            for row in range(4):
                # The same top-5 as sorting the exact scores, except where two of them tie
                # within rounding: each one returned scores at least the exact 5th best.
                kth = (sign * exact[row]).topk(5).values[-1]
                assert bool((sign * exact[row, indices[row]] >= kth - 2 * tolerance).all()), kind
                assert len(set(indices[row].tolist())) == 5
                torch.testing.assert_close(
                    values[row], exact[row, indices[row]], rtol=0, atol=tolerance
                )
                assert bool((sign * values[row]).diff().le(0).all()), "best first"
    assert len(list((tmp_path / "faiss").glob(f"{faiss_search.PREFIX}*"))) == 1


def test_engine_explain_uses_the_search(tmp_path):
    engine = _engine("faiss", cache_dir=tmp_path)
    explanation = engine.explain(0, k=3)
    indices, _ = engine.top_k(0, 3)
    assert explanation.train_indices.tolist() == indices.tolist()
    assert engine._search.builds == 1


@pytest.mark.portability
@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_half_precision_features_are_searched_in_float32(kind, tmp_path):
    index = _random_index(64, 8, seed=19)
    half = _index(index.features.half(), index.norms, name="half")
    terms = _terms([half], [torch.randn(2, 8, generator=torch.Generator().manual_seed(20))])
    search = IndexSearch(SearchSettings(kind), tmp_path, progress=False)
    indices, values = search.candidates(terms, "grad_cos", 4, False)
    assert values.dtype == torch.float32
    _check_ranking(indices, values, terms, "grad_cos", 4, opponents=False)


@pytest.mark.parametrize(
    ("value", "message"), [(0, "positive"), (-1.5, "positive"), ("1", "a number")]
)
def test_bad_chunk_sizes_are_refused(value, message):
    with pytest.raises(InputError, match=f"search setting chunk_mb must be {message}"):
        SearchSettings(chunk_mb=value)


def test_chunks_are_sized_in_megabytes():
    assert SearchSettings(chunk_mb=256).rows_per_chunk(256) == 262144
    assert SearchSettings(chunk_mb=1e-9).rows_per_chunk(4096) == 1
