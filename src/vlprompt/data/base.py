"""Dataset readers: the base class, the split_zhou JSON reader and the dataset registry.

A dataset class knows its folder under the data root, how to read the full train/val/test lists
(original labels, stored order) and how to lay out a synthetic copy of itself. Everything else
(few-shot subsets, base/new subsampling, file checks) is shared and lives in ``splits.py``.
A new benchmark stored as a split_zhou JSON is a subclass of :class:`JsonSplitDataset` setting
six class attributes, in a new module of ``vlprompt/data/datasets/``.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from ..clip.templates import DEFAULT_TEMPLATE
from ..fileio import atomic_write_text  # noqa: F401 (re-exported to the dataset modules)
from .records import PathLike, Record, check_labels

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: draw(label, index) -> PIL image; used by the synthetic writers
DrawFn = Callable[[int, int], "object"]


def listdir_nohidden(path: PathLike, sort: bool = False) -> List[str]:
    """Entries of ``path`` not starting with a dot (Dassl's helper; unsorted unless ``sort``)."""
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    return sorted(names) if sort else names


def packaged_classnames(name: str) -> Optional[List[str]]:
    """The class names shipped in ``vlprompt/data/classnames/<name>.txt`` (None if absent)."""
    try:
        text = resources.files("vlprompt.data").joinpath("classnames", f"{name}.txt").read_text(
            encoding="utf-8")
    except (FileNotFoundError, OSError):
        return None
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


def read_imagenet_classnames(path: PathLike) -> Dict[str, str]:
    """``classnames.txt`` (``<wnid> <name with spaces>`` per line) as an ordered dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it lists '<wnid> <class name>' per line "
                                f"(CoOp's ImageNet classnames.txt)")
    out: Dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.strip().split(" ")
        if not parts or not parts[0]:
            continue
        if len(parts) < 2:
            raise ValueError(f"{path}:{n}: expected '<wnid> <class name>', got {line!r}")
        out[parts[0]] = " ".join(parts[1:])
    return out


class Dataset:
    """Base class of a benchmark reader (subclass, set the class attributes, implement ``read``)."""

    name: ClassVar[str] = ""                 # vlprompt name, e.g. "eurosat"
    folder: ClassVar[str] = ""               # folder under the data root, e.g. "eurosat"
    aliases: ClassVar[Tuple[str, ...]] = ()  # other spellings (Dassl config names)
    num_classes: ClassVar[Optional[int]] = None  # of the real benchmark (for listings)
    template: ClassVar[str] = DEFAULT_TEMPLATE
    test_only: ClassVar[bool] = False        # ImageNet variants: evaluation only
    val_is_test: ClassVar[bool] = False      # ImageNet: no val split, val = test
    stable_order: ClassVar[bool] = True      # False: item order depends on the filesystem
    layout: ClassVar[str] = ""               # expected files, for listings and errors

    def __init__(self, root: PathLike):
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.folder

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> Dict[str, List[Record]]:
        """Full ``{"train", "val", "test"}`` lists with original labels in stored order."""
        raise NotImplementedError

    def classnames(self, parts: Dict[str, List[Record]]) -> List[str]:
        """Raw class names indexed by label, from the records (consistent names required)."""
        names: Dict[int, str] = {}
        for split in SPLITS:
            for r in parts.get(split, []):
                known = names.setdefault(r.label, r.classname)
                if known != r.classname:
                    raise ValueError(f"{self.name}: label {r.label} has two class names, "
                                     f"{known!r} and {r.classname!r}")
        if not names:
            return []
        n = max(names) + 1
        gaps = [i for i in range(n) if i not in names]
        if gaps:
            raise ValueError(f"{self.name}: labels must be 0..{n - 1} without gaps; "
                             f"no item has label(s) {gaps[:5]}")
        return [names[i] for i in range(n)]

    def require_dir(self, path: Path, what: str = "") -> Path:
        if not path.exists():
            hint = f" Expected layout: {self.layout}" if self.layout else ""
            raise FileNotFoundError(f"{self.name}: {path} not found{(' (' + what + ')') if what else ''}."
                                    f" Is --root the folder that contains '{self.folder}/'?{hint}")
        return path

    def fewshot_pickle(self, shots: int, seed: int) -> Path:
        """Where Dassl keeps the few-shot subset of this dataset (read-only for vlprompt)."""
        return self.dataset_dir / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"

    # -- synthetic data ------------------------------------------------------------------------
    @classmethod
    def default_classnames(cls) -> Optional[List[str]]:
        """Real raw class names in label order when vlprompt ships them, else None."""
        return packaged_classnames(cls.name)

    def write_synthetic(self, classnames: Sequence[str], counts: Dict[str, int],
                        draw: DrawFn) -> None:
        """Write ``counts[split]`` images per class in this dataset's real layout."""
        raise NotImplementedError(f"{self.name} has no synthetic writer")


def save_image(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    image.save(path, format=fmt, quality=95) if fmt == "JPEG" else image.save(path, format=fmt)


def read_split_json(path: PathLike, image_root: PathLike) -> Dict[str, List[Record]]:
    """Read a split_zhou JSON (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``).

    Keeps item order (few-shot sampling depends on it). Malformed files, and labels that name no
    class (outside 0..n-1 for the n distinct labels, one label with two class names or one class
    name with two labels), raise a
    one-line ``ValueError`` naming the file, the split and the first offending item.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found (the split_zhou JSON from the "
                                f"CoOp DATASETS.md downloads)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict) or not set(SPLITS) <= set(obj):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected an object with keys 'train', 'val', 'test'; found {found}")
    root = os.fspath(image_root)
    out: Dict[str, List[Record]] = {}
    for split in SPLITS:
        items = obj[split]
        if not isinstance(items, list):
            raise ValueError(f"{path}: '{split}' must be a list of [path, label, classname]")
        records = []
        for i, item in enumerate(items):
            ok = (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
                  and isinstance(item[2], str))
            label = _int_label(item[1]) if ok else None
            if label is None:
                raise ValueError(f"{path}: {split}[{i}] = {item!r} is not "
                                 f"[relative_path, label >= 0, classname]")
            records.append(Record(os.path.join(root, item[0]), label, item[2]))
        out[split] = records
    check_labels(out, path, unique_names=True)
    return out


def _int_label(value: object) -> Optional[int]:
    """An integral label (``3`` or ``"3"``; not ``True`` or ``2.5``), else None."""
    if isinstance(value, bool):
        return None
    try:
        label = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return label if label == value or str(label) == str(value).strip() else None


def write_split_json(path: PathLike, parts: Dict[str, List[Tuple[str, int, str]]]) -> None:
    """Write a split_zhou JSON with Dassl's formatting (indent 4)."""
    obj = {s: [list(t) for t in parts.get(s, [])] for s in SPLITS}
    atomic_write_text(path, json.dumps(obj, indent=4, separators=(",", ": ")))


class JsonSplitDataset(Dataset):
    """A benchmark stored as ``<folder>/<image_dir>/...`` plus ``<folder>/<split_file>``."""

    image_dir: ClassVar[str] = "images"  # JSON paths are relative to this ("" = dataset folder)
    split_file: ClassVar[str] = ""       # e.g. "split_zhou_EuroSAT.json"

    @property
    def image_root(self) -> Path:
        return self.dataset_dir / self.image_dir if self.image_dir else self.dataset_dir

    @property
    def split_path(self) -> Path:
        return self.dataset_dir / self.split_file

    def read(self) -> Dict[str, List[Record]]:
        self.require_dir(self.dataset_dir)
        if not self.split_path.is_file():
            raise FileNotFoundError(f"{self.name}: split file {self.split_path} not found; "
                                    f"download {self.split_file} (CoOp DATASETS.md) into "
                                    f"{self.dataset_dir}")
        return read_split_json(self.split_path, self.image_root)

    # synthetic layout: override ``synthetic_relpath`` for datasets with their own file naming
    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        """Relative image path of a synthetic item (``serial`` is unique in the dataset)."""
        stem = classname.replace(" ", "_").replace("/", "_")
        return f"{stem}/{stem}_{serial:05d}.jpg"

    def write_synthetic(self, classnames: Sequence[str], counts: Dict[str, int],
                        draw: DrawFn) -> None:
        parts: Dict[str, List[Tuple[str, int, str]]] = {s: [] for s in SPLITS}
        serial = 0
        for split in SPLITS:
            for label, name in enumerate(classnames):
                for _ in range(counts.get(split, 0)):
                    rel = self.synthetic_relpath(name, label, split, serial)
                    save_image(draw(label, serial), self.image_root / rel)
                    parts[split].append((rel, label, name))
                    serial += 1
        write_split_json(self.split_path, parts)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Type[Dataset]] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_dataset(cls: Type[Dataset]) -> Type[Dataset]:
    """Class decorator: make ``cls`` loadable by ``cls.name`` (and its aliases)."""
    if not cls.name or not cls.folder:
        raise ValueError(f"{cls.__name__}: set the class attributes 'name' and 'folder'")
    for key in (cls.name, *cls.aliases):
        existing = _REGISTRY.get(_key(key))
        if existing is not None and existing is not cls:
            raise ValueError(f"dataset name {key!r} is already registered by {existing.__name__}")
    for key in (cls.name, *cls.aliases):
        _REGISTRY[_key(key)] = cls
    return cls


def get_dataset(name: str) -> Type[Dataset]:
    """The dataset class registered as ``name`` (case-insensitive; Dassl names work too)."""
    try:
        return _REGISTRY[_key(name)]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())} "
                       f"(or pass a dataset .yaml file)") from None


def list_datasets() -> List[str]:
    """Registered dataset names (aliases excluded), sorted."""
    return sorted({cls.name for cls in _REGISTRY.values()})
