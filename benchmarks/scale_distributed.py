"""A sharded index built by two gloo processes (torchrun) against one process (issue #15, d).

Both build the same demo-model index (the demo's training images repeated up to ``--n``,
projected to d = 4096, shards of ``--shard-mb``) through ``python -m tfa_widgets.index build``,
each into its own temporary cache; wall time includes starting the processes and loading the
model. One process uses torch's default threads, each torchrun rank one thread
(``OMP_NUM_THREADS=1``, torchrun's default): on this project's 2-core machine both use the two
cores, so the figure shows the cost of the split, not a speed-up from more hardware.

    PYTHONPATH=$PWD python benchmarks/scale_distributed.py [--n 4000] [--nproc 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def engine():
    """The engine factory the builds run (``--engine scale_distributed:engine``)."""
    from scale_memory import Repeated

    from tfa_widgets import TFAEngine
    from tfa_widgets.data import load_demo

    demo = load_demo(progress=False)
    return TFAEngine(
        demo.model,
        Repeated(demo.train_set, int(os.environ["SCALE_N"])),
        demo.test_set,
        cache_dir=os.environ["SCALE_CACHE"],
        shard_mb=float(os.environ["SCALE_SHARD_MB"]),
        memory_budget_mb=0,
        projection_dim=4096,
        progress=False,
    )


def timed_build(n: int, shard_mb: float, nproc: int) -> float:
    with tempfile.TemporaryDirectory(prefix="tfa-scale-distributed-") as cache:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
            "SCALE_N": str(n),
            "SCALE_CACHE": cache,
            "SCALE_SHARD_MB": str(shard_mb),
        }
        launcher = [sys.executable, "-m"]
        if nproc > 1:
            launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            launcher += ["-m"]
        command = [*launcher, "tfa_widgets.index", "build", "--engine", "scale_distributed:engine"]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    print(f"  {nproc} process(es): {done.stdout.strip().splitlines()[-1]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=4, help="small: several per rank")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores; N={args.n}, d=4096")
    one = timed_build(args.n, args.shard_mb, 1)
    several = timed_build(args.n, args.shard_mb, args.nproc)
    print(f"one process: {one:.1f} s ({args.n / one:.0f} img/s)")
    print(f"{args.nproc} gloo processes: {several:.1f} s ({args.n / several:.0f} img/s); "
          f"speed ratio {one / several:.2f}x")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
