"""Optimiser and learning-rate schedule of the CoOp family (Dassl ``build_optimizer`` /
``build_lr_scheduler``): SGD with momentum, cosine annealing over ``max_epoch`` stepped once per
epoch, preceded by ``warmup_epoch`` epochs at a constant ``warmup_lr`` (Dassl's
``ConstantWarmupScheduler`` with ``WARMUP_RECOUNT=True``).

With warmup W and T = max_epoch, Dassl's chained schedulers give, for the 0-based epoch e:
``lr(e) = warmup_lr`` for e < W, and ``base_lr * (1 + cos(pi * (e - W) / T)) / 2`` for e >= W
(the cosine is not re-counted after the warmup, so it never reaches 0 within the run).
The schedule is computed in closed form from the epoch, so resuming restores it exactly.
A parameter group may carry its own ``warmup_epoch`` (DPT warms its text context up for 1 epoch
and its visual prompts for 10, each with its own Dassl scheduler); groups without one use the
config's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import TrainConfig


def lr_at_epoch(epoch: int, base_lr: float, config: TrainConfig,
                warmup_epoch: Optional[int] = None) -> float:
    """Learning rate of one parameter group during the 0-based ``epoch`` (``warmup_epoch``
    overrides ``config.warmup_epoch`` for that group)."""
    warmup = config.warmup_epoch if warmup_epoch is None else int(warmup_epoch)
    if epoch < warmup:
        return config.warmup_lr
    if config.lr_scheduler == "constant":
        return base_lr
    step = epoch - warmup
    return base_lr * (1 + math.cos(math.pi * step / config.max_epoch)) / 2


def build_optimizer(method, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over ``method.param_groups(lr)``; each group keeps its own base LR (``base_lr``)."""
    groups = method.param_groups(config.lr)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    if not groups:
        raise ValueError(f"method {method.name!r} has no trainable parameters to optimise")
    for group in groups:
        group.setdefault("lr", config.lr)
        group["base_lr"] = group["lr"]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, dampening=0, nesterov=False)


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, config: TrainConfig) -> list[float]:
    """Set every group's LR for ``epoch``; returns the LRs."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = lr_at_epoch(epoch, group["base_lr"], config, group.get("warmup_epoch"))
        lrs.append(group["lr"])
    return lrs
