"""Where the evaluation gets its test images and regions: the demo and datasets with masks.

Test images are drawn at random with each seed, never chosen by looking at results. On the demo
half of each seed's draw comes from the test images that carry the planted patch although they
belong to another class (their proponents are expected to be patched training images of the
shortcut class, so the patch measures have data); the other half from the remaining test images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.report import Regions


def draw(pool: Sequence[int], n: int, seed: int) -> list[int]:
    """Return ``n`` distinct items of ``pool`` drawn with a generator seeded by ``seed``."""
    if n > len(pool):
        raise InputError(f"cannot draw {n} test images from a pool of {len(pool)}")
    generator = torch.Generator().manual_seed(int(seed))
    return [int(pool[int(i)]) for i in torch.randperm(len(pool), generator=generator)[:n]]


def random_test_images(num_test: int, per_seed: int, seeds: Sequence[int]) -> dict[int, list[int]]:
    """Return ``{seed: per_seed test indices}`` drawn uniformly from ``range(num_test)``."""
    return {seed: draw(range(num_test), per_seed, seed) for seed in seeds}


def demo_test_images(demo, per_seed: int, seeds: Sequence[int]) -> dict[int, list[int]]:
    """Return ``{seed: test indices}`` for the demo, half from the patched test images."""
    patch_pool = sorted(demo.metadata.patched_test_other)
    other_pool = [i for i in range(len(demo.test_set)) if i not in set(patch_pool)]
    first = (per_seed + 1) // 2
    return {
        seed: draw(patch_pool, first, seed) + draw(other_pool, per_seed - first, seed)
        for seed in seeds
    }


def demo_regions(demo) -> Regions:
    """Return the demo's regions per training image: ``"object"`` and, if planted, ``"patch"``."""
    meta = demo.metadata

    def regions(index: int) -> dict[str, torch.Tensor | None]:
        patch = meta.patch_mask("train", index) if index in meta.train_patch_boxes else None
        return {"object": meta.train_masks[index], "patch": patch}

    return regions
