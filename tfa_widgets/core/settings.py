"""The engine's settings as values: how the gradient index is built and kept, and SmoothGrad.

`TFAEngine` takes an `IndexSettings` (``settings=``) or the same values as keywords; both are
checked here, once, with a message naming the setting.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.index_store import DEFAULT_BUDGET_MB
from tfa_widgets.core.logra import PROJECTIONS
from tfa_widgets.core.shards import check_dtype


@dataclass(frozen=True)
class IndexSettings:
    """How the engine computes, stores and searches training gradients.

    Parameters
    ----------
    batch_size : int
        Images per batch when computing gradients, scores and maps.
    memory_budget_mb : float
        Exact gradients are stored while ``N × P × 4`` bytes fit; otherwise projections
        (``0``: always project).
    projection_dim : int
        Dimension of projected gradients.
    projection_seed : int
        Seed of the random projection.
    projection : {"countsketch", "logra"}
        How gradients are projected: a CountSketch of the full per-sample gradients, or
        factorised per Linear/Conv2d layer (LoGra, see `tfa_widgets.core.logra`; models whose
        layers are not factored fall back to the CountSketch). A sharded index is always a
        CountSketch.
    rescore : int
        With a projected index, ``max(rescore, 2k)`` candidates are re-scored exactly by
        ``top_k``. Each costs about three forward passes (a CIFAR ResNet-18: about 40 ms on one
        CPU core); more candidates miss fewer true top-k images: the exact top-8 of a ResNet-18
        (random init, N = 256, LoGra d = 4096) was 0.69 within the projected top-16 and 1.00
        within the top-32 (``benchmarks/scale_build.py``).
    strategy : {"auto", "factored", "vmap"}
        How per-example gradients are batched (see `GradientModel`).
    cache_budget_mb : float
        Size of all index files in the cache directory together; least recently used ones are
        removed first.
    test_gradient_cache_mb : float
        Memory for the test-image gradients kept for the next query (a ResNet-18 gradient is
        about 45 MB); least recently used ones are dropped first, the latest is always kept.
    shard_mb : float
        With a cache directory, an index larger than this is built as a directory of shards of
        this size, each written as soon as it is computed (memory bounded by one shard,
        resumable after an interruption, mapped instead of read when loaded; see
        `tfa_widgets.core.shards`); a smaller one stays one file.
    index_dtype : {"float32", "float16"}
        How a sharded index stores its features: float16 halves the disk and the scan, and
        moves a grad-cos score by at most about ``5e-4`` before exact re-scoring.
    num_workers : int
        ``torch.utils.data.DataLoader`` workers reading training images for the index build
        and for exact scores over the training set (``0``: read in this process). The order is
        fixed, so the index does not depend on it.

    Raises
    ------
    InputError
        When a size or budget is not a valid number.
    """

    batch_size: int = 64
    memory_budget_mb: float = 1024
    projection_dim: int = 4096
    projection_seed: int = 0
    projection: str = "countsketch"
    rescore: int = 16
    strategy: str = "auto"
    cache_budget_mb: float = DEFAULT_BUDGET_MB
    test_gradient_cache_mb: float = 512
    shard_mb: float = 64
    index_dtype: str = "float32"
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_integers(batch_size=self.batch_size, projection_dim=self.projection_dim)
        _check_integers(minimum=0, rescore=self.rescore, num_workers=self.num_workers)
        _check_numbers(
            cache_budget_mb=self.cache_budget_mb,
            test_gradient_cache_mb=self.test_gradient_cache_mb,
            shard_mb=self.shard_mb,
        )
        check_dtype(self.index_dtype)
        if self.projection not in PROJECTIONS:
            raise InputError(f"unknown projection {self.projection!r}; choose one of {PROJECTIONS}")
        _check_numbers(minimum=0, memory_budget_mb=self.memory_budget_mb)  # 0: always project

    @classmethod
    def merged(cls, settings: IndexSettings | None, **keywords) -> IndexSettings:
        """Return ``settings``, or the settings the keywords give when it is ``None``.

        Parameters
        ----------
        settings : IndexSettings, optional
            Settings given as one value.
        **keywords
            The same settings given one by one (the engine's keyword arguments).

        Returns
        -------
        IndexSettings
            The settings in force.

        Raises
        ------
        InputError
            When ``settings`` is not an `IndexSettings`, or is given together with a keyword
            that differs from its default (which of the two would win is unclear).
        """
        if settings is None:
            return cls(**keywords)
        if not isinstance(settings, cls):
            raise InputError(f"settings must be an IndexSettings, got {settings!r}")
        defaults = {f.name: f.default for f in fields(cls)}
        changed = sorted(name for name, value in keywords.items() if value != defaults[name])
        if changed:
            raise InputError(
                f"give the index settings either as settings= or as keywords, not both: "
                f"{changed} were also given as keywords"
            )
        return settings


@dataclass(frozen=True)
class SmoothGrad:
    """SmoothGrad settings for TFA maps.

    Parameters
    ----------
    n : int
        Number of noisy copies averaged per training image.
    sigma : float
        Noise standard deviation as a fraction of the input range (max - min) of the image.
    seed : int
        Seed of the noise, so the same settings give the same maps.

    Raises
    ------
    InputError
        When ``n`` is not a whole number >= 1, ``sigma`` not in [0, 10), or ``seed`` not an
        integer.
    """

    n: int = 16
    sigma: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_integer(self.n) or self.n < 1:
            raise InputError(
                f"SmoothGrad needs a whole number of noise samples n >= 1, got n={self.n!r}"
            )
        if (
            isinstance(self.sigma, bool)
            or not isinstance(self.sigma, numbers.Real)
            or not 0.0 <= self.sigma < 10.0
        ):
            raise InputError(
                f"SmoothGrad sigma is a fraction of the input range and must be a number in "
                f"[0, 10), got sigma={self.sigma!r}"
            )
        if not _is_integer(self.seed):
            raise InputError(f"SmoothGrad seed must be an integer, got seed={self.seed!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_integers(minimum: int = 1, **settings) -> None:
    for name, value in settings.items():
        if not _is_integer(value) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise InputError(f"{name} must be {kind}, got {value!r}")


def _check_numbers(minimum: float | None = None, **settings) -> None:
    """Check numbers are > 0, or >= ``minimum`` when given."""
    for name, value in settings.items():
        number = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if not number or not (value > 0 if minimum is None else value >= minimum):
            kind = "a positive number" if minimum is None else f"a number >= {minimum}"
            raise InputError(f"{name} must be {kind}, got {value!r}")
