"""Build a sharded gradient index in several processes or cluster jobs.

``python -m tfa_widgets.index build --engine my_study:make_engine`` builds the index of the
engine that ``my_study.make_engine()`` returns (a `TFAEngine` with a ``cache_dir``):

- under ``torchrun --nproc_per_node=N`` (one node or several, torchrun's usual rendezvous),
  each rank computes its own shards (shard ``s`` belongs to rank ``s % world_size``), then
  rank 0 checks them all and completes the manifest after a barrier (gloo on CPUs, NCCL when
  CUDA is available: each rank then uses the GPU ``LOCAL_RANK``, made current before the
  factory is called, so ``device="cuda"`` in the factory means that GPU);
- with ``--part i/n``, it computes part ``i`` of ``n`` only (one job of a job array), and
  ``python -m tfa_widgets.index gather --engine ...`` completes the manifest once every part
  is done;
- otherwise it is one process building the whole index.

A part, a rank or a whole build that is interrupted resumes from its complete shards when run
again. The factory runs in every process: it should be cheap (no training) and give the same
engine everywhere (same weights, same dataset, same settings); the index directory is named by
their fingerprint, so a different engine never mixes its shards with these.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.core.errors import TFAError


def load_factory(spec: str) -> Callable[[], TFAEngine]:
    """Return the engine factory named ``module:function`` (the module importable from the
    current directory or ``PYTHONPATH``).

    Parameters
    ----------
    spec : str
        ``"package.module:function"``.

    Returns
    -------
    callable
        The function; called without arguments, it returns a `TFAEngine`.

    Raises
    ------
    SystemExit
        When the module or the function cannot be found (with a message saying which).
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SystemExit(f"--engine must be module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"--engine: cannot import {module_name!r} ({error})") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise SystemExit(f"--engine: {module_name!r} has no function {function_name!r}")
    return factory


def _make_engine(spec: str) -> TFAEngine:
    engine = load_factory(spec)()
    if not isinstance(engine, TFAEngine):
        raise SystemExit(f"--engine {spec} returned {type(engine).__name__}, not a TFAEngine")
    return engine


def _part(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"--part must be i/n with 0 <= i < n, got {text!r}")
    return int(index), int(count)


def _report(index) -> str:
    layout = index.shard_layout
    size = sum(path.stat().st_size for path in index.directory.glob("shard-*.safetensors"))
    return (
        f"gradient index: {layout.num_rows} rows x {layout.width} ({layout.dtype}) in "
        f"{layout.num_shards} shards, {size / 2**30:.2f} GiB in {index.directory}"
    )


def _distributed_build(spec: str, timeout_hours: float) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=timeout_hours)
    )
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        engine = _make_engine(spec)
        engine.build_index_part(rank, world)
        dist.barrier()  # every rank's shards are on disk
        if rank == 0:
            print(_report(engine.gather_index()), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``build`` or ``gather`` (see the module's description).

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (``sys.argv[1:]`` when ``None``).

    Returns
    -------
    int
        The exit status: 0 on success, 1 when the engine reports a `TFAError` (printed).
    """
    parser = argparse.ArgumentParser(prog="python -m tfa_widgets.index", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compute the index (or one part of it)")
    gather = commands.add_parser("gather", help="complete the index after every --part ran")
    for command in (build, gather):
        command.add_argument(
            "--engine", required=True, help="module:function returning a TFAEngine"
        )
    build.add_argument("--part", type=_part, help="i/n: compute part i of n (a job array)")
    build.add_argument(
        "--timeout-hours",
        type=float,
        default=24.0,
        help="under torchrun: how long a rank waits at the barrier for the others",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "gather":
            print(_report(_make_engine(args.engine).gather_index()), flush=True)
        elif args.part is not None:
            directory = _make_engine(args.engine).build_index_part(*args.part)
            print(f"part {args.part[0]}/{args.part[1]} written to {directory}", flush=True)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _distributed_build(args.engine, args.timeout_hours)
        else:
            engine = _make_engine(args.engine)
            engine.build_index_part(0, 1)
            print(_report(engine.gather_index()), flush=True)
    except TFAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
