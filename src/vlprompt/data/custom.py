"""Custom datasets described by a YAML file, no code needed.

```yaml
name: my_birds                 # optional, defaults to the file name without .yaml
image_root: images             # relative paths resolve against the YAML's folder, always
# either a split_zhou JSON (paths relative to image_root) ...
split_file: split.json
# ... or class sub-folders: image_root/{train,val,test}/<class>/* ...
folders: {train: train, val: val, test: test}
# ... or one tree image_root/<class>/* split per class by ratios after a seeded shuffle
split_ratios: [0.5, 0.2, 0.3]
split_seed: 1
template: "a photo of a {}, a type of bird."   # optional
classnames: {blue_jay: "blue jay bird"}        # optional renames (folder/raw name -> new)
fewshot_dir: split_fewshot                     # optional folder of Dassl shot_K-seed_S.pkl files
```

Folder-based classes are sorted by name, labels follow that order and files are sorted, so the
split is reproducible.

Relative ``image_root``, ``split_file`` and ``fewshot_dir`` resolve against the folder of the YAML
file whatever the working directory and whatever ``--root`` says (a YAML needs no ``--root``, and
one given is ignored), so a YAML moved together with its data keeps working. ``name`` is the
dataset's name in results and run-folder names; it must not contain a path separator.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ..clip.templates import DEFAULT_TEMPLATE
from .base import SPLITS, Dataset, listdir_nohidden, read_split_json
from .records import PathLike, Record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_KEYS = {"name", "image_root", "split_file", "folders", "split_ratios", "split_seed", "template",
         "classnames", "fewshot_dir"}


def read_dataset_yaml(path: PathLike) -> Tuple[str, Dict[str, Any], Path]:
    """(name, settings, absolute path) of a dataset YAML, without looking at any image."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found (a dataset .yaml; see "
                                f"vlprompt.data.custom for its keys)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of dataset settings (name, image_root, ...)")
    return yaml_dataset_name(spec, str(path)), spec, path


def yaml_dataset_name(spec: Dict[str, Any], source: str) -> str:
    """The YAML's ``name:``, else the file stem; refused when it could not be a folder name."""
    raw = spec.get("name")
    name = str(raw).strip() if raw is not None and str(raw).strip() else Path(source).stem
    if any(c in name for c in "/\\") or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{source}: name {name!r} must not contain '/' or '\\' nor start "
                         f"with '.' (it names the run folders); e.g. name: my_birds")
    return name


def _images_in(folder: Path) -> List[str]:
    return [n for n in listdir_nohidden(folder, sort=True) if n.lower().endswith(IMAGE_EXTENSIONS)]


class CustomDataset(Dataset):
    """A dataset defined by a YAML file (see the module docstring)."""

    folder = ""

    def __init__(self, spec: Dict[str, Any], base_dir: PathLike, source: str = "<dict>"):
        unknown = set(spec) - _KEYS
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        if "image_root" not in spec:
            raise ValueError(f"{source}: 'image_root' is required (the folder with the images)")
        modes = [k for k in ("split_file", "folders", "split_ratios") if k in spec]
        if len(modes) > 1:
            raise ValueError(f"{source}: use only one of 'split_file', 'folders', 'split_ratios' "
                             f"(found {modes})")
        self.spec, self.source = spec, source
        self.base_dir = Path(os.path.abspath(os.fspath(base_dir)))
        super().__init__(self._resolve(spec["image_root"]))
        self.name = yaml_dataset_name(spec, source)  # type: ignore[misc]
        self.template = str(spec.get("template") or DEFAULT_TEMPLATE)  # type: ignore[misc]
        if "{}" not in self.template:
            raise ValueError(f"{source}: template {self.template!r} has no '{{}}' for the class name")
        renames = spec.get("classnames") or {}
        if not isinstance(renames, dict):
            raise ValueError(f"{source}: 'classnames' must map raw names to new names")
        self.renames = {str(k): str(v) for k, v in renames.items()}

    def _resolve(self, value: Any) -> Path:
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else self.base_dir / path

    @classmethod
    def from_yaml(cls, path: PathLike, root: Optional[PathLike] = None) -> "CustomDataset":
        """Read a dataset YAML. Relative paths resolve against the YAML's own folder; ``root`` is
        ignored (kept so callers may pass their ``--root`` unchanged)."""
        _, spec, path = read_dataset_yaml(path)
        return cls(spec, path.parent, str(path))

    @property
    def dataset_dir(self) -> Path:
        return self.root

    def fewshot_pickle(self, shots: int, seed: int) -> Path:
        fewshot_dir = self.spec.get("fewshot_dir")
        if not fewshot_dir:
            return self.root / "__no_fewshot_dir__" / f"shot_{shots}-seed_{seed}.pkl"
        return self._resolve(fewshot_dir) / f"shot_{shots}-seed_{seed}.pkl"

    def read(self) -> Dict[str, List[Record]]:
        self.require_dir(self.root, "image_root")
        if "split_file" in self.spec:
            parts = read_split_json(self._resolve(self.spec["split_file"]), self.root)
        elif "split_ratios" in self.spec:
            parts = self._read_ratio_split()
        else:
            parts = self._read_folders(self.spec.get("folders") or
                                       {s: s for s in SPLITS})
        if self.renames:
            parts = {s: [Record(r.path, r.label, self.renames.get(r.classname, r.classname))
                         for r in v] for s, v in parts.items()}
        return parts

    def _read_folders(self, folders: Dict[str, str]) -> Dict[str, List[Record]]:
        if not isinstance(folders, dict) or not set(folders) <= set(SPLITS) or "test" not in folders:
            raise ValueError(f"{self.source}: 'folders' must map train/val/test (test required) "
                             f"to sub-folders of image_root")
        dirs = {s: self.require_dir(self.root / str(f), f"{s} folder") for s, f in folders.items()}
        classes = sorted({c for d in dirs.values() for c in listdir_nohidden(d)
                          if (d / c).is_dir()})
        if not classes:
            raise ValueError(f"{self.source}: no class sub-folders under {list(dirs.values())}")
        label_of = {c: i for i, c in enumerate(classes)}
        parts: Dict[str, List[Record]] = {s: [] for s in SPLITS}
        for split, d in dirs.items():
            for c in sorted(x for x in listdir_nohidden(d) if (d / x).is_dir()):
                parts[split].extend(Record(str(d / c / n), label_of[c], c) for n in _images_in(d / c))
        return parts

    def _read_ratio_split(self) -> Dict[str, List[Record]]:
        ratios = self.spec["split_ratios"]
        if (not isinstance(ratios, (list, tuple)) or len(ratios) != 3
                or any(not isinstance(r, (int, float)) or r < 0 for r in ratios)
                or abs(sum(ratios) - 1.0) > 1e-6):
            raise ValueError(f"{self.source}: split_ratios must be three non-negative numbers "
                             f"[train, val, test] summing to 1, got {ratios!r}")
        rng = random.Random(int(self.spec.get("split_seed", 1)))
        classes = sorted(c for c in listdir_nohidden(self.root) if (self.root / c).is_dir())
        if not classes:
            raise ValueError(f"{self.source}: no class sub-folders under {self.root}")
        parts: Dict[str, List[Record]] = {s: [] for s in SPLITS}
        for label, c in enumerate(classes):
            names = _images_in(self.root / c)
            rng.shuffle(names)
            n_train = round(ratios[0] * len(names))
            n_val = round(ratios[1] * len(names))
            chunks = (names[:n_train], names[n_train:n_train + n_val], names[n_train + n_val:])
            for split, chunk in zip(SPLITS, chunks):
                parts[split].extend(Record(str(self.root / c / n), label, c) for n in chunk)
        return parts
