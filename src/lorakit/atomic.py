"""Atomic writes: build a folder or file next to its destination, then swap it in with one rename.

A process killed at any point leaves either the old content or the new one at the destination, never a mix.
On Linux an existing folder is exchanged with `renameat2(RENAME_EXCHANGE)`; elsewhere a two-step rename is used.

A kill does leave the temporary behind (`.NAME.tmp-PID@HOST-XXXX`, up to an adapter's size). The next write to
the same destination removes those whose process is gone: same host and the pid is not alive, or older than
`STALE_AFTER_S` (another host, a reused pid, or a name without a pid from an older lorakit). A temporary that
a live process is writing right now is left alone.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import DiskFullError, OutputError

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
STALE_AFTER_S = 24 * 3600
"""A temporary whose writer cannot be checked (other host, no pid in its name) is stale after this long."""
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def temp_prefix(name: str, pid: int | None = None, kind: str = "tmp") -> str:
    """The prefix of a temporary for destination `name`, written by process `pid` (default: this one)."""
    return f".{name}.{kind}-{os.getpid() if pid is None else pid}@{_HOST}-"


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove the temporaries that killed writers left in `parent` for destination `name` (a glob: "step-*")."""
    pattern = re.compile(rf"^\.({_glob_regex(name)})\.(tmp|old)-(?:(\d+)@([A-Za-z0-9]+)-)?.+$")
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or not _stale(entry, m[3], m[4]):
            continue
        log.info("removing %s, left by an interrupted write", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _glob_regex(name: str) -> str:
    return ".*".join(re.escape(part) for part in name.split("*"))


def _stale(entry: Path, pid: str | None, host: str | None) -> bool:
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    if pid is None or host != _HOST:
        return False  # no way to ask whether its writer lives: wait until it is old
    return not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists, owned by someone else (OverflowError: not a pid at all, but err on keeping it)
    return True


def atomic_dir(path: Path, write: Callable[[Path], None], *, keep_others: bool = False) -> None:
    """Create or replace folder `path` with what `write(tmp)` puts into a fresh temporary folder.

    With `keep_others`, files already in `path` that `write` did not produce are carried over. Without it, an
    existing folder is replaced only if it is empty or shares a name with what `write` produced (an earlier
    output of the same kind, whose stale files then go); a folder of other things (`--out ~/models`) is refused
    with an OutputError, before anything in it changes.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    try:
        write(tmp)
        if not keep_others and path.is_dir():
            _refuse_foreign(path, tmp)
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
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name, kind="old"), dir=path.parent))
            os.rename(path, old / "d")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, path)
        raise


def _refuse_foreign(path: Path, new: Path) -> None:
    """OutputError if replacing `path` by `new` would delete a folder that is not an earlier output like it."""
    old = {e.name for e in path.iterdir()}
    if old and not old & {e.name for e in new.iterdir()}:
        shown = ", ".join(sorted(old)[:3]) + (", ..." if len(old) > 3 else "")
        raise OutputError(
            f"{path}: exists and holds other files ({shown}), which writing here would delete; "
            "choose a new or empty folder"
        )


def atomic_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create or replace file `path` with what `write(tmp)` writes to a temporary file beside it (fsynced, then
    renamed over `path`). On any error the temporary goes and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise


_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def tree_size(path: Path) -> int:
    """Bytes of a file, or of the regular files in a folder. Links are never followed (what they point at is not
    this tree's): a link alone counts its own few bytes, a link inside a folder nothing. What vanishes or cannot
    be read meanwhile counts 0 (a listing beside a writer or a deleter)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    # os.walk follows no link to a folder, and skips folders it cannot read
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def mtime_of(path: Path) -> float:
    """The last change of `path` itself (a link's, not its target's); 0.0 when it is gone or unreadable."""
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


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
