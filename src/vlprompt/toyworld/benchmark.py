"""The ``toyworld`` benchmark: a base-to-new dataset in the CoOp/Dassl layout.

Classes are colour × shape pairs ("red star"). Base and new classes are disjoint combinations of
the same attributes: every colour and every shape occurs in both halves, but no pair does. Labels
``0 .. n_base-1`` are the base classes, so the protocol's rule (first ``ceil(n/2)`` labels are base,
PROTOCOL.md §3) splits them exactly. Images use the ``"benchmark"`` drawing style (a distribution
shift from pretraining). Layout under ``<root>/toyworld/``: ``images/<class>/<n>.png`` and
``split_toyworld.json`` with the split_zhou schema (PROTOCOL.md §1.3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..data.base import write_split_json
from ..fileio import make_temp_dir
from . import world
from .version import TOYWORLD_VERSION

logger = logging.getLogger(__name__)

DATASET_DIR = "toyworld"
IMAGE_DIR = "images"
SPLIT_FILE = "split_toyworld.json"
TEMPLATE = "a photo of a {}."


def class_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(base pairs, new pairs) of (colour, shape) indices.

    With 8 colours and 8 shapes, base = pairs with (colour + shape) mod 8 in {0, 1} and new = pairs
    with (colour + shape) mod 8 in {4, 5}: 16 each, every colour and shape twice in each half,
    no pair in both.
    """
    n_c, n_s = len(world.COLOURS), len(world.SHAPES)
    base = [(c, s) for c in range(n_c) for s in range(n_s) if (c + s) % n_s in (0, 1)]
    new = [(c, s) for c in range(n_c) for s in range(n_s) if (c + s) % n_s in (4, 5)]
    return base, new


def classnames() -> list[str]:
    """Class names in label order (base first)."""
    base, new = class_pairs()
    return [world.class_name(c, s) for c, s in base + new]


@dataclass
class BenchmarkConfig:
    """Size of the written benchmark (per class) and the drawing seed."""

    image_size: int = 32
    train_per_class: int = 16
    val_per_class: int = 4
    test_per_class: int = 25
    seed: int = 1

    def key(self) -> str:
        blob = json.dumps({"config": asdict(self), "toyworld": TOYWORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_benchmark(root: Union[str, os.PathLike], config: BenchmarkConfig = BenchmarkConfig(),
                    overwrite: bool = False) -> Path:
    """Write the benchmark under ``<root>/toyworld`` and return that folder.

    A folder written with the same config (recorded in ``toyworld.json``) is reused; one written
    by another toy-world config is replaced; a folder that the toy world did not write is replaced
    only with ``overwrite`` (else ``ValueError`` names it). The folder is built next to its
    destination and moved into place, so it is never half-written.
    """
    root = Path(root).expanduser().absolute()
    target = root / DATASET_DIR
    stamp = {"toyworld_version": TOYWORLD_VERSION, "config": asdict(config), "key": config.key()}
    if target.exists():
        try:
            existing = json.loads((target / "toyworld.json").read_text())
        except (OSError, ValueError):
            existing = None
        if existing == stamp:
            logger.info("reusing the toy benchmark in %s", target)
            return target
        if existing is None and not overwrite:
            raise ValueError(f"{target} exists and was not written by the toy world; remove it, "
                             f"choose another data root, or pass overwrite=True")
        logger.warning("replacing the toy benchmark in %s (written with another config)", target)
    root.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 would make the published folder unreadable to the group
    tmp = make_temp_dir(root, ".toyworld-")
    try:
        rng = np.random.default_rng(config.seed)
        names = classnames()
        base, new = class_pairs()
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        counts = {"train": config.train_per_class, "val": config.val_per_class,
                  "test": config.test_per_class}
        for label, (colour, shape) in enumerate(base + new):
            folder = names[label].replace(" ", "_")
            (tmp / IMAGE_DIR / folder).mkdir(parents=True)
            total = sum(counts.values())
            specs = world.sample_specs(total, rng, pairs=[(colour, shape)])
            images = world.draw(specs, config.image_size, "benchmark", rng)
            i = 0
            for part, n in counts.items():
                for _ in range(n):
                    rel = f"{folder}/{i:04d}.png"
                    Image.fromarray(images[i]).save(tmp / IMAGE_DIR / rel)
                    split[part].append([rel, label, names[label]])
                    i += 1
        write_split_json(tmp / SPLIT_FILE, split)
        with open(tmp / "toyworld.json", "w") as f:
            json.dump(stamp, f, indent=2)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("wrote the toy benchmark (%d classes) to %s", len(names), target)
    return target
