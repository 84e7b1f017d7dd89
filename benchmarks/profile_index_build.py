"""Where the time of one index-build batch goes: torch.profiler's top operators.

Usage: python benchmarks/profile_index_build.py [--model resnet18] [--strategy factored]
       [--projection countsketch|logra]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from bench_engine import cifar_resnet18, demo_sized_cnn
from torch.profiler import ProfilerActivity, profile

from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.index import compute_rows
from tfa_widgets.core.logra import make_projector


def main() -> None:
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo-cnn", "resnet18"], default="resnet18")
    parser.add_argument("--strategy", choices=["vmap", "factored"], default="factored")
    parser.add_argument("--projection", choices=["countsketch", "logra"], default="countsketch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = (cifar_resnet18() if args.model == "resnet18" else demo_sized_cnn()).eval().to(device)
    names = [n for n, _ in model.named_parameters()]
    gradients = GradientModel(model, names, "cross_entropy", None, args.batch_size, args.strategy)
    projector = make_projector(args.projection, gradients, 4096, 0)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 6, (args.batch_size,), device=device)

    features = torch.zeros(args.batch_size, projector.dim, device=device)

    def step() -> None:
        compute_rows(gradients, images, labels, features, projector)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
