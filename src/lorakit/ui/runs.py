"""Training runs and jobs of the playground, each in its own subprocess: the page stays responsive, and a crash
of a run (or of the Python that runs it) cannot take the UI down.

    runs = Runs(workspace, python_args=["--model.path", "/models/x"])
    runs.start("r1", {"train": {"steps": "20"}})   # `lorakit train runs/r1/request.yaml`
    runs.stop("r1")                                 # SIGINT: the step finishes, a resumable checkpoint is written
    runs.resume("r1")                               # `lorakit train runs/r1/config.yaml --train.resume auto`

A run is a `lorakit train` process writing its run folder (config.yaml, metrics.jsonl, checkpoints/, adapter/);
its state is read back from that folder, so runs from an earlier session of the UI show up too. A run whose UI
died keeps training; the next UI adopts it (`lorakit.ui.procs.adopt`, through the run's .process.json): it is
running there, with its curve, and Stop works on it. Jobs (evaluation,
merge and GGUF export) are in lorakit.ui.jobs.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.serve import protocol as P
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import SHORTHANDS, load_config, read_yaml, save_config
from lorakit.train.metrics import read_metrics
from lorakit.ui.procs import Adopted, adopt, child_env, error_line, interrupt, record_process, stop_all, tail
from lorakit.ui.workspace import Workspace, check_name, discard

LOCKED = {("train", "out_dir"), ("train", "resume")}
"""Fields the UI sets itself: the run folder is runs/<name>, resuming is the Resume button."""
PATH_FIELDS = {("data", "train_file"), ("data", "eval_file"), ("model", "path")}
"""Fields that name files: they must lie inside the workspace."""
PROCESS = ".process.json"
"""In a run folder: the identity of the process training it (and the step it started from), for adoption."""
STOP_GRACE_S = 120.0
"""How long `shutdown` waits for runs to write their checkpoint before killing them."""


@dataclass
class _Process:
    proc: subprocess.Popen | Adopted
    base_step: int
    """The last step recorded when this process started (0, or the resumed checkpoint's)."""
    stop_requested: bool = False


class Runs:
    def __init__(self, ws: Workspace, *, train_args: list[str] | None = None) -> None:
        self.ws = ws
        self.train_args = train_args or []
        """Overrides every run gets first (the UI's model, device and dtype); the form's come after."""
        self.lock = threading.Lock()
        self.live: dict[str, _Process] = {}
        for name in self.names() if (ws.root / "runs").is_dir() else []:
            adopted = adopt(self.folder(name) / PROCESS, judge=lambda: 1)  # runs read their state from files
            if adopted is not None:
                base = adopted.record.get("base_step")
                self.live[name] = _Process(adopted, base if isinstance(base, int) else 0)

    def folder(self, name: str) -> Path:
        return self.ws.root / "runs" / check_name(name, "run")

    # -- start, stop, resume -----------------------------------------------------------------------------------

    def start(self, name: Any, values: Any) -> dict[str, Any]:
        """Check the form's values as `lorakit train` would, write runs/<name>/request.yaml, start the run."""
        name = check_name(name, "run")
        folder = self.folder(name)
        overrides = self._overrides(values)
        overrides += ["--train.out_dir", str(folder)]
        try:
            cfg = load_config(None, overrides)
        except LorakitError as e:
            raise P.bad(str(e), "values") from None
        with self.lock:
            if folder.exists():
                raise P.APIError(
                    409, f"a run named {name!r} exists already: pick another name", "exists", "name"
                )
            folder.mkdir(parents=True)
            save_config(cfg, folder / "request.yaml")
            self._spawn(name, [str(folder / "request.yaml")], base_step=0)
        return self.state(name)

    def stop(self, name: str) -> dict[str, Any]:
        """SIGINT: the training loop finishes its step, writes a resumable checkpoint and exits."""
        with self.lock:
            live = self.live.get(check_name(name, "run"))
            if live is None or live.proc.poll() is not None:
                raise P.APIError(409, f"run {name!r} is not running", "not_running", "name")
            live.stop_requested = True
            interrupt(live.proc)
        return self.state(name)

    def delete(self, name: str, in_use: Callable[[Path], str | None]) -> None:
        """Delete a run's folder (checkpoints, adapter, curves): 409 while it runs or while an adapter is loaded
        from it (`in_use` gives the reason)."""
        folder = self.folder(name)
        with self.lock:
            if not (folder / "request.yaml").is_file():
                raise P.APIError(404, f"no run named {name!r}", "not_found", "name")
            if self.running(name):
                raise P.APIError(409, f"run {name!r} is running: stop it first", "running", "name")
            reason = in_use(folder)
            if reason:
                raise P.APIError(409, f"run {name!r}: {reason}", "in_use", "name")
            discard(folder)
            self.live.pop(name, None)

    def resume(self, name: str) -> dict[str, Any]:
        folder = self.folder(name)
        with self.lock:
            if not folder.is_dir():
                raise P.APIError(404, f"no run named {name!r}", "not_found", "name")
            live = self.live.get(name)
            if live is not None and live.proc.poll() is None:
                raise P.APIError(409, f"run {name!r} is running already", "running", "name")
            if not (folder / "config.yaml").is_file() or latest_checkpoint(folder) is None:
                raise P.APIError(
                    409,
                    f"run {name!r} has no checkpoint to resume from: start a new run",
                    "no_checkpoint",
                    "name",
                )
            records = [r for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
            base = records[-1]["step"] if records else 0
            self._spawn(name, [str(folder / "config.yaml"), "--train.resume", "auto"], base_step=base)
        return self.state(name)

    def _spawn(self, name: str, args: list[str], *, base_step: int) -> None:
        folder = self.folder(name)
        with (folder / "output.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lorakit", "train", *args],
                cwd=self.ws.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,  # a Ctrl-C in the UI's terminal is the UI's; it stops its runs itself
            )
        record_process(folder / PROCESS, proc, base_step=base_step)
        self.live[name] = _Process(proc, base_step)

    def _overrides(self, values: Any) -> list[str]:
        """The form's {section: {key: text}} as `--section.key text` overrides, after the UI's own."""
        if values is None:
            values = {}
        if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
            raise P.bad("'values' must map each section to {key: value}", "values")
        out = list(self.train_args)
        for section, fields in values.items():
            for key, value in fields.items():
                where = f"{section}.{key}"
                if (section, key) in LOCKED or section in SHORTHANDS:
                    raise P.bad(f"{where} is set by the playground, not the form", where)
                if not isinstance(value, (str, int, float, bool)) or value is None:
                    raise P.bad(f"{where}: send the value as text, as on the command line", where)
                text = str(value).lower() if isinstance(value, bool) else str(value)
                if (section, key) in PATH_FIELDS and text.strip():
                    text = str(self.ws.path(text, what=where))
                out += [f"--{where}", text]
        return out

    # -- state -------------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(
            d.name
            for d in (self.ws.root / "runs").iterdir()
            if d.is_dir() and not d.name.startswith(".") and (d / "request.yaml").is_file()
        )

    def state(self, name: str) -> dict[str, Any]:
        folder = self.folder(name)
        if not (folder / "request.yaml").is_file():
            raise P.APIError(404, f"no run named {name!r}", "not_found", "name")
        steps = (read_yaml(folder / "request.yaml").get("train") or {}).get("steps")
        records = [r for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
        last = records[-1] if records else None
        live = self.live.get(name)
        running = live is not None and live.proc.poll() is None
        checkpoint = latest_checkpoint(folder) is not None
        error = None
        if running:
            status = "stopping" if live.stop_requested else ("running" if last else "starting")
        elif (folder / "summary.json").is_file():
            status = "finished"
        elif live is not None and live.stop_requested:
            status = "stopped"
        elif live is None and checkpoint:
            status = "stopped"  # from an earlier session of the UI
        else:
            status = "failed"
            error = error_line(folder / "output.log", "train") or "the run ended without a summary"
        eta = None
        if running and last and live is not None and last["step"] > live.base_step and steps:
            per_step = last["elapsed_s"] / (last["step"] - live.base_step)
            eta = round(per_step * (steps - last["step"]), 1)
        return {
            "name": name,
            "status": status,
            "step": last["step"] if last else 0,
            "steps": steps,
            "eta_s": eta,
            "tokens_per_s": last.get("tokens_per_s") if last else None,
            "started": (folder / "request.yaml").stat().st_mtime,
            "has_checkpoint": checkpoint,
            "error": error,
        }

    def running(self, name: str) -> bool:
        live = self.live.get(name)
        return live is not None and live.proc.poll() is None

    def detail(self, name: str) -> dict[str, Any]:
        state = self.state(name)
        folder = self.folder(name)
        config = folder / ("config.yaml" if (folder / "config.yaml").is_file() else "request.yaml")
        summary = None
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads((folder / "summary.json").read_text())
        return {
            **state,
            "config": read_yaml(config),
            "summary": summary,
            "log_tail": tail(folder / "output.log"),
        }

    def shutdown(self) -> None:
        """Stop every live run as the Stop button does, wait for their checkpoints, kill what is left."""
        with self.lock:
            live = [p for p in self.live.values() if p.proc.poll() is None]
            for p in live:
                p.stop_requested = True
        stop_all([p.proc for p in live], STOP_GRACE_S)


__all__ = ["Runs"]
