"""Records, splits and the Dassl pickles users already have (PROTOCOL.md sections 1-2).

Dassl stores few-shot subsets and ImageNet's folder scan as pickles of
``dassl.data.datasets.base_dataset.Datum`` objects with absolute paths. ``read_dassl_pickle``
loads them without dassl installed (a restricted unpickler maps that one class to a shim) and
rebases the paths when the data root has moved since the pickle was written.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Record:
    """One image: absolute ``path``, integer ``label`` and the raw class name as the split file
    stores it (underscores kept; ``Split.classnames`` holds the display form)."""

    path: str
    label: int
    classname: str


@dataclass
class Split:
    """A loaded dataset split. ``classnames[i]`` is the display name (``_`` -> space) of label ``i``;
    ``template`` is the dataset's hand-crafted prompt (``{}`` marks the class name)."""

    dataset: str
    train: List[Record]
    val: List[Record]
    test: List[Record]
    classnames: List[str]
    template: str = "a photo of a {}."
    info: Dict[str, object] = field(default_factory=dict)  # how it was built (shots, seed, sources)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def check_labels(parts: Dict[str, Sequence[Record]], source: PathLike,
                 num_classes: Optional[int] = None, unique_names: bool = False) -> None:
    """Refuse a label that names no class, and a label stored with two class names (with
    ``unique_names`` also a class name stored with two labels, e.g. an off-by-one label).

    ``num_classes`` defaults to the number of distinct labels in ``parts``, so labels must then be
    0..n-1 without gaps. Raises a one-line ``ValueError`` naming ``source``, the split, the item
    and the valid range (a bad label otherwise fails deep inside the loss, or trains silently).
    """
    n = num_classes if num_classes is not None else len(
        {r.label for records in parts.values() for r in records})
    by_label: Dict[int, tuple] = {}
    by_name: Dict[str, tuple] = {}
    for split, records in parts.items():
        for i, r in enumerate(records):
            item = f"{source}: {split}[{i}] ({r.path}, label {r.label})"
            if not 0 <= r.label < n:
                raise ValueError(f"{item} names no class: labels must be 0..{n - 1} ({n} "
                                 f"classes); fix the label or remove the item")
            if not r.classname:
                continue
            name, where = by_label.setdefault(r.label, (r.classname, f"{split}[{i}]"))
            if name != r.classname:
                raise ValueError(f"{item} is {r.classname!r} but {where} has label {r.label} "
                                 f"as {name!r}; one label, one class name")
            label, where = by_name.setdefault(r.classname, (r.label, f"{split}[{i}]"))
            if unique_names and label != r.label:
                raise ValueError(f"{item} is {r.classname!r} but {where} has {r.classname!r} "
                                 f"as label {label}; one class name, one label")


# ----------------------------------------------------------------------------------------------
# Dassl pickles
# ----------------------------------------------------------------------------------------------
class _DatumShim:
    """Stands in for ``dassl.data.datasets.base_dataset.Datum``; pickle fills ``__dict__``."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


_DATUM_MODULE = "dassl.data.datasets.base_dataset"
# Builtins a Datum pickle may legitimately reference; anything else is refused.
_SAFE_BUILTINS = {("builtins", "object"), ("collections", "OrderedDict"), ("builtins", "dict"),
                  ("builtins", "list"), ("copyreg", "_reconstructor")}


class _DasslUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if module == _DATUM_MODULE and name == "Datum":
            return _DatumShim
        if (module, name) in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a Dassl split pickle")


def rebase_path(path: str, dataset_dir: PathLike, folder: str) -> str:
    """Map an absolute path recorded on another machine onto ``dataset_dir``.

    The last ``/<folder>/`` component in the recorded path marks the dataset folder; the rest is
    joined onto ``dataset_dir``. Paths without that marker are returned unchanged.
    """
    norm = path.replace("\\", "/")
    marker = f"/{folder.strip('/')}/"
    cut = norm.rfind(marker)
    if cut < 0:
        if norm.startswith(folder.strip("/") + "/"):
            return os.path.join(os.fspath(dataset_dir), norm[len(folder.strip("/")) + 1:])
        return path
    return os.path.join(os.fspath(dataset_dir), norm[cut + len(marker):])


def read_dassl_pickle(pkl: PathLike, dataset_dir: Optional[PathLike] = None,
                      folder: Optional[str] = None) -> Dict[str, List[Record]]:
    """Load a Dassl ``{"train": [Datum...], ...}`` pickle into lists of :class:`Record`.

    With ``dataset_dir`` and ``folder`` the recorded absolute paths are rebased onto the current
    dataset folder (PROTOCOL 2.3). Raises ``ValueError`` naming the file when it is not such a pickle.
    """
    pkl = Path(pkl)
    try:
        with open(pkl, "rb") as f:
            data = _DasslUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(f"{pkl}: not a readable Dassl split pickle ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{pkl}: expected a dict of split lists, found {type(data).__name__}")
    out: Dict[str, List[Record]] = {}
    for key, items in data.items():
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{pkl}: split {key!r} is {type(items).__name__}, expected a list")
        records = []
        for i, item in enumerate(items):
            state = getattr(item, "__dict__", None)
            if not state or "_impath" not in state or "_label" not in state:
                raise ValueError(f"{pkl}: item {i} of {key!r} is not a Dassl Datum")
            path = str(state["_impath"])
            if dataset_dir is not None and folder:
                path = rebase_path(path, dataset_dir, folder)
            records.append(Record(path, int(state["_label"]), str(state.get("_classname", ""))))
        out[str(key)] = records
    return out


def check_files(records: Sequence[Record], dataset: str, skip_missing: bool = False,
                what: str = "images") -> List[Record]:
    """Records whose file exists. Missing files raise ``FileNotFoundError`` (count and first
    paths) unless ``skip_missing``, which drops them with a warning."""
    missing = [r for r in records if not os.path.isfile(r.path)]
    if not missing:
        return list(records)
    first = ", ".join(r.path for r in missing[:3])
    message = (f"{dataset}: {len(missing)} of {len(records)} {what} are missing "
               f"(first: {first})")
    if not skip_missing:
        raise FileNotFoundError(message + "; check --root or pass skip_missing=True "
                                          "(--skip-missing) to drop them")
    logger.warning("%s; dropping them", message)
    gone = {id(r) for r in missing}
    return [r for r in records if id(r) not in gone]
