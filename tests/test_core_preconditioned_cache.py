"""Fitted EK-FAC factors and TRAK kernels on disk: a second engine loads them, a damaged file is
fitted again with a warning, other settings get another file, the budget is the indexes'."""

from __future__ import annotations

import warnings

import pytest
from smooth_models import images_and_labels, smooth_cnn
from test_core_scoring import relative_error
from torch.utils.data import TensorDataset

from tfa_widgets import InputError, TFAEngine
from tfa_widgets.core.index_store import PRECONDITIONER_PREFIX
from tfa_widgets.core.kfac import KFACSettings


def engine(cache_dir, **settings) -> TFAEngine:
    model = smooth_cnn()
    images, labels = images_and_labels(13)
    return TFAEngine(
        model,
        TensorDataset(images[:12], labels[:12]),
        TensorDataset(images[12:], labels[12:]),
        batch_size=5,
        progress=False,
        cache_dir=cache_dir,
        **settings,
    )


def fit_files(cache_dir) -> list:
    return sorted(cache_dir.glob(f"{PRECONDITIONER_PREFIX}*"))


def test_a_second_engine_loads_the_fit_instead_of_fitting(tmp_path):
    first = engine(tmp_path)
    expected = {m: first.scores(0, target=1, method=m) for m in ("influence", "relatif", "trak")}
    # Influence and RelatIF share one EK-FAC fit; TRAK has its own.
    assert first._preconditioned.fits == 2 and len(fit_files(tmp_path)) == 2
    second = engine(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean load warns about nothing
        for method, scores in expected.items():
            # The same float64 tensors, saved and read back bit for bit; 1e-12 of slack only
            # for the order of sums in the second engine's per-example gradients.
            assert relative_error(second.scores(0, target=1, method=method), scores) < 1e-12
    assert second._preconditioned.fits == 0
    self_first, self_second = first.self_scores("trak"), second.self_scores("trak")
    assert relative_error(self_second, self_first) < 1e-12


def test_a_corrupt_or_truncated_file_is_fitted_again_with_a_warning(tmp_path):
    expected = engine(tmp_path).scores(0, target=1, method="influence")
    (path,) = fit_files(tmp_path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    damaged = engine(tmp_path)
    with pytest.warns(UserWarning, match="corrupt.*fitting it again"):
        scores = damaged.scores(0, target=1, method="influence")
    assert damaged._preconditioned.fits == 1
    assert relative_error(scores, expected) < 1e-12
    path.write_bytes(path.read_bytes()[:100])  # truncated
    truncated = engine(tmp_path)
    with pytest.warns(UserWarning, match="unreadable.*fitting it again"):
        scores = truncated.scores(0, target=1, method="influence")
    assert truncated._preconditioned.fits == 1
    assert relative_error(scores, expected) < 1e-12
    assert engine(tmp_path)._preconditioned.fit("influence") and len(fit_files(tmp_path)) == 1


def test_other_settings_get_another_file(tmp_path):
    default = engine(tmp_path)
    scores = default.scores(0, target=1, method="influence")
    damped = engine(tmp_path, scorer_settings={"influence": {"settings": KFACSettings(damping=1)}})
    other = damped.scores(0, target=1, method="influence")
    assert damped._preconditioned.fits == 1 and len(fit_files(tmp_path)) == 2
    # Ten times the damping shrinks every score: the two cannot be the same fit.
    assert relative_error(other, scores) > 0.1
    plain = KFACSettings(eigenvalue_correction=False)
    kfac = engine(tmp_path, scorer_settings={"influence": {"settings": plain}})
    kfac.scores(0, target=1, method="influence")
    assert kfac._preconditioned.fits == 1 and len(fit_files(tmp_path)) == 3
    trak = engine(tmp_path, scorer_settings={"trak": {"dim": 16, "seed": 3}})
    trak.scores(0, target=1, method="trak")
    assert trak._preconditioned.fits == 1 and len(fit_files(tmp_path)) == 4


def test_fits_count_against_the_cache_budget_of_the_indexes(tmp_path):
    first = engine(tmp_path)
    first.build_index("grad_dot")
    first.scores(0, target=1, method="influence")
    files = first.index_store.files()
    assert len(files) == 2 and any(f.name.startswith(PRECONDITIONER_PREFIX) for f in files)
    first.index_store.budget_bytes = 0
    assert len(first.index_store.evict()) == 2  # both go when nothing fits


def test_unknown_scorer_settings_are_refused(tmp_path):
    with pytest.raises(InputError, match="only"):
        engine(tmp_path, scorer_settings={"grad_cos": {}})
    with pytest.raises(InputError, match="trak"):
        engine(tmp_path, scorer_settings={"trak": {"dimension": 8}})
