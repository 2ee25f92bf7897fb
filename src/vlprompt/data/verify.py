"""Unreadable images: find them all before training, and name the file when one is met later.

A truncated JPEG or an HTML page saved as ``.jpg`` otherwise surfaces as a Pillow traceback from
a DataLoader worker hours into a run. ``verify_images`` decodes every image up front (threads:
Pillow releases the GIL while decoding); ``BadImageError`` is the one-line error raised by
``ImageDataset`` for a file that cannot be decoded.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageFile, UnidentifiedImageError

from .records import Record

logger = logging.getLogger(__name__)

#: what decoding an image can raise for a bad file (Pillow plugins use all of these)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_MESSAGE = re.compile(r"(?:^|\n)(?:[\w.]*BadImageError: )?(?P<path>[^\n]+?): cannot decode "
                      r"image \((?P<reason>[^\n]*)\); run 'vlprompt datasets check "
                      r"(?P<dataset>[^\n]+?) \.\.\.' ")


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def describe_error(err: BaseException) -> str:
    """A short one-line reason for a decoding failure (without the path, which is named apart)."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, UnidentifiedImageError):
        return "not an image file Pillow can read"
    text = _flat(str(err))
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class BadImageError(ValueError):
    """An image that cannot be decoded, as one line naming the file and the fix.

    ``BadImageError(path, reason, dataset)``; a single string (how DataLoader workers and pickle
    rebuild an exception: the message plus the worker's traceback) is parsed back into
    ``path``/``reason``, so the message stays one line wherever it is caught; the string given
    is kept in ``details``.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], reason: Optional[str] = None,
                 dataset: Optional[str] = None):
        self.details = ""
        if reason is None:
            self.details = str(path)
            self.path, self.reason, self.dataset = self._parse(self.details)
        else:
            self.path, self.reason, self.dataset = _flat(os.fspath(path)), _flat(reason), dataset
        super().__init__(self.one_line() if self.path else self.details)

    @staticmethod
    def _parse(message: str) -> Tuple[str, str, Optional[str]]:
        matches = list(_MESSAGE.finditer(message))
        if not matches:
            return "", _flat(message), None
        m = matches[-1]
        dataset = m.group("dataset")
        return m.group("path"), m.group("reason"), None if dataset == "<dataset>" else dataset

    def one_line(self) -> str:
        """The message without any traceback a DataLoader worker added."""
        if not self.path:
            return self.reason
        return (f"{self.path}: cannot decode image ({self.reason}); run 'vlprompt datasets check "
                f"{self.dataset or '<dataset>'} ...' to list every bad file, or pass "
                f"--skip-missing to skip unreadable images")


@dataclass(frozen=True)
class BadImage:
    """Stands in for an image that could not be decoded (``ImageDataset(skip_bad=True)``)."""

    path: str
    reason: str


def check_image(path: str) -> Optional[str]:
    """None if ``path`` decodes completely, else the one-line reason it does not."""
    try:
        with Image.open(path) as img:
            img.load()
            img.convert("RGB")
    except DECODE_ERRORS as err:
        return describe_error(err)
    return None


def _unique_paths(records: Iterable[Union[Record, str]]) -> List[str]:
    paths = (r.path if isinstance(r, Record) else os.fspath(r) for r in records)
    return list(dict.fromkeys(paths))


def verify_images(records: Sequence[Union[Record, str]], workers: Optional[int] = None,
                  progress: bool = True) -> List[Tuple[str, str]]:
    """``(path, reason)`` of every record whose image is missing, not an image or truncated, in
    record order (each path once). Decodes every image fully, in ``workers`` threads (default:
    up to 8); the tqdm bar shows on a terminal only, never with ``progress=False``."""
    from tqdm import tqdm

    paths = _unique_paths(records)
    if not paths:
        return []
    from ..runtime import usable_cpus

    workers = workers or min(8, usable_cpus())
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    if truncated_ok:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; checking for truncated "
                       "images regardless")
    # process-wide: image loads in other threads during the check are strict too (then restored)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(tqdm(pool.map(check_image, paths), total=len(paths), unit="img",
                                desc="checking images", disable=None if progress else True,
                                leave=False))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]
