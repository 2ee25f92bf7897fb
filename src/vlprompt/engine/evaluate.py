"""Evaluation as Dassl's ``Classification`` evaluator computes it (PROTOCOL.md §7): top-1
accuracy over images, macro-F1 over the classes present in the labels (sklearn's
``f1_score(average="macro", labels=np.unique(y_true))``), per-class accuracy — all in percent.

Under ``torchrun`` each rank predicts the images r, r+W, ...; predictions are gathered by dataset
index on every rank, so each image counts exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed as D

logger = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting on a device (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision fp16 is not supported on CPU; use fp32 or bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


@torch.no_grad()
def predict(method, dataset: Dataset, batch_size: int = 100, device: Optional[torch.device] = None,
            precision: str = "auto", num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) for every item of ``dataset``, in dataset order, over all ranks."""
    device = device or method.device
    indices = D.shard_indices(len(dataset))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = method.training
    method.eval()
    labels, preds = [], []
    try:
        for images, targets in loader:
            with autocast(precision, device):
                logits = method(images.to(device, non_blocking=True))
            preds.append(logits.argmax(dim=-1).cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        method.train(was_training)
    local = (indices, torch.cat(preds).tolist() if preds else [],
             torch.cat(labels).tolist() if labels else [])
    n = len(dataset)
    all_labels = np.full(n, -1, dtype=np.int64)
    all_preds = np.full(n, -1, dtype=np.int64)
    for idx, p, y in D.all_gather_objects(local):
        all_preds[idx] = p
        all_labels[idx] = y
    if (all_labels < 0).any():
        raise RuntimeError("evaluation lost images while gathering predictions across ranks")
    return all_labels, all_preds


def evaluate_method(method, dataset: Dataset, classnames: Sequence[str], batch_size: int = 100,
                    device: Optional[torch.device] = None, precision: str = "auto",
                    num_workers: int = 0) -> dict:
    """Metrics of ``method`` on ``dataset`` (items ``(image, label)``): see ``compute_metrics``,
    plus ``classnames`` and ``time_s``."""
    start = time.time()
    labels, preds = predict(method, dataset, batch_size, device, precision, num_workers)
    result = compute_metrics(labels, preds, list(classnames))
    result["classnames"] = list(classnames)
    result["time_s"] = round(time.time() - start, 3)
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
    ]
