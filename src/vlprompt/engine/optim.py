"""Optimiser and learning-rate schedule of the CoOp family (Dassl ``build_optimizer`` /
``build_lr_scheduler``): SGD with momentum (or Dassl's Adam / AdamW), cosine annealing over
``max_epoch`` stepped once per epoch, preceded by ``warmup_epoch`` epochs at a constant
``warmup_lr`` (Dassl's ``ConstantWarmupScheduler`` with ``WARMUP_RECOUNT=True``).

With warmup W and T = max_epoch, Dassl's chained schedulers give, for the 0-based epoch e:
``lr(e) = warmup_lr`` for e < W, and
``min_lr + (base_lr - min_lr) * (1 + cos(pi * (e - W) / T)) / 2`` for e >= W (the cosine is not
re-counted after the warmup, so it never reaches its floor within the run; Dassl's floor is 0).
``cosine_step`` is the same curve over optimiser steps: step s of a run of S steps gets
``min_lr + (base_lr - min_lr) * (1 + cos(pi * (s - W_s) / S)) / 2`` with W_s = W x steps per
epoch (CLIP-LoRA: no warmup, S = 500 x shots, floor 1e-6).
The schedule is computed in closed form from the epoch (step), so resuming restores it exactly.
A parameter group may carry its own ``warmup_epoch`` (DPT warms its text context up for 1 epoch
and its visual prompts for 10, each with its own Dassl scheduler); groups without one use the
config's. Per-group learning rates (e.g. DePT's 6.5x for its head) come from the method's
``param_groups``: every group keeps its own base LR and follows the one schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import TrainConfig


def _cosine(base_lr: float, position: float, length: int, config: TrainConfig) -> float:
    # at min_lr = 0 this is bit-for-bit base_lr * (1 + cos) / 2
    floor = config.min_lr
    return floor + (base_lr - floor) * (1 + math.cos(math.pi * position / length)) / 2


def lr_at_epoch(epoch: int, base_lr: float, config: TrainConfig,
                warmup_epoch: Optional[int] = None) -> float:
    """Learning rate of one parameter group during the 0-based ``epoch`` (``warmup_epoch``
    overrides ``config.warmup_epoch`` for that group)."""
    warmup = config.warmup_epoch if warmup_epoch is None else int(warmup_epoch)
    if epoch < warmup:
        return config.warmup_lr
    if config.lr_scheduler == "constant":
        return base_lr
    return _cosine(base_lr, epoch - warmup, config.max_epoch, config)


def lr_at_step(step: int, base_lr: float, config: TrainConfig, steps_per_epoch: int,
               total_steps: int, warmup_epoch: Optional[int] = None) -> float:
    """``cosine_step``: learning rate of one group for the 0-based optimiser ``step`` of a run of
    ``total_steps`` steps (the warmup still counts whole epochs of ``steps_per_epoch``)."""
    warmup = (config.warmup_epoch if warmup_epoch is None else int(warmup_epoch)) * steps_per_epoch
    if step < warmup:
        return config.warmup_lr
    return _cosine(base_lr, step - warmup, total_steps, config)


def build_optimizer(method, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (or Adam/AdamW) over ``method.param_groups(lr)``; each group keeps its own base LR
    (``base_lr``). Adam and AdamW use Dassl's settings: betas ``adam_betas``, the config's
    weight decay (L2 for Adam, decoupled for AdamW), no amsgrad; ``adam_eps`` as configured."""
    groups = method.param_groups(config.lr)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    if not groups:
        raise ValueError(f"method {method.name!r} has no trainable parameters to optimise")
    for group in groups:
        group.setdefault("lr", config.lr)
        group["base_lr"] = group["lr"]
    if config.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        return cls(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                   weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, dampening=0, nesterov=False)


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, config: TrainConfig) -> list[float]:
    """Set every group's LR for ``epoch``; returns the LRs."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = lr_at_epoch(epoch, group["base_lr"], config, group.get("warmup_epoch"))
        lrs.append(group["lr"])
    return lrs


def set_step_lr(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig,
                steps_per_epoch: int, total_steps: int) -> list[float]:
    """``cosine_step``: set every group's LR for the run's 0-based optimiser ``step``."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = lr_at_step(step, group["base_lr"], config, steps_per_epoch, total_steps,
                                 group.get("warmup_epoch"))
        lrs.append(group["lr"])
    return lrs
