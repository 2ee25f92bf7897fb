"""ImageNet-1k and its four test-only variants (PROTOCOL.md 1.4-1.5).

ImageNet: ``imagenet/images/{train,val}/<wnid>/`` with ``imagenet/classnames.txt``
(``<wnid> <name>``), labels = sorted wnid index, val used as test (and as val); or Dassl's
``imagenet/preprocessed.pkl``. Image order inside a class folder is ``os.listdir`` order as in
Dassl, so a sampled few-shot subset is cached under the vlprompt cache folder.
Variants read ``classnames.txt`` from their own folder: ImageNetV2 uses folders ``0..N-1`` (label =
line of classnames.txt); Sketch, A and R use their sorted wnid folders (A and R: 200 classes).
"""

import os
from pathlib import Path
from typing import ClassVar, Dict, List, Sequence, Tuple

from ...clip.templates import dataset_template
from ..base import (Dataset, DrawFn, atomic_write_text, listdir_nohidden, packaged_classnames,
                    read_imagenet_classnames, register_dataset, save_image)
from ..records import Record, check_labels, read_dassl_pickle


def split_wnid_names(entries: Sequence[str]) -> List[Tuple[str, str]]:
    """``"<wnid> <name>"`` entries (as shipped) -> (wnid, name); plain names get made-up wnids."""
    out = []
    for i, entry in enumerate(entries):
        head, _, rest = entry.partition(" ")
        if head.startswith("n") and head[1:].isdigit() and rest:
            out.append((head, rest))
        else:
            out.append((f"n{90000000 + i:08d}", entry))
    return out


def read_wnid_folders(split_dir: Path, names: Dict[str, str], owner: str,
                      sort_files: bool = False) -> List[Record]:
    """Dassl's ImageNet folder scan: sorted wnid folders give labels 0..n-1."""
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    records = []
    for label, wnid in enumerate(folders):
        if wnid not in names:
            raise ValueError(f"{owner}: folder {split_dir / wnid} has no line in classnames.txt")
        for imname in listdir_nohidden(split_dir / wnid, sort=sort_files):
            records.append(Record(str(split_dir / wnid / imname), label, names[wnid]))
    return records


def _write_classnames(path: Path, pairs: Sequence[Tuple[str, str]]) -> None:
    atomic_write_text(path, "".join(f"{w} {n}\n" for w, n in pairs))


@register_dataset
class ImageNet(Dataset):
    name = "imagenet"
    aliases = ("ImageNet",)
    folder = "imagenet"
    template = dataset_template("imagenet")
    num_classes = 1000
    val_is_test = True
    stable_order = False
    layout = ("imagenet/images/train/<wnid>/*.JPEG, imagenet/images/val/<wnid>/*.JPEG, "
              "imagenet/classnames.txt (or imagenet/preprocessed.pkl)")

    def read(self) -> Dict[str, List[Record]]:
        self.require_dir(self.dataset_dir)
        pkl = self.dataset_dir / "preprocessed.pkl"
        if pkl.is_file():
            data = read_dassl_pickle(pkl, self.dataset_dir, self.folder)
            if "train" not in data or "test" not in data:
                raise ValueError(f"{pkl}: expected 'train' and 'test' lists")
            check_labels(data, pkl)
            return {"train": data["train"], "val": [], "test": data["test"]}
        names = read_imagenet_classnames(self.dataset_dir / "classnames.txt")
        image_dir = self.dataset_dir / "images"
        train = read_wnid_folders(self.require_dir(image_dir / "train"), names, self.name)
        test = read_wnid_folders(self.require_dir(image_dir / "val", "validation images in "
                                                  "1000 wnid sub-folders"), names, self.name)
        return {"train": train, "val": [], "test": test}

    def write_synthetic(self, classnames: Sequence[str], counts: Dict[str, int],
                        draw: DrawFn) -> None:
        pairs = split_wnid_names(classnames)
        _write_classnames(self.dataset_dir / "classnames.txt", pairs)
        serial = 0
        n_train = counts.get("train", 0)
        n_test = counts.get("val", 0) + counts.get("test", 0)
        for label, (wnid, _) in enumerate(pairs):
            for i in range(n_train):
                save_image(draw(label, serial),
                           self.dataset_dir / "images" / "train" / wnid / f"{wnid}_{i + 1}.JPEG")
                serial += 1
            for _ in range(n_test):
                save_image(draw(label, serial), self.dataset_dir / "images" / "val" / wnid /
                           f"ILSVRC2012_val_{serial + 1:08d}.JPEG")
                serial += 1

    @classmethod
    def default_classnames(cls):
        return packaged_classnames("imagenet")


class _ImageNetVariant(Dataset):
    """Test-only ImageNet variant: wnid folders under ``image_dir`` + ``classnames.txt``."""

    image_dir: ClassVar[str] = ""
    template = dataset_template("imagenet")
    test_only = True
    class_list: ClassVar[str] = "imagenet"   # packaged list whose wnids the folders use

    def read(self) -> Dict[str, List[Record]]:
        self.require_dir(self.dataset_dir)
        names = read_imagenet_classnames(self.dataset_dir / "classnames.txt")
        image_root = self.require_dir(self.dataset_dir / self.image_dir)
        return {"train": [], "val": [],
                "test": read_wnid_folders(image_root, names, self.name, sort_files=True)}

    @classmethod
    def default_classnames(cls):
        return packaged_classnames(cls.class_list)

    def write_synthetic(self, classnames: Sequence[str], counts: Dict[str, int],
                        draw: DrawFn) -> None:
        pairs = split_wnid_names(classnames)
        # classnames.txt is ImageNet's full list (as users copy it); folders exist only for ours
        full = split_wnid_names(packaged_classnames("imagenet") or [])
        known = {w for w, _ in full}
        _write_classnames(self.dataset_dir / "classnames.txt",
                          full + [p for p in pairs if p[0] not in known])
        serial = 0
        for label, (wnid, _) in enumerate(pairs):
            for _ in range(counts.get("test", 0)):
                save_image(draw(label, serial),
                           self.dataset_dir / self.image_dir / wnid / f"img_{serial:06d}.jpg")
                serial += 1
        if self.image_dir in ("imagenet-a", "imagenet-r"):
            atomic_write_text(self.dataset_dir / self.image_dir / "README.txt", "synthetic\n")


@register_dataset
class ImageNetSketch(_ImageNetVariant):
    name = "imagenet_sketch"
    aliases = ("ImageNetSketch",)
    folder = "imagenet-sketch"
    image_dir = "images"
    num_classes = 1000
    layout = "imagenet-sketch/images/<wnid>/*.JPEG, imagenet-sketch/classnames.txt"


@register_dataset
class ImageNetA(_ImageNetVariant):
    name = "imagenet_a"
    aliases = ("ImageNetA",)
    folder = "imagenet-adversarial"
    image_dir = "imagenet-a"
    num_classes = 200
    class_list = "imagenet_a"
    layout = "imagenet-adversarial/imagenet-a/<wnid>/*.jpg (200), imagenet-adversarial/classnames.txt"


@register_dataset
class ImageNetR(_ImageNetVariant):
    name = "imagenet_r"
    aliases = ("ImageNetR",)
    folder = "imagenet-rendition"
    image_dir = "imagenet-r"
    num_classes = 200
    class_list = "imagenet_r"
    layout = "imagenet-rendition/imagenet-r/<wnid>/*.jpg (200), imagenet-rendition/classnames.txt"


@register_dataset
class ImageNetV2(_ImageNetVariant):
    name = "imagenetv2"
    aliases = ("ImageNetV2", "imagenet_v2")
    folder = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"
    num_classes = 1000
    layout = ("imagenetv2/imagenetv2-matched-frequency-format-val/{0..999}/*.jpeg, "
              "imagenetv2/classnames.txt (ImageNet's, in class-index order)")

    def read(self) -> Dict[str, List[Record]]:
        self.require_dir(self.dataset_dir)
        names = list(read_imagenet_classnames(self.dataset_dir / "classnames.txt").values())
        image_root = self.require_dir(self.dataset_dir / self.image_dir)
        present = {int(e.name) for e in os.scandir(image_root) if e.is_dir() and e.name.isdigit()}
        # the reference loops over all 1000 labels; a smaller copy may stop at its last folder
        n = max(present) + 1 if present else 0
        if n > len(names):
            raise ValueError(f"{self.name}: folder {n - 1} exceeds the {len(names)} classes of "
                             f"{self.dataset_dir / 'classnames.txt'}")
        records = []
        for label in range(n):
            class_dir = self.require_dir(image_root / str(label))
            for imname in listdir_nohidden(class_dir, sort=True):
                records.append(Record(str(class_dir / imname), label, names[label]))
        return {"train": [], "val": [], "test": records}

    def classnames(self, parts):
        names = list(read_imagenet_classnames(self.dataset_dir / "classnames.txt").values())
        n = max((r.label for r in parts["test"]), default=-1) + 1
        return names[:n]

    def write_synthetic(self, classnames: Sequence[str], counts: Dict[str, int],
                        draw: DrawFn) -> None:
        pairs = split_wnid_names(classnames)
        _write_classnames(self.dataset_dir / "classnames.txt", pairs)
        serial = 0
        for label in range(len(pairs)):
            for _ in range(counts.get("test", 0)):
                save_image(draw(label, serial), self.dataset_dir / self.image_dir / str(label) /
                           f"{serial:040x}.jpeg")
                serial += 1
