"""Memory held by the engine's test-gradient cache after clicking through many test images.

A ResNet-18 (random weights, 10 classes, 32×32 inputs, 11.2 M parameters: a 45 MB gradient)
answers ``scores`` for ``--clicks`` distinct test images. Prints the bytes the cache holds
against the bytes the former 64-entry bound would have held for the same clicks.

    PYTHONPATH=$PWD python benchmarks/gradient_cache_memory.py --clicks 70
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset
from torchvision.models import resnet18

from tfa_widgets import TFAEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=70)
    parser.add_argument("--budget-mb", type=float, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    train = TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))
    test = TensorDataset(torch.randn(args.clicks, 3, 32, 32), torch.zeros(args.clicks).long())
    engine = TFAEngine(model, train, test, progress=False, test_gradient_cache_mb=args.budget_mb)
    for click in range(args.clicks):
        engine.scores(click)
    gradient_mb = engine._model_term.gradients.num_params * 4 / 2**20
    held_mb = engine._test_gradients.cache.nbytes / 2**20
    count_bound_mb = min(args.clicks, 64) * gradient_mb
    print(f"one test gradient: {gradient_mb:.1f} MB; clicks: {args.clicks}")
    print(f"held now: {held_mb:.0f} MB in {len(engine._test_gradients.cache)} gradients "
          f"(budget {args.budget_mb:.0f} MB)")  # fmt: skip
    print(f"held under the former 64-entry bound: {count_bound_mb:.0f} MB "
          f"(ratio now/former {held_mb / count_bound_mb:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
