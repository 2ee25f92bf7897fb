"""The one training loop (DESIGN.md, "Engine"): a plain PyTorch loop over any ``Method``.

SGD (or Adam/AdamW) + cosine with constant warmup (per epoch, or per step), autocast bf16/fp16 on
GPU and fp32 on CPU, gradient accumulation (a batch split into chunks: same gradient, less
memory), deterministic seeding, a progress bar, a checkpoint after every epoch (and within long
epochs) and exact resume; an epoch count or an iteration budget (``max_steps``). A method may
combine its loss terms' gradients itself (gradient surgery, ``Method.combines_gradients``): the
engine still accumulates, all-reduces and unscales them (``_combined_step``).

Determinism across interruptions: the data order of epoch ``e`` depends on ``(seed, e)`` alone,
each item's augmentation on its position in the epoch (not on the number of workers or
processes), and the optimiser, RNG and running-loss state are restored, so a run resumed at an
epoch boundary or mid-epoch ends with the same tensors as an uninterrupted one.

Model selection (``train.select``): ``last`` tests the last epoch's tensors; ``best_val``
evaluates on the val split after every epoch (under a saved and restored RNG state, so training
is the same as with ``last``), commits a new best (ties: the later epoch, as Dassl) as the run
folder's best-epoch checkpoint before the generation whose header names it (``best``,
``val_history``), and loads it into the method when training ends. A resumed run takes the best
so far from the generation it resumes from, so it ends with the same best as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from ..config import TrainConfig
from . import checkpoint as ckpt
from . import distributed as D
from .cached_views import check_cached_views
from .evaluate import autocast, autocast_dtype, evaluate_method, resolved_precision
from .optim import build_optimizer, set_epoch_lr, set_step_lr
from .rundir import RunDir, best_folder_name

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


class SeededItems(Dataset):
    """Wraps a dataset whose ``transform`` draws from a ``generator`` attribute: item
    ``(index, seed)`` is transformed with a generator seeded by ``seed`` (``EpochSampler`` with
    ``with_seeds``), so augmentation is independent of workers, processes and resume points."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed = key
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "generator"):
            transform.generator = torch.Generator().manual_seed(seed)
        return self.dataset[index]


@dataclasses.dataclass
class Progress:
    """Where training stands: ``epoch`` epochs completed, ``step`` steps of the next one done,
    with that epoch's running sums (so the loss history is exact after a mid-epoch resume)."""

    epoch: int = 0
    step: int = 0
    loss_history: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    sums: dict = dataclasses.field(default_factory=lambda: {"loss": 0.0, "n": 0.0})
    finished: bool = False
    #: ``select: best_val``: the best epoch so far ``{"epoch", "val_accuracy", "folder"}`` and
    #: the val accuracy after each epoch
    best: Optional[dict] = None
    val_history: list = dataclasses.field(default_factory=list)

    def summary(self, max_epoch: int) -> dict:
        out = {"epochs": max_epoch if self.finished else self.epoch,
               "loss_history": list(self.loss_history), "time_s": round(self.elapsed, 3),
               "finished": self.finished}
        if self.val_history:
            out.update(self.selection())
        return out

    def selection(self) -> dict:
        """What ``best_val`` records in headers and results."""
        return {"select": "best_val", "best": dict(self.best or {}),
                "val_history": list(self.val_history)}


@dataclasses.dataclass
class _Loop:
    """What the training steps share."""

    method: object
    config: TrainConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    params: list
    scaler: Optional[torch.amp.GradScaler]
    amp_dtype: Optional[torch.dtype]
    run: Optional[RunDir]
    save: Callable[[Progress], None]
    #: ``select: best_val``: commits the best-epoch checkpoint; the best tensors kept in memory
    save_best: Optional[Callable[[Progress], None]] = None
    best_tensors: Optional[dict] = None


def _resume(loop: _Loop, resume_from_tensors: bool) -> Progress:
    """The progress stored in the run folder's newest intact checkpoint (a fresh ``Progress``
    when there is none): tensors into the method, optimiser/scaler/RNG state restored."""
    run = loop.run
    gen = run.latest_generation(verify=True) if run is not None else None
    if gen is None:
        return Progress()
    header = ckpt.load_generation(gen, loop.method, source=str(run.path))
    _warn_precision_change(loop, header)
    if header.get("finished"):
        state = None
        with contextlib.suppress(ValueError):
            state = ckpt.load_training_state(gen)
        progress = Progress(epoch=loop.config.max_epoch, finished=True,
                            loss_history=list((state or {}).get("loss_history", [])),
                            elapsed=float((state or {}).get("time_s", 0.0)))
        return _selection_from(loop, header, progress)
    try:
        state = ckpt.load_training_state(gen)
    except ValueError as err:
        older = [g for g in run.generations() if g.index < gen.index and g.verify() is None
                 and g.state_problem() is None]
        if older:
            logger.warning("%s; resuming from the previous checkpoint (%s)", err, older[0].folder)
            gen = older[0]
            header = ckpt.load_generation(gen, loop.method, source=str(run.path))
            state = ckpt.load_training_state(gen)
        elif resume_from_tensors:
            logger.warning("%s; continuing from the learned tensors of epoch %s with a fresh "
                           "optimiser (momentum and RNG state are lost: the result will differ "
                           "from an uninterrupted run)", err, header.get("epoch"))
            return _selection_from(loop, header, Progress(epoch=int(header.get("epoch", 0))))
        else:
            raise ValueError(f"{err}; the learned tensors of epoch {header.get('epoch')} are "
                             f"intact: rerun with --resume-from-tensors to continue from them "
                             f"(optimiser momentum is lost), or --force to start over") from None
    loop.optimizer.load_state_dict(state["optimizer"])
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    progress = Progress(epoch=int(state.get("epoch", header.get("epoch", 0))),
                        step=int(state.get("step", 0)),
                        loss_history=list(state.get("loss_history", [])),
                        elapsed=float(state.get("time_s", 0.0)),
                        sums=dict(state.get("sums") or {"loss": 0.0, "n": 0.0}))
    if progress.epoch > loop.config.max_epoch:
        raise ValueError(f"{run.path}: checkpoint is at epoch {progress.epoch} but max_epoch is "
                         f"{loop.config.max_epoch}; use --force to start over")
    return _selection_from(loop, header, progress)


def _warn_precision_change(loop: _Loop, header: dict) -> None:
    """``precision: auto`` depends on the machine: say so when a run resumes in another one."""
    before = header.get("precision")
    now = resolved_precision(loop.config.precision, loop.device)
    if before and before != now and not header.get("finished") and D.is_main():
        logger.warning("%s ran in %s and resumes in %s (train.precision=%s on this machine); set "
                       "train.precision=%s to continue as it started", loop.run.path, before, now,
                       loop.config.precision, before)


def _selection_from(loop: _Loop, header: dict, progress: Progress) -> Progress:
    """``best_val``: the best so far and the val history of the generation resumed from; its
    best-epoch folder must be intact (else the run could not end with the same best)."""
    if loop.config.select != "best_val":
        return progress
    progress.best = dict(header["best"]) if header.get("best") else None
    progress.val_history = list(header.get("val_history") or [])
    best = loop.run.best_generation(progress.best)
    problem = best.verify() if best is not None else None
    if problem:
        raise ValueError(f"{loop.run.path}: the best-epoch checkpoint of epoch "
                         f"{progress.best.get('epoch')} is not usable ({problem}); rerun with "
                         f"--force to start over")
    return progress


def _make_saver(method, config: TrainConfig, run: Optional[RunDir], backbone: str,
                header_extra: Optional[dict], optimizer, scaler) -> Callable[[Progress], None]:
    precision = resolved_precision(config.precision, method.device)

    def save(progress: Progress) -> None:
        if run is None or not D.is_main():
            return
        extra = dict(header_extra or {})
        extra.update({"max_epoch": config.max_epoch, "finished": progress.finished,
                      "step": progress.step, "precision": precision})
        if config.select == "best_val":
            extra.update(progress.selection())
        header = ckpt.make_header(method, backbone, progress.epoch, extra)
        state = {"epoch": progress.epoch, "step": progress.step,
                 "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "rng": ckpt.rng_state(), "loss_history": progress.loss_history,
                 "sums": progress.sums, "time_s": progress.elapsed}
        ckpt.save_checkpoint(run.path, method, header, state)

    return save


def _make_best_saver(loop: _Loop, backbone: str,
                     header_extra: Optional[dict]) -> Callable[[Progress], None]:
    """``best_val``: keep the new best epoch's tensors (in memory on every rank; committed as the
    run's best-epoch folder by rank 0)."""
    def save_best(progress: Progress) -> None:
        loop.best_tensors = ckpt.trainable_tensors(loop.method)
        if loop.run is None or not D.is_main():
            return
        extra = {**(header_extra or {}), "max_epoch": loop.config.max_epoch, "finished": False,
                 "step": 0, "select": "best_val",
                 "val_accuracy": progress.best["val_accuracy"]}
        header = ckpt.make_header(loop.method, backbone, progress.epoch, extra)
        loop.run.commit_best(loop.best_tensors, header)

    return save_best


def _validate(loop: _Loop, val_set: Dataset, progress: Progress, num_workers: int) -> None:
    """``best_val``, after an epoch: val accuracy, and a new best (ties: the later epoch, as
    Dassl's ``curr_result >= best_result``) kept before the generation naming it is committed.
    The RNG state is restored afterwards, so evaluation does not change the training."""
    config = loop.config
    rng = ckpt.rng_state()
    entry = evaluate_method(loop.method, val_set, list(loop.method.classnames),
                            batch_size=config.eval_batch_size, device=loop.device,
                            precision=config.precision, num_workers=num_workers)
    ckpt.set_rng_state(rng)
    accuracy = float(entry["accuracy"])
    progress.val_history.append(accuracy)
    if progress.best is None or accuracy >= progress.best["val_accuracy"]:
        progress.best = {"epoch": progress.epoch, "val_accuracy": accuracy,
                         "folder": best_folder_name(progress.epoch)}
        loop.save_best(progress)
    if D.is_main():
        logger.info("epoch [%d/%d] val accuracy %.2f%% (best %.2f%% at epoch %d)",
                    progress.epoch, config.max_epoch, accuracy, progress.best["val_accuracy"],
                    progress.best["epoch"])


def _load_best(loop: _Loop, progress: Progress) -> None:
    """``best_val``, when training has ended: the best epoch's tensors into the method."""
    if progress.best is None:
        return
    if loop.best_tensors is not None:
        loop.method.load_trainable_state_dict(
            {k: v.to(loop.device) for k, v in loop.best_tensors.items()})
    else:  # resumed after the best epoch: from its folder
        ckpt.load_generation(loop.run.best_generation(progress.best), loop.method,
                             source=str(loop.run.path))
    if D.is_main():
        logger.info("Deploy the model with the best val performance (epoch %d, %.2f%%)",
                    progress.best["epoch"], progress.best["val_accuracy"])


def _step(loop: _Loop, images: torch.Tensor, labels: torch.Tensor,
          where: str) -> tuple[float, dict]:
    """One optimiser step over a batch (split into ``grad_accum`` chunks); (loss, parts)."""
    if loop.method.combines_gradients:
        return _combined_step(loop, images, labels, where)
    config, method = loop.config, loop.method
    batch_loss, batch_parts = 0.0, {}
    for x, y in zip(images.chunk(config.grad_accum), labels.chunk(config.grad_accum)):
        weight = x.shape[0] / images.shape[0]
        with autocast(config.precision, loop.device):
            loss, parts = method.loss(x, y)
        value = float(loss.detach())
        _check_finite(loop, value, parts, where)
        scaled = loss * weight
        (loop.scaler.scale(scaled) if loop.scaler is not None else scaled).backward()
        batch_loss += value * weight
        for k, v in parts.items():
            batch_parts[k] = batch_parts.get(k, 0.0) + float(v) * weight
    D.all_reduce_gradients(loop.params)
    _apply_step(loop)
    return batch_loss, batch_parts


def _check_finite(loop: _Loop, value: float, parts: dict, where: str) -> None:
    """Stop every process together on a NaN/inf loss."""
    bad = not math.isfinite(value)
    if D.is_distributed():
        bad = D.all_reduce_sum([float(bad)], loop.device)[0] > 0
    if bad:
        hint = ("the run uses reduced precision; try train.precision=fp32 (or bf16)"
                if loop.amp_dtype is not None else "try a lower train.lr")
        raise NonFiniteLossError(f"non-finite loss at {where}: loss={value}, parts={parts}. "
                                 f"{hint}. The last good checkpoint is kept"
                                 + (f" in {loop.run.path}" if loop.run else ""))


def _apply_step(loop: _Loop) -> None:
    """The optimiser step on the gradients in ``.grad`` (through the AMP scaler, if any)."""
    if loop.scaler is not None:
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)


def _combined_step(loop: _Loop, images: torch.Tensor, labels: torch.Tensor,
                   where: str) -> tuple[float, dict]:
    """``_step`` for a method that combines its loss terms' gradients (gradient surgery).

    Each term's gradient is accumulated separately over the ``grad_accum`` chunks (chunk
    weights as in ``_step``), averaged over processes and divided by the AMP loss scale, and
    ``Method.combine_gradients`` runs once, on the gradients of the whole optimiser batch: a
    nonlinear combination (ProGrad's projection) then gives the same step whatever the chunking
    and the number of processes, which combining per chunk or per process would not. The
    combined gradient goes back through the scaler (re-multiplied by its scale, a power of two,
    so exactly), which skips the step and lowers its scale if any term overflowed.
    """
    config, method, params = loop.config, loop.method, loop.params
    sums: dict[str, list[torch.Tensor]] = {}
    batch_loss, batch_parts = 0.0, {}
    for x, y in zip(images.chunk(config.grad_accum), labels.chunk(config.grad_accum)):
        weight = x.shape[0] / images.shape[0]
        with autocast(config.precision, loop.device):
            terms, parts = method.loss_terms(x, y)
        values = [float(t.detach()) for t in terms.values()]
        _check_finite(loop, sum(values), parts, where)
        for i, (name, term) in enumerate(terms.items()):
            acc = sums.setdefault(name, [torch.zeros_like(p) for p in params])
            if not term.requires_grad:
                continue
            scaled = term * weight
            scaled = loop.scaler.scale(scaled) if loop.scaler is not None else scaled
            grads = torch.autograd.grad(scaled, params, retain_graph=i < len(terms) - 1,
                                        allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g)
        batch_loss += values[0] * weight
        for k, v in parts.items():
            batch_parts[k] = batch_parts.get(k, 0.0) + float(v) * weight
    grads = _all_reduce_terms(params, sums)
    scale = loop.scaler.get_scale() if loop.scaler is not None else 1.0
    if loop.scaler is not None:
        grads = {k: [g * (1.0 / scale) for g in gs] for k, gs in grads.items()}
        if not all(bool(torch.isfinite(g).all()) for gs in grads.values() for g in gs):
            grads = None  # an overflow: the scaler skips the step and backs off
    combined = (method.combine_gradients(grads) if grads is not None
                else [torch.full_like(p, float("inf")) for p in params])
    for p, g in zip(params, combined):
        p.grad = g * scale if loop.scaler is not None else g
    _apply_step(loop)
    return batch_loss, batch_parts


def _all_reduce_terms(params: list, grads: dict[str, list[torch.Tensor]]
                      ) -> dict[str, list[torch.Tensor]]:
    """Average each term's gradients over processes with the engine's gradient all-reduce
    (``D.all_reduce_gradients`` on ``.grad``, one term at a time)."""
    if not D.is_distributed():
        return grads
    out = {}
    for name, term in grads.items():
        for p, g in zip(params, term):
            p.grad = g
        D.all_reduce_gradients(params)
        out[name] = [p.grad for p in params]
    for p in params:
        p.grad = None
    return out


def _train_loader(dataset: Dataset, config: TrainConfig, device: torch.device, timing: dict
                  ) -> tuple[DataLoader, D.EpochSampler]:
    """The run's training loader and its sampler, built once: worker processes persist across
    epochs (``persistent_workers``) and prefetch, and each epoch sets the sampler's order
    (``EpochSampler.set_epoch``) before iterating. Augmentation draws from a generator seeded per
    item (``SeededItems``), so neither the workers' RNG nor their number changes the batches."""
    workers = 0 if config.cached_views else timing["num_workers"]  # cached views: in memory
    sampler = D.EpochSampler(len(dataset), config.seed, with_seeds=True)
    items = dataset if getattr(dataset, "takes_seeds", False) else SeededItems(dataset)
    loader = DataLoader(items, batch_size=timing["per_rank_batch"], sampler=sampler,
                        drop_last=timing["drop_last"], num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(config.seed + D.rank()),
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return loader, sampler


def _batches(loader: DataLoader, timing: dict):
    """The loader's batches, adding the time spent waiting for each to ``timing["data_wait_s"]``
    (the data stall: time the step could not start because its batch was not ready)."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            timing["data_wait_s"] += time.perf_counter() - start
        yield batch


def _run_epoch(loop: _Loop, loader: DataLoader, sampler: D.EpochSampler, progress: Progress,
               bar, timing: dict) -> None:
    """Train from ``progress`` to the end of its epoch, committing mid-epoch checkpoints as
    configured; updates ``progress`` (epoch done when this returns)."""
    config, device = loop.config, loop.device
    epoch = progress.epoch
    if progress.step == 0:  # a mid-epoch resume has the RNG state of its checkpoint
        seed_everything(D.epoch_seed(config.seed, epoch) + D.rank())
    per_rank_batch = timing["per_rank_batch"]
    steps_per_epoch = timing["steps_per_epoch"]
    # the steps this epoch runs: all of them, except in the last epoch of a ``max_steps`` budget
    epoch_steps = min(steps_per_epoch, timing["total_steps"] - epoch * steps_per_epoch)
    # drop_last is decided on the whole epoch, so a resumed epoch keeps the same batches
    sampler.set_epoch(epoch, start=progress.step * per_rank_batch)
    per_step_lr = config.lr_scheduler == "cosine_step"
    lrs = set_epoch_lr(loop.optimizer, epoch, config)
    loop.method.train()
    epoch_start = time.time()
    last_save = time.time()
    loop_start = time.perf_counter()
    for images, labels in _batches(loader, timing):
        step = progress.step
        if per_step_lr:
            lrs = set_step_lr(loop.optimizer, epoch * steps_per_epoch + step, config,
                              steps_per_epoch, timing["total_steps"])
        batch_loss, parts = _step(loop, images.to(device, non_blocking=True),
                                  torch.as_tensor(labels).to(device, non_blocking=True),
                                  f"epoch {epoch + 1}, step {step + 1}")
        n = images.shape[0]
        progress.sums["loss"] += batch_loss * n
        progress.sums["n"] += n
        for k, v in parts.items():
            progress.sums[k] = progress.sums.get(k, 0.0) + v * n
        progress.step += 1
        timing["steps_done"] += 1
        _report_step(loop, progress, bar, timing, batch_loss, parts, lrs[0])
        if progress.step >= epoch_steps:
            break  # before the loader reads past the step budget
        if _due(config, progress.step, last_save):
            progress.elapsed += time.time() - epoch_start
            epoch_start = last_save = time.time()
            loop.save(progress)
    timing["loop_s"] += time.perf_counter() - loop_start
    keys = sorted(progress.sums)
    totals = dict(zip(keys, D.all_reduce_sum([progress.sums[k] for k in keys], device)))
    progress.loss_history.append(totals["loss"] / max(totals["n"], 1.0))
    loop.method.on_epoch_end(epoch, config.max_epoch)
    progress.elapsed += time.time() - epoch_start
    progress.epoch, progress.step, progress.sums = epoch + 1, 0, {"loss": 0.0, "n": 0.0}
    if D.is_main():
        logger.debug("epoch %d/%d done: loss %.4f", epoch + 1, config.max_epoch,
                     progress.loss_history[-1])


def _due(config: TrainConfig, step: int, last_save: float) -> bool:
    """Is a mid-epoch checkpoint due after ``step`` steps of the epoch?"""
    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        return True
    minutes = config.checkpoint_every_minutes
    return bool(minutes) and time.time() - last_save >= 60.0 * minutes


def _report_step(loop: _Loop, progress: Progress, bar, timing: dict, batch_loss: float,
                 parts: dict, lr: float) -> None:
    config = loop.config
    bar.update(1)
    postfix = {"epoch": f"{progress.epoch + 1}/{config.max_epoch}", "loss": f"{batch_loss:.4f}",
               "lr": f"{lr:.2e}"}
    if "acc" in parts:
        postfix["acc"] = f"{parts['acc']:.1f}"
    bar.set_postfix(postfix, refresh=False)
    steps_per_epoch = timing["steps_per_epoch"]
    if D.is_main() and (progress.step % config.print_freq == 0 or progress.step == steps_per_epoch):
        rate = (time.time() - timing["start"]) / timing["steps_done"]
        eta = rate * (timing["remaining"] - timing["steps_done"])
        extra = "".join(f" {k} {v:.4f}" for k, v in parts.items())
        logger.info("epoch [%d/%d] batch [%d/%d] loss %.4f (%.4f)%s lr %.4e eta %s",
                    progress.epoch + 1, config.max_epoch, progress.step, steps_per_epoch,
                    batch_loss, progress.sums["loss"] / progress.sums["n"], extra, lr,
                    _fmt_eta(eta))
        if loop.run is not None:  # read by sweep status tables
            loop.run.write_progress({"epoch": progress.epoch, "max_epoch": config.max_epoch,
                                     "step": progress.step, "steps_per_epoch": steps_per_epoch,
                                     "eta_s": round(eta, 1), "loss": batch_loss})


def _progress_bar(total: int, show_progress: Optional[bool]):
    from tqdm.auto import tqdm

    # disable=None lets tqdm decide: shown on a terminal only
    disable = True if (not D.is_main() or show_progress is False) else (
        None if show_progress is None else False)
    return tqdm(total=total, disable=disable, leave=False, dynamic_ncols=True, unit="step")


def _batch_layout(config: TrainConfig, num_items: int, world: int) -> dict:
    """Per-rank batch size, ``drop_last`` and steps per epoch of a training set."""
    per_rank_batch = config.batch_size // world
    items = -(-num_items // world)  # per rank, padded as EpochSampler pads
    drop_last = items >= per_rank_batch  # keeps 1- and 2-shot epochs non-empty
    return {"per_rank_batch": per_rank_batch, "drop_last": drop_last,
            "steps_per_epoch": items // per_rank_batch if drop_last else 1}


def _with_step_budget(config: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """With ``max_steps``, the run's epochs are those its steps reach (the last one stops early):
    ``max_epoch`` becomes their number, for the loop, the per-epoch schedule and checkpoints."""
    if config.max_steps is None:
        return config
    return dataclasses.replace(config, max_epoch=-(-config.max_steps // steps_per_epoch))


def training_switches(config: TrainConfig):
    """The runtime-only performance switches of a run (``perf.SWITCHES``) for its training
    steps: activation checkpointing and ``torch.compile``."""
    from ..perf import switches

    return switches(activation_checkpointing=config.activation_checkpointing,
                    compile_blocks=config.compile)


def make_train_step(method, config: TrainConfig, device: Optional[torch.device] = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[float, dict]]:
    """The engine's optimisation step as a function ``step(images, labels) -> (loss, parts)``:
    the optimiser of ``config``, autocast, gradient accumulation and gradient combination exactly
    as ``train_method`` runs them, without data loading or a run folder (``vlprompt bench``).
    Call it inside ``training_switches(config)`` for the run's runtime switches."""
    device = torch.device(device) if device is not None else method.device
    method.to(device)
    optimizer = build_optimizer(method, config)
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    params = list(method.named_trainable_parameters().values())
    loop = _Loop(method, config, device, optimizer, params, scaler, amp_dtype, None,
                 lambda progress: None)
    set_epoch_lr(optimizer, 0, config)  # the first epoch's learning rate, as train_method
    method.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
        return _step(loop, images.to(device), labels.to(device), "bench")
    return step


def train_method(method, dataset: Dataset, config: TrainConfig,
                 run_dir: Optional[Union[str, Path, RunDir]] = None,
                 device: Optional[torch.device] = None, resume: bool = True,
                 backbone: Optional[str] = None, header_extra: Optional[dict] = None,
                 epoch_callback: Optional[Callable[[int], None]] = None,
                 show_progress: Optional[bool] = None, resume_from_tensors: bool = False,
                 val_set: Optional[Dataset] = None) -> dict:
    """Train ``method`` on ``dataset`` (items ``(image, label)``).

    Commits a checkpoint to ``run_dir`` after each epoch and within long epochs (rank 0) and,
    with ``resume``, continues from the newest one there. ``epoch_callback(epoch)`` runs after
    each epoch's checkpoint (tests use it to simulate an interruption). Returns ``{"epochs",
    "loss_history", "time_s", "finished"}`` (``select: best_val`` adds ``select``, ``best``,
    ``val_history``). With ``select: best_val`` (``val_set`` = the val split of the training
    classes) the method holds the best epoch's tensors when this returns.
    Raises ``NonFiniteLossError`` on a NaN/inf loss.
    """
    from ..clip.fingerprint import backbone_fingerprint
    from ..runtime import resolve_num_workers

    device = torch.device(device) if device is not None else method.device
    method.to(device)
    fingerprint = backbone_fingerprint(method.clip)
    backbone = backbone or getattr(method.clip, "backbone_name", None) or "custom"
    run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
    world = D.world_size()
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"train.batch_size={config.batch_size} must be divisible by the number of "
                         f"processes ({world}) times train.grad_accum ({config.grad_accum})")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    check_cached_views(method, config.cached_views)
    if config.select == "best_val" and (val_set is None or len(val_set) == 0):
        raise ValueError("train.select=best_val needs a val split to select on, and this run has "
                         "none; use train.select=last")
    layout = _batch_layout(config, len(dataset), world)
    config = _with_step_budget(config, layout["steps_per_epoch"])

    optimizer = build_optimizer(method, config)
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    save = _make_saver(method, config, run, backbone, header_extra, optimizer, scaler)
    params = list(method.named_trainable_parameters().values())
    loop = _Loop(method, config, device, optimizer, params, scaler, amp_dtype, run, save)
    loop.save_best = _make_best_saver(loop, backbone, header_extra)
    progress = _resume(loop, resume_from_tensors) if resume else Progress()
    if progress.finished:
        _load_best(loop, progress)
        return progress.summary(config.max_epoch)
    if progress.epoch or progress.step:
        if D.is_main():
            logger.info("Resuming from %s (epoch %d/%d%s)", run.path, progress.epoch,
                        config.max_epoch, f", step {progress.step}" if progress.step else "")
    D.broadcast_parameters(loop.params)

    steps_per_epoch = layout["steps_per_epoch"]
    total_steps = config.max_steps or steps_per_epoch * config.max_epoch
    remaining = total_steps - (steps_per_epoch * progress.epoch + progress.step)
    num_workers = resolve_num_workers(config.num_workers)
    if config.cached_views:
        dataset = _view_features(loop, dataset, num_workers, show_progress)
    timing = {**layout, "total_steps": total_steps, "remaining": remaining, "steps_done": 0,
              "start": time.time(), "num_workers": num_workers, "data_wait_s": 0.0,
              "loop_s": 0.0}
    loader, sampler = _train_loader(dataset, config, device, timing)
    bar = _progress_bar(remaining, show_progress)
    redirect = contextlib.nullcontext()
    if not bar.disable:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
    try:
        with redirect, training_switches(config):
            while progress.epoch < config.max_epoch:
                _run_epoch(loop, loader, sampler, progress, bar, timing)
                if config.select == "best_val":
                    _validate(loop, val_set, progress, timing["num_workers"])
                save(progress)
                D.barrier()
                if epoch_callback is not None:
                    epoch_callback(progress.epoch - 1)
    finally:
        bar.close()

    method.on_train_end()
    if backbone_fingerprint(method.clip, recompute=True) != fingerprint:
        raise RuntimeError("the frozen CLIP changed during training (a method modified it in "
                           "place); its results are not valid")
    progress.finished = True
    save(progress)
    D.barrier()
    if D.is_main():
        logger.info("Finish training")
    _load_best(loop, progress)
    return {**progress.summary(config.max_epoch), **_stall_summary(timing),
            "precision": resolved_precision(config.precision, device)}


def _stall_summary(timing: dict) -> dict:
    """The data stall of this process's training steps: the share of the training loop's wall
    time spent waiting for batches (logged, and kept in the run's results)."""
    if not timing["loop_s"]:
        return {}
    fraction = timing["data_wait_s"] / timing["loop_s"]
    if D.is_main():
        logger.info("data loading stalled training for %.1f%% of its time (%.1fs of %.1fs)",
                    100 * fraction, timing["data_wait_s"], timing["loop_s"])
    return {"data_stall_fraction": round(fraction, 4)}


def _view_features(loop: _Loop, dataset: Dataset, num_workers: int,
                   show_progress: Optional[bool]) -> Dataset:
    """``train.cached_views``: the features of the pre-drawn views of ``dataset``'s images, as
    the dataset the loop trains on (``engine.cached_views``)."""
    from .cached_views import draw_view_features

    config = loop.config
    total = config.cached_views * len(dataset)
    if D.is_main():
        logger.info("cached views: drawing %d augmented views of each of %d training images "
                    "(%d image-tower passes, once)", config.cached_views, len(dataset), total)
    bar = _progress_bar(total, show_progress)
    try:
        return draw_view_features(loop.method, dataset, config.cached_views, config.seed,
                                  config.eval_batch_size, config.precision, loop.device,
                                  num_workers, progress=lambda done, _: bar.update(
                                      done - bar.n))
    finally:
        bar.close()
