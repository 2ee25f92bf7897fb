"""Data: the 15 CoOp-family benchmarks read from users' folders unchanged, custom datasets from a
YAML file, Dassl-identical few-shot subsets, base/new classes, transforms and loaders.

    split = load_split("eurosat", "$DATA", shots=16, seed=1, subsample="base")
    bad = verify_images(split.train)      # [(path, reason)] of undecodable images, before training
    loader = build_loader(split.train, build_transform(train=True), batch_size=32, train=True)
"""

from .base import (Dataset, JsonSplitDataset, get_dataset, list_datasets, read_split_json,
                   register_dataset, write_split_json)
from .loader import ImageDataset, build_loader, collate_skip_bad
from .records import Record, Split, check_labels, read_dassl_pickle
from .splits import check_shots, dataset_name, is_dataset_file, load_split
from .transforms import CLIP_MEAN, CLIP_STD, build_transform
from .verify import BadImage, BadImageError, verify_images

from . import datasets  # noqa: E402,F401  (registers the benchmarks)

__all__ = ["BadImage", "BadImageError", "CLIP_MEAN", "CLIP_STD", "Dataset", "ImageDataset",
           "JsonSplitDataset", "Record", "Split", "build_loader", "build_transform",
           "check_labels", "check_shots", "collate_skip_bad", "dataset_name", "get_dataset",
           "is_dataset_file", "list_datasets", "load_split", "read_dassl_pickle",
           "read_split_json", "register_dataset", "verify_images", "write_split_json"]
