"""Deterministic training of a classifier on an in-memory dataset, with a progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError

TRAIN_THREADS = 1
"""Threads used while training: fixed, so that a machine's core count cannot change the weights
(a kernel's reduction order may depend on how its work is split between threads)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings: SGD with Nesterov momentum and a one-cycle learning-rate schedule."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


@contextmanager
def reproducible_torch(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Run the block with a fixed thread count and deterministic algorithms; restore both after.

    What remains machine-dependent is the CPU's instruction set: torch picks vectorised kernels by
    it (see ``ATEN_CPU_CAPABILITY``), and they round float32 sums differently.
    """
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic, warn_only=old_warn_only)
        torch.set_num_threads(old_threads)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int, nn.Module, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` with cross-entropy on ``images [N, C, H, W]``; return it in eval mode.

    Shuffling uses a generator seeded with ``seed`` (there is no augmentation), and training runs
    under `reproducible_torch`, so the same inputs give the same weights on any machine with the
    same CPU instruction set. ``on_epoch(epoch, model, mean_lr)`` is called after each epoch
    (``epoch`` from 1, ``mean_lr`` the mean learning rate of its steps); it must not change the
    model (`tfa_widgets.data.demo_checkpoints.CheckpointRecorder` copies the weights).
    """
    cfg = config or TrainConfig()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    if cfg.epochs * steps_per_epoch < 8:
        raise InputError(
            f"training needs at least 8 optimiser steps for its learning-rate schedule, got "
            f"{cfg.epochs} epochs of {steps_per_epoch} batches"
        )
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.25
    )
    model.train()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="training demo model", disable=not progress)
    with reproducible_torch():
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(images), generator=gen)
            total, rates = 0.0, 0.0
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                rates += opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                total += float(loss.detach())
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / steps_per_epoch:.3f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, model, rates / steps_per_epoch)
    bar.close()
    return model.eval()
