"""Stopping a run safely: Ctrl-C waits for the end of an optimizer step (`StepGuard`), and a run's checkpoints
(`RunCheckpoints`: resume at the start, save on the cadence, and what an interrupt leaves)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit.errors import TrainingError
from lorakit.readers import read_json
from lorakit.train.best import STATE_KEY as BEST_KEY
from lorakit.train.checkpoint import CheckpointError, latest_checkpoint, resume_from, save_checkpoint

log = logging.getLogger(__name__)


class RunCheckpoints:
    """A run's resumable checkpoints: resuming at the start, saving on the cadence, and what a Ctrl-C leaves."""

    def __init__(self, out_dir, model, opt, sched, cfg, method, base_model_id, rank, best=None) -> None:
        self.out_dir, self.model, self.opt, self.sched, self.cfg = out_dir, model, opt, sched, cfg
        self.method, self.base_model_id, self.rank = method, base_model_id, rank
        self.best = best if best is not None and best.active else None  # saved with each checkpoint

    def resume(self) -> int:
        """The step to start from: 0, or that of the checkpoint train.resume names ("auto": the newest intact
        one; a truncated one is skipped, with a warning)."""
        if not self.cfg.train.resume:
            return 0
        start, resumed = resume_from(
            self.cfg.train.resume,
            self.out_dir,
            self.model,
            self.opt,
            self.sched,
            base_model_id=self.base_model_id,
            method=self.method,
        )
        if resumed is not None:
            log.info("resumed from %s at step %d", resumed, start)
            if self.best is not None:
                state = read_json(resumed / "state.json", CheckpointError)
                self.best.load(resumed, state.get(BEST_KEY), self.model)
        return start

    def save(self, step: int) -> Path | None:
        """Write the checkpoint of step `step` (under FSDP2 every rank calls this; rank 0 writes)."""
        return save_checkpoint(
            self.out_dir,
            step,
            self.model,
            self.opt,
            self.sched,
            self.cfg,
            base_model_id=self.base_model_id,
            rank=self.rank,
            method=self.method,
            extra=self.best.checkpoint_files if self.best is not None else None,
        )

    @contextmanager
    def on_interrupt(self, start: int, sharded: bool) -> Iterator[StepGuard]:
        """Inside the block, Ctrl-C waits for the end of a step (`StepGuard`). Then rank 0 saves the checkpoint
        of the last complete step and raises a one-line TrainingError saying how to resume; under FSDP2 nothing
        is saved (gathering the shards needs every rank in step, and an interrupt stops them anywhere)."""
        guard = StepGuard(start)
        try:
            yield guard
        except KeyboardInterrupt:
            done = guard.done
            if guard.forced and self.rank == 0:  # a second Ctrl-C stopped a step half-way: nothing to save
                raise TrainingError(
                    f"interrupted again during step {done + 1}: no checkpoint written (the step was half done); "
                    f"{self._newest()}"
                ) from None
            if sharded and self.rank == 0:
                raise TrainingError(
                    f"interrupted after step {done} (FSDP writes no checkpoint on interrupt); {self._newest()}"
                ) from None
            if not sharded and self.rank == 0 and done > start:
                path = self.save(done)
                log.warning("interrupted: saved a resumable checkpoint to %s", path)
                raise TrainingError(
                    f"interrupted at step {done}; resume with --train.resume {path}"
                ) from None
            raise
        finally:
            guard.restore()

    def _newest(self) -> str:
        newest = latest_checkpoint(self.out_dir)
        return f"resume from {newest} with --train.resume auto" if newest else "no checkpoint yet"


class StepGuard:
    """Ctrl-C (SIGINT) during an optimizer step is held until the step is complete, then raised.

    Between `enter()` (a step begins) and `leave()` (weights, optimizer, scheduler, method hooks and the step
    counter all agree), a SIGINT only sets a flag; `leave()` raises it. So an interrupt never finds updated
    weights under the previous step number, which a checkpoint would repeat on resume. A second Ctrl-C inside a
    step stops at once (`forced`: the step is half done, no checkpoint can be trusted). Only the main thread
    handles signals; elsewhere, or when SIGINT is not Python's to handle, this does nothing."""

    def __init__(self, done: int = 0) -> None:
        self.done = done
        """Optimizer steps complete (as of the last `leave`)."""
        self.inside = self.held = self.forced = False
        self.previous = signal.getsignal(signal.SIGINT)
        self.active = threading.current_thread() is threading.main_thread() and callable(self.previous)
        if self.active:
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.inside and not self.held:
            self.held = True
            log.warning("Ctrl-C: stopping when this step is complete (Ctrl-C again to stop at once, unsaved)")
            return
        self.forced = self.inside
        self.previous(signum, frame)  # Python's default handler: raises KeyboardInterrupt

    def enter(self) -> None:
        self.inside = True

    def complete(self, done: int) -> None:
        """Step `done` is complete; a Ctrl-C is still held (until `leave`), but anything raised from here on (a
        callback's KeyboardInterrupt) finds `done` up to date."""
        self.done = done

    def leave(self, done: int) -> None:
        """Step `done` is complete (weights, optimizer, scheduler, method hooks); a held Ctrl-C is raised here."""
        self.inside, self.done = False, done
        if self.held:
            self.held = False
            self.previous(signal.SIGINT, None)

    def restore(self) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
