"""Evaluate TFA and its scorers on an embedded dataset and print the result tables.

    .venv/bin/python benchmarks/evaluate.py                 # full run (long: see the README)
    .venv/bin/python benchmarks/evaluate.py --quick         # smoke run (a few minutes)
    .venv/bin/python benchmarks/evaluate.py --test-images 3 --seeds 0 1 --k 8 --json rows.json
    .venv/bin/python benchmarks/evaluate.py --data digits   # scikit-learn's real digits
    .venv/bin/python benchmarks/evaluate.py --data voc      # the same on VOC-format files
    .venv/bin/python benchmarks/evaluate.py --from-json s0.json s1.json  # tables of saved runs

Every seed is a seed of the data *and* of training: each loads (or trains once, then caches) its
own dataset and model, and draws its own test images (half of them related to the planted
shortcut patch, see `tfa_widgets.eval.setups`). Three tables:

- ``maps``: the pixel-map measures per (seed, test image) unit, mean ± std over units
  (`tfa_widgets.eval.report`);
- ``attribution``: quanda's data-attribution measures for every scorer of the engine and a random
  attributor, one value per seed, mean ± std over seeds (`tfa_widgets.eval.tda`);
- ``patch``: what the maps add per scorer on the fooled test images, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, replace

import torch

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.core.explanation import SmoothGrad
from tfa_widgets.data.digits import load_named_demo
from tfa_widgets.eval.report import MEASURE_GROUPS, EvalConfig, evaluate
from tfa_widgets.eval.saved import pool_runs
from tfa_widgets.eval.setups import demo_regions, demo_test_images, random_test_images
from tfa_widgets.eval.summary import format_report, format_table, summarise
from tfa_widgets.eval.tda import seed_rows
from tfa_widgets.eval.vocformat import demo_as_voc, multilabel_model

TABLES = ("maps", "attribution", "patch")
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
        "--tables",
        nargs="+",
        choices=TABLES,
        default=list(TABLES),
        help="which tables to compute (attribution and patch need a demo-like dataset)",
    )
    parser.add_argument(
        "--lds", type=int, default=0, help="subset models retrained per seed for the LDS (0: none)"
    )
    parser.add_argument(
        "--data",
        choices=("demo", "digits", "voc"),
        default="demo",
        help="demo: the generated demo; digits: scikit-learn's handwritten digits with a planted "
        "patch and flipped labels; voc: demo images written and read back as a Pascal VOC "
        "2012 tree (multi-label, BCE, segmentation masks), with a multi-label head",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="the engine's memory_budget_mb (0: projected indexes, a few MB; TracIn-CP keeps one "
        "index per checkpoint)",
    )
    parser.add_argument(
        "--no-randomisation",
        action="store_true",
        help="skip the model-randomisation measure (it builds the indexes of a randomised model)",
    )
    parser.add_argument(
        "--scorers", nargs="+", default=None, help="the engine's scorers to measure (default: all)"
    )
    parser.add_argument(
        "--json",
        default=None,
        help="also write all rows to this JSON file (rewritten after each table and seed, so a "
        "run stopped early keeps what it measured)",
    )
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="compute nothing: print the tables of rows saved by --json (e.g. one run per seed)",
    )
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
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    return config, per_seed, seeds


def run_seed(args, config: EvalConfig, per_seed: int, seed: int, folder: str, save) -> tuple:
    """Return ``(map rows, training-image rows, tests, sizes)`` for one data and training seed;
    ``save(map rows, training-image rows, tests)`` keeps what is done after each table."""
    progress = not args.no_progress
    demo = load_named_demo("digits" if args.data == "digits" else "shapes", seed=seed,
                           progress=progress)  # fmt: skip
    if args.data == "voc":
        train_set, val_set = demo_as_voc(demo, f"{folder}/seed-{seed}")
        model = multilabel_model(demo.model, train_set)
        engine = TFAEngine(model, train_set, val_set, loss="bce", progress=False)
        tests = random_test_images(len(val_set), per_seed, [seed])
        regions = None  # the VOC object masks, through train_set.mask(i)
    else:
        budget = args.memory_budget_mb
        engine = demo.engine(
            progress=progress, **({} if budget is None else {"memory_budget_mb": budget})
        )
        tests = demo_test_images(demo, per_seed, [seed])
        regions = demo_regions(demo)
    engine.build_index()
    map_rows = []
    if "maps" in args.tables:
        map_rows = evaluate(engine, tests, config, regions=regions, progress=progress)
        save(map_rows, [], tests)
    other = [t for t in args.tables if t != "maps"]
    image_rows = []
    if other and args.data != "voc":
        image_rows = seed_rows(
            demo, engine, tests[seed], seed, k=config.k, groups=other, lds_models=args.lds,
            scorers=args.scorers, randomisation=not args.no_randomisation,
            on_rows=lambda done: save(map_rows, done, tests),
        )  # fmt: skip
    return map_rows, image_rows, tests, (len(engine.train_set), len(engine.test_set))


def print_tables(rows: list[dict], image_rows: list[dict]) -> None:
    """Print the map table and the training-image tables of these rows."""
    if rows:
        print(format_report(rows))
        print()
    for kind, title in (
        ("attribution", "training images chosen (quanda's measures), mean ± std over seeds"),
        ("patch", "what the maps add, on fooled test images, mean ± std over seeds"),
    ):
        chosen = [r for r in image_rows if r["kind"] == kind]
        if chosen:
            print(f"{title}:")
            print(format_table(summarise(chosen)))
            print()


def print_saved(files: list[str]) -> int:
    """Print the tables of the rows saved in ``files`` by ``--json`` runs, pooled (a row that two
    runs share, such as the random attributor's of one seed, counts once)."""
    saved = pool_runs(files)
    print(f"{len(files)} saved runs; seeds and test images {saved.tests}")
    print()
    print_tables(saved.rows, saved.image_rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation for every seed and print the tables."""
    args = parse_args(argv)
    if args.from_json:
        return print_saved(args.from_json)
    config, per_seed, seeds = settings(args)
    torch.manual_seed(0)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    command = " ".join(["python benchmarks/evaluate.py", *map(shlex.quote, sys.argv[1:])])
    rows, image_rows, tests, sizes = [], [], {}, None

    def save(more_rows: list, more_image_rows: list, drawn: dict, complete: bool = False) -> None:
        """Write what is measured so far to ``--json`` (a run stopped later keeps it)."""
        if not args.json:
            return
        payload = {"command": command, "data": args.data, "config": asdict(config)}
        seconds, load = time.perf_counter() - started, [load_before, os.getloadavg()[0]]
        payload |= {"complete": complete, "seconds": round(seconds), "load": load}
        payload |= {"tests": tests | drawn, "rows": rows + more_rows}
        payload |= {"training_image_rows": image_rows + more_image_rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)

    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            maps, images, drawn, sizes = run_seed(args, config, per_seed, seed, folder, save)
            rows += maps
            image_rows += images
            tests |= drawn
            save([], [], {})
    finished = time.perf_counter()
    print(f"command: {command}")
    print(f"data: {args.data}, {sizes[0]} training / {sizes[1]} test images per seed")
    print(f"seeds (data and training) and their test images: {tests}")
    print(f"config: {asdict(config)}")
    print(
        f"time: {finished - started:.0f} s (models from the cache or trained, indexes, "
        f"measures), torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print_tables(rows, image_rows)
    save([], [], {}, complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
