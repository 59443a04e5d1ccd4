"""The playground's child processes: their environment, their logs' last lines and one-line errors, Ctrl-C for
a process group (as in a terminal: the child and anything it started) and killing one that does not stop.

Children run in their own session, so a UI that dies (killed, out of memory) leaves its runs and jobs running.
Each child's identity is recorded beside its output (`record_process`), and the next UI on that workspace
adopts the ones still running (`adopt`): it shows them live, can stop them, and records their end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_file


def child_env() -> dict[str, str]:
    """A run's or job's environment: unbuffered output, and no progress bars in its log (the page draws them)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log, progress-bar redraws (\\r) collapsed to their last state."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    out = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in out if line.strip()][-lines:])


def error_line(log: Path, command: str) -> str | None:
    """The one-line error a `lorakit` command printed ("lorakit train: error: ..."), or the last line of a
    traceback."""
    lines = tail(log, 60).splitlines()
    for line in reversed(lines):
        if line.startswith(f"lorakit {command}: "):
            return line.removeprefix(f"lorakit {command}: ")
    return lines[-1] if lines else None


def interrupt(proc: subprocess.Popen) -> None:
    """SIGINT to a child's process group (children run in their own session), as Ctrl-C in its terminal."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)


def reap(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait up to `grace_s` for an interrupted child, then kill its process group."""
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Ctrl-C for each child's process group, then wait for them all, together at most `grace_s`; kill the
    groups of those still there."""
    for proc in procs:
        interrupt(proc)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        reap(proc, max(0.1, deadline - time.monotonic()))


def identity(pid: int) -> dict[str, Any] | None:
    """What tells process `pid` apart from a later one given the same pid: its start time (clock ticks after
    boot) and the boot's id. None if it is not running (or has exited and is not yet reaped), or where there is
    no /proc (not Linux: there nothing is adopted)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):  # exited
        return None
    return {"pid": pid, "start": int(fields[19]), "boot": boot}


def record_process(path: Path, proc: subprocess.Popen, **extra: Any) -> None:
    """Write the identity of a child just started to `path`, with `extra` (what its adopter needs to know)."""
    found = identity(proc.pid)
    if found is not None:
        atomic_file(path, json.dumps({**found, **extra}).encode())


class Adopted:
    """The part of `subprocess.Popen` the playground uses, for a process an earlier UI started: it is polled
    through /proc (it is not our child: its exit status is not ours to read, so `judge()` gives one once it has
    gone: 0 when its result is there). Its process group is its pid, as for every child started here."""

    def __init__(self, record: dict[str, Any], judge: Callable[[], int]) -> None:
        self.record = record
        self.pid: int = record["pid"]
        self.judge = judge
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and identity(self.pid) != _key(self.record):
            self.returncode = self.judge()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.2)
        return rc


def adopt(path: Path, judge: Callable[[], int]) -> Adopted | None:
    """The process recorded in `path` if that very process still runs (not another that got its pid), else
    None: no record, an unreadable one, or the process is gone."""
    try:
        record = json.loads(path.read_text())
        pid = record.get("pid") if isinstance(record, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
    except (OSError, ValueError):
        return None
    if identity(record["pid"]) != _key(record):
        return None
    return Adopted(record, judge)


class WorkspaceBusy(Exception):
    """Another live `lorakit ui` holds the workspace."""


def claim(path: Path) -> None:
    """Record this process as the workspace's UI in `path`; WorkspaceBusy if another process that is still running
    recorded itself there (a record of a process that is gone, a UI that was killed, is taken over). Two UIs on
    one workspace would each adopt and stop the other's runs."""
    other = adopt(path, judge=lambda: 0)
    if other is not None and other.pid != os.getpid():
        raise WorkspaceBusy(f"pid {other.pid}")
    me = identity(os.getpid())
    if me is not None:
        atomic_file(path, json.dumps(me).encode())


def release(path: Path) -> None:
    """Remove `path` if it records this process (what `claim` wrote)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def _key(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("pid", "start", "boot")}


__all__ = [
    "Adopted",
    "WorkspaceBusy",
    "adopt",
    "claim",
    "child_env",
    "error_line",
    "identity",
    "interrupt",
    "reap",
    "record_process",
    "release",
    "stop_all",
    "tail",
]
