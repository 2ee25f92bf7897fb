"""Torch dataset and data loader over records, with Dassl's loader settings (PROTOCOL.md 6)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from .records import Record


class ImageDataset(torch.utils.data.Dataset):
    """``records[i] -> (transform(path) [3,S,S], label)``."""

    def __init__(self, records: Sequence[Record], transform: Callable[[str], Tensor]):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        record = self.records[index]
        return self.transform(record.path), record.label


def build_loader(records: Sequence[Record], transform: Callable[[str], Tensor], batch_size: int,
                 train: bool, num_workers: int = 0, sampler: Optional[Sampler] = None,
                 seed: int = 0, pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader as Dassl builds it.

    Train: random order (a ``torch.Generator`` seeded with ``seed``, so the order is reproducible),
    ``drop_last = len(records) >= batch_size`` (keeps 1- and 2-shot loaders non-empty). Test:
    sequential, keep the last batch. ``pin_memory`` defaults to CUDA availability. Worker
    processes get torch seeds derived from the same generator, so train crops are reproducible.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = ImageDataset(records, transform)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=bool(train and len(dataset) >= batch_size),
                      pin_memory=pin_memory, generator=generator,
                      persistent_workers=False)
