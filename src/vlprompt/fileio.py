"""Atomic, durable file writes: a crash, a power cut or a full disk never leaves a half-written
checkpoint, result, config, split file or cached model behind. One mechanism for every writer in
vlprompt.

Files are created with mode ``0o666`` and folders with ``0o777``, so the kernel applies the
process umask (and any default ACL) exactly as for ``open(path, "w")``: under umask 022 outputs
are 0644, readable by the group on shared lab machines (``tempfile.mkstemp`` would make them
0600). Nothing reads or changes the umask, which is process-wide: ``os.umask(0)`` followed by a
restore would race with other threads creating files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Union

PathLike = Union[str, os.PathLike]

_TMP_SUFFIX = ".tmp"
_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
               | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_CLOEXEC", 0))
# ".<name>.<8 random characters>.tmp": this module's temporaries (and mkstemp's, used before)
_STALE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# fsync of a folder is refused by some file systems; the data itself is synced already
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"


def make_temp_file(path: PathLike) -> Path:
    """Create an empty, unique ``.<name>.<random>.tmp`` beside ``path``, mode ``0o666 & ~umask``."""
    path = Path(path)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, _OPEN_FLAGS, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def make_temp_dir(parent: PathLike, prefix: str) -> Path:
    """Create a unique ``<prefix><random>`` folder in ``parent``, mode ``0o777 & ~umask``
    (``tempfile.mkdtemp`` makes 0700 folders, unreadable by the group once moved into place)."""
    parent = Path(parent)
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"could not create a temporary folder in {parent}")


def fsync_file(path: PathLike) -> None:
    """Flush ``path``'s data to the disk (``fsync``), so a power cut cannot lose it."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows needs write access
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be
    opened (Windows) or synced (some network file systems)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a unique temporary file beside ``path``, fsync it, move it into
    place with ``os.replace`` and fsync the folder; the temporary file is removed if ``write``
    fails, and the old ``path`` (if any) is kept. ``write`` must close what it opens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(path)
    try:
        write(str(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """JSON with ``indent=2`` and a final newline unless ``dumps_kwargs`` say otherwise."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs) + "\n")


def remove_stale_temporaries(folder: PathLike, *, min_age_s: float = 0.0) -> List[Path]:
    """Remove the ``.<name>.<random>.tmp`` files a crash between create and rename left in
    ``folder`` (not recursive) and return them. Real files are kept. A write in progress in the
    same folder would lose its temporary: call this when no other writer is active, or pass
    ``min_age_s`` to spare files modified in the last ``min_age_s`` seconds."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not _STALE.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if min_age_s > 0 and now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # removed meanwhile (its writer renamed it into place)
            continue
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed), waiting for it: processes
    sharing a cache (downloads, conversions) take turns instead of doing the work twice. The OS
    releases it if the holder dies. Without ``fcntl`` (Windows) it does not lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
