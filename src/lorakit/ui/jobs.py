"""Evaluation and export jobs of the playground: `lorakit` subprocesses whose last stdout line is their JSON
result (an evaluation), or whose output file is their result (a merge or GGUF export).

    jobs = Jobs(workspace)                # lists the jobs of earlier sessions too
    job_id = jobs.start("eval", ["eval", "--task", "dates", ...], summary={"adapter": "t1", "data": "task:dates"})
    jobs.state(job_id)                    # running, then done (with its result), failed (with why) or cancelled
    jobs.cancel(job_id)                   # Ctrl-C for its process group; killed after CANCEL_GRACE_S
    jobs.delete(job_id)                   # its folder goes (409 while it runs)

Each job has a folder, jobs/<id>/: job.json (what it runs, for what, when it started), process.json (which
process runs it), its stdout and log, and exit.json once it has ended (its exit status, whether it was
cancelled, when). A job's state is read back from that folder, so the jobs of an earlier session of the UI are
listed with their results. A job of an earlier UI that died while it ran, and that still runs, is adopted
(`lorakit.ui.procs.adopt`): it is running here, can be cancelled, and its end is recorded (its exit status is
not ours to read: it counts as done when its result is there). One with no exit.json whose process is gone
shows as interrupted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_file, mtime_of
from lorakit.serve import protocol as P
from lorakit.ui.procs import (
    Adopted,
    adopt,
    child_env,
    error_line,
    interrupt,
    reap,
    record_process,
    stop_all,
    tail,
)
from lorakit.ui.workspace import Workspace, discard

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 10.0
"""How long a cancelled job has to unwind (remove its temporaries) after Ctrl-C before it is killed."""
RECORD, PROCESS, EXIT = "job.json", "process.json", "exit.json"
"""A job's record, written before it starts; its process's identity, once started; its end, once it has exited."""


@dataclass
class Job:
    id: str
    kind: str
    """eval or export; "unknown" for a folder of jobs/ without a readable record (an older lorakit's)."""
    folder: Path
    command: str
    """The lorakit subcommand it runs (its errors read "lorakit <command>: error: ...")."""
    started: float
    summary: dict[str, Any] = field(default_factory=dict)
    """What the page shows of it: the adapter, the data, the output (workspace paths and names)."""
    result_file: Path | None = None
    """The job's result is this file (an export); None: the last stdout line, as JSON (an evaluation)."""
    proc: subprocess.Popen | Adopted | None = None
    """None: the job was started by an earlier session of the UI, and its process is gone."""
    cancelled: bool = False
    returncode: int | None = None
    """Its exit status once exit.json records it."""
    ended: float | None = None

    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc is not None else self.returncode


class Jobs:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        root = ws.root / "jobs"
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith("."):
                job = self._read(folder)
                self.jobs[job.id] = job
                if isinstance(job.proc, Adopted):  # watched as our own are, once listed
                    threading.Thread(target=self._watch, args=(job,), daemon=True).start()

    def start(
        self,
        kind: str,
        argv: list[str],
        *,
        result_file: Path | None = None,
        summary: dict[str, Any] | None = None,
    ) -> str:
        """Record the job in a new jobs/<id>/ and start `lorakit ARGV` there; its id."""
        with self.lock:
            job_id, folder = _new_folder(self.ws.root / "jobs", kind)
            job = Job(job_id, kind, folder, argv[0], time.time(), summary or {}, result_file)
            record = {
                "id": job_id,
                "kind": kind,
                "command": argv[0],
                "argv": argv,
                "started": job.started,
                "summary": job.summary,
                "result_file": None
                if result_file is None
                else result_file.relative_to(self.ws.root).as_posix(),
            }
            atomic_file(folder / RECORD, json.dumps(record, indent=1).encode())
            with (folder / "stdout.txt").open("wb") as out, (folder / "output.log").open("wb") as err:
                job.proc = subprocess.Popen(
                    [sys.executable, "-m", "lorakit", *argv],
                    cwd=self.ws.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=child_env(),
                    start_new_session=True,
                )
            record_process(folder / PROCESS, job.proc)
            self.jobs[job_id] = job
        threading.Thread(target=self._watch, args=(job,), daemon=True).start()
        return job_id

    # -- reading -----------------------------------------------------------------------------------------------

    def state(self, job_id: str) -> dict[str, Any]:
        return self._state(self._get(job_id), with_log=True)

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every job (of `kind`), newest first, without their logs."""
        jobs = sorted(self.jobs.values(), key=lambda j: (j.started, j.id), reverse=True)
        return [self._state(j, with_log=False) for j in jobs if kind in (None, j.kind)]

    def _get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise P.APIError(404, f"no job {job_id!r}", "not_found", "id")
        return job

    def _state(self, job: Job, *, with_log: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": job.id,
            "kind": job.kind,
            "started": job.started,
            "ended": job.ended,
            "summary": job.summary,
            "status": "running",
            "result": None,
            "error": None,
        }
        if with_log:
            out["log_tail"] = tail(job.folder / "output.log", 8)
        rc = job.exit_status()
        if job.kind == "unknown":
            out["status"] = "unknown"
        elif rc is None and job.proc is None:
            out["status"], out["error"] = (
                "interrupted",
                "the UI stopped while this job ran: its result is unknown",
            )
        elif rc is None:
            out["status"] = "cancelling" if job.cancelled else "running"
        elif job.cancelled and rc != 0:  # rc 0: it had finished before the signal came
            out["status"] = "cancelled"
        elif rc != 0:
            out["status"] = "failed"
            out["error"] = error_line(job.folder / "output.log", job.command) or f"exit status {rc}"
        elif job.result_file is not None:
            path = job.result_file.relative_to(self.ws.root).as_posix()
            out["status"], out["result"] = "done", {"path": path, "exists": job.result_file.exists()}
        else:
            try:
                out["status"], out["result"] = "done", _printed_result(job.folder)
            except (OSError, ValueError):
                out["status"], out["error"] = "failed", "the job printed no result"
        return out

    def _read(self, folder: Path) -> Job:
        """The job recorded in `folder`: kind "unknown" when its record is missing or not one of ours."""
        try:
            rec = json.loads((folder / RECORD).read_text())
            result = rec["result_file"]
            job = Job(
                folder.name,
                _typed(rec["kind"], str),
                folder,
                _typed(rec["command"], str),
                float(rec["started"]),
                _typed(rec["summary"], dict),
                None if result is None else self.ws.path(result, must_exist=False),
            )
        except (OSError, ValueError, TypeError, KeyError, P.APIError):
            return Job(folder.name, "unknown", folder, "", mtime_of(folder))
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            end = json.loads((folder / EXIT).read_text())
            job.returncode, job.cancelled = _typed(end["returncode"], int), bool(end["cancelled"])
            job.ended = float(end["ended"])
        if not (folder / EXIT).exists():
            job.proc = adopt(folder / PROCESS, judge=lambda: 0 if self._has_result(job) else 1)
            if job.proc is not None:
                log.info("job %s: adopted its process %d, started by an earlier UI", job.id, job.proc.pid)
        return job

    def _has_result(self, job: Job) -> bool:
        """Whether an ended job left its result: its output file, or a JSON object as its last stdout line."""
        if job.result_file is not None:
            return job.result_file.exists()
        try:
            return isinstance(_printed_result(job.folder), dict)
        except (OSError, ValueError):
            return False

    # -- cancelling, deleting, ending --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ctrl-C for the job's process group: it stops where it is and removes its temporaries (an export's
        output is written atomically, so it is either whole or absent); killed if it has not exited after
        `CANCEL_GRACE_S`. A job that is not running in this session answers 409."""
        with self.lock:
            job = self._get(job_id)
            if job.proc is None or job.proc.poll() is not None or job.cancelled:
                raise P.APIError(409, f"job {job_id!r} is not running", "not_running", "id")
            job.cancelled = True
            interrupt(job.proc)
        threading.Thread(target=reap, args=(job.proc, CANCEL_GRACE_S), daemon=True).start()
        return self.state(job_id)

    def delete(self, job_id: str) -> str:
        """Remove a job that has ended, and its folder (409 while it runs: cancel it first)."""
        with self.lock:
            job = self._get(job_id)
            if job.proc is not None and job.proc.poll() is None:
                raise P.APIError(409, f"job {job_id!r} is running: cancel it first", "running", "id")
            if job.folder.exists():
                discard(job.folder)
            del self.jobs[job_id]
        return job_id

    def _watch(self, job: Job) -> None:
        assert job.proc is not None
        job.proc.wait()
        self._record_end(job)

    def _record_end(self, job: Job) -> None:
        """Write the ended job's exit.json (once; not for a job deleted meanwhile)."""
        with self.lock:
            if job.returncode is not None or self.jobs.get(job.id) is not job or job.proc is None:
                return
            job.returncode, job.ended = job.proc.wait(), time.time()
            end = {"returncode": job.returncode, "cancelled": job.cancelled, "ended": job.ended}
            if isinstance(job.proc, Adopted):
                end["adopted"] = True  # its exit status is judged from its result
            try:
                atomic_file(job.folder / EXIT, json.dumps(end).encode())
            except OSError as e:
                log.warning("job %s: could not record its end: %s", job.id, e)

    def shutdown(self) -> None:
        """Cancel every running job and wait for them (each gets `CANCEL_GRACE_S`, then is killed)."""
        live = [job for job in self.jobs.values() if job.proc is not None and job.proc.poll() is None]
        for job in live:
            job.cancelled = True
        stop_all([job.proc for job in live], CANCEL_GRACE_S)
        for (
            job
        ) in self.jobs.values():  # the watchers are daemon threads: the process may end before they write
            if job.proc is not None:
                self._record_end(job)


def _printed_result(folder: Path) -> Any:
    """An evaluation's result: the JSON value of the last line it printed. OSError or ValueError if there is none."""
    lines = (folder / "stdout.txt").read_text().strip().splitlines()
    if not lines:
        raise ValueError("no output")
    return json.loads(lines[-1])


def _new_folder(root: Path, kind: str) -> tuple[str, Path]:
    """A new, unused jobs/<kind>-<unix time>-<n>/ (ids of earlier sessions stay unique)."""
    now = int(time.time())
    for n in itertools.count(1):
        job_id = f"{kind}-{now}-{n}"
        try:
            (root / job_id).mkdir(parents=True)
        except FileExistsError:
            continue
        return job_id, root / job_id
    raise AssertionError("unreachable")


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


__all__ = ["CANCEL_GRACE_S", "EXIT", "PROCESS", "RECORD", "Job", "Jobs"]
