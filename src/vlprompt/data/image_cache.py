"""A decoded-and-resized uint8 copy of each image on local disk (``train.image_cache``).

Decoding a 500x375 JPEG costs more than the whole augmentation of a 224-pixel image, and a
photo is decoded again in every epoch. With the cache, an image is decoded once, its shorter side
brought down to ``size`` (``transforms.resize_shorter``: bicubic, aspect kept; images already
smaller are stored as they are, never upsampled) and stored as raw RGB bytes; later epochs read
those bytes and augment a small array.

Exactness (a named option, because training results change):

- Test transform (resize shorter side, centre crop) with ``size == image_size``: bit-identical
  to the uncached pipeline, since the stored image is exactly the resize the transform would do
  and its own resize is then the identity (``tests/data/test_image_cache.py``).
- Train transform (RandomResizedCrop): an approximation. The crop box is drawn in the original
  image's coordinates with the same random draws as without the cache (the entry stores the
  original width and height), then that region is resampled from the smaller stored image
  (``transforms.crop_resized``), so crop position, area and aspect are the same and only the
  pixels differ: small crops are upsampled from fewer pixels (softer). Measured with
  ``benchmarks/data_pipeline.py`` (photo-like q90 JPEGs, same seeds, ``size = image_size =
  224``), mean / max |difference| of normalised values vs the uncached pipeline: 0.0175 / 0.93
  on 500x375 and 0.0116 / 1.0 on 1600x1200 photos (values span about 4; times the CLIP std of
  0.27 that is 0.005 and 0.003 in [0, 1] units, about 1 of 255 grey levels). Drawing the crop
  in the cached image's own pixel grid instead would move it (0.42 in the tests).

Speed (same benchmark, 2 shared CPU cores, noisy): warm passes give 1.1-2x the images/s of
plain decoding for the train transform and 2.6-4.4x for the test transform on 500x375 photos,
7.5-10x and 16-36x on 1600x1200; the cold pass that fills the cache runs at 0.5-1x (the writes).

Storage: one file per image, ``<root>/<key[:2]>/<key>.rgb`` with ``key`` the SHA-256 of (absolute
path, file size, mtime_ns, size, draft), 256 shard folders. One file per image needs no index and
no lock: DataLoader workers of one or several runs read and write entries independently, a write
is a unique temporary file moved into place with ``os.replace`` (readers see the old entry or the
new, never a partial one), the last of two writers of the same key wins with equal content, and
an edited image (new size or mtime) gets a new key. Raw bytes rather than ``.npy`` because an
entry must also hold the original size (for the crop box) and a CRC-32: a 28-byte header (magic,
original width and height, stored width and height, CRC-32 of the pixels). A truncated, foreign
or bit-flipped entry fails the magic, length, shape or CRC check and is decoded again and
rewritten, never raising. Entries are not fsynced: a power cut can at worst leave an entry that
fails these checks, and fsync would cost about as much as the decode it saves. Nothing is
evicted: delete the folder to reclaim space; entries of edited images stay until then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Tuple, Union

from PIL import Image

from ..fileio import make_temp_file, remove_stale_temporaries
from .transforms import ImageInput, decode_image, resize_shorter

logger = logging.getLogger(__name__)

_MAGIC = b"VLPIMG01"
# magic, original width, original height, stored width, stored height, CRC-32 of the pixels
_HEADER = struct.Struct("<8s5I")
_KEY_VERSION = "1"
ENTRY_SUFFIX = ".rgb"


def default_cache_root() -> Path:
    """``$VLPROMPT_IMAGE_CACHE``, else ``image-cache`` in vlprompt's cache folder
    (``$VLPROMPT_CACHE`` or ``~/.cache/vlprompt``)."""
    env = os.environ.get("VLPROMPT_IMAGE_CACHE")
    if env:
        return Path(env).expanduser()
    from ..clip.load import cache_dir

    return cache_dir() / "image-cache"


def shrink_shorter(img: Image.Image, size: int) -> Image.Image:
    """``resize_shorter(img, size)`` when the shorter side is above ``size``, else ``img``: the
    test transform's own resize then reproduces the uncached pixels for every image size."""
    return resize_shorter(img, size) if min(img.size) > size else img


def encode_entry(img: Image.Image, full_size: Tuple[int, int]) -> bytes:
    """Header + raw RGB bytes (``[H, W, 3]`` uint8, row-major) of a stored image."""
    pixels = img.tobytes()
    return _HEADER.pack(_MAGIC, *full_size, *img.size, zlib.crc32(pixels)) + pixels


def decode_entry(data: bytes, size: int) -> Optional[Tuple[Image.Image, Tuple[int, int]]]:
    """(stored image, original (width, height)) of an entry, or None when it is truncated,
    foreign or corrupt, or does not have the shape a cache of ``size`` stores."""
    if len(data) < _HEADER.size:
        return None
    magic, full_w, full_h, width, height, crc = _HEADER.unpack_from(data)
    pixels = memoryview(data)[_HEADER.size:]
    if (magic != _MAGIC or width < 1 or height < 1 or len(pixels) != width * height * 3
            or min(width, height) != min(size, full_w, full_h) or zlib.crc32(pixels) != crc):
        return None
    return Image.frombytes("RGB", (width, height), pixels), (full_w, full_h)


class ImageCache:
    """``cache.load(path) -> (image, original size)``: the image with its shorter side at most
    ``size``, decoded from the file once and read from ``root`` afterwards.

    ``draft`` decodes JPEGs in draft mode (``train.fast_decode``) before the resize; it is part of
    the key. The object holds only a folder and two settings, so it pickles into DataLoader
    workers. Write failures (full or read-only disk) are logged once and training goes on.
    """

    def __init__(self, size: int, root: Union[str, os.PathLike, None] = None,
                 draft: bool = False):
        if size < 1:
            raise ValueError(f"image cache size must be >= 1, got {size}")
        self.size, self.draft = int(size), bool(draft)
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self._warned = False

    def entry_path(self, path: Union[str, os.PathLike], stat: Optional[os.stat_result] = None
                   ) -> Path:
        """Where the entry of image file ``path`` in its current version lives."""
        absolute = os.path.abspath(os.fspath(path))
        stat = stat if stat is not None else os.stat(absolute)
        key_text = "\0".join((_KEY_VERSION, absolute, str(stat.st_size), str(stat.st_mtime_ns),
                              str(self.size), str(int(self.draft))))
        key = hashlib.sha256(key_text.encode("utf-8", "surrogateescape")).hexdigest()
        return self.root / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def load(self, source: ImageInput) -> Tuple[Image.Image, Tuple[int, int]]:
        """(RGB image, shorter side <= ``size``; the original (width, height)). PIL images
        (nothing to key on) are shrunk in memory. Raises what decoding the file raises."""
        if isinstance(source, Image.Image):
            img, full_size = decode_image(source)
            return shrink_shorter(img, self.size), full_size
        entry = self.entry_path(source)
        cached = self._read(entry)
        if cached is not None:
            return cached
        img, full_size = decode_image(source, self.size if self.draft else None)
        img = shrink_shorter(img, self.size)
        self._write(entry, encode_entry(img, full_size))
        return img, full_size

    def _read(self, entry: Path) -> Optional[Tuple[Image.Image, Tuple[int, int]]]:
        try:
            data = entry.read_bytes()
        except OSError:  # absent (first epoch), unreadable: decode instead
            return None
        return decode_entry(data, self.size)

    def _write(self, entry: Path, data: bytes) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_file(entry)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, entry)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        except OSError as err:
            if not self._warned:
                self._warned = True
                logger.warning("image cache: cannot write to %s (%s); decoding uncached",
                               self.root, err)

    def remove_stale_temporaries(self, min_age_s: float = 3600.0) -> List[Path]:
        """Remove temporaries a killed writer left (older than ``min_age_s``) and return them."""
        if not self.root.is_dir():
            return []
        removed: List[Path] = []
        for shard in sorted(p for p in self.root.iterdir() if p.is_dir()):
            removed += remove_stale_temporaries(shard, min_age_s=min_age_s)
        return removed

    def __getstate__(self) -> dict:
        return {"size": self.size, "draft": self.draft, "root": str(self.root)}

    def __setstate__(self, state: dict) -> None:
        self.size, self.draft = state["size"], state["draft"]
        self.root, self._warned = Path(state["root"]), False

    def __repr__(self) -> str:
        return f"ImageCache(size={self.size}, root={str(self.root)!r}, draft={self.draft})"


def optional_image_cache(enabled: bool, size: int, draft: bool = False,
                         root: Union[str, os.PathLike, None] = None) -> Optional[ImageCache]:
    """The cache a run's transforms share when ``train.image_cache`` is on, else None."""
    return ImageCache(size, root=root, draft=draft) if enabled else None
