"""The gradient index: caching on disk, invalidation, corruption, projection quality."""

from __future__ import annotations

import warnings

import pytest
import torch
from core_models import small_cnn, small_dataset
from precision import float32_cosine_tolerance
from torch import nn

from tfa_widgets import TFAEngine
from tfa_widgets.core.errors import IndexCacheError
from tfa_widgets.core.index import GradientIndex, store_batch
from tfa_widgets.core.projection import RandomProjector

pytestmark = pytest.mark.portability


def make_engine(cache_dir, model=None, **kwargs):
    model = model if model is not None else small_cnn()
    return TFAEngine(
        model,
        small_dataset(20),
        small_dataset(2, seed=7),
        cache_dir=cache_dir,
        progress=False,
        **kwargs,
    )


def index_file(cache_dir):
    files = sorted(cache_dir.glob("gradient-index-*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_second_engine_loads_the_index_instead_of_rebuilding(tmp_path):
    first = make_engine(tmp_path)
    first.build_index()
    assert first.index_builds == 1
    second = make_engine(tmp_path)
    second.build_index()
    assert second.index_builds == 0
    torch.testing.assert_close(second.scores(0), first.scores(0))


def test_changed_weight_invalidates_the_index(tmp_path):
    make_engine(tmp_path).build_index()
    model = small_cnn()
    with torch.no_grad():
        model[7].bias[0] += 1e-3
    engine = make_engine(tmp_path, model)
    engine.build_index()
    assert engine.index_builds == 1
    assert len(list(tmp_path.glob("gradient-index-*.safetensors"))) == 2  # one per weights
    reference = TFAEngine(model, small_dataset(20), small_dataset(2, seed=7), progress=False)
    torch.testing.assert_close(engine.scores(0), reference.scores(0))


def test_truncated_index_is_reported_and_rebuilt(tmp_path):
    make_engine(tmp_path).build_index()
    path = index_file(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    engine = make_engine(tmp_path)
    with pytest.warns(UserWarning, match="unreadable"):
        engine.build_index()
    assert engine.index_builds == 1
    assert make_engine(tmp_path).build_index() is not None  # the rebuilt file loads again


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    make_engine(tmp_path).build_index()
    path = index_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCacheError, match="checksum"):
        GradientIndex.load(path, _fingerprint(tmp_path))


def _fingerprint(cache_dir):
    from tfa_widgets.core.fingerprint import combine

    engine = make_engine(cache_dir)
    return combine(**engine._indexes.fingerprint_parts(engine._model_term))


def test_interrupted_build_leaves_nothing_that_would_load(tmp_path):
    class Failing(torch.utils.data.Dataset):
        def __init__(self):
            self.inner = small_dataset(20)

        def __len__(self):
            return 20

        def __getitem__(self, i):
            if i == 15 and self.fail:
                raise KeyboardInterrupt
            return self.inner[i]

    data = Failing()
    data.fail = False
    engine = TFAEngine(small_cnn(), data, cache_dir=tmp_path, progress=False, batch_size=4)
    data.fail = True
    with pytest.raises(KeyboardInterrupt):
        engine.build_index()
    assert list(tmp_path.iterdir()) == []
    data.fail = False
    engine.build_index()
    assert engine.index_builds == 1 and index_file(tmp_path).exists()


def test_projected_index_when_over_budget_and_exact_rescoring(tmp_path):
    exact = make_engine(tmp_path / "exact")
    projected = make_engine(tmp_path / "proj", memory_budget_mb=1e-4, projection_dim=64, rescore=8)
    # Exact scores of the float64 model by two paths (a float32 index; forward-mode dots), each
    # within the float32 index bound of the float64 truth (precision.py): twice that between them.
    bound = float32_cosine_tolerance(exact._model_term.gradients.num_params)
    tolerance = {name: 2 * value for name, value in bound.items()}
    assert not exact.build_index().projected
    assert projected.build_index().projected and projected.build_index().features.shape[1] == 64
    # top_k re-scores its candidates exactly: the values equal the exact scores.
    indices, values = projected.top_k(0, 3)
    torch.testing.assert_close(values, exact.scores(0)[indices], **tolerance)
    # scores(exact=True) re-scores every training image; the projected ones differ.
    torch.testing.assert_close(projected.scores(0, exact=True), exact.scores(0), **tolerance)
    assert not torch.allclose(projected.scores(0), exact.scores(0), **tolerance)
    torch.testing.assert_close(exact.scores(0, exact=True), exact.scores(0))


def clustered_problem(n=600, classes=5, seed=2):
    """A model trained briefly on noisy copies of class prototypes (a realistic score spread).

    Data and training are float64: float32 random normals differ in the last bit between CPUs
    (torch draws them with a vectorised kernel on AVX2), and float32 training would carry such
    differences into the weights.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=generator)
    noise = torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64)
    images = prototypes[labels] + 0.8 * noise
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    ).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    test_labels = torch.arange(classes)
    test_noise = torch.randn(classes, 3, 8, 8, generator=generator, dtype=torch.float64)
    test_images = prototypes + 0.8 * test_noise
    train = torch.utils.data.TensorDataset(images, labels)
    return model.eval(), train, torch.utils.data.TensorDataset(test_images, test_labels)


def test_projected_scores_rank_the_exact_top10_within_the_projected_top50():
    model, train, test = clustered_problem()
    exact = TFAEngine(model, train, test, progress=False)
    projected = TFAEngine(
        model, train, test, progress=False, memory_budget_mb=1.0, projection_dim=1024
    )
    assert projected.build_index().projected
    assert exact.param_names and exact._model_term.gradients.num_params > 8 * 1024
    # Both scores come from float32 indexes, each score within `slack` / 2 of its float64 value
    # (precision.py; the projection adds one float32 sum per bucket, within the same bound; the
    # probabilistic bound, as the worst case of 8837 terms, 5e-4, exceeds some score gaps). The
    # sets take what another CPU could put in or leave out: the exact top 10 with everything
    # within `slack` below its 10th score, the projected top 50 without what is that close above.
    tolerance = float32_cosine_tolerance(exact._model_term.gradients.num_params, probable=True)
    slack = 2 * (tolerance["atol"] + tolerance["rtol"])
    for t in range(len(test)):
        top10 = _top_with_slack(exact.scores(t), 10, slack)
        top50 = _top_with_slack(projected.scores(t), 50, -slack)
        assert top10 <= top50, f"test {t}: {len(top10 - top50)} of the exact top-10 missed"


def _top_with_slack(scores: torch.Tensor, k: int, slack: float) -> set[int]:
    """Return the images scoring at least the k-th highest score minus ``slack``."""
    kth = float(scores.topk(k).values[-1])
    return set(torch.nonzero(scores >= kth - slack).flatten().tolist())


def test_projection_is_seeded_and_keeps_inner_products():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4001, generator=generator, dtype=torch.float64)
    b = 0.6 * a + torch.randn(4001, generator=generator, dtype=torch.float64)
    projector = RandomProjector(4001, 1000, seed=3)
    pa, pb = projector.project(a), projector.project(b)
    assert pa.shape == (1000,)
    assert torch.equal(pa, RandomProjector(4001, 1000, seed=3).project(a))
    assert not torch.equal(pa, RandomProjector(4001, 1000, seed=4).project(a))
    torch.testing.assert_close(projector.project(a, by_gather=True), pa)
    true_cos = torch.cosine_similarity(a, b, 0)
    assert abs(float(torch.cosine_similarity(pa, pb, 0) - true_cos)) < 0.06
    # Unbiased: averaged over seeds, projected inner products match the exact one.
    estimates = [RandomProjector(4001, 50, seed=s).project(torch.stack([a, b])) for s in range(400)]
    mean = torch.stack([e[0] @ e[1] for e in estimates]).mean()
    assert abs(float(mean / (a @ b)) - 1) < 0.03


def test_projection_of_blocks_equals_projection_of_the_whole():
    generator = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 2500, generator=generator)
    projector = RandomProjector(2500, 700, seed=5)
    whole = projector.project(grads)
    torch.testing.assert_close(projector.project(grads, by_gather=True), whole)
    # Uneven blocks that straddle the sketch's block boundaries (700, 1400, 2100).
    sizes = [1, 699, 650, 900, 250]
    projected = torch.zeros(3, 700)
    start = 0
    for block in grads.split(sizes, dim=1):
        projector.accumulate(projected, block, start)
        start += block.shape[1]
    torch.testing.assert_close(projected, whole)


@pytest.mark.parametrize("by_gather", [False, True])
def test_store_batch_writes_exact_or_projected_rows_and_norms(by_gather):
    grads = torch.randn(4, 900, generator=torch.Generator().manual_seed(2))
    blocks = list(grads.split([100, 500, 300], dim=1))
    rows = torch.zeros(4, 900)
    torch.testing.assert_close(store_batch(blocks, rows, None), grads.norm(dim=1))
    torch.testing.assert_close(rows, grads)
    projector = RandomProjector(900, 128, seed=1)
    rows = torch.zeros(4, 128)
    norms = store_batch(blocks, rows, projector, by_gather=by_gather)
    torch.testing.assert_close(norms, grads.norm(dim=1))
    torch.testing.assert_close(rows, projector.project(grads))


def test_projection_sends_each_block_to_distinct_outputs():
    projector = RandomProjector(2500, 700, seed=5)
    for first in (0, 700, 2100):  # a full block, and the last, partial one
        last = min(first + 700, 2500)
        basis = torch.eye(2500)[first:last]
        sketch = projector.project(basis)
        assert int((sketch != 0).sum()) == last - first  # one output per coordinate
        assert int((sketch.abs().sum(0) > 1).sum()) == 0  # no two share an output


def test_load_reports_a_foreign_fingerprint(tmp_path):
    engine = make_engine(tmp_path)
    engine.build_index()
    with pytest.raises(IndexCacheError, match="another model"), warnings.catch_warnings():
        GradientIndex.load(index_file(tmp_path), "0" * 64)


def test_an_index_from_an_older_sketch_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    make_engine(tmp_path).build_index()
    monkeypatch.setattr("tfa_widgets.core.index_store.SKETCH_VERSION", "some-later-sketch/9")
    engine = make_engine(tmp_path)
    engine.build_index()
    assert engine.index_builds == 1
    assert len(list(tmp_path.glob("gradient-index-*.safetensors"))) == 2
