"""Small procedurally drawn datasets in the exact on-disk layout of each benchmark.

Tests and demos need real folders without the real downloads. Every class gets its own colour
(evenly spread hues) and pattern (blob, stripes, checks, ring), and each image varies in
brightness, pattern phase and noise, so a model can learn the classes but not memorise one
picture. Class names are the real ones where vlprompt ships them.
"""

from __future__ import annotations

import colorsys
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .base import get_dataset
from .records import PathLike

logger = logging.getLogger(__name__)

DEFAULT_NUM_CLASSES = 10


def split_counts(images_per_class: int) -> Dict[str, int]:
    """CoOp's 50/20/30 split of a class (rounded), with at least one image in each split."""
    if images_per_class < 3:
        raise ValueError(f"images_per_class must be >= 3 (one per split), got {images_per_class}")
    n_train = max(1, round(0.5 * images_per_class))
    n_val = max(1, round(0.2 * images_per_class))
    n_test = images_per_class - n_train - n_val
    if n_test < 1:
        n_train -= 1
        n_test = 1
    return {"train": n_train, "val": n_val, "test": n_test}


class Painter:
    """``painter(label, serial) -> PIL image``: class-specific colour and pattern, per-image noise."""

    def __init__(self, num_classes: int, image_size: int = 32, seed: int = 0):
        self.num_classes, self.size, self.seed = max(1, num_classes), image_size, seed

    def colour(self, label: int) -> np.ndarray:
        hue = (label / self.num_classes + 0.07 * (label % 2)) % 1.0
        value = 0.95 if (label // 8) % 2 == 0 else 0.6
        return np.array(colorsys.hsv_to_rgb(hue, 0.9, value)) * 255.0

    def __call__(self, label: int, serial: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, label, serial])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s  # [S,S] in [0,1)
        base = self.colour(label) * rng.uniform(0.85, 1.1)
        accent = 255.0 - self.colour(label)
        phase = rng.uniform(0, 1)
        kind = label % 4
        if kind == 0:    # blob at a jittered centre
            cy, cx = rng.uniform(0.35, 0.65, size=2)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.06
        elif kind == 1:  # horizontal stripes
            mask = np.sin((yy + phase) * 2 * np.pi * 4) > 0
        elif kind == 2:  # checks
            mask = ((np.floor((yy + phase) * 4) + np.floor((xx + phase) * 4)) % 2) == 0
        else:            # vertical stripes
            mask = np.sin((xx + phase) * 2 * np.pi * 3) > 0.3
        img = np.empty((s, s, 3), np.float32)
        img[:] = base
        img[mask] = 0.65 * base + 0.35 * accent
        img += rng.normal(0, 8.0, size=img.shape)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_dataset(root: PathLike, name: str, num_classes: Optional[int] = None,
                  images_per_class: int = 10, image_size: int = 32, seed: int = 0,
                  classnames: Optional[Sequence[str]] = None) -> Path:
    """Write a synthetic copy of benchmark ``name`` under ``root`` and return its dataset folder.

    ``num_classes`` defaults to min(real class count, 10); class names are the real ones in label
    order when vlprompt ships them (else ``class_000``...), or ``classnames`` if given. Each class
    gets ``images_per_class`` images split 50/20/30 into train/val/test (test-only datasets put
    all of them in test). Then ``load_split(name, root)`` reads it like the real benchmark.
    """
    cls = get_dataset(name)
    ds = cls(root)
    if classnames is None:
        real = cls.default_classnames() or []
        n = num_classes if num_classes is not None else min(len(real) or DEFAULT_NUM_CLASSES,
                                                          DEFAULT_NUM_CLASSES)
        names: List[str] = list(real[:n]) + [f"class_{i:03d}" for i in range(len(real), n)]
    else:
        names = list(classnames)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} but {len(names)} classnames were given")
    if not names:
        raise ValueError("a synthetic dataset needs at least one class")
    counts = split_counts(images_per_class)
    if cls.test_only:
        counts = {"train": 0, "val": 0, "test": images_per_class}
    os.makedirs(ds.dataset_dir, exist_ok=True)
    ds.write_synthetic(names, counts, Painter(len(names), image_size, seed))
    logger.info("wrote synthetic %s (%d classes, %d images each) to %s", cls.name, len(names),
                images_per_class, ds.dataset_dir)
    return ds.dataset_dir
