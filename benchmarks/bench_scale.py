"""Issue #15's scale benchmark: runs its four parts, each printing its figures beside a baseline
measured in the same run.

- (a) ``scale_build.py``: ResNet-18 CIFAR index build (factorised vs CountSketch vs batched
  forward+backward vs per-example loop) with top-k recall, TFA maps and query latency;
- (b) ``scale_memory.py``: peak RSS of a demo-model build at N = 3,000 and N = 50,000;
- (c) ``scale_search.py``: 1.28M rows on disk, chunked exact, FAISS flat and IVF search;
- (d) ``scale_distributed.py``: two gloo processes against one.

Each part runs in its own process, with its defaults (so one's memory does not inflate the next
one's figures; run a part's script directly for its options). A part that fails is reported and
the others still run.

    PYTHONPATH=$PWD python benchmarks/bench_scale.py [--parts build memory search distributed]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {
    "build": "scale_build.py",
    "memory": "scale_memory.py",
    "search": "scale_search.py",
    "distributed": "scale_distributed.py",
}


def run_part(name: str) -> int:
    """Run one part in a fresh process, streaming its output; return its exit status."""
    print(f"\n=== ({name}) benchmarks/{PARTS[name]}", flush=True)
    root = str(HERE.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    status = subprocess.call(
        [sys.executable, str(HERE / PARTS[name])],
        env={**os.environ, "PYTHONPATH": path},
        cwd=HERE,
    )
    print(f"=== ({name}) exit {status} after {time.perf_counter() - start:.0f} s", flush=True)
    return status


def main() -> None:
    """Run the chosen parts in turn and exit non-zero when any of them failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args()
    failed = [name for name in args.parts if run_part(name) != 0]
    if failed:
        sys.exit(f"parts that failed: {failed}")


if __name__ == "__main__":
    main()
