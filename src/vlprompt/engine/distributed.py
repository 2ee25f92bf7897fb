"""Multi-process training and evaluation with ``torchrun`` (``torch.distributed``): gloo on CPU,
NCCL on GPU. Methods know nothing of it.

Gradients of the trainable tensors are averaged across ranks after each optimiser step's
backward passes, which is what DDP computes (DDP's bucketing overlap is not worth it for prompt
tensors of kilobytes to megabytes, and it would need every method's ``loss`` routed through a
wrapped ``forward``). Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: Optional[str] = None) -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT`` in the environment). Returns True when running with
    more than one process. Idempotent."""
    if is_distributed():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    logger.debug("rank %d/%d joined (%s)", rank(), world_size(), dist.get_backend())
    return world_size() > 1


def default_device(device: Optional[str] = None) -> torch.device:
    """``device`` if given; else the local GPU (``cuda:LOCAL_RANK``) when there is one, else CPU."""
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or "
                             f"cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no usable CUDA GPU (torch "
                             f"{torch.__version__}); use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if dev.type == "cuda" and dev.index is None and is_distributed():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks (one flat all-reduce)."""
    if not is_distributed() or world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).to(g.dtype)
        offset += n


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values to every rank (identical starting point)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EpochSampler(Sampler):
    """Training order that depends only on (seed, epoch) — so a resumed run sees the same batches
    as an uninterrupted one — split across ranks like ``DistributedSampler``: the permutation is
    padded to a multiple of the world size and rank r takes positions r, r+W, r+2W, ...

    With ``with_seeds`` it yields ``(index, sample_seed)``: the augmentation seed of the item at
    that position of the epoch (``sample_seed``), the same whatever the number of workers or
    processes, and whether or not the epoch was resumed mid-way. Call ``set_epoch`` before each
    epoch; ``start`` skips the items this rank already consumed (a mid-epoch resume).
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True,
                 num_replicas: Optional[int] = None, rank_: Optional[int] = None,
                 with_seeds: bool = False):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas if num_replicas is not None else world_size()
        self.rank = rank_ if rank_ is not None else rank()
        self.with_seeds = with_seeds
        self.epoch = 0
        self.start = 0
        self.per_rank = -(-num_items // self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator:
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.per_rank * self.num_replicas
        order += order[: total - len(order)]
        positions = range(self.rank + self.start * self.num_replicas, total, self.num_replicas)
        if not self.with_seeds:
            return iter(order[p] for p in positions)
        base = epoch_seed(self.seed, self.epoch)
        return iter((order[p], sample_seed(base, p)) for p in positions)

    def __len__(self) -> int:
        return self.per_rank - self.start


def sample_seed(epoch_base: int, position: int) -> int:
    """The augmentation seed of the item at ``position`` of an epoch seeded ``epoch_base``."""
    return (epoch_base * 6364136223846793005 + position * 1442695040888963407 + 1) % (2 ** 63 - 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for (run seed, epoch): data order, augmentation and worker RNG of that epoch."""
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2 ** 63 - 1)


def shard_indices(num_items: int) -> list[int]:
    """This rank's evaluation indices: r, r+W, ... (no padding, so no image counts twice)."""
    return list(range(rank(), num_items, world_size()))
