"""The one training loop (DESIGN.md, "Engine"): a plain PyTorch loop over any ``Method``.

SGD + cosine with constant warmup, autocast bf16/fp16 on GPU and fp32 on CPU, gradient
accumulation (a batch split into chunks: same gradient, less memory), deterministic seeding,
a progress bar, a checkpoint after every epoch and exact resume.

Determinism across interruptions: the data order, augmentation and worker RNG of epoch ``e`` are
seeded from ``(seed, e)`` alone, and the optimiser state is restored, so a resumed run ends with
the same tensors as an uninterrupted one.
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..clip.load import state_checksum
from ..config import TrainConfig
from . import checkpoint as ckpt
from . import distributed as D
from .evaluate import autocast, autocast_dtype
from .optim import build_optimizer, set_epoch_lr

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch and python RNGs from the loader's generator; numpy too
    seed = torch.initial_seed() % (2 ** 32)
    np.random.seed(seed)
    random.seed(seed)


def _fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def train_method(method, dataset: Dataset, config: TrainConfig,
                 run_dir: Optional[Union[str, Path]] = None, device: Optional[torch.device] = None,
                 resume: bool = True, backbone: Optional[str] = None,
                 header_extra: Optional[dict] = None,
                 epoch_callback: Optional[Callable[[int], None]] = None,
                 show_progress: Optional[bool] = None) -> dict:
    """Train ``method`` on ``dataset`` (items ``(image, label)``).

    Writes a checkpoint to ``run_dir`` after each epoch (rank 0) and, with ``resume``, continues
    from the one there. ``epoch_callback(epoch)`` runs after each epoch's checkpoint (tests use it
    to simulate an interruption). Returns ``{"epochs", "loss_history", "time_s", "finished"}``.
    Raises ``NonFiniteLossError`` on a NaN/inf loss.
    """
    device = torch.device(device) if device is not None else method.device
    method.to(device)
    clip_checksum = state_checksum(method.clip)
    backbone = backbone or getattr(method.clip, "backbone_name", None) or "custom"
    run_dir = Path(run_dir) if run_dir is not None else None
    world = D.world_size()
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"train.batch_size={config.batch_size} must be divisible by the number of "
                         f"processes ({world}) times train.grad_accum ({config.grad_accum})")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")

    optimizer = build_optimizer(method, config)
    params = list(method.named_trainable_parameters().values())
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, loss_history, elapsed, finished = 0, [], 0.0, False
    if resume and run_dir is not None and (run_dir / ckpt.HEADER_FILE).exists():
        header = ckpt.load_checkpoint(run_dir, method)
        state = ckpt.load_training_state(run_dir)
        if header.get("finished"):
            finished = True
        elif state is None or state.get("epoch") != header.get("epoch"):
            raise ValueError(f"{run_dir}: {ckpt.STATE_FILE} is missing or from another epoch than "
                             f"{ckpt.HEADER_FILE}; rerun with --force to start over")
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            ckpt.set_rng_state(state["rng"])
            loss_history = list(state.get("loss_history", []))
            elapsed = float(state.get("time_s", 0.0))
        start_epoch = int(header.get("epoch", 0))
        if start_epoch > config.max_epoch:
            raise ValueError(f"{run_dir}: checkpoint is at epoch {start_epoch} but max_epoch is "
                             f"{config.max_epoch}; use --force to start over")
        if D.is_main():
            logger.info("Resuming from %s (epoch %d/%d)", run_dir, start_epoch, config.max_epoch)
    D.broadcast_parameters(params)

    def save(epoch: int, done: bool) -> None:
        if run_dir is None or not D.is_main():
            return
        extra = dict(header_extra or {})
        extra.update({"max_epoch": config.max_epoch, "finished": done})
        head = ckpt.make_header(method, backbone, clip_checksum, epoch, extra)
        state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "rng": ckpt.rng_state(), "loss_history": loss_history,
                 "time_s": elapsed}
        ckpt.save_checkpoint(run_dir, method, head, state)

    if finished:
        return {"epochs": config.max_epoch, "loss_history": loss_history,
                "time_s": round(elapsed, 3), "finished": True}

    per_rank_batch = config.batch_size // world
    sampler = D.EpochSampler(len(dataset), config.seed)
    drop_last = len(sampler) >= per_rank_batch
    steps_per_epoch = len(sampler) // per_rank_batch if drop_last else math.ceil(len(sampler) / per_rank_batch)
    remaining = steps_per_epoch * (config.max_epoch - start_epoch)
    from tqdm.auto import tqdm

    # disable=None lets tqdm decide: shown on a terminal only
    disable = True if (not D.is_main() or show_progress is False) else (None if show_progress is None else False)
    bar = tqdm(total=remaining, disable=disable, leave=False, dynamic_ncols=True, unit="step")
    run_start = time.time()
    steps_done = 0
    try:
        for epoch in range(start_epoch, config.max_epoch):
            epoch_start = time.time()
            seed = D.epoch_seed(config.seed, epoch)
            seed_everything(seed + D.rank())
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler,
                                drop_last=drop_last, num_workers=config.num_workers,
                                pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
                                generator=torch.Generator().manual_seed(seed + D.rank()),
                                persistent_workers=False)
            lrs = set_epoch_lr(optimizer, epoch, config)
            method.train()
            sums = {"loss": 0.0, "n": 0.0}
            for step, (images, labels) in enumerate(loader):
                images = images.to(device, non_blocking=True)
                labels = torch.as_tensor(labels).to(device, non_blocking=True)
                batch_loss, batch_parts = 0.0, {}
                for x, y in zip(images.chunk(config.grad_accum), labels.chunk(config.grad_accum)):
                    weight = x.shape[0] / images.shape[0]
                    with autocast(config.precision, device):
                        loss, parts = method.loss(x, y)
                    value = float(loss.detach())
                    bad = not math.isfinite(value)
                    if D.is_distributed():
                        bad = D.all_reduce_sum([float(bad)], device)[0] > 0
                    if bad:
                        hint = ("the run uses reduced precision; try train.precision=fp32 (or bf16)"
                                if amp_dtype is not None else "try a lower train.lr")
                        raise NonFiniteLossError(
                            f"non-finite loss at epoch {epoch + 1}, step {step + 1}: loss={value}, "
                            f"parts={parts}. {hint}. The last good checkpoint (epoch {epoch}) is kept"
                            + (f" in {run_dir}" if run_dir else ""))
                    scaled = loss * weight
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    batch_loss += value * weight
                    for k, v in parts.items():
                        batch_parts[k] = batch_parts.get(k, 0.0) + float(v) * weight
                D.all_reduce_gradients(params)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n = images.shape[0]
                sums["loss"] += batch_loss * n
                sums["n"] += n
                for k, v in batch_parts.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                steps_done += 1
                bar.update(1)
                postfix = {"epoch": f"{epoch + 1}/{config.max_epoch}", "loss": f"{batch_loss:.4f}",
                           "lr": f"{lrs[0]:.2e}"}
                if "acc" in batch_parts:
                    postfix["acc"] = f"{batch_parts['acc']:.1f}"
                bar.set_postfix(postfix, refresh=False)
                if D.is_main() and ((step + 1) % config.print_freq == 0 or step + 1 == steps_per_epoch):
                    rate = (time.time() - run_start) / steps_done
                    eta = rate * (remaining - steps_done)
                    extra = "".join(f" {k} {v:.4f}" for k, v in batch_parts.items())
                    logger.info("epoch [%d/%d] batch [%d/%d] loss %.4f (%.4f)%s lr %.4e eta %s",
                                epoch + 1, config.max_epoch, step + 1, steps_per_epoch, batch_loss,
                                sums["loss"] / sums["n"], extra, lrs[0], _fmt_eta(eta))
            keys = sorted(sums)
            totals = dict(zip(keys, D.all_reduce_sum([sums[k] for k in keys], device)))
            mean_loss = totals["loss"] / max(totals["n"], 1.0)
            loss_history.append(mean_loss)
            method.on_epoch_end(epoch, config.max_epoch)
            elapsed += time.time() - epoch_start
            if D.is_main():
                parts = "".join(f" {k} {totals[k] / max(totals['n'], 1.0):.4f}"
                                for k in keys if k not in ("loss", "n"))
                logger.debug("epoch %d/%d done: loss %.4f%s", epoch + 1, config.max_epoch,
                             mean_loss, parts)
            save(epoch + 1, False)
            D.barrier()
            if epoch_callback is not None:
                epoch_callback(epoch)
    finally:
        bar.close()

    method.on_train_end()
    if state_checksum(method.clip) != clip_checksum:
        raise RuntimeError("the frozen CLIP changed during training (a method modified it in "
                           "place); its results are not valid")
    save(config.max_epoch, True)
    D.barrier()
    if D.is_main():
        logger.info("Finish training")
    return {"epochs": config.max_epoch, "loss_history": loss_history,
            "time_s": round(elapsed, 3), "finished": True}
