"""The malloc setting the engine applies on the CPU, and batched per-example losses."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch.func import vmap

from tfa_widgets.core.allocator import keep_freed_memory
from tfa_widgets.core.losses import batch_losses, encode_class, encode_labels, example_loss

pytestmark = pytest.mark.portability


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # once per process; calling again is harmless


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "squared_error"])
def test_batch_losses_equal_per_example_losses(loss):
    generator = torch.Generator().manual_seed(0)
    if loss == "squared_error":
        logits = torch.randn(5, 1, generator=generator)
        targets = torch.randn(5, generator=generator)
    else:
        logits = torch.randn(5, 4, generator=generator)
        labels = [1, 0, 3, 2, 1] if loss == "cross_entropy" else torch.eye(4)[[1, 0, 3, 2, 1]]
        targets = encode_labels(labels, loss, 4)
        if loss == "bce":  # explaining one class uses a weight mask
            targets[0] = encode_class(2, loss, 4)
    expected = vmap(lambda out, target: example_loss(out, target, loss))(logits, targets)
    torch.testing.assert_close(batch_losses(logits, targets, loss), expected)
