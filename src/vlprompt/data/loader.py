"""Torch dataset and data loader over records, with Dassl's loader settings (PROTOCOL.md 6)."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler, default_collate

from .records import Record
from .verify import DECODE_ERRORS, BadImage, BadImageError, describe_error


class ImageDataset(torch.utils.data.Dataset):
    """``records[i] -> (transform(path) [3,S,S], label)``.

    An image that cannot be decoded raises a one-line :class:`BadImageError` naming the file
    (``dataset`` names the dataset in its hint); with ``skip_bad`` it yields
    ``(BadImage(path, reason), label)`` instead, which :func:`collate_skip_bad` drops.
    """

    def __init__(self, records: Sequence[Record], transform: Callable[[str], Tensor],
                 skip_bad: bool = False, dataset: Optional[str] = None):
        self.records = list(records)
        self.transform = transform
        self.skip_bad = skip_bad
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tuple[Union[Tensor, BadImage], int]:
        record = self.records[index]
        try:
            image = self.transform(record.path)
        except DECODE_ERRORS as err:
            if isinstance(err, BadImageError):
                raise
            reason = describe_error(err)
            if not self.skip_bad:
                raise BadImageError(record.path, reason, self.dataset) from err
            return BadImage(record.path, reason), record.label
        return image, record.label


def split_bad(batch: Sequence[tuple]) -> Tuple[List[tuple], List[BadImage]]:
    """(items whose first element is an image, the :class:`BadImage` markers) of a batch."""
    good = [item for item in batch if not isinstance(item[0], BadImage)]
    bad = [item[0] for item in batch if isinstance(item[0], BadImage)]
    return good, bad


def collate_skip_bad(batch: Sequence[tuple]):
    """``default_collate`` of the items that are not :class:`BadImage` markers; None when no item
    of the batch could be decoded (callers skip such batches)."""
    good, _ = split_bad(batch)
    return default_collate(good) if good else None


def build_loader(records: Sequence[Record], transform: Callable[[str], Tensor], batch_size: int,
                 train: bool, num_workers: int = 0, sampler: Optional[Sampler] = None,
                 seed: int = 0, pin_memory: Optional[bool] = None,
                 skip_bad: bool = False) -> DataLoader:
    """A DataLoader as Dassl builds it.

    Train: random order (a ``torch.Generator`` seeded with ``seed``, so the order is reproducible),
    ``drop_last = len(records) >= batch_size`` (keeps 1- and 2-shot loaders non-empty). Test:
    sequential, keep the last batch. ``pin_memory`` defaults to CUDA availability. Worker
    processes get torch seeds derived from the same generator, so train crops are reproducible.
    ``skip_bad`` drops undecodable images from their batch (a batch of only such images is None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = ImageDataset(records, transform, skip_bad=skip_bad)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=bool(train and len(dataset) >= batch_size),
                      pin_memory=pin_memory, generator=generator,
                      persistent_workers=False,
                      collate_fn=collate_skip_bad if skip_bad else None)
