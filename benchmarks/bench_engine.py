"""Speed of the TFA engine against baselines measured in the same run.

Prints, for one model and N training images:
- index build (per-sample gradients, exact and projected) in images/s, against a batched
  forward+backward over the same images (the floor no per-sample method can beat) and a
  per-example autograd loop;
- query latency (scores over the whole index + top-k, re-scoring included);
- TFA maps/s for k=8, with and without SmoothGrad (n=16), against a per-pair double-backward loop;
- the preconditioned scorers (influence and RelatIF with EK-FAC, TRAK): the time to fit their
  factors or kernel (with the self-scores), in units of one index build timed in turn with it,
  their query latency and their TFA maps/s (``--scorers`` chooses them, ``none`` skips).

Each method is timed in turn with its baseline, best of two rounds (fits: three; maps: five), so
that a shared machine slowing down part way slows both alike (queries: medians over 15 test
images). On the CPU the process lets malloc keep freed memory, as the engine does.

Usage: python benchmarks/bench_engine.py [--model demo-cnn|resnet18] [--n 3000] [--device cuda]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from tfa_widgets import SmoothGrad, TFAEngine
from tfa_widgets.core.allocator import keep_freed_memory
from tfa_widgets.core.maps import noisy_copies


def demo_sized_cnn(num_classes: int = 6) -> nn.Module:
    """The embedded demo's architecture (a three-stage ResNet of about 150k parameters)."""
    from tfa_widgets.data.model import DemoResNet

    return DemoResNet(num_classes=num_classes)


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3×3 conv, no max-pool)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Return the best time of ``repeats`` calls of ``fn`` on the chosen clock."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = CLOCK()
        fn()
        sync(device)
        best = min(best, CLOCK() - start)
    return best


def batched_forward_backward(model, images, labels, batch_size, device):
    """Return a function running a batched forward+backward over all images."""

    def run():
        for i in range(0, len(images), batch_size):
            x, y = images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            torch.autograd.grad(loss, list(model.parameters()))

    return run


def per_example_loop(model, images, labels, device):
    """Return a function computing each image's flattened gradient, one at a time."""
    params = list(model.parameters())

    def run():
        for x, y in zip(images, labels, strict=True):
            loss = nn.functional.cross_entropy(model(x[None].to(device)), y[None].to(device))
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    return run


def pair_loop_maps(model, images, labels, test_grad, device):
    """Return a function for the per-pair double backward: ∇_x cos(g(x, y), g_t), one image
    at a time."""
    params = list(model.parameters())

    def run():
        for x, y in zip(images, labels, strict=True):
            x = x[None].to(device).requires_grad_(True)
            loss = nn.functional.cross_entropy(model(x), y[None].to(device))
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([g.flatten() for g in grads])
            score = flat @ test_grad / (flat.norm() * test_grad.norm())
            torch.autograd.grad(score, x)

    return run


def alternating_best(fns: dict, device: torch.device, rounds: int) -> dict:
    """Best time of each function over ``rounds`` rounds that call them in turn.

    A shared machine that slows down part way slows a method and its baseline alike.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for key, fn in fns.items():
            best[key] = min(best[key], timed(fn, device))
    return best


def rebuild(engine: TFAEngine) -> None:
    """Build the engine's index from scratch (dropping one built before)."""
    engine._model_term.index = None
    engine.build_index()


def refit(engine: TFAEngine, method: str) -> None:
    """Fit ``method``'s preconditioner from scratch (no cache directory: nothing is loaded)."""
    engine._preconditioned._fits.clear()
    engine._preconditioned.fit(method)


def bench_scorers(engine: TFAEngine, methods: list[str], device: torch.device) -> None:
    """Fit time per index build, query latency and maps/s of the preconditioned scorers."""
    build = functools.partial(rebuild, engine)
    indices = list(range(8))
    for method in methods:
        fit = functools.partial(refit, engine, method)
        times = alternating_best({"build": build, "fit": fit}, device, rounds=3)
        engine.top_k(15, 8, method=method)
        latencies = [
            timed(lambda t=t, m=method: engine.top_k(t, 8, method=m), device) for t in range(15)
        ]
        engine.tfa_maps(0, indices[:2], method=method)
        maps = timed(lambda m=method: engine.tfa_maps(1, indices, target=0, method=m), device, 3)
        print(f"{method:>9}: fit {times['fit']:6.2f} s = {times['fit'] / times['build']:5.2f} "
              f"index builds ({times['build']:5.2f} s); query median "
              f"{1000 * statistics.median(latencies):7.1f} ms; maps k=8 "
              f"{8 / maps:7.1f} maps/s")  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo-cnn", "resnet18"], default="demo-cnn")
    parser.add_argument("--n", type=int, default=3000, help="training images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loop-images", type=int, default=200, help="images for the loops")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="'process' counts this process's CPU time: with --threads 1 it is robust to other "
        "programs sharing the machine (CPU only)",
    )
    parser.add_argument(
        "--scorers",
        default="influence,relatif,trak",
        help="preconditioned scorers to time, comma-separated, or 'none'",
    )
    parser.add_argument(
        "--only-scorers", action="store_true", help="skip the index, query and map baselines"
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the engine does on the CPU: baselines run under the same malloc
    torch.manual_seed(0)
    model = (demo_sized_cnn() if args.model == "demo-cnn" else cifar_resnet18()).eval().to(device)
    num_classes = 6 if args.model == "demo-cnn" else 10
    images = torch.randn(args.n, 3, 32, 32)
    labels = torch.randint(0, num_classes, (args.n,))
    train = TensorDataset(images, labels)
    test = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, num_classes, (16,)))
    num_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"model {args.model}: {num_params:,} parameters; N={args.n} images 3x32x32; "
          f"device {device} ({name}, {torch.get_num_threads()} threads, {args.clock} clock); "
          f"torch {torch.__version__}")  # fmt: skip

    if args.only_scorers:
        engine = TFAEngine(
            model, train, test, device=device, memory_budget_mb=0, projection_dim=4096,
            batch_size=args.batch_size, progress=False,
        )  # fmt: skip
        engine._indexes.data_fingerprint = "benchmark"
        print("\npreconditioned scorers (projected index d=4096, factored):")
        bench_scorers(engine, args.scorers.split(","), device)
        return

    loop_n = min(args.loop_images, args.n)
    floor_run = batched_forward_backward(model, images, labels, args.batch_size, device)
    loop_run = per_example_loop(model, images[:loop_n], labels[:loop_n], device)
    batched_forward_backward(model, images[:256], labels[:256], args.batch_size, device)()
    times = alternating_best({"floor": floor_run, "loop": loop_run}, device, rounds=2)
    floor, loop = args.n / times["floor"], loop_n / times["loop"]
    print(f"\nbaseline batched forward+backward: {floor:10.1f} img/s")
    print(f"baseline per-example autograd loop: {loop:9.1f} img/s")
    print("(each build below is timed in turn with the forward+backward; its ratio is to that)")

    exact_budget = args.n * num_params * 4 / 2**20 + 1
    storages = [("projected", 0.0)] + ([("exact", exact_budget)] if exact_budget < 4096 else [])
    engines = {}
    for strategy in ("vmap", "factored"):
        for storage, budget in storages:
            engine = TFAEngine(
                model, train, test, device=device, memory_budget_mb=budget, projection_dim=4096,
                batch_size=args.batch_size, strategy=strategy, progress=False,
            )  # fmt: skip
            engine._indexes.data_fingerprint = (
                "benchmark"  # hashing the data is not part of the build
            )
            build = functools.partial(rebuild, engine)
            times = alternating_best({"floor": floor_run, "build": build}, device, rounds=2)
            rate = args.n / times["build"]
            engines[strategy, storage] = engine
            print(f"index build {storage:>9} d=4096, {strategy:>8}: {rate:9.1f} img/s = "
                  f"{times['floor'] / times['build']:5.2f}x the floor, "
                  f"{rate / loop:6.1f}x the loop")  # fmt: skip
    if exact_budget >= 4096:
        print(f"(exact index skipped: {exact_budget:.0f} MB)")

    for (strategy, storage), engine in engines.items():
        engine.top_k(15, 8)
        latencies = [timed(lambda t=t, e=engine: e.top_k(t, 8), device) for t in range(15)]
        print(f"query {storage:>9} {strategy:>8} (new test image, all N scored, top-8): "
              f"median {1000 * statistics.median(latencies):7.1f} ms")  # fmt: skip

    smooth = SmoothGrad(n=16, sigma=0.15, seed=0)
    engine = engines["vmap", "projected"]
    test_grad = engine._test_gradients.get(engine._model_term, engine.query(1, 0))
    pair = pair_loop_maps(model, images[:8], labels[:8], test_grad.float(), device)
    noisy = noisy_copies(images[:2], smooth)
    pair_smooth = pair_loop_maps(
        model, noisy, labels[:2].repeat_interleave(16), test_grad.float(), device
    )
    indices = list(range(8))
    for strategy in ("vmap", "factored"):
        engine = engines[strategy, "projected"]
        engine.tfa_maps(0, indices[:2])
        runs = {
            "pair": pair,
            "maps": lambda e=engine: e.tfa_maps(1, indices, target=0),
            "pair smooth": pair_smooth,
            "smooth": lambda e=engine: e.tfa_maps(1, indices, target=0, smooth=smooth),
        }
        times = alternating_best(runs, device, rounds=5)
        print(f"\nbaseline per-pair double backward: {8 / times['pair']:8.1f} maps/s, "
              f"with SmoothGrad n=16: {2 / times['pair smooth']:6.2f} maps/s")  # fmt: skip
        print(f"TFA maps k=8 {strategy:>8}: {8 / times['maps']:8.1f} maps/s = "
              f"{times['pair'] / times['maps']:5.2f}x the pair loop; SmoothGrad n=16: "
              f"{8 / times['smooth']:7.2f} maps/s = "
              f"{4 * times['pair smooth'] / times['smooth']:5.2f}x")  # fmt: skip

    if args.scorers != "none":
        print("\npreconditioned scorers (projected index d=4096, factored):")
        bench_scorers(engines["factored", "projected"], args.scorers.split(","), device)


if __name__ == "__main__":
    main()
