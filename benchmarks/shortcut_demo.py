"""Does TFA find the planted shortcut? Numbers behind the README's shortcut claim.

For every patched test image of another class that the demo model predicts as the shortcut class
("fooled" images), take the top-k proponents (grad-cos) and report

* how often they include patched training images, and what share of them are patched;
* for the patched proponents, the share of TFA map mass that lies on the training image's patch,
  divided by the patch's share of the image area (1 = no preference; higher = focused on the patch),
  for the positive part of the signed map and for the absolute map;
* the same ratio for Grad-CAM on the test image (the usual feature attribution: it shows what in
  the test image mattered) and for Grad-CAM on each patched proponent for its own label (the
  two-step "TDA, then FA on the training image" baseline).

Run: ``python benchmarks/shortcut_demo.py [--k 8] [--limit N] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tfa_widgets.core.maps import reduce_maps
from tfa_widgets.data import load_demo


def _mass_ratio(maps: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Return, per map, (share of non-negative mass on the patch) / (patch share of the area)."""
    maps = maps.clamp_min(0)
    share = (maps * patches).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-20)
    area = patches.flatten(1).float().mean(1)
    return share / area


def run(k: int = 8, limit: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Return the shortcut-detection numbers for the demo (see the module docstring)."""
    demo = load_demo(seed, progress=progress)
    meta = demo.metadata
    engine = demo.engine(progress=progress)
    engine.build_index()
    pred = demo.predictions("test")
    fooled = [t for t in meta.patched_test_other if int(pred[t]) == meta.shortcut_class]
    fooled = fooled[:limit] if limit else fooled
    patched_train = set(meta.train_patch_boxes)
    hits, shares, tfa_pos, tfa_abs, cam_test, cam_train = [], [], [], [], [], []
    start = time.perf_counter()
    for t in fooled:
        indices, _ = engine.top_k(t, k)
        chosen = [int(i) for i in indices if int(i) in patched_train]
        hits.append(bool(chosen))
        shares.append(len(chosen) / k)
        test_patch = meta.patch_mask("test", t)[None]
        image = demo.test_set[t][0]
        cam_test.append(
            float(_mass_ratio(engine.gradcam(image, meta.shortcut_class)[None], test_patch))
        )
        if not chosen:
            continue
        raw = engine.tfa_maps(t, chosen)
        patches = torch.stack([meta.patch_mask("train", i) for i in chosen])
        tfa_pos += _mass_ratio(reduce_maps(raw, "signed"), patches).tolist()
        tfa_abs += _mass_ratio(reduce_maps(raw, "abs"), patches).tolist()
        train_images = torch.stack([demo.train_set[i][0] for i in chosen])
        cams = engine.gradcam(train_images, [meta.shortcut_class] * len(chosen))
        cam_train += _mass_ratio(cams, patches).tolist()

    def mean(xs: list) -> float:
        return float(torch.tensor(xs, dtype=torch.float64).mean()) if xs else float("nan")

    return {
        "k": k,
        "patched_test_other": len(meta.patched_test_other),
        "fooled": len(fooled),
        "shortcut_rate": len(fooled) / max(len(meta.patched_test_other), 1),
        "topk_has_patched_train": mean(hits),
        "patched_share_of_topk": mean(shares),
        "patched_share_of_train": len(patched_train) / len(demo.train_set),
        "tfa_positive_ratio": mean(tfa_pos),
        "tfa_abs_ratio": mean(tfa_abs),
        "gradcam_test_ratio": mean(cam_test),
        "gradcam_train_ratio": mean(cam_train),
        "maps_measured": len(tfa_pos),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="proponents per test image")
    parser.add_argument("--limit", type=int, default=None, help="at most this many fooled images")
    parser.add_argument("--seed", type=int, default=0, help="demo seed")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    r = run(args.k, args.limit, args.seed)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"command: python benchmarks/shortcut_demo.py --k {args.k} --seed {args.seed}")
    print(
        f"fooled test images (patched, other class, predicted as the shortcut class): "
        f"{r['fooled']} of {r['patched_test_other']}"
    )
    print(
        f"top-{r['k']} proponents include a patched training image: "
        f"{r['topk_has_patched_train']:.0%} of fooled images; patched share of proponents "
        f"{r['patched_share_of_topk']:.0%} (training set: {r['patched_share_of_train']:.0%})"
    )
    print("mass on the patch / patch share of the image area (1 = no preference):")
    print(f"  TFA map on patched proponents, positive part : {r['tfa_positive_ratio']:6.2f}")
    print(f"  TFA map on patched proponents, absolute      : {r['tfa_abs_ratio']:6.2f}")
    print(f"  Grad-CAM on the test image                   : {r['gradcam_test_ratio']:6.2f}")
    print(f"  Grad-CAM on the patched proponents           : {r['gradcam_train_ratio']:6.2f}")
    print(f"({r['maps_measured']} TFA maps, {r['seconds']} s after the index was built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
