"""Few-shot sampling and base/new class subsampling exactly as Dassl and CoOp do them.

PROTOCOL.md 2.1: per label, in order of first appearance, ``random.sample(items, K)`` with
Python's stdlib generator seeded by the run seed; classes with fewer than K items keep all of
them. The train list is sampled first, then val with ``min(K, 4)``. A private
``random.Random(seed)`` produces the same stream as ``random.seed(seed)`` on the global
generator, so the subsets equal Dassl's without touching global state.

PROTOCOL.md 3: base classes are the first ``ceil(n/2)`` label ids, new classes the rest; records
are filtered and relabelled to ``0..m-1`` in original label order.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Dict, List, Sequence, Tuple

from .records import Record

logger = logging.getLogger(__name__)

SUBSAMPLE_CHOICES = ("all", "base", "new")


def group_by_label(records: Sequence[Record]) -> Dict[int, List[Record]]:
    """Records per label, labels in order of first appearance, items in stored order."""
    groups: Dict[int, List[Record]] = {}
    for record in records:
        groups.setdefault(record.label, []).append(record)
    return groups


def sample_fewshot(records: Sequence[Record], shots: int, rng: random.Random,
                   what: str = "train") -> List[Record]:
    """Dassl ``generate_fewshot_dataset`` for one list (``repeat=False``).

    ``rng`` is advanced exactly as the global ``random`` module would be. Returns the records
    unchanged when ``shots < 1``.
    """
    if shots < 1:
        return list(records)
    out: List[Record] = []
    short = []
    for label, items in group_by_label(records).items():
        if len(items) >= shots:
            out.extend(rng.sample(items, shots))
        else:
            out.extend(items)
            short.append((label, len(items)))
    if short:
        example = ", ".join(f"label {lab}: {n}" for lab, n in short[:3])
        logger.warning("%d classes have fewer than %d %s items and keep all of them (%s)",
                       len(short), shots, what, example)
    return out


def fewshot_split(train: Sequence[Record], val: Sequence[Record], shots: int,
                  seed: int) -> Tuple[List[Record], List[Record]]:
    """(train, val) few-shot subsets for ``seed``: train with K shots, then val with min(K, 4)."""
    rng = random.Random(seed)
    new_train = sample_fewshot(train, shots, rng, "train")
    new_val = sample_fewshot(val, min(shots, 4), rng, "val")
    return new_train, new_val


def base_new_labels(labels: Sequence[int], subsample: str) -> List[int]:
    """The original label ids kept by ``subsample`` (sorted): first ceil(n/2) for base."""
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    ordered = sorted(set(labels))
    if subsample == "all":
        return ordered
    m = math.ceil(len(ordered) / 2)
    return ordered[:m] if subsample == "base" else ordered[m:]


def subsample_records(records: Sequence[Record], selected: Sequence[int]) -> List[Record]:
    """Keep records whose label is in ``selected`` and relabel them to their index there."""
    relabel = {old: new for new, old in enumerate(selected)}
    return [Record(r.path, relabel[r.label], r.classname) for r in records if r.label in relabel]
