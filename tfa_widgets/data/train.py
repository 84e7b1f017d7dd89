"""Deterministic training of a classifier on an in-memory dataset, with a progress bar."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings: SGD with Nesterov momentum and a one-cycle learning-rate schedule."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` with cross-entropy on ``images [N, C, H, W]``; return it in eval mode.

    Shuffling uses a generator seeded with ``seed``, so the same inputs give the same weights.
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
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / steps_per_epoch:.3f}")
    bar.close()
    return model.eval()
