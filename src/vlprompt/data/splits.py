"""``load_split``: read a dataset, take its few-shot subset and its base/new classes.

Order of operations as in every CoOp-family loader (PROTOCOL.md 3): read the full split ->
few-shot over all classes (an existing Dassl ``split_fewshot`` pickle wins, else sampled as Dassl
samples) -> base/new subsampling of train, val and test -> file checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from .base import Dataset, atomic_write_text, get_dataset
from .fewshot import base_new_labels, fewshot_split, subsample_records
from .records import PathLike, Record, Split, check_files, check_labels, read_dassl_pickle

logger = logging.getLogger(__name__)


DATASET_FILE_SUFFIXES = (".yaml", ".yml")


def is_dataset_file(spec: Union[str, PathLike]) -> bool:
    """True when ``spec`` names a custom dataset YAML file rather than a registered dataset."""
    return os.fspath(spec).lower().endswith(DATASET_FILE_SUFFIXES)


def resolve_dataset(dataset: Union[str, PathLike, Dataset], root: Optional[PathLike]) -> Dataset:
    """A dataset instance for a registered name, a dataset ``.yaml`` file or an instance.

    A YAML needs no ``root``: its paths resolve against the YAML file's own folder, and ``root``
    is ignored for it.
    """
    if isinstance(dataset, Dataset):
        return dataset
    text = os.fspath(dataset)
    if is_dataset_file(text):
        from .custom import CustomDataset

        return CustomDataset.from_yaml(text)
    cls = get_dataset(text)
    if root is None:
        raise ValueError(f"{cls.name}: a data root is needed (the folder that contains "
                         f"'{cls.folder}/'); pass --root")
    return cls(root)


def dataset_name(spec: Union[str, PathLike], root: Optional[PathLike] = None) -> str:
    """The dataset's name without reading any image: the registered name (``EuroSAT`` ->
    ``eurosat``), or a YAML's ``name:`` (default: the file stem). Use it for folder names,
    never the raw spec (``my.yaml`` or a path). ``root`` is accepted for symmetry and unused."""
    if is_dataset_file(spec):
        from .custom import read_dataset_yaml

        return read_dataset_yaml(spec)[0]
    return get_dataset(os.fspath(spec)).name


def check_shots(shots: int) -> int:
    """``shots`` if it is -1 (all images) or >= 1; else a one-line ``ValueError``."""
    try:
        value = operator.index(shots)  # ints, numpy ints; not 2.5 or "16"
    except TypeError:
        value = None
    if value is None or isinstance(shots, bool) or (value != -1 and value < 1):
        raise ValueError(f"shots must be -1 (all images) or >= 1, got {shots!r}")
    return value


def _fewshot_cache_path(ds: Dataset, shots: int, seed: int) -> Path:
    from ..clip.load import cache_dir

    digest = hashlib.sha1(str(ds.dataset_dir).encode()).hexdigest()[:10]
    return cache_dir() / "fewshot" / f"{ds.name}-{digest}" / f"shot_{shots}-seed_{seed}.json"


def _load_cached(path: Path, ds: Dataset, num_classes: int) -> Optional[Dict[str, List[Record]]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        base = ds.dataset_dir
        parts = {k: [Record(str(base / p), int(y), c) for p, y, c in v] for k, v in obj.items()}
        check_labels(parts, path, num_classes)
        return parts
    except (OSError, ValueError, TypeError) as err:
        logger.warning("ignoring unreadable few-shot cache %s (%s)", path, err)
        return None


def _save_cached(path: Path, ds: Dataset, parts: Dict[str, List[Record]]) -> None:
    base = ds.dataset_dir
    obj = {k: [[os.path.relpath(r.path, base), r.label, r.classname] for r in v]
           for k, v in parts.items()}
    try:
        atomic_write_text(path, json.dumps(obj))
    except OSError as err:  # a read-only cache must not stop training
        logger.warning("could not write few-shot cache %s (%s)", path, err)


def fewshot_source(ds: Dataset, shots: int, seed: int) -> str:
    """Where the few-shot subset would come from: 'pickle', 'cache' or 'sampled'."""
    if ds.fewshot_pickle(shots, seed).is_file():
        return "pickle"
    if not ds.stable_order and _fewshot_cache_path(ds, shots, seed).is_file():
        return "cache"
    return "sampled"


def take_fewshot(ds: Dataset, parts: Dict[str, List[Record]], shots: int,
                 seed: int, num_classes: Optional[int] = None) -> tuple:
    """(train, val, source) few-shot lists with original labels. ``num_classes`` (default: from
    ``parts``) bounds the labels of a Dassl pickle or cache."""
    if num_classes is None:
        num_classes = len(ds.classnames(parts))
    pkl = ds.fewshot_pickle(shots, seed)
    if pkl.is_file():
        logger.info("Loading preprocessed few-shot data from %s", pkl)
        data = read_dassl_pickle(pkl, ds.dataset_dir, ds.folder)
        if "train" not in data:
            raise ValueError(f"{pkl}: no 'train' list in the few-shot pickle")
        check_labels(data, pkl, num_classes)
        return data["train"], data.get("val", parts["val"]), "pickle"
    cache = _fewshot_cache_path(ds, shots, seed)
    if not ds.stable_order and cache.is_file():
        cached = _load_cached(cache, ds, num_classes)
        if cached is not None and "train" in cached:
            logger.info("Loading cached few-shot data from %s", cache)
            return cached["train"], cached.get("val", parts["val"]), "cache"
    train, val = fewshot_split(parts["train"], parts["val"], shots, seed)
    if not ds.stable_order:
        # the item order came from os.listdir: keep the sample so later runs see the same one
        _save_cached(cache, ds, {"train": train, "val": val})
    return train, val, "sampled"


def load_split(dataset: Union[str, PathLike, Dataset], root: Optional[PathLike] = None,
               shots: int = -1, seed: int = 1, subsample: str = "all",
               skip_missing: bool = False) -> Split:
    """Load ``dataset`` (a registered name or a dataset ``.yaml``) from ``root``.

    ``shots >= 1`` takes the Dassl few-shot subset for ``seed`` (train K per class, val
    min(K, 4)), ``-1`` keeps every image; ``subsample`` is ``all``, ``base`` (first ceil(n/2)
    labels) or ``new``. Nothing is written into the data root. Missing image files raise
    ``FileNotFoundError`` unless ``skip_missing``. A YAML dataset needs no ``root``.
    """
    check_shots(shots)
    ds = resolve_dataset(dataset, root)
    parts = ds.read()
    raw_names = ds.classnames(parts)
    info: Dict[str, object] = {"dataset_dir": str(ds.dataset_dir), "shots": shots, "seed": seed,
                               "subsample": subsample, "fewshot_source": None}
    train, val, test = parts["train"], parts["val"], parts["test"]
    if shots >= 1 and ds.test_only:
        logger.warning("%s is evaluation-only; ignoring shots=%d", ds.name, shots)
    elif shots >= 1:
        train, val, source = take_fewshot(ds, parts, shots, seed, len(raw_names))
        info["fewshot_source"] = source

    if subsample == "all":
        base_new_labels([], subsample)  # validates the value
        selected = list(range(len(raw_names)))
    else:
        selected = base_new_labels([r.label for r in train] or range(len(raw_names)), subsample)
        train, val, test = (subsample_records(x, selected) for x in (train, val, test))
    if ds.val_is_test:
        val = test
    classnames = [raw_names[i].replace("_", " ") for i in selected]

    train = check_files(train, ds.name, skip_missing, "train images")
    if val is not test:
        val = check_files(val, ds.name, skip_missing, "val images")
    test = check_files(test, ds.name, skip_missing, "test images")
    if ds.val_is_test:
        val = test
    return Split(dataset=ds.name, train=list(train), val=list(val), test=list(test),
                 classnames=classnames, template=ds.template, info=info)
