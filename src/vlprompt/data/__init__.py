"""Data: the 15 CoOp-family benchmarks read from users' folders unchanged, custom datasets from a
YAML file, Dassl-identical few-shot subsets, base/new classes, transforms and loaders.

    split = load_split("eurosat", "$DATA", shots=16, seed=1, subsample="base")
    loader = build_loader(split.train, build_transform(train=True), batch_size=32, train=True)
"""

from .base import (Dataset, JsonSplitDataset, get_dataset, list_datasets, read_split_json,
                   register_dataset, write_split_json)
from .loader import ImageDataset, build_loader
from .records import Record, Split, read_dassl_pickle
from .splits import load_split
from .transforms import CLIP_MEAN, CLIP_STD, build_transform

from . import datasets  # noqa: E402,F401  (registers the benchmarks)

__all__ = ["CLIP_MEAN", "CLIP_STD", "Dataset", "ImageDataset", "JsonSplitDataset", "Record",
           "Split", "build_loader", "build_transform", "get_dataset", "list_datasets", "load_split",
           "read_dassl_pickle", "read_split_json", "register_dataset", "write_split_json"]
