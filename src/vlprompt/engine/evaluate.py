"""Evaluation as Dassl's ``Classification`` evaluator computes it (PROTOCOL.md §7): top-1
accuracy over images, macro-F1 over the classes present in the labels (sklearn's
``f1_score(average="macro", labels=np.unique(y_true))``), per-class accuracy — all in percent.

Under ``torchrun`` each rank predicts the images r, r+W, ...; predictions are gathered by dataset
index on every rank, so each image counts exactly once. With ``skip_bad`` an image that cannot be
decoded is left out (every rank drops the same indices) and counted in ``num_skipped``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..data.verify import BadImage, BadImageError
from . import distributed as D

logger = logging.getLogger(__name__)

#: how many skipped paths an evaluation result lists (``num_skipped`` counts them all)
MAX_SKIPPED_LISTED = 100


#: ``auto`` on CPU: "1" uses bf16 autocast whatever the CPU, "0" never; unset: where the CPU
#: computes bf16 natively (``cpu_has_native_bf16``). The tests set "0", so their numbers do not
#: depend on the machine they run on.
CPU_BF16_ENV = "VLPROMPT_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast
    runs 3.5-4.6x faster than fp32 (README, "Performance"); elsewhere it is emulated, slower."""
    import os

    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting on a device (None = plain fp32).

    ``auto``: bf16 on GPUs that have it (else fp16); on CPU bf16 where the CPU computes it
    natively (its accuracy effect on the toy world is within seed-to-seed noise: README), fp32
    elsewhere. ``fp32`` reproduces a run exactly on any machine."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision fp16 is not supported on CPU; use fp32 or bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolved_precision(precision: str, device: torch.device) -> str:
    """What a precision setting runs as on ``device``: "fp32", "bf16" or "fp16" (recorded in a
    run's results, since ``auto`` depends on the machine)."""
    dtype = autocast_dtype(precision, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(precision: str, device: torch.device):
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_metrics(labels: np.ndarray, preds: np.ndarray, classnames: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class accuracy (percent) from integer labels and predictions."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    total = int(labels.size)
    correct = int((labels == preds).sum())
    f1s, per_class = [], {}
    for c in np.unique(labels):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        name = classnames[c] if c < len(classnames) else str(c)
        per_class[name] = 100.0 * tp / (tp + fn)
    return {
        "accuracy": 100.0 * correct / total if total else 0.0,
        "macro_f1": 100.0 * float(np.mean(f1s)) if f1s else 0.0,
        "per_class_accuracy": per_class,
        "mean_per_class_accuracy": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "num_images": total,
        "num_correct": correct,
    }


class Predictions(NamedTuple):
    """Labels and predictions of the decodable images (dataset order) and the skipped paths."""

    labels: np.ndarray
    preds: np.ndarray
    skipped: List[str]


class _Indexed(Dataset):
    """``i -> (dataset index, image or BadImage marker, label)`` over ``indices`` of ``dataset``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], skip_bad: bool):
        self.dataset, self.indices, self.skip_bad = dataset, list(indices), skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image, label = self.dataset[index]
        except BadImageError as err:
            if not (self.skip_bad and err.path):
                raise
            return index, BadImage(err.path, err.reason), -1
        return index, image, label


def _collate(batch: list):
    """(indices, images, labels) of the decodable items, plus (index, path) of the others."""
    good = [item for item in batch if not isinstance(item[1], BadImage)]
    bad = [(item[0], item[1].path) for item in batch if isinstance(item[1], BadImage)]
    if not good:
        return [], None, None, bad
    indices, images, labels = zip(*good)
    return list(indices), default_collate(list(images)), default_collate(list(labels)), bad


def _run_loader(method, loader: DataLoader, device: torch.device, precision: str) -> tuple:
    """This rank's (indices, predictions, labels, skipped (index, path))."""
    done, preds, labels, skipped = [], [], [], []
    try:
        for indices, images, targets, bad in loader:
            skipped.extend(bad)
            if not indices:
                continue
            with autocast(precision, device):
                logits = method(images.to(device, non_blocking=True))
            done.extend(indices)
            preds.extend(logits.argmax(dim=-1).cpu().tolist())
            labels.extend(torch.as_tensor(targets).cpu().tolist())
    except BadImageError as err:
        # from a worker the message carries its traceback: name the file in one line again
        raise (BadImageError(err.path, err.reason, err.dataset) if err.path else err) from None
    return done, preds, labels, skipped


@torch.no_grad()
def predict_with_skipped(method, dataset: Dataset, batch_size: int = 100,
                         device: Optional[torch.device] = None, precision: str = "auto",
                         num_workers: int = 0, skip_bad: bool = False) -> Predictions:
    """``predict`` plus the paths of the images it skipped (``skip_bad``, or an
    ``ImageDataset(skip_bad=True)``), which are left out of labels and predictions on every rank."""
    device = device or method.device
    indices = D.shard_indices(len(dataset))
    loader = DataLoader(_Indexed(dataset, indices, skip_bad), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    was_training = method.training
    method.eval()
    try:
        local = _run_loader(method, loader, device, precision)
    finally:
        method.train(was_training)
    return _gather(local, len(dataset))


def _gather(local: tuple, n: int) -> Predictions:
    """Every rank's predictions by dataset index; skipped indices are dropped on every rank."""
    all_labels = np.full(n, -1, dtype=np.int64)
    all_preds = np.full(n, -1, dtype=np.int64)
    skipped: dict = {}
    for idx, p, y, bad in D.all_gather_objects(local):
        all_preds[idx] = p
        all_labels[idx] = y
        skipped.update(bad)
    keep = np.ones(n, dtype=bool)
    keep[list(skipped)] = False
    if (all_labels[keep] < 0).any():
        raise RuntimeError("evaluation lost images while gathering predictions across ranks")
    return Predictions(all_labels[keep], all_preds[keep], [skipped[i] for i in sorted(skipped)])


def predict(method, dataset: Dataset, batch_size: int = 100, device: Optional[torch.device] = None,
            precision: str = "auto", num_workers: int = 0,
            skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) for every item of ``dataset``, in dataset order, over all ranks.

    An undecodable image raises a one-line ``BadImageError`` naming it; with ``skip_bad`` it is
    left out instead (``predict_with_skipped`` also returns the skipped paths).
    """
    out = predict_with_skipped(method, dataset, batch_size, device, precision, num_workers,
                               skip_bad)
    return out.labels, out.preds


def evaluate_method(method, dataset: Dataset, classnames: Sequence[str], batch_size: int = 100,
                    device: Optional[torch.device] = None, precision: str = "auto",
                    num_workers: int = 0, skip_bad: bool = False) -> dict:
    """Metrics of ``method`` on ``dataset`` (items ``(image, label)``): see ``compute_metrics``,
    plus ``classnames``, ``time_s``, ``num_skipped`` and ``skipped_files`` (the first
    ``MAX_SKIPPED_LISTED`` undecodable images left out with ``skip_bad``; not in ``num_images``)."""
    start = time.time()
    out = predict_with_skipped(method, dataset, batch_size, device, precision, num_workers,
                               skip_bad)
    result = compute_metrics(out.labels, out.preds, list(classnames))
    result["classnames"] = list(classnames)
    result["num_skipped"] = len(out.skipped)
    result["skipped_files"] = out.skipped[:MAX_SKIPPED_LISTED]
    result["time_s"] = round(time.time() - start, 3)
    if out.skipped:
        logger.info("skipped %d undecodable image(s), e.g. %s", len(out.skipped), out.skipped[0])
    return result


def format_result(result: dict) -> list[str]:
    """Dassl's result block (values to 1 decimal), which users' parse scripts read."""
    return [
        "=> result",
        f"* total: {result['num_images']:,}",
        f"* correct: {result['num_correct']:,}",
        f"* accuracy: {result['accuracy']:.1f}%",
        f"* error: {100.0 - result['accuracy']:.1f}%",
        f"* macro_f1: {result['macro_f1']:.1f}%",
    ] + ([f"* skipped: {result['num_skipped']:,} unreadable images"]
         if result.get("num_skipped") else [])
