"""Reading an adapter folder from under `--adapter-root` so that no symlink, and no race, lets a file from outside in.

    with private_copy(root, "fr") as (real, copy):    # checked copies of root/fr's adapter files
        bank.load("fr", copy, source=real)

Checking a path and opening it later leaves a window (a symlink swapped in between), and an adapter's files are
read several times by the loaders. So every file is opened once, and what was opened is checked: the real path of
the open descriptor (`/proc/self/fd/N`; elsewhere, the inode of the descriptor against that of the resolved
path) must lie inside the root's real path, and it must be a regular file (a FIFO or a device is refused: they are
opened non-blocking, so a FIFO cannot hang the server). Its bytes are copied, from that descriptor, into a
private temporary folder (mode 0700) that the loaders then read as often as they like. Symlinks are followed, so
a link to a file elsewhere inside the root is fine; the folder itself is opened and checked the same way, and its
files are opened relative to that descriptor. Hard links are not symlinks: a hard link inside the root to a file
outside it needs write access to the root, which the operator controls.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit.formats import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)
"""What the loaders read from an adapter folder (a pickle is copied only to be refused with its own message)."""
_PROC_FD = Path("/proc/self/fd")


class PathRefused(Exception):
    """The path, or a file in it, is outside the root (HTTP 403)."""


class PathUnreadable(Exception):
    """The path cannot be opened as an adapter folder: missing, not a folder, a FIFO, a name too long (HTTP 400)."""


@contextlib.contextmanager
def private_copy(root: Path, lora_path: str) -> Iterator[tuple[Path, Path]]:
    """(the folder's real path, a private copy of its adapter files), the copy removed at the end.

    `lora_path` is relative to `root` or absolute. Raises PathRefused or PathUnreadable naming `lora_path`."""
    copy = Path(tempfile.mkdtemp(prefix="lorakit-adapter-"))
    try:
        real = _copy_into(root, lora_path, copy)
        yield real, copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _copy_into(root: Path, lora_path: str, dest: Path) -> Path:
    real_root = os.path.realpath(root)
    folder = Path(lora_path) if Path(lora_path).is_absolute() else Path(root) / lora_path
    dir_fd = _open(str(folder), os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK, lora_path, None)
    try:
        real_dir = _opened_inside(dir_fd, str(folder), real_root, lora_path)
        for name in ADAPTER_FILES:
            shown = f"{lora_path.rstrip('/')}/{name}"
            try:
                fd = _open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, shown, dir_fd)
            except FileNotFoundError:
                continue  # the loader names what is missing
            try:
                _opened_inside(fd, os.path.join(real_dir, name), real_root, shown)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PathUnreadable(f"lora_path {shown!r}: not a regular file")
                os.set_blocking(fd, True)
                with os.fdopen(fd, "rb", closefd=False) as src, open(dest / name, "xb") as out:
                    shutil.copyfileobj(src, out, 2**20)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return Path(real_dir)


def _open(path: str, flags: int, shown: str, dir_fd: int | None) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        if dir_fd is not None:
            raise
        raise PathUnreadable(f"lora_path {shown!r}: no such folder") from None
    except NotADirectoryError:
        raise PathUnreadable(f"lora_path {shown!r}: not a folder") from None
    except (OSError, ValueError) as e:  # ENAMETOOLONG, ELOOP, EACCES, an embedded NUL...
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PathUnreadable(f"lora_path {shown!r} cannot be opened: {why}") from None


def _opened_inside(fd: int, resolved_guess: str, real_root: str, shown: str) -> str:
    """The real path of what `fd` is open on; PathRefused unless it lies inside `real_root`."""
    try:
        real = os.readlink(_PROC_FD / str(fd))
    except OSError:  # no /proc: the descriptor must be the very file its resolved path names now
        real = os.path.realpath(resolved_guess)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(real))
        except OSError:
            same = False
        if not same:
            raise PathRefused(f"lora_path {shown!r} refused: it changed while it was being opened") from None
    if not _within(real, real_root):
        raise PathRefused(
            f"lora_path {shown!r} refused: it is outside --adapter-root (it resolves elsewhere)"
        )
    return real


def _within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives, or a relative "(deleted)"-style name
        return False


__all__ = ["ADAPTER_FILES", "PathRefused", "PathUnreadable", "private_copy"]
