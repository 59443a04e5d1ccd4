"""The playground's child processes: their environment, their logs' last lines and one-line errors, Ctrl-C for
a process group (as in a terminal: the child and anything it started) and killing one that does not stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


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


__all__ = ["child_env", "error_line", "interrupt", "reap", "stop_all", "tail"]
