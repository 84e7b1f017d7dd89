"""How well the explorer's audit rankings surface the demo's planted training images.

For each ranking of the training set (frequent proponents of the misclassified test images, and
self-influence), prints how many of the planted mislabelled and patched (shortcut) training
images fall in its top 1%, 5% and 10%, beside what a random ranking gives on average.

    TFA_CACHE_DIR=/tmp/tfa-cache-explorer PYTHONPATH=$PWD python benchmarks/audit_demo.py
"""

from __future__ import annotations

import numpy as np
import torch

from tfa_widgets.data import load_demo
from tfa_widgets.widgets.audit import TrainingData, audit_rankings

FRACTIONS = (0.01, 0.05, 0.10)


def main() -> None:
    torch.set_num_threads(1)
    demo = load_demo(progress=False)
    engine = demo.engine(progress=False)
    engine.build_index()
    predicted = demo.predictions("test").numpy()
    labels = demo.test_set.labels.numpy()

    def mistakes(true_class: int | None) -> list[int]:
        wrong = np.flatnonzero(predicted != labels)
        return [int(i) for i in wrong if true_class is None or labels[i] == true_class]

    data = TrainingData(engine, mistakes)
    n = len(engine.train_set)
    planted = {
        "mislabelled": set(demo.metadata.flipped_labels),
        "patched": set(demo.metadata.train_patch_boxes),
    }
    frequent, tests = audit_rankings(data, None, k=8, progress=False)
    rankings = {
        f"frequent proponents of {tests} mistakes (top-8 each)": frequent,
        "self-influence (grad-dot ‖g_i‖²)": data.self_influence_ranking(),
    }
    print(f"training images: {n}; " + ", ".join(f"{k}: {len(v)}" for k, v in planted.items()))
    header = "".join(f"{f'top {f:.0%}':>20}" for f in FRACTIONS)
    for name, ranking in rankings.items():
        print(f"\n{name}\n{'':14}{header}")
        for kind, members in planted.items():
            cells = []
            for fraction in FRACTIONS:
                top = set(ranking[: int(round(fraction * n))].tolist())
                random = fraction * len(members)
                cells.append(f"{len(top & members):>6} (random {random:5.1f})")
            print(f"{kind:14}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
