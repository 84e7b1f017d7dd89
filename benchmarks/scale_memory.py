"""Peak memory of a demo-model index build at N = 3,000 and N = 50,000 (issue #15, figure b).

Each build runs in a fresh process on the demo's training images repeated up to N (every other
repetition mirrored), projected to d = 4096 and written as shards of ``--shard-mb`` to a
temporary cache directory. Its peak RSS is that of the whole process (``ru_maxrss``: torch,
the demo and the build) and, separately, of the build alone: the high-water mark reset just
before ``build_index`` (``/proc/self/clear_refs``, Linux) minus the RSS at that moment. The
target: the two peaks differ by less than 300 MB. ``--baseline`` adds the larger build held in
memory and written as one file (the behaviour before shards), measured in the same run.

Each build's figures are printed as soon as it ends, and every ``--every`` seconds a build
prints how far it is (rows in complete shards, for a sharded build) and its peak so far, so a
run stopped early still says what the build reached.

    PYTHONPATH=$PWD python benchmarks/scale_memory.py [--sizes 3000 50000] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset


class Repeated(Dataset):
    """The first dataset's items repeated up to ``size``, odd repetitions mirrored."""

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset, self.size = dataset, size
        self.fingerprint = f"demo-train-repeated-mirrored-{len(dataset)}-{size}"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple:
        repetition, j = divmod(i, len(self.dataset))
        image, label = self.dataset[j][:2]
        return (image.flip(-1) if repetition % 2 else image), label


def child(size: int, shard_mb: float, cache_dir: str, every: float) -> dict:
    from tfa_widgets import TFAEngine
    from tfa_widgets.data import load_demo

    demo = load_demo(progress=False)
    engine = TFAEngine(
        demo.model, Repeated(demo.train_set, size), demo.test_set, cache_dir=cache_dir,
        shard_mb=shard_mb, memory_budget_mb=0, projection_dim=4096, progress=False,
    )  # fmt: skip
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    done = threading.Event()
    watch = threading.Thread(
        target=_report_progress, args=(size, Path(cache_dir), before, start, every, done)
    )
    watch.start()
    try:
        index = engine.build_index()
    finally:
        done.set()
        watch.join()
    seconds = time.perf_counter() - start
    return {
        "n": size,
        "kind": type(index).__name__,
        "index_mb": len(index) * 4096 * 4 / 2**20,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "build_peak_mb": _status_mb("VmHWM") - before,
        "seconds": seconds,
    }


def _report_progress(
    size: int, cache_dir: Path, before: float, start: float, every: float, done: threading.Event
) -> None:
    """Print, every ``every`` seconds, the rows in complete shards and the peaks so far."""
    while not done.wait(every):
        rows = 0
        for manifest in cache_dir.glob("gradient-index-*/manifest.json"):
            try:
                shards = json.loads(manifest.read_text())["shards"]
            except (OSError, ValueError, KeyError):
                continue
            rows = sum(shard["rows"] for shard in shards.values())
        print(
            f"  N={size}: {time.perf_counter() - start:.0f} s, {rows} rows in complete shards, "
            f"peak RSS {_status_mb('VmHWM'):.0f} MB, of the build alone "
            f"{_status_mb('VmHWM') - before:.0f} MB; load average {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status (Linux only)")


def measure(size: int, shard_mb: float, every: float) -> dict:
    """Run one build in a fresh process (its progress lines pass through), print and return
    its figures."""
    with tempfile.TemporaryDirectory(prefix="tfa-scale-memory-") as cache_dir:
        command = [sys.executable, __file__, "--child", str(size), str(shard_mb), cache_dir]
        command.append(str(every))
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the build of N={size} failed (exit {done.returncode})")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"N={run['n']:>6} {run['kind']:<13} index {run['index_mb']:6.0f} MB  peak RSS "
        f"{run['peak_mb']:5.0f} MB, of the build alone {run['build_peak_mb']:5.0f} MB  "
        f"{run['seconds']:.0f} s ({run['n'] / run['seconds']:.0f} img/s); "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[3000, 50000])
    parser.add_argument("--shard-mb", type=float, default=64)
    parser.add_argument("--baseline", action="store_true", help="also one in-memory file")
    parser.add_argument("--every", type=float, default=60, help="seconds between progress lines")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, shard_mb, cache_dir, every = args.child
        print(json.dumps(child(int(size), float(shard_mb), cache_dir, float(every))))
        return
    print(
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, demo model, d=4096",
        flush=True,
    )
    runs = [measure(size, args.shard_mb, args.every) for size in args.sizes]
    if args.baseline:
        runs.append(measure(args.sizes[1], 1e6, args.every))  # one shard: the whole index
    for key, what in (("peak_mb", "process"), ("build_peak_mb", "build")):
        difference = runs[1][key] - runs[0][key]
        print(f"{what} peak difference N={args.sizes[1]} - N={args.sizes[0]}: {difference:.0f} MB "
              f"(target < 300 MB){'' if difference < 300 else '  MISSED'}")  # fmt: skip
    if args.baseline:
        base = runs[2]["build_peak_mb"]
        above = base - runs[0]["build_peak_mb"]
        print(f"baseline, in memory and one file, N={args.sizes[1]}: build peak "
              f"{base:.0f} MB ({above:.0f} MB above N={args.sizes[0]})")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
