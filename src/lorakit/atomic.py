"""Atomic writes: build a folder or file next to its destination, then swap it in with one rename.

A process killed at any point leaves either the old content or the new one at the destination, never a mix.
On Linux an existing folder is exchanged with `renameat2(RENAME_EXCHANGE)`; elsewhere a two-step rename is used.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import DiskFullError, OutputError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def atomic_dir(path: Path, write: Callable[[Path], None], *, keep_others: bool = False) -> None:
    """Create or replace folder `path` with what `write(tmp)` puts into a fresh temporary folder.

    With `keep_others`, files already in `path` that `write` did not produce are carried over.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if keep_others and path.is_dir():
            for entry in path.iterdir():
                if not (tmp / entry.name).exists() and not entry.name.startswith("."):
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        _fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "d")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, path)
        raise


def atomic_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise


_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _raise_if_disk_full(e: BaseException, path: Path) -> None:
    """Re-raise a full-disk failure (an OSError ENOSPC/EDQUOT, or a library's wrapped form) as one clear line."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, DiskFullError) or not (full or any(s in str(e) for s in _DISK_FULL_TEXT)):
        return
    raise DiskFullError(
        errno.ENOSPC, f"{path}: no space left on device while writing; the previous content is unchanged"
    ) from e


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
