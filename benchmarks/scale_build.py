"""Scale (a): ResNet-18 index build, recall, maps and query latency, each beside its baseline.

Prints, for a CIFAR ResNet-18 (random init, random 32×32 images) and N training images:
- index build in img/s, factorised projection (LoGra) and CountSketch at the same storage
  ``d``, each timed in turn with a batched forward+backward over the same images (best of two
  rounds, so a machine that slows part way slows both alike), and a per-example autograd loop;
- top-k recall (k=10) of the exact grad-cos top-10 by the projected scores before re-scoring,
  for each projection, over a few test images (exact scores by forward mode over all N);
- TFA maps/s for k=8, with and without SmoothGrad (n=16), against a per-pair double backward;
- query latency for a new test image (test gradient, scores of N_q rows, top-8 re-scored
  exactly) with an index of N_q rows: the built rows tiled, over a dataset of N_q images; and
  the FLOP count of each part, with the re-scoring's rate beside a batched forward's (its floor).

Usage: python benchmarks/scale_build.py [--model resnet18|demo-cnn] [--n 256] [--query-n 10000]
       [--clock wall|process] [--threads T]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import bench_engine
import torch
from bench_engine import (
    alternating_best,
    batched_forward_backward,
    cifar_resnet18,
    demo_sized_cnn,
    pair_loop_maps,
    per_example_loop,
    rebuild,
    timed,
)
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from tfa_widgets import SmoothGrad, TFAEngine
from tfa_widgets.core.allocator import keep_freed_memory
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.maps import noisy_copies

PROJECTIONS = ("logra", "countsketch")


def engine_for(model, train, test, projection: str, args) -> TFAEngine:
    """An engine that always projects, to ``args.dim`` by ``projection``."""
    engine = TFAEngine(
        model,
        train,
        test,
        memory_budget_mb=0,
        projection_dim=args.dim,
        projection=projection,
        batch_size=args.batch_size,
        progress=False,
    )
    engine._indexes.data_fingerprint = "benchmark"  # hashing the data is not part of the build
    return engine


def build_speed(engines: dict, floor_run, loop: float, n: int, device) -> None:
    """Print each projection's build rate beside the forward+backward timed with it."""
    for projection, engine in engines.items():
        times = alternating_best(
            {"floor": floor_run, "build": lambda e=engine: rebuild(e)}, device, rounds=2
        )
        rate = n / times["build"]
        print(f"index build d={engine._model_term.index.features.shape[1]} {projection:>11}: "
              f"{rate:8.1f} img/s = {times['floor'] / times['build']:5.2f}x the forward+backward "
              f"({n / times['floor']:.1f} img/s in the same rounds), "
              f"{rate / loop:5.1f}x the loop")  # fmt: skip


def recall(engines: dict, tests: int, k: int = 10) -> None:
    """Print the mean recall of the exact top-k among the projected top-k, per projection."""
    first = next(iter(engines.values()))
    exact = [first.scores(t, exact=True) for t in range(tests)]
    for projection, engine in engines.items():
        hits = []
        for t in range(tests):
            truth = set(exact[t].topk(k).indices.tolist())
            found = set(engine.scores(t).topk(k).indices.tolist())
            hits.append(len(truth & found) / k)
        print(f"top-{k} recall before re-scoring {projection:>11}: {statistics.mean(hits):.2f} "
              f"(min {min(hits):.2f}, {tests} test images)")  # fmt: skip


def maps_speed(engine: TFAEngine, model, images, labels, device) -> None:
    """Print TFA maps/s for k=8 (and with SmoothGrad n=16) beside a per-pair double backward."""
    smooth = SmoothGrad(n=16, sigma=0.15, seed=0)
    test_grad = engine._test_gradients.get(engine._model_term, engine.query(1, 0))
    pair = pair_loop_maps(model, images[:8], labels[:8], test_grad.float(), device)
    noisy = noisy_copies(images[:2], smooth)
    pair_smooth = pair_loop_maps(
        model, noisy, labels[:2].repeat_interleave(16), test_grad.float(), device
    )
    indices = list(range(8))
    engine.tfa_maps(1, indices[:2], target=0)
    runs = {
        "pair": pair,
        "maps": lambda: engine.tfa_maps(1, indices, target=0),
        "pair smooth": pair_smooth,
        "smooth": lambda: engine.tfa_maps(1, indices, target=0, smooth=smooth),
    }
    # Three rounds: on a shared CPU the best of two still swung the unsmoothed ratio 1.9-2.6x.
    times = alternating_best(runs, device, rounds=3)
    print(f"per-pair double backward: {8 / times['pair']:6.2f} maps/s, with SmoothGrad n=16: "
          f"{2 / times['pair smooth']:6.3f} maps/s")  # fmt: skip
    print(f"TFA maps k=8: {8 / times['maps']:6.2f} maps/s = "
          f"{times['pair'] / times['maps']:5.2f}x the pair loop; SmoothGrad n=16: "
          f"{8 / times['smooth']:6.3f} maps/s = "
          f"{4 * times['pair smooth'] / times['smooth']:5.2f}x")  # fmt: skip


def query_latency(engine: TFAEngine, model, rows: int, num_classes: int, device) -> None:
    """Print the median latency of a query for a new test image with an index of ``rows``,
    and of its parts, over 8 new images (each part timed on the same images)."""
    pool_recall(engine)
    big = tiled_engine(engine, model, rows, num_classes)
    noise = torch.Generator().manual_seed(6)
    new_images = torch.randn(17, 3, 32, 32, generator=noise)
    big.top_k(new_images[0], 8)  # first use: allocations, lazy imports
    totals = [timed(lambda x=x: big.top_k(x, 8), device) for x in new_images[1:9]]
    parts = [query_parts(big, x, device) for x in new_images[9:]]
    ms = {name: 1000 * statistics.median(p[name] for p in parts) for name in parts[0]}
    pool = min(rows, max(big.settings.rescore, 2 * 8))
    print(f"query for a new test image, N={rows} ({engine._model_term.index.projection}, top-8 of "
          f"{pool} re-scored exactly): median {1000 * statistics.median(totals):.0f} ms "
          f"(min {1000 * min(totals):.0f} ms, 8 images)")  # fmt: skip
    print("  its parts, median over 8 other images: " + ", ".join(
        f"{name} {value:.0f} ms" for name, value in ms.items()))  # fmt: skip
    rescoring = ms["search + re-scoring"] - ms["search"]
    print(f"  re-scoring {rescoring:.0f} ms by difference; the "
          f"projected top-8 (approximate) is ready after "
          f"{ms['target'] + ms['test gradient'] + ms['search']:.0f} ms")  # fmt: skip
    flops = query_flops(big, new_images[9], pool, device)
    rate = flops["batched forward"] / flops["batched forward s"]
    print(f"  GFLOP (torch.utils.flop_counter): forward {flops['forward'] / 1e9:.1f}, test "
          f"gradient {flops['test gradient'] / 1e9:.1f}, re-scoring {flops['re-scoring'] / 1e9:.1f}"
          f" at {flops['re-scoring'] / rescoring / 1e6:.0f} GFLOP/s; a batched forward of the "
          f"{pool} candidates ran at {rate / 1e9:.0f} GFLOP/s, at which the re-scoring alone "
          f"takes {1000 * flops['re-scoring'] / rate:.0f} ms")  # fmt: skip


def pool_recall(engine: TFAEngine, tests: int = 4, k: int = 8, pools=(8, 16, 32, 64)) -> None:
    """Print the recall of the exact top-k among the projected top-``pool`` (the candidates
    ``top_k`` re-scores), over ``tests`` test images (exact scores by forward mode over all N)."""
    pools = [pool for pool in pools if pool < engine.num_train]
    if not pools:
        print(f"pool recall: not measured (N={engine.num_train} is not above the pools)")
        return
    hits = {pool: [] for pool in pools}
    for t in range(tests):
        truth = set(engine.scores(t, exact=True).topk(k).indices.tolist())
        approximate = engine.scores(t)
        for pool in pools:
            found = set(approximate.topk(pool).indices.tolist())
            hits[pool].append(len(truth & found) / k)
    print(f"recall of the exact top-{k} among the projected top-P re-scored, N={engine.num_train}, "
          f"{tests} test images: " + ", ".join(
              f"P={pool} {statistics.mean(h):.2f} (min {min(h):.2f})" for pool, h in hits.items()
          ))  # fmt: skip


def query_parts(engine: TFAEngine, image: torch.Tensor, device) -> dict[str, float]:
    """Time the parts of a top-8 query for a new image, in turn: the target (the forward pass,
    kept), the test gradient (a backward pass through it), the projected top-8 over the index
    (the query vector, its projection, scores of every row), and ``top_k`` with the test
    gradient kept (search and exact re-scoring)."""
    query = engine.query(image)
    target = timed(functools.partial(engine.query, image), device)
    gradient = timed(
        functools.partial(engine._test_gradients.get, engine._model_term, query), device
    )
    search = timed(lambda: engine.scores(query).topk(8), device)
    rescored = timed(functools.partial(engine.top_k, query, 8), device)
    return {
        "target": target,
        "test gradient": gradient,
        "search": search,
        "search + re-scoring": rescored,
    }


def query_flops(engine: TFAEngine, image: torch.Tensor, pool: int, device) -> dict[str, float]:
    """Count the floating-point operations of a query's parts (``torch.utils.flop_counter``:
    convolutions and matrix products): the forward pass that picks the class, the test gradient
    (forward and backward) and the re-scoring of ``pool`` candidates (one forward-mode pass);
    and those of a batched forward of the candidates with its time (best of three), the rate
    the re-scoring is compared with."""
    gradients = engine._model_term.gradients
    query = engine.query(image)
    target = torch.tensor(query.target)
    candidates = engine.scores(query).topk(pool).indices.tolist()
    images, targets = engine.train_data.batch(candidates)
    test_grad = gradients.gradient(image, target)
    parts = {
        "forward": lambda: engine._predictor.logits(image[None]),
        "test gradient": lambda: gradients.gradient(image, target),
        "re-scoring": lambda: gradients.dots_along(images, targets, test_grad),
        "batched forward": lambda: engine._predictor.logits(images),
    }
    counts = {}
    for name, run in parts.items():
        with FlopCounterMode(display=False) as counter:
            run()
        counts[name] = counter.get_total_flops()
    counts["batched forward s"] = timed(parts["batched forward"], device, repeats=3)
    return counts


def tiled_engine(engine: TFAEngine, model, rows: int, num_classes: int) -> TFAEngine:
    """An engine over ``rows`` random images whose index is ``engine``'s rows tiled (with a
    little noise) to ``rows``."""
    built = engine._model_term.index
    repeats = -(-rows // len(built))
    noise = torch.Generator().manual_seed(5)
    features = built.features.repeat(repeats, 1)[:rows]
    features = features + 0.01 * features.std() * torch.randn(features.shape, generator=noise)
    train = TensorDataset(
        torch.randn(rows, 3, 32, 32, generator=noise), torch.randint(0, num_classes, (rows,))
    )
    big = TFAEngine(
        model, train, memory_budget_mb=0, projection_dim=built.projection_dim,
        projection=built.projection, batch_size=engine.settings.batch_size, progress=False,
    )  # fmt: skip
    big._model_term.index = GradientIndex(
        features=features,
        norms=built.norms.repeat(repeats)[:rows],
        fingerprint=built.fingerprint,
        projection_dim=built.projection_dim,
        projection_seed=built.projection_seed,
        projection=built.projection,
        layout=built.layout,
    )
    return big


def main() -> None:
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "demo-cnn"], default="resnet18")
    parser.add_argument("--n", type=int, default=256, help="training images")
    parser.add_argument("--dim", type=int, default=4096, help="projected dimension")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loop-images", type=int, default=16, help="images for the loop")
    parser.add_argument("--recall-tests", type=int, default=4, help="test images for recall")
    parser.add_argument("--query-n", type=int, default=10000, help="index rows for the query")
    parts = ["build", "recall", "maps", "query"]
    parser.add_argument("--skip", nargs="*", default=[], choices=parts, help="parts not run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process: CPU time of this process (other jobs on a shared CPU count less)",
    )
    args = parser.parse_args()
    bench_engine.CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)
    resnet = args.model == "resnet18"
    model = (cifar_resnet18() if resnet else demo_sized_cnn()).eval().to(device)
    num_classes = 10 if resnet else 6
    images = torch.randn(args.n, 3, 32, 32)
    labels = torch.randint(0, num_classes, (args.n,))
    train = TensorDataset(images, labels)
    test = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, num_classes, (16,)))
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"N={args.n}; device {device}, {torch.get_num_threads()} threads, {args.clock} clock; "
          f"torch {torch.__version__}")  # fmt: skip

    engines = {p: engine_for(model, train, test, p, args) for p in PROJECTIONS}
    if "build" in args.skip:
        for engine in engines.values():
            engine.build_index()
    else:
        floor_run = batched_forward_backward(model, images, labels, args.batch_size, device)
        loop_n = min(args.loop_images, args.n)
        loop_run = per_example_loop(model, images[:loop_n], labels[:loop_n], device)
        times = alternating_best({"floor": floor_run, "loop": loop_run}, device, rounds=2)
        loop = loop_n / times["loop"]
        print(f"baseline batched forward+backward: {args.n / times['floor']:8.1f} img/s; "
              f"per-example autograd loop: {loop:6.1f} img/s")  # fmt: skip
        build_speed(engines, floor_run, loop, args.n, device)
    if "recall" not in args.skip:
        recall(engines, args.recall_tests)
    if "maps" not in args.skip:
        maps_speed(engines["logra"], model, images, labels, device)
    if "query" not in args.skip:
        query_latency(engines["logra"], model, args.query_n, num_classes, device)


if __name__ == "__main__":
    main()
