"""Evaluate TFA against its baselines on the embedded demo and print the result table.

    .venv/bin/python benchmarks/evaluate.py                 # full run (10-15 minutes, 2 cores)
    .venv/bin/python benchmarks/evaluate.py --quick         # smoke run (a few minutes)
    .venv/bin/python benchmarks/evaluate.py --test-images 3 --seeds 0 1 --k 8 --json rows.json
    .venv/bin/python benchmarks/evaluate.py --data voc      # the same on VOC-format files

Every seed draws its own test images (half of them related to the planted shortcut patch, see
`tfa_widgets.eval.setups`); each (seed, test image) is one unit, and the table gives mean ± std
over units. Measures and methods are defined in `tfa_widgets.eval.report`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, replace

import torch

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.core.explanation import SmoothGrad
from tfa_widgets.data import load_demo
from tfa_widgets.eval.report import MEASURE_GROUPS, EvalConfig, evaluate
from tfa_widgets.eval.setups import demo_regions, demo_test_images, random_test_images
from tfa_widgets.eval.summary import format_report
from tfa_widgets.eval.vocformat import demo_as_voc, multilabel_model

QUICK = EvalConfig(
    k=4,
    ps=(5, 25),
    smooth=SmoothGrad(n=4, sigma=0.15),
    retrain_epochs=3,
    randomise=("all",),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-images", type=int, default=None, help="test images per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, e.g. 0 1 2")
    parser.add_argument("--k", type=int, default=None, help="proponents per test image")
    parser.add_argument("--quick", action="store_true", help="small smoke-test setting")
    parser.add_argument("--measures", nargs="+", choices=MEASURE_GROUPS, default=None)
    parser.add_argument(
        "--data",
        choices=("demo", "voc"),
        default="demo",
        help="demo: the embedded demo; voc: demo images written and read back as a Pascal VOC "
        "2012 tree (multi-label, BCE, segmentation masks), with a multi-label head",
    )
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> tuple[EvalConfig, int, list[int]]:
    """Return the evaluation config, test images per seed and seeds for these arguments."""
    config = QUICK if args.quick else EvalConfig()
    if args.k is not None:
        config = replace(config, k=args.k)
    if args.measures is not None:
        config = replace(config, measures=tuple(args.measures))
    per_seed = args.test_images if args.test_images is not None else (2 if args.quick else 3)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    return config, per_seed, seeds


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation on the demo and print the tables."""
    args = parse_args(argv)
    config, per_seed, seeds = settings(args)
    torch.manual_seed(0)
    started = time.perf_counter()
    demo = load_demo(progress=not args.no_progress)
    with tempfile.TemporaryDirectory() as folder:
        if args.data == "voc":
            train_set, val_set = demo_as_voc(demo, folder)
            model = multilabel_model(demo.model, train_set)
            engine = TFAEngine(model, train_set, val_set, loss="bce", progress=False)
            tests = random_test_images(len(val_set), per_seed, seeds)
            regions = None  # the VOC object masks, through train_set.mask(i)
        else:
            engine = demo.engine(progress=not args.no_progress)
            tests = demo_test_images(demo, per_seed, seeds)
            regions = demo_regions(demo)
        engine.build_index()
        ready = time.perf_counter()
        rows = evaluate(engine, tests, config, regions=regions, progress=not args.no_progress)
    finished = time.perf_counter()
    command = " ".join(["python benchmarks/evaluate.py", *map(shlex.quote, sys.argv[1:])])
    print(f"command: {command}")
    print(
        f"data: {args.data}, {len(engine.train_set)} training / {len(engine.test_set)} test images"
    )
    print(f"test images by seed: {tests}")
    print(f"config: {asdict(config)}")
    print(
        f"time: {ready - started:.0f} s demo and index, {finished - ready:.0f} s evaluation, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print()
    print(format_report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(config), "tests": tests, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
