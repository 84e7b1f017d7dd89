"""Caches on disk and in memory: one index per fingerprint within a budget, stale temporary
files removed, unsavable caches reported before the build, memory bounded by bytes."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from core_models import small_cnn, small_dataset

from tfa_widgets import TFAEngine
from tfa_widgets.core.errors import IndexCacheError
from tfa_widgets.core.index import GradientIndex, temporary_path
from tfa_widgets.core.memory_cache import BytesLRU, nbytes
from tfa_widgets.widgets.cache import ExplanationCache
from tfa_widgets.widgets.gallery import Gallery

ROOT = Path(__file__).resolve().parents[1]


def make_engine(cache_dir, model=None, **kwargs):
    model = model if model is not None else small_cnn()
    return TFAEngine(
        model, small_dataset(20), small_dataset(2, seed=7), cache_dir=cache_dir, progress=False,
        **kwargs,
    )  # fmt: skip


def shifted_model(shift: float):
    model = small_cnn()
    with torch.no_grad():
        model[7].bias += shift
    return model


def index_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("gradient-index-*.safetensors"))


def temporaries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(".gradient-index-*.tmp"))


# ---------------------------------------------------------------- one file per fingerprint
def test_switching_weights_back_and_forth_reuses_each_index(tmp_path):
    for shift in (0.0, 0.1, 0.0, 0.1):
        make_engine(tmp_path, shifted_model(shift)).build_index()
    assert len(index_files(tmp_path)) == 2
    for shift in (0.0, 0.1):
        engine = make_engine(tmp_path, shifted_model(shift))
        engine.build_index()
        assert engine.index_builds == 0, f"weights shifted by {shift} were rebuilt"


def test_a_tracin_checkpoint_with_the_model_weights_reuses_the_model_index(tmp_path):
    model = small_cnn()
    make_engine(tmp_path, model).build_index()
    engine = make_engine(tmp_path, model, checkpoints=[(model.state_dict(), 0.1)])
    engine.build_index("tracin_cp")
    assert engine.index_builds == 0 and len(index_files(tmp_path)) == 1


def test_the_budget_removes_the_least_recently_used_index(tmp_path):
    make_engine(tmp_path, shifted_model(0.0)).build_index()
    size = index_files(tmp_path)[0].stat().st_size
    budget_mb = 2.5 * size / 2**20  # room for two index files, not three

    def engine(shift):
        return make_engine(tmp_path, shifted_model(shift), cache_budget_mb=budget_mb)

    engine(0.1).build_index()
    first, second = engine(0.0), engine(0.1)
    # Make the order of use explicit: the second weights were used long ago, then the
    # first ones are loaded again now (a load marks a file as recently used).
    long_ago = time.time() - 3600
    for path in index_files(tmp_path):
        os.utime(path, (long_ago, long_ago))
    first.build_index()
    assert first.index_builds == 0
    engine(0.2).build_index()  # a third index: the least recently used one goes
    assert len(index_files(tmp_path)) == 2
    reloaded = engine(0.0)
    reloaded.build_index()
    assert reloaded.index_builds == 0, "the recently used index was removed"
    second.build_index()
    assert second.index_builds == 1, "the least recently used index was kept"


def test_an_index_over_the_whole_budget_is_still_saved(tmp_path):
    engine = make_engine(tmp_path, cache_budget_mb=1e-6)
    engine.build_index()
    assert len(index_files(tmp_path)) == 1
    again = make_engine(tmp_path, cache_budget_mb=1e-6)
    again.build_index()
    assert again.index_builds == 0


# ---------------------------------------------------------------- temporary files
KILLED_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from core_models import small_cnn, small_dataset
    from tfa_widgets import TFAEngine
    from tfa_widgets.core import index

    def write_then_die(tensors, filename, metadata):
        index.__dict__["_real_save_file"](tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGKILL)

    index._real_save_file, index.save_file = index.save_file, write_then_die
    TFAEngine(small_cnn(), small_dataset(20), cache_dir=sys.argv[1], progress=False).build_index()
    """
)


def test_a_save_killed_by_sigkill_leaves_a_temporary_file_the_next_build_removes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, "-c", KILLED_DURING_SAVE, str(tmp_path), str(ROOT / "tests")]
    killed = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(temporaries(tmp_path)) == 1 and index_files(tmp_path) == []
    engine = make_engine(tmp_path)
    engine.build_index()
    assert temporaries(tmp_path) == [] and len(index_files(tmp_path)) == 1


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    return int(finished.stdout)


def test_only_temporary_files_of_dead_or_old_writers_are_removed(tmp_path):
    pid = dead_pid()
    live = temporary_path(tmp_path / "gradient-index-aaaa.safetensors")  # this process
    dead = live.with_name(live.name.replace(f".{os.getpid()}@", f".{pid}@"))
    legacy = tmp_path / f".gradient-index-bbbb.safetensors.{pid}.tmp"  # before hosts
    elsewhere = tmp_path / f".gradient-index-cccc.safetensors.{pid}@another-host.tmp"
    old = tmp_path / f".gradient-index-dddd.safetensors.{os.getpid()}@another-host.tmp"
    for path in (live, dead, legacy, elsewhere, old):
        path.write_bytes(b"partial index")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    make_engine(tmp_path).build_index()
    assert temporaries(tmp_path) == sorted([live, elsewhere])


# ---------------------------------------------------------------- caches that cannot be written
def test_a_cache_dir_that_is_a_file_is_refused_at_construction(tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    with pytest.raises(IndexCacheError, match="is a file, not a directory"):
        make_engine(tmp_path / "cache")


class CountingDataset(torch.utils.data.Dataset):
    """Counts the items read, to show that no index build started."""

    def __init__(self, n: int = 20) -> None:
        self.inner, self.reads = small_dataset(n), 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_a_cache_dir_under_a_file_fails_before_the_build(tmp_path):
    (tmp_path / "file").write_text("x")
    data = CountingDataset()
    engine = TFAEngine(small_cnn(), data, cache_dir=tmp_path / "file" / "cache", progress=False)
    reads = data.reads
    with pytest.raises(IndexCacheError, match="cannot be saved in cache_dir.*cache_dir=None"):
        engine.build_index()
    assert engine.index_builds == 0
    # Only the fingerprint read the data (once, cached): no batch of the build was loaded.
    assert data.reads == reads + len(data)


def test_a_directory_where_the_index_file_goes_fails_before_the_build(tmp_path):
    make_engine(tmp_path).build_index()
    path = index_files(tmp_path)[0]
    path.unlink()
    path.mkdir()
    engine = make_engine(tmp_path)
    with pytest.raises(IndexCacheError, match="is a directory where the gradient index"):
        engine.build_index()
    assert engine.index_builds == 0


def test_a_read_only_cache_dir_fails_before_the_build_and_still_serves_its_indexes(tmp_path):
    make_engine(tmp_path).build_index()
    tmp_path.chmod(0o555)
    try:
        probe = tmp_path / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: file permissions do not stop writes here")
        reader = make_engine(tmp_path)
        reader.build_index()
        assert reader.index_builds == 0
        other = make_engine(tmp_path, shifted_model(0.3))
        with pytest.raises(IndexCacheError, match="cannot be saved.*Permission denied"):
            other.build_index()
        assert other.index_builds == 0
    finally:
        tmp_path.chmod(0o755)


def test_a_failed_save_keeps_the_index_in_memory_with_a_warning(tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tfa_widgets.core.index.save_file", disk_full)
    engine = make_engine(tmp_path)
    with pytest.warns(UserWarning, match="No space left.*kept in memory"):
        index = engine.build_index()
    assert engine.index_builds == 1 and len(index) == 20
    assert list(tmp_path.iterdir()) == []  # neither a partial file nor a temporary one
    reference = TFAEngine(small_cnn(), small_dataset(20), small_dataset(2, seed=7), progress=False)
    torch.testing.assert_close(engine.scores(0), reference.scores(0))
    assert engine.index_builds == 1


# ---------------------------------------------------------------- corrupt files
def corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    return {
        "empty": b"",
        "truncated header": data[:20],
        "truncated data": data[: len(data) // 2],
        "flipped byte": bytes(flipped),
        "garbage": b"\x00garbage" * 100,
    }


def test_loading_a_corrupt_index_leaks_no_file_handle(tmp_path):
    engine = make_engine(tmp_path)
    engine.build_index()
    path = index_files(tmp_path)[0]
    fingerprint = engine.build_index().fingerprint
    unraisable = []
    previous = sys.unraisablehook
    sys.unraisablehook = unraisable.append  # a ResourceWarning in __del__ lands here
    try:
        for name, data in corruptions(path.read_bytes()).items():
            path.write_bytes(data)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(IndexCacheError):
                    GradientIndex.load(path, fingerprint)
                gc.collect()
            assert unraisable == [], f"{name}: {unraisable[0].exc_value!r}"
    finally:
        sys.unraisablehook = previous


# ---------------------------------------------------------------- memory bounded by bytes
def test_bytes_lru_drops_the_least_recently_used_values_beyond_its_bytes():
    cache = BytesLRU(max_bytes=3 * 400)  # three float32 vectors of 100
    for key in "abc":
        cache[key] = torch.zeros(100)
    assert cache["a"] is not None  # "a" is now the most recently used
    cache["d"] = torch.zeros(100)
    assert [k in cache for k in "abcd"] == [True, False, True, True]
    assert cache.nbytes == 1200
    cache["e"] = torch.zeros(1000, dtype=torch.float64)  # alone over the budget: kept alone
    assert len(cache) == 1 and cache.nbytes == 8000 and "e" in cache
    cache["e"] = torch.zeros(10)  # replacing a value counts its new size only
    assert cache.nbytes == 40


def test_nbytes_counts_tensors_nested_in_containers_and_dataclasses(demo_like_explanation):
    explanation = demo_like_explanation
    tensors = [v for v in vars(explanation).values() if isinstance(v, torch.Tensor)]
    tensors += explanation.train_labels  # 0-d label tensors of a TensorDataset, in a list
    expected = sum(t.numel() * t.element_size() for t in tensors)
    assert nbytes(explanation) == expected > 0
    nested = {"a": [torch.zeros(3), (torch.zeros(2, dtype=torch.int16), 7)], "b": np.zeros(5)}
    assert nbytes(nested) == 4 * 3 + 2 * 2 + 8 * 5


@pytest.fixture(scope="module")
def demo_like_explanation():
    engine = TFAEngine(small_cnn(), small_dataset(10), small_dataset(3, seed=7), progress=False)
    return engine.explain(0, k=3)


def test_test_gradients_are_bounded_by_bytes():
    engine = TFAEngine(small_cnn(), small_dataset(10), small_dataset(3, seed=7), progress=False)
    gradient_bytes = engine._model_term.gradients.num_params * 8  # float64 model
    budget_mb = 2.5 * gradient_bytes / 2**20
    engine = TFAEngine(
        small_cnn(), small_dataset(10), small_dataset(3, seed=7), progress=False,
        test_gradient_cache_mb=budget_mb,
    )  # fmt: skip
    for test in range(3):
        for target in range(3):
            engine.scores(test, target=target)
    assert (
        len(engine._test_gradients.cache) == 2
        and engine._test_gradients.cache.nbytes == 2 * gradient_bytes
    )


def test_the_explanation_cache_is_bounded_by_bytes(demo_like_explanation):
    size = nbytes(demo_like_explanation)
    cache = ExplanationCache(max_bytes=int(2.5 * size))
    computed = []

    def compute(k):
        computed.append(k)
        return demo_like_explanation

    for key in "abc":
        cache.get(key, 3, compute)
    assert len(cache) == 2
    cache.get("a", 3, compute)
    assert computed == [3, 3, 3, 3]  # "a" was dropped first


def test_the_gallery_thumbnails_are_bounded_by_bytes(monkeypatch):
    engine = TFAEngine(small_cnn(), small_dataset(4), small_dataset(5, seed=7), progress=False)
    thumbnail_bytes = 8 * 8 * 3 * 4  # an [8, 8, 3] float32 display image
    monkeypatch.setattr("tfa_widgets.widgets.gallery.THUMBNAIL_CACHE_BYTES", 2 * thumbnail_bytes)
    gallery = Gallery(engine, on_select=lambda i: None, progress=False)
    pictures = [gallery.thumbnail(i) for i in range(5)]
    assert len(gallery._thumbs) == 2 and gallery._thumbs.nbytes == 2 * thumbnail_bytes
    assert np.array_equal(gallery.thumbnail(0), pictures[0])  # recomputed after eviction
