"""Engine factories for the sharded-index tests: `python -m tfa_widgets.index --engine
shard_engines:small` builds the index of `small()` in ``$TFA_SHARD_TEST_DIR``."""

from __future__ import annotations

import os

import torch
from core_models import small_cnn, small_dataset

from tfa_widgets import TFAEngine

NUM_TRAIN = 20
NUM_PARAMS = 463  # small_cnn()
ROWS_PER_SHARD = 6  # 4 shards of 6, 6, 6 and 2 rows: the last one is short


def shard_mb(rows: int = ROWS_PER_SHARD, width: int = NUM_PARAMS, itemsize: int = 4) -> float:
    """Return the ``shard_mb`` that makes shards of ``rows`` rows."""
    return (rows * width * itemsize + 1) / 2**20


def small(cache_dir=..., **kwargs) -> TFAEngine:
    """Return the small engine whose index the tests shard (exact gradients, 4 shards), its
    cache in ``$TFA_SHARD_TEST_DIR`` unless ``cache_dir`` is given (``None``: in memory)."""
    if os.environ.get("TFA_TEST_THREADS"):
        torch.set_num_threads(int(os.environ["TFA_TEST_THREADS"]))
    settings = {"shard_mb": shard_mb(), "batch_size": 4, "progress": False, **kwargs}
    return TFAEngine(
        small_cnn(),
        small_dataset(NUM_TRAIN),
        small_dataset(2, seed=7),
        cache_dir=os.environ["TFA_SHARD_TEST_DIR"] if cache_dir is ... else cache_dir,
        **settings,
    )
